"""Every main activation format and every branch format exports to QDQ ONNX and agrees with the
torch reference in ONNX Runtime (accuracy level 0)."""
import itertools

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from calibless.formats import BRANCH_FORMATS, MAIN_FORMATS
from calibless.methods import fit_layer
from loraq_export.models.base import LoadedModel
from loraq_export.export.onnx_export import export_graph
from loraq_export.fit.recipes import load_recipe
from loraq_export.fit.swap import LoraqLinear, quantized
from loraq_export.export.validate import ValidationError, validate_onnx


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(128, 256)
        self.down = nn.Linear(256, 128, bias=False)

    def forward(self, x):
        return self.down(nn.functional.gelu(self.up(x))) + x


def mlp_model() -> LoadedModel:
    m = Mlp().eval()

    def make_inputs(seed=0, batch=2, seq=None):
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(batch, seq or 5 + seed % 4, 128, generator=g) * 2,)

    return LoadedModel("mlp", "test", m, m, ["x"], ["y"], {"x": {0: "b", 1: "s"}, "y": {0: "b", 1: "s"}},
                       make_inputs, lambda n, l: (True, "test"))


def fit_all(model: LoadedModel, recipe: str, method: str, **spec_overrides):
    r = load_recipe(recipe, method)
    return {n: fit_layer(m.weight.T, r.spec_for(n), method) for n, m in model.module.named_modules()
            if isinstance(m, nn.Linear)}


def export_and_validate(model, records):
    batches = [model.make_inputs(seed=s, batch=b) for s, b in ((1, 3), (2, 1))]
    with torch.no_grad():
        fp = [model.wrapper(*b).numpy() for b in batches]
    with quantized(model.module, records):
        graph, io = export_graph(model, model.make_inputs())
        fns = {m.layer_name: m.reference for m in model.module.modules() if isinstance(m, LoraqLinear)}
        return graph, validate_onnx(graph, io, fns, model.wrapper, model.input_names, batches, fp)


@pytest.mark.parametrize("main,branch", list(itertools.product(sorted(MAIN_FORMATS), sorted(BRANCH_FORMATS))))
def test_every_format_agrees_with_torch_in_ort(main, branch):
    model = mlp_model()
    records = fit_all(model, f"{main}-g64-r16-{branch}", "lqer")
    graph, v = export_and_validate(model, records)
    assert v["worst_layer"]["rel_l2"] < 1e-5
    ops = [n.op_type for n in graph.graph.node]
    wbits, abits = BRANCH_FORMATS[branch]
    per_layer = 1 + (wbits is not None) * 2 + (MAIN_FORMATS[main][1] is not None) + (abits is not None) * 2
    assert ops.count("DequantizeLinear") == 2 * per_layer  # weights W, A, B and each quantized activation
    # the main weight is INT4 (INT8 for w8a16), blocked along the input dim, and feeds the MatMul directly
    inits = {i.name: i for i in graph.graph.initializer}
    assert inits["up.weight_q"].data_type == (onnx.TensorProto.INT4 if main.startswith("w4") else onnx.TensorProto.INT8)
    dq = next(n for n in graph.graph.node if n.input and n.input[0] == "up.weight_q")
    assert {a.name: a.i for a in dq.attribute} == {"axis": 0, "block_size": 64}
    consumers = [n.op_type for n in graph.graph.node if dq.output[0] in n.input]
    assert consumers == ["MatMul"]
    if branch != "fp16":
        assert inits["up.down_q"].data_type == (onnx.TensorProto.INT4 if branch.startswith("w4") else onnx.TensorProto.INT8)
    if MAIN_FORMATS[main][1] is not None:
        assert "QuantizeLinear" in ops


def test_w6a6_branch_codes_stay_in_6_bit_range():
    model = mlp_model()
    records = fit_all(model, "w4a16-g64-r16-w6a6", "svdquant")
    graph, _ = export_and_validate(model, records)
    for name in ("up.down_q", "up.up_q", "down.down_q", "down.up_q"):
        t = onnx.numpy_helper.to_array(next(i for i in graph.graph.initializer if i.name == name))
        assert t.dtype == np.int8 and t.min() >= -32 and t.max() <= 31


