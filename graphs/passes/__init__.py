"""Graph passes: each a function gs.Graph -> gs.Graph, registered by name, composable.

    apply_passes(model, DEFAULT_PASSES)     # what `loraq export` runs
    apply_passes(model, NO_FUSE_PASSES)     # `loraq export --no-fuse`: the unfused graph, tidied

Every pass preserves the model's outputs (tests run ONNX Runtime before and after on the same
inputs). The fusing passes only rewrite a pattern when the rewrite is exact up to float
summation order (see each module's docstring for its conditions).
"""
from __future__ import annotations

from typing import Callable, Iterable

import onnx
import onnx_graphsurgeon as gs

from graphs.nodes import quiet
from graphs.protos import export_model

GraphPass = Callable[[gs.Graph], gs.Graph]
PASSES: dict[str, GraphPass] = {}


def register_pass(name: str):
    """Decorator: make a graph -> graph function available to ``apply_passes`` under ``name``."""
    def deco(fn: GraphPass) -> GraphPass:
        if name in PASSES and PASSES[name] is not fn:
            raise ValueError(f"graph pass {name!r} is already registered")
        PASSES[name] = fn
        return fn
    return deco


def run_passes(graph: gs.Graph, names: Iterable[str]) -> gs.Graph:
    for name in names:
        if name not in PASSES:
            raise KeyError(f"unknown graph pass {name!r}; known: {', '.join(sorted(PASSES))}")
        graph = PASSES[name](graph)
    return graph


def to_model(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export ``graph`` keeping ``like``'s IR version and opset imports (plus any the graph added)."""
    with quiet():
        out = export_model(graph.cleanup().toposort())
    have = {o.domain: o.version for o in like.opset_import}
    extra = [o for o in out.opset_import if o.domain not in have]
    del out.opset_import[:]
    out.opset_import.extend([onnx.helper.make_opsetid(d, v) for d, v in have.items()] + list(extra))
    out.ir_version = like.ir_version
    for p in like.metadata_props:
        out.metadata_props.add().CopyFrom(p)
    return out


def apply_passes(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """Run the named passes, in order, on ``model``; returns a new model."""
    with quiet():
        graph = gs.import_onnx(model)
        graph = run_passes(graph, list(names))
    return to_model(graph, model)


# Registration happens on import of each pass module.
from graphs.passes import bias_first, cleanup, fold_up, fuse_down, share_act_quant  # noqa: E402,F401

# Measured on ONNX Runtime CPU (tools/bench_fusion.py --forms): fold_up ([x | h] @ [W ; B], bias
# fused by ORT) is the cheapest form where K <= N, fuse_down ([W | A] then Split, bias moved
# before the Split) where K > N; fold_up runs first and leaves K > N layers to fuse_down when the
# main path and the branch read the same tensor. bias_first takes the layers neither can fuse
# (INT8 or FP16 factors): the bias then goes into the main MatMulNBits.
DEFAULT_PASSES = ["share_act_quant", "remove_redundant_qdq", "fold_up", "fuse_down", "bias_first", "cleanup"]
NO_FUSE_PASSES = ["cleanup"]
