"""calibless: data-free fitting of quantized layers. Pure tensors in, quantized tensors out."""
from calibless.formats import ActFormat, BranchFormat, LayerFormat, WeightFormat
from calibless.record import Branch, QTensor, QuantizedLinear
from calibless.methods import METHODS, fit_layer, get_method, register_method

__all__ = [
    "ActFormat", "BranchFormat", "LayerFormat", "WeightFormat",
    "QTensor", "Branch", "QuantizedLinear",
    "METHODS", "fit_layer", "get_method", "register_method",
]