def test_broken_graph_is_caught():
    """Validation must fail when the graph computes something else than torch."""
    model = mlp_model()
    records = fit_all(model, "w4a16-g64", "rtn")
    batches = [model.make_inputs(seed=1, batch=2)]
    with quantized(model.module, records):
        graph, io = export_graph(model, model.make_inputs())
        for init in graph.graph.initializer:
            if init.name == "up.weight_scale":  # corrupt one scale tensor
                arr = onnx.numpy_helper.to_array(init) * 1.5
                init.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), init.name))
        fns = {m.layer_name: m.reference for m in model.module.modules() if isinstance(m, LoraqLinear)}
        with pytest.raises(ValidationError) as e:
            validate_onnx(graph, io, fns, model.wrapper, model.input_names, batches)
    assert "up" in str(e.value)


def test_minilm_exports_with_natural_interface(minilm, minilm_weights):
    r = load_recipe("w4a8-g64-r16-w8a8", "lqer")
    records = {n: fit_layer(w, r.spec_for(n), "lqer") for n, w in minilm_weights.items()}
    batches = [minilm.make_inputs(seed=3, batch=3), minilm.make_inputs(seed=4, batch=1)]
    with torch.no_grad():
        fp = [minilm.wrapper(*b).numpy() for b in batches]
    with quantized(minilm.module, records):
        graph, io = export_graph(minilm, minilm.make_inputs(seed=0, batch=2))
        fns = {m.layer_name: m.reference for m in minilm.module.modules() if isinstance(m, LoraqLinear)}
        v = validate_onnx(graph, io, fns, minilm.wrapper, minilm.input_names, batches, fp)
    assert v["layers"] == 36 and v["worst_layer"]["rel_l2"] < 1e-4
    assert [i.name for i in graph.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in graph.graph.output] == ["last_hidden_state"]
    for i in graph.graph.input:
        assert i.type.tensor_type.elem_type == onnx.TensorProto.INT64
        dims = i.type.tensor_type.shape.dim
        assert dims[0].dim_param and dims[1].dim_param  # dynamic batch and sequence
    assert not any(n.domain == "loraq" for n in graph.graph.node)


@pytest.mark.parametrize("asym", [False, True])
def test_int8_per_channel_main_runs_as_matmulnbits_and_passes_the_target_checks(asym):
    """The budget's w8a16-gch layers: ONNX Runtime fuses their INT8 weight DQ into an 8-bit
    MatMulNBits (the check now verifies that for 8-bit main weights too), and the symmetric form is
    what TensorRT takes as INT8 weight-only (per channel, no zero point)."""
    from graphs.check import check_model, main_weight_dqs
    from graphs.runtime import ort_optimized
    from graphs.targets import legalize
    import onnx_graphsurgeon as gs
    model = mlp_model()
    records = fit_all(model, "w8a16-gch" + ("-asym" if asym else ""), "rtn")
    graph, v = export_and_validate(model, records)
    assert v["worst_layer"]["rel_l2"] < 1e-5
    inits = {i.name: i for i in graph.graph.initializer}
    assert inits["up.weight_q"].data_type == (onnx.TensorProto.UINT8 if asym else onnx.TensorProto.INT8)
    assert {d.inputs[0].name for d in main_weight_dqs(gs.import_onnx(graph))} == {"up.weight_q", "down.weight_q"}
    ort_graph = legalize(graph, "ort")
    assert check_model(ort_graph, "ort") == []
    fused = [n.input[1] for n in ort_optimized(ort_graph).graph.node if n.op_type == "MatMulNBits"]
    assert sorted(fused) == ["down.weight_q_T", "up.weight_q_T"]
    # an INT8 main weight that cannot fuse (its DQ read twice) is a violation, not passed over
    g = gs.import_onnx(ort_graph)
    dq = next(n for n in g.nodes if n.op == "DequantizeLinear" and n.inputs[0].name == "up.weight_q")
    extra = gs.Variable("extra", dtype=np.float32)
    g.nodes.append(gs.Node("Identity", "extra/Identity", {}, [dq.outputs[0]], [extra]))
    g.outputs.append(extra)
    assert {"ort-dq-direct", "ort-matmulnbits"} <= {x.rule for x in check_model(gs.export_onnx(g), "ort")}
    if not asym:
        assert check_model(legalize(graph, "tensorrt"), "tensorrt") == []
