"""The budget's layer sensitivities: the probed estimate (one forward, a few backward passes)
agrees with the exact one (one forward per layer, that layer alone quantized), the exact one is
what a model that cannot be differentiated gets, and the model is left as it was."""
import dataclasses
import math

import pytest
import torch

from loraq_export.fit import sensitivity as S
from loraq_export.fit.block_replay import block_stack
from loraq_export.fit.input_stats import STATS_SEED_OFFSET
from loraq_export.fit.plan import plan_layers
from loraq_export.fit.recipes import load_recipe


class _Bar:
    def update(self, n):
        pass

    def reset(self):
        pass


def _setup(model, num_layers=None, outside_the_blocks=False):
    from loraq_export.models import load_model
    loaded = load_model(model, num_layers)
    recipe = load_recipe(None, "loraq")
    plans = [p for p in plan_layers(loaded.module, recipe, loaded.select, loaded.name)
             if p.quantize or (outside_the_blocks and p.in_features % 64 == 0)]
    return loaded, plans, {p.name: recipe.layer_recipe(p.name) for p in plans}


def _spearman(x, y):
    rx, ry = x.argsort().argsort().float(), y.argsort().argsort().float()
    return float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])


# PixArt-Sigma with the layers outside its block stack too (timestep embedding, adaLN, caption
# projection, proj_out: not recomputed by the blocks' checkpointing, their D kept from the forward)
@pytest.mark.parametrize("model,num_layers", [(None, None), ("pixart-sigma", 2)])
def test_probed_output_errors_agree_with_one_forward_per_layer(model, num_layers):
    loaded, plans, refs = _setup(model, num_layers, outside_the_blocks=model is not None)
    assert len({p.name.split(".")[0] for p in plans}) > 1 or model is None
    sample = S.sensitivity_sample(loaded, 0)
    flags = [q.requires_grad for q in loaded.module.parameters()]
    probed = S._probed_output_errors(loaded, plans, refs, sample, 0, _Bar())
    exact = S._exact_output_errors(loaded, plans, refs, sample, _Bar())
    names = [p.name for p in plans]
    lp = torch.tensor([math.log(probed[n]) for n in names])
    le = torch.tensor([math.log(exact[n]) for n in names])
    # the layers' sensitivities span orders of magnitude; the estimate must rank them as the
    # exact forwards do and sit on the same scale (a probe that modified the gradient it passes on,
    # or one number per sample instead of per channel, ranked at 0.4-0.85 on MiniLM)
    assert float(le.max() - le.min()) > 2.0
    assert _spearman(lp, le) > 0.9
    assert abs(float((lp - le).mean())) < 0.25 and float((lp - le).abs().max()) < 1.2
    assert [q.requires_grad for q in loaded.module.parameters()] == flags
    mods = dict(loaded.module.named_modules())
    assert not any(mods[p.name]._forward_hooks for p in plans)  # the probe's hooks are gone
    assert not any("forward" in b.__dict__ for b in block_stack(loaded.module)[1])  # and its checkpointing
    assert all(q.grad is None for q in loaded.module.parameters())  # no weight gradients were computed


class _NoGrad(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    @torch.no_grad()
    def forward(self, *args):
        return self.inner(*args)


class _InPlace(torch.nn.Module):
    """Modifies a tensor autograd saved for the backward pass: the forward runs, the backward fails."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        e = self.inner(*args).exp()
        e.mul_(1.0)
        return e.log()


@pytest.mark.parametrize("wrap", [_NoGrad, _InPlace])
def test_a_model_that_cannot_be_differentiated_gets_the_exact_sensitivities(wrap, capsys):
    loaded, plans, refs = _setup(None)
    plans = plans[:6]
    loaded = dataclasses.replace(loaded, wrapper=wrap(loaded.wrapper))
    reference = {p.name: (refs[p.name], 2.0) for p in plans}
    got = S.layer_sensitivity(loaded, plans, reference, seed=0)
    exact = S._exact_output_errors(loaded, plans, refs, S.sensitivity_sample(loaded, 0), _Bar())
    assert got == {n: e / 2.0 for n, e in exact.items()} and all(e > 0 for e in exact.values())
    if wrap is _InPlace:
        assert "backward pass failed" in capsys.readouterr().err
    else:
        assert S._probed_output_errors(loaded, plans, refs, S.sensitivity_sample(loaded, 0), 0, _Bar()) is None


def test_the_sample_spans_several_of_a_diffusion_transformers_inputs():
    from loraq_export.models import load_model
    loaded = load_model("pixart-sigma", 1)
    latents, timesteps, text = S.sensitivity_sample(loaded, 0)[:3]
    assert latents.shape[0] == S.SENSITIVITY_SAMPLES and len(set(timesteps.tolist())) == S.SENSITIVITY_SAMPLES
    first = loaded.synthetic_batches(STATS_SEED_OFFSET)
    assert torch.equal(latents[1:2], first[1][0][0])


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(64, 128), torch.nn.Linear(128, 64)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class _Stacked(torch.nn.Module):
    """A block stack whose first block runs twice, and a layer after the stack."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([_Block(), _Block()])
        self.head = torch.nn.Linear(64, 64)

    def forward(self, x):
        for i in (0, 1, 0):
            x = self.blocks[i](x)
        return self.head(x)


def test_recomputed_blocks_give_what_the_whole_graph_gives(monkeypatch):
    from types import SimpleNamespace
    from loraq_export.fit.plan import LayerPlan
    torch.manual_seed(0)
    model = _Stacked().eval()
    loaded = SimpleNamespace(module=model, wrapper=model)
    recipe = load_recipe(None, "loraq")
    lins = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    plans = [LayerPlan(n, m.in_features, m.out_features, True, "") for n, m in lins]
    refs = {n: recipe.layer_recipe(n) for n, _ in lins}
    sample = (torch.randn(3, 10, 64),)
    recomputed = S._probed_output_errors(loaded, plans, refs, sample, 0, _Bar())
    monkeypatch.setattr(S, "block_stack", lambda module: None)  # no stack: no checkpointing
    whole = S._probed_output_errors(loaded, plans, refs, sample, 0, _Bar())
    assert all(v > 0 for v in whole.values())
    assert all(abs(recomputed[n] - whole[n]) <= 1e-5 * whole[n] for n, _ in lins)
