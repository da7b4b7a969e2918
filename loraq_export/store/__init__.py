"""Storing fitted layers: checkpoints, resumable partial runs, atomic outputs."""
