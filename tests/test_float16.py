"""graphs.float16.to_float16: the whole graph in float16, agreeing with the float32 graph in ONNX
Runtime to float16's precision."""
import numpy as np
import onnx
from onnx import TensorProto

from graph_fixtures import inputs, rel_l2, run, single_model
from graphs.float16 import FP16_TINY, to_float16


def _float_types(model):
    types = {i.data_type for i in model.graph.initializer if i.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)}
    types |= {vi.type.tensor_type.elem_type for vi in list(model.graph.input) + list(model.graph.output)}
    return types


def test_weight_only_graph_in_float16_agrees_with_float32():
    model = single_model(256, 128, 32, branch="fp16")  # INT4 main weight, fp16 factors, float activations
    half = to_float16(model)
    assert _float_types(half) == {TensorProto.FLOAT16}
    x = inputs(256)
    y = run(half, {"x": x["x"].astype(np.float16)})
    assert y.dtype == np.float16
    # fp16 unit roundoff 2^-11 ~ 4.9e-4 per rounding; K = 256 sums and three GEMMs stay well under 1e-2
    assert rel_l2(run(model, x), y.astype(np.float32)) < 1e-2


def test_dynamic_activation_scale_floor_stays_positive():
    model = single_model(128, 64, 16, main_act=8, branch="w8a8")
    half = to_float16(model)
    eps = [onnx.numpy_helper.to_array(i) for i in half.graph.initializer if i.name.endswith("act_scale_eps")]
    assert eps and all(e.size == 1 and e.reshape(-1)[0] == np.float16(FP16_TINY) for e in eps)  # 1e-8 would underflow to 0
    x = {"x": np.zeros((1, 4, 128), np.float16)}  # an all-zero token: 0 / floor, not 0 / 0
    assert np.isfinite(run(half, x)).all()
