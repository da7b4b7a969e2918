"""graphs.protos: copies, exports and writes of models past protobuf's 2 GiB limit."""
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from graphs.protos import copy_model, export_model, serialized_size, write_model
from graphs.runtime import ort_session
from graphs.synthetic import chain_model, fp32_chain, inputs, layer_spec


def _models():
    return [fp32_chain([64, 96, 32]), chain_model([layer_spec(128, 64, rank=16), layer_spec(64, 128, rank=8)])]


@pytest.mark.parametrize("model", _models(), ids=["fp32", "qdq"])
def test_copy_and_export_equal_what_protobuf_and_graphsurgeon_give(model):
    ref = onnx.ModelProto()
    ref.CopyFrom(model)
    assert copy_model(model).SerializeToString(deterministic=True) == ref.SerializeToString(deterministic=True)
    graph = gs.import_onnx(model)
    assert (export_model(graph).SerializeToString(deterministic=True)
            == gs.export_onnx(graph).SerializeToString(deterministic=True))


def test_copy_keeps_a_present_empty_message_present():
    # repeated fields are copied whole; a singular message field is recursed into, and an empty
    # one must stay present (an empty shape is a scalar's, no shape is unknown rank)
    model = onnx.ModelProto()
    model.graph.SetInParent()
    assert model.HasField("graph") and copy_model(model).HasField("graph")


def test_write_model_external_leaves_the_model_as_it_was_and_runs_in_ort(tmp_path):
    model = chain_model([layer_spec(2048, 2048, rank=16), layer_spec(2048, 256, rank=8)])  # 2 MiB of codes, then less
    before = model.SerializeToString(deterministic=True)
    files = write_model(model, tmp_path / "m.onnx", external=True)
    assert [f.name for f in files] == ["m.onnx", "m.onnx.data"]
    assert model.SerializeToString(deterministic=True) == before  # onnx.save_model would have emptied it
    on_disk = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    external = [t for t in on_disk.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    places = [{e.key: int(e.value) for e in t.external_data if e.key != "location"} for t in external]
    assert [p["offset"] % 65536 for p in places if p["length"] > 1 << 20] == [0]
    feed = inputs(2048)
    want = ort_session(model).run(None, feed)[0]
    np.testing.assert_array_equal(ort_session(str(tmp_path / "m.onnx")).run(None, feed)[0], want)


def test_a_model_over_2_gib_is_copied_exported_and_run():
    # two 1.1 GB weights: protobuf's CopyFrom and SerializeToString refuse the 2.2 GB model
    n = 275_000_000
    a = gs.Constant("a", np.full(n, 0.5, np.float32))
    b = gs.Constant("b", np.full(n, 0.25, np.float32))
    x = gs.Variable("x", dtype=np.float32, shape=[1])
    s, y = gs.Variable("s", dtype=np.float32), gs.Variable("y", dtype=np.float32)
    graph = gs.Graph(nodes=[gs.Node("Add", inputs=[a, b], outputs=[s]), gs.Node("Mul", inputs=[s, x], outputs=[y])],
                     inputs=[x], outputs=[y], opset=21)
    del a, b
    model = export_model(graph)
    del graph
    assert serialized_size(model) == 2**31
    with pytest.raises(Exception):
        model.SerializeToString()  # what loraq no longer relies on
    out = ort_session(model).run(None, {"x": np.array([2.0], np.float32)})[0]
    assert out.shape == (n,) and out[0] == 1.5 and out[-1] == 1.5


def test_extra_outputs_are_returned_and_the_model_is_left_as_it_was():
    model = chain_model([layer_spec(128, 64, rank=16), layer_spec(64, 128, rank=8)])
    before = model.SerializeToString(deterministic=True)
    inner = model.graph.node[len(model.graph.node) // 2].output[0]
    session = ort_session(model, extra_outputs=[inner, inner, model.graph.output[0].name])
    assert [o.name for o in session.get_outputs()] == [model.graph.output[0].name, inner]
    assert model.SerializeToString(deterministic=True) == before
    out, mid = session.run(None, inputs(128))
    assert out.shape[-1] == 128 and np.isfinite(mid).all()


def test_shape_inference_reads_large_weights_as_headers_only():
    from onnx_graphsurgeon.importers.onnx_importer import get_onnx_tensor_shape
    from graphs.passes.cleanup import SHAPE_ONLY_BYTES, infer_shapes
    model = chain_model([layer_spec(1024, 512, rank=16), layer_spec(512, 256, rank=8)])
    graph = gs.import_onnx(model)
    consts = {n: t._values for n, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    assert max(v.nbytes for v in consts.values()) > SHAPE_ONLY_BYTES  # 1024 x 512 int4 codes: 256 KiB
    ends = {t.name for t in graph.inputs + graph.outputs}
    for t in graph.tensors().values():
        if isinstance(t, gs.Variable) and t.name not in ends:
            t.dtype, t.shape = None, None
    infer_shapes(graph)
    expected = onnx.shape_inference.infer_shapes(model).graph.value_info
    assert len(expected) > 10
    tensors = graph.tensors()
    assert all(tensors[vi.name].shape == get_onnx_tensor_shape(vi) for vi in expected)
    assert all(tensors[n]._values is v for n, v in consts.items())
