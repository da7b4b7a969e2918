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
    per_layer = 1 + (wbits is not None) * 2 + (main != "w4a16") + (abits is not None) * 2
    assert ops.count("DequantizeLinear") == 2 * per_layer  # weights W, A, B and each quantized activation
    # the main weight is INT4, blocked along the input dim, and feeds the MatMul directly
    inits = {i.name: i for i in graph.graph.initializer}
    assert inits["up.weight_q"].data_type == onnx.TensorProto.INT4
    dq = next(n for n in graph.graph.node if n.input and n.input[0] == "up.weight_q")
    assert {a.name: a.i for a in dq.attribute} == {"axis": 0, "block_size": 64}
    consumers = [n.op_type for n in graph.graph.node if dq.output[0] in n.input]
    assert consumers == ["MatMul"]
    if branch != "fp16":
        assert inits["up.down_q"].data_type == (onnx.TensorProto.INT4 if branch.startswith("w4") else onnx.TensorProto.INT8)
    if main != "w4a16":
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
