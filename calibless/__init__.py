"""calibless: data-free fitting of quantized layers. Pure tensors in, quantized tensors out."""
from calibless.formats import ActFormat, BranchFormat, FitSpec, LayerFormat, WeightFormat
from calibless.record import Branch, LayerRecord, QTensor
from calibless.methods import METHODS, fit_layer, get_method, method_options, register_method

__all__ = [
    "ActFormat", "BranchFormat", "FitSpec", "LayerFormat", "WeightFormat",
    "QTensor", "Branch", "LayerRecord",
    "METHODS", "fit_layer", "get_method", "method_options", "register_method",
]
