"""loraq_export: the orchestration a user touches (models, recipes, fitting, checkpoints, export, CLI).

Python API: ``quantize_(module, recipe, method=..., filter_fn=...)`` for any nn.Module,
``load_quantized_model(checkpoint)`` for a checkpoint written by ``loraq quantize``, and
``load_lora(model, file, scale=...)`` / ``unload_lora(model)`` for LoRA adapters on either.
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


def load_lora(model, path, scale=1.0, fmt="fp16"):
    """Add a LoRA adapter to a model from ``load_quantized_model`` or ``quantize_`` (see
    loraq_export.fit.lora.load_lora): it then computes what ``loraq export --lora`` exports."""
    from loraq_export.fit.lora import load_lora as _load_lora
    return _load_lora(model, path, scale, fmt)


def unload_lora(model):
    """Undo every ``load_lora`` on ``model``."""
    from loraq_export.fit.lora import unload_lora as _unload_lora
    return _unload_lora(model)
