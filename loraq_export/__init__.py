"""loraq_export: the orchestration a user touches (models, recipes, swap, checkpoints, export, CLI)."""
__version__ = "0.1.0"


def load_quantized_model(path):
    """Load a ``loraq quantize`` checkpoint as a torch model (see loraq_export.checkpoint)."""
    from loraq_export.checkpoint import load_quantized_model as _load
    return _load(path)
