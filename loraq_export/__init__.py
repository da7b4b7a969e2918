"""loraq_export: the orchestration a user touches (models, recipes, fitting, checkpoints, export, CLI).

Python API: ``quantize_(module, recipe, method=..., filter_fn=...)`` for any nn.Module, and
``load_quantized_model(checkpoint)`` for a checkpoint written by ``loraq quantize``.
"""
__version__ = "0.1.0"


def quantize_(module, recipe=None, method=None, filter_fn=None, **kw):
    """Quantize ``module``'s Linear layers in place (see loraq_export.api.quantize_)."""
    from loraq_export.api import quantize_ as _quantize
    return _quantize(module, recipe, method, filter_fn, **kw)


def load_quantized_model(path):
    """Load a ``loraq quantize`` checkpoint as a torch model (see loraq_export.store.checkpoint)."""
    from loraq_export.store.checkpoint import load_quantized_model as _load
    return _load(path)
