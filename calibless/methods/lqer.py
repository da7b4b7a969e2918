"""LQER: the top-r SVD of the RTN error, closed form (arXiv 2402.02446)."""
from calibless.lowrank import top_r
from calibless.methods import register_method
from calibless.record import Branch, LayerRecord, QTensor


@register_method("lqer", uses_branch=True)
def fit_lqer(w, spec, seed=0):
    main = QTensor.from_float(w, spec.main.weight)
    a, b = top_r(w - main.dequantize(), spec.rank, seed=seed)
    return LayerRecord(main, spec.main, Branch.from_float(a, b, spec.branch))
