"""Fold a layer's input rotation into the layer that produces that input, where it is exact.

An attention output projection reads the attention context, which is, head by head, a mix of the
value projection's outputs: context_h = A_h V_h with A_h built from queries and keys only. So
rotating V's output columns by a block Hadamard whose blocks lie inside one head (block B
divides the head dim) rotates the context by the same matrix, exactly: V' = V H gives
context' = context H. The value projection's weight and bias absorb H (W_v <- H W_v,
b_v <- b_v H) and so does the output projection's weight (W_o <- W_o H, so that
(context H)(H^T W_o^T) = context W_o^T): the FP model is unchanged, and the output projection
is then fitted on its rotated weight with no online op.

Known producer -> consumer pairs (the rule is structural; every fold is then checked on the
model's own example inputs, and all folds are undone if the model's output moves):
- transformers BERT: ``*.attention.self.value`` -> ``*.attention.output.dense``;
- diffusers Attention (PixArt, SANA, ...): ``*.to_v`` -> ``*.to_out.0``.
Anything else (LayerNorm / adaLN outputs, GELU outputs) is rotated online.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from calibless.methods import get_method
from calibless.rotation import block_hadamard, rotation_block
from loraq_export.fit.plan import LayerPlan
from loraq_export.models.stored_dtype import to_float32

FOLD_TOLERANCE = 1e-4  # relative L2 of the model's output after folding (float32 summation order: ~1e-6)


def _attention_pair(module: nn.Module, consumer: str) -> Optional[tuple[str, int]]:
    """(producer name, heads) when ``consumer`` is an attention output projection of a known kind."""
    rules = ((".attention.output.dense", ".attention.self.value", ".attention.self", "num_attention_heads"),
             (".to_out.0", ".to_v", "", "heads"))
    for suffix, producer_suffix, heads_at, heads_attr in rules:
        if consumer.endswith(suffix):
            stem = consumer[: -len(suffix)]
            try:
                producer = module.get_submodule(stem + producer_suffix)
                heads = getattr(module.get_submodule(stem + heads_at), heads_attr)
            except AttributeError:
                return None
            if isinstance(producer, nn.Linear) and isinstance(heads, int) and heads > 0:
                return stem + producer_suffix, heads
    return None


@torch.no_grad()
def _rotate_outputs(linear: nn.Linear, block: int) -> None:
    """W <- H W, b <- b H: the layer's outputs come out multiplied by the block Hadamard."""
    linear.weight.copy_(block_hadamard(linear.weight.T.contiguous(), block).T)
    if linear.bias is not None:
        linear.bias.copy_(block_hadamard(linear.bias, block))


@torch.no_grad()
def _rotate_inputs(linear: nn.Linear, block: int) -> None:
    """W <- W H: the layer takes inputs multiplied by the block Hadamard (H = H^T = H^-1)."""
    linear.weight.copy_(block_hadamard(linear.weight, block))


def fold_rotations(module: nn.Module, plans: list[LayerPlan], run_model: Optional[Callable[[], torch.Tensor]]) -> dict:
    """Fold where exact, editing ``module``'s FP weights into an equivalent model; sets
    ``plan.folded_by`` on the layers whose rotation the producer now applies and returns
    {consumer: producer}. ``run_model()`` runs the FP model on example inputs (None: nothing is
    folded, every rotation stays online)."""
    if run_model is None:
        return {}
    mods = dict(module.named_modules())
    candidates = {}
    for p in plans:
        if not p.quantize or p.spec is None or p.spec.rotation is None:
            continue
        pair = _attention_pair(module, p.name)
        if pair is None:
            continue
        producer, heads = pair
        lin = mods[producer]
        if lin.out_features != p.in_features or lin.out_features % heads:
            continue
        block = rotation_block(p.spec.rotation, p.in_features)  # the block fit_layer records
        if (lin.out_features // heads) % block == 0:
            candidates[p.name] = (producer, block)
    if not candidates:
        return {}
    with torch.no_grad():
        before = run_model().float()
        touched = {n for c, (prod, _) in candidates.items() for n in (c, prod)}
        for n in touched:  # rotated weights are not 16-bit values: edit float32 copies
            to_float32(mods[n])
        saved = {n: (mods[n].weight.clone(), None if mods[n].bias is None else mods[n].bias.clone()) for n in touched}
        for consumer, (producer, block) in candidates.items():
            _rotate_outputs(mods[producer], block)
            _rotate_inputs(mods[consumer], block)
        after = run_model().float()
    moved = float((after - before).norm() / before.norm().clamp_min(1e-30))
    if not moved <= FOLD_TOLERANCE:  # the structure is not what the rule assumed: undo, stay online
        with torch.no_grad():
            for prod, (w, b) in saved.items():
                mods[prod].weight.copy_(w)
                if b is not None:
                    mods[prod].bias.copy_(b)
        return {}
    for p in plans:
        if p.name in candidates:
            p.folded_by = candidates[p.name][0]
    return {c: prod for c, (prod, _) in candidates.items()}


def plan_and_fold(loaded, recipe, seed: int) -> list[LayerPlan]:
    """The plan of a loaded model, with the rotations that can be folded folded (the model's own
    example inputs check that the FP model did not move)."""
    from loraq_export.fit.plan import plan_layers
    plans = plan_layers(loaded.module, recipe, loaded.select, loaded.name)
    if not get_method(recipe.method).rotates:  # a method choosing its own permutation rotates online
        fold_rotations(loaded.module, plans, lambda: loaded.wrapper(*loaded.make_inputs(seed=seed + 303, batch=2)))
    return plans
