"""End-to-end quality against the FP model: sentence embeddings, diffusion sampling."""
