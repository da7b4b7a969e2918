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


def _timestep_embedding_model():
    """y = x + [sin(t f), cos(t f)], f = exp(-ln(10000) i / 4) for i = Range(0, 4): a diffusion
    model's sinusoidal timestep embedding, with Range (no float16 in ONNX) and Sin/Cos."""
    from onnx import helper
    c = lambda name, v: helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(np.array(v, np.float32), name))  # noqa: E731
    nodes = [c("start", 0.0), c("limit", 4.0), c("delta", 1.0), c("coef", -np.log(10000.0) / 4),
             helper.make_node("Range", ["start", "limit", "delta"], ["i"]),
             helper.make_node("Mul", ["i", "coef"], ["e"]), helper.make_node("Exp", ["e"], ["f"]),
             helper.make_node("Unsqueeze", ["t", "axis1"], ["t1"]), helper.make_node("Mul", ["t1", "f"], ["arg"]),
             helper.make_node("Sin", ["arg"], ["s"]), helper.make_node("Cos", ["arg"], ["co"]),
             helper.make_node("Concat", ["s", "co"], ["emb"], axis=1), helper.make_node("Add", ["x", "emb"], ["y"])]
    graph = helper.make_graph(nodes, "temb", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8]),
                                              helper.make_tensor_value_info("t", TensorProto.FLOAT, ["b"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])],
                              [onnx.numpy_helper.from_array(np.array([1], np.int64), "axis1")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def test_sinusoidal_embedding_and_range_stay_float32():
    model = _timestep_embedding_model()
    half = to_float16(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(half.graph.input) + list(half.graph.output)}
    # x and y in float16; the timestep, read only by the embedding, stays a float32 input
    assert types == {"x": TensorProto.FLOAT16, "t": TensorProto.FLOAT, "y": TensorProto.FLOAT16}
    assert {n.op_type for n in half.graph.node} >= {"Range", "Cast"}
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    t = np.array([999.7, 3.3], np.float32)  # 999.7 in float16 is 999.5: sin(t) would move by 0.2
    y32 = run(model, {"x": x, "t": t})
    y16 = run(half, {"x": x.astype(np.float16), "t": t})
    assert y16.dtype == np.float16
    # only x, the Cast of the embedding and the Add round to float16: a few u = 4.9e-4 each
    assert np.abs(y16.astype(np.float32) - y32).max() < 4 * 2.0 ** -11 * np.abs(y32).max()


def _rms_norm_model(eps: float):
    """y = x / sqrt(mean(x^2) + eps) * w, the statistics named as a model's norm scope."""
    from onnx import helper
    nodes = [
        helper.make_node("Constant", [], ["two"], name="/model/norm/Constant", value=helper.make_tensor("", TensorProto.FLOAT, [], [2.0])),
        helper.make_node("Constant", [], ["eps"], name="/model/norm/Constant_1", value=helper.make_tensor("", TensorProto.FLOAT, [], [eps])),
        helper.make_node("Pow", ["x", "two"], ["sq"], name="/model/norm/Pow"),
        helper.make_node("ReduceMean", ["sq"], ["ms"], name="/model/norm/ReduceMean", axes=[-1], keepdims=1),
        helper.make_node("Add", ["ms", "eps"], ["mse"], name="/model/norm/Add"),
        helper.make_node("Sqrt", ["mse"], ["rms"], name="/model/norm/Sqrt"),
        helper.make_node("Div", ["x", "rms"], ["xn"], name="/model/norm/Div"),
        helper.make_node("Mul", ["xn", "w"], ["y"], name="/model/norm/weight_Mul"),
    ]
    w = onnx.numpy_helper.from_array(np.linspace(0.5, 1.5, 64).astype(np.float32), "w")
    graph = helper.make_graph(nodes, "rms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 64])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_rms_norm_eps_is_not_raised_like_a_scale_floor():
    """A norm's epsilon (1e-6) is no floor: raised to float16's smallest normal (6.1e-5) it would
    swamp the mean square of small activations (here ~1e-6, as in a tiny random Gemma-2)."""
    model = _rms_norm_model(1e-6)
    half = to_float16(model, keep=(r"^/model/norm/(Pow|ReduceMean|Add|Sqrt|Div)$",))
    consts = {n.output[0]: n.attribute[0].t for n in half.graph.node if n.op_type == "Constant"}
    assert consts["eps"].data_type == TensorProto.FLOAT  # read only by float32 nodes: never rounded
    x = np.random.default_rng(0).standard_normal((1, 8, 64)).astype(np.float32) * 1e-3
    ref = run(model, {"x": x})
    assert half.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # x is read only by the statistics
    y16 = run(half, {"x": x}).astype(np.float32)
    assert half.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert np.linalg.norm(y16 - ref) / np.linalg.norm(ref) < 2e-3  # the weight Mul and y round to float16
    # the whole norm in float16: eps keeps its float16 value (a subnormal), not 6.1e-5
    plain = to_float16(model)
    eps16 = next(n.attribute[0].t for n in plain.graph.node if n.output[0] == "eps")
    assert abs(float(onnx.numpy_helper.to_array(eps16)) - 1e-6) < 1e-7
