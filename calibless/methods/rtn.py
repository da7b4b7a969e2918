"""Round-to-nearest: absmax scales, no branch. The baseline every method must beat."""
from calibless.methods import register_method
from calibless.record import QTensor, QuantizedLinear


@register_method("rtn")
def fit_rtn(w, spec, act_stats=None, seed=0):
    return QuantizedLinear(QTensor.from_float(w, spec.main.weight), spec.main)
