"""BlockReplay: a forward with the blocks before a changed layer replayed from the FP record gives
the output a full forward gives, and replay turns itself off where it could not."""
import torch
from torch import nn

from loraq_export.fit.block_replay import BlockReplay, block_stack


def _perturbed_outputs(loaded, names, sample):
    replay = BlockReplay(loaded.module, lambda: loaded.wrapper(*sample))
    fp = replay.reference()
    assert replay.record is not None
    mods = dict(loaded.module.named_modules())
    for name in names:
        lin = mods[name]
        saved = lin.weight.data
        lin.weight.data = saved + 0.05 * saved.std() * torch.randn(saved.shape, generator=torch.Generator().manual_seed(1))
        try:
            j = replay.block_of(name)
            yield j, replay.run_from(j), replay.run(), fp
        finally:
            lin.weight.data = saved


def test_replay_gives_the_full_forward_on_a_bert():
    from loraq_export.models import load_model
    loaded = load_model(None)
    sample = loaded.synthetic_batches(0)[0][0]
    names = ["encoder.layer.0.attention.self.query", "encoder.layer.3.output.dense", "encoder.layer.5.intermediate.dense"]
    seen = []
    for j, replayed, full, fp in _perturbed_outputs(loaded, names, sample):
        seen.append(j)
        assert torch.equal(replayed, full) and not torch.equal(full, fp)
    assert seen == [0, 3, 5]


def test_replay_gives_the_full_forward_on_a_diffusion_transformer():
    from loraq_export.models import load_model
    loaded = load_model("pixart-sigma", 3)
    sample = loaded.make_inputs(seed=3, batch=1, seq=64)
    names = ["transformer_blocks.1.attn2.to_k", "transformer_blocks.2.ff.net.2", "proj_out"]
    seen = []
    for j, replayed, full, fp in _perturbed_outputs(loaded, names, sample):
        seen.append(j)
        assert torch.equal(replayed, full) and not torch.equal(full, fp)
    assert seen == [1, 2, 0]  # a layer outside the stack replays nothing


class _Tracing(nn.Module):
    """A block with a side effect the model reads after the stack (it appends to a list the model
    passes in): replaying its output alone cannot reproduce that."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x, trace):
        y = self.lin(x)
        trace.append(y.sum())
        return y


class _Stack(nn.Module):
    def __init__(self, order=(0, 1, 2), as_dict=False):
        super().__init__()
        self.blocks = nn.ModuleList([_Tracing() for _ in range(3)])
        self.order, self.as_dict = order, as_dict

    def forward(self, x):
        trace = []
        for i in self.order:
            x = self.blocks[i](x, trace)
        out = x + sum(trace) if self.order == (0, 1, 2) else x
        return {"out": out} if self.as_dict else out


def test_replay_turns_off_for_side_effects_and_for_blocks_run_twice():
    x = torch.randn(4, 8)
    for model in (_Stack(), _Stack(as_dict=True), _Stack(order=(0, 1, 2, 0)), _Stack(order=(1, 0, 2))):
        replay = BlockReplay(model, lambda: model(x))
        replay.reference()
        assert replay.record is None and replay.block_of("blocks.2.lin") == 0
        assert all("forward" not in b.__dict__ for b in model.blocks)  # nothing left stubbed
    assert block_stack(nn.Linear(2, 2)) is None
