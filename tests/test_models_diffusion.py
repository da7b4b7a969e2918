"""Diffusion transformers: presets, seeded builds, local diffusers folders, ONNX export."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from diffusion_fixtures import tiny_config
from loraq_export.errors import UserError
from loraq_export.models.diffusion import PRESETS, SUPPORTED, build_from_config, build_preset, make_diffusion_model
from loraq_export.models.diffusion_folders import load_diffusers_folder

from graphs.runtime import ort_session  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

# Key published values: (class, layers, heads, head dim, hidden, caption_channels, in, out, patch, sample)
PUBLISHED = {
    "pixart-sigma": ("PixArtTransformer2DModel", 28, 16, 72, 1152, 4096, 4, 8, 2, 128),
    "sana-600m": ("SanaTransformer2DModel", 28, 36, 32, 1152, 2304, 32, 32, 1, 32),
    "sana-1.6b": ("SanaTransformer2DModel", 20, 70, 32, 2240, 2304, 32, 32, 1, 32),
}
SANA_CROSS = {"sana-600m": (16, 72, 1152), "sana-1.6b": (20, 112, 2240)}
TINY = ["pixart-sigma", "sana-600m"]


def _session(path):
    return ort_session(str(path), threads=1)  # one thread: tiny models on a shared 2-core box


def tiny(name, seed=0, **over):
    cls_name, config = tiny_config(name)
    config.update(over)
    return build_from_config(cls_name, config, seed)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_matches_published_config(name):
    cls_name, layers, heads, head_dim, hidden, caption, c_in, c_out, patch, sample = PUBLISHED[name]
    assert PRESETS[name][0] == cls_name and PRESETS[name][1]["num_layers"] == layers
    m = build_preset(name, num_layers=1)  # full depth is 0.6-1.6 B parameters: never in tests
    cfg = m.config
    assert type(m).__name__ == cls_name and cfg.num_layers == 1 and len(m.transformer_blocks) == 1
    assert (cfg.num_attention_heads, cfg.attention_head_dim) == (heads, head_dim)
    assert cfg.num_attention_heads * cfg.attention_head_dim == hidden
    assert (cfg.caption_channels, cfg.in_channels, cfg.out_channels) == (caption, c_in, c_out)
    assert (cfg.patch_size, cfg.sample_size) == (patch, sample)
    assert m.proj_out.in_features == hidden
    if name in SANA_CROSS:
        assert (cfg.num_cross_attention_heads, cfg.cross_attention_head_dim, cfg.cross_attention_dim) == SANA_CROSS[name]
        assert cfg.mlp_ratio == 2.5 and cfg.interpolation_scale is None
    else:
        assert cfg.cross_attention_dim == 1152 and cfg.norm_type == "ada_norm_single"
        assert cfg.interpolation_scale == 2 and cfg.use_additional_conditions is False
    assert next(m.parameters()).dtype == torch.float32


def test_unknown_preset_and_bad_layers():
    with pytest.raises(UserError, match="unknown diffusion preset"):
        build_preset("pixart-alpha")
    with pytest.raises(UserError, match="num_layers"):
        build_preset("sana-600m", num_layers=0)


@pytest.mark.parametrize("name", TINY)
def test_seeded_build_is_deterministic_and_non_trivial(name):
    a, b, c = tiny(name, 0), tiny(name, 0), tiny(name, 1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    for mod_name, mod in a.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            w = mod.weight
            fan_in = w[0].numel()
            assert 0.5 < float(w.std()) * fan_in**0.5 < 1.5, mod_name  # ~N(0, 1/fan_in)
    lm = make_diffusion_model(a, name)
    out = lm.wrapper(*lm.make_inputs())
    assert torch.isfinite(out).all() and out.std() > 0.1


def test_select_blocks_only():
    lm = make_diffusion_model(tiny("pixart-sigma"), "tiny")
    chosen = {n: lm.select(n, m) for n, m in lm.module.named_modules() if isinstance(m, torch.nn.Linear)}
    q = {n for n, (ok, _) in chosen.items() if ok}
    assert q == {n for n in chosen if n.startswith("transformer_blocks.")}
    assert "transformer_blocks.0.attn1.to_q" in q and "transformer_blocks.0.ff.net.2" in q
    assert "transformer_blocks.0.attn2.to_out.0" in q
    for n in ("adaln_single.linear", "caption_projection.linear_1", "proj_out"):
        ok, reason = chosen[n]
        assert not ok and reason.startswith("outside transformer blocks")
    assert "timestep" in chosen["adaln_single.emb.timestep_embedder.linear_1"][1]
    sana = make_diffusion_model(tiny("sana-600m"), "tiny")
    assert sana.select("time_embed.linear", None) == (False, "outside transformer blocks (timestep embedding / adaLN-single)")
    assert sana.select("transformer_blocks.3.attn1.to_k", None)[0]


@pytest.mark.parametrize("name", TINY)
def test_make_inputs(name):
    lm = make_diffusion_model(tiny(name), name)
    cfg = lm.module.config
    assert lm.input_names == ["hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask"]
    assert lm.output_names == ["sample"] and lm.kind == SUPPORTED[type(lm.module).__name__]
    x = lm.make_inputs(seed=3, batch=2)
    y = lm.make_inputs(seed=3, batch=2)
    assert all(torch.equal(a, b) for a, b in zip(x, y))
    assert not torch.equal(x[0], lm.make_inputs(seed=4, batch=2)[0])
    lat, t, text, mask = x
    assert lat.shape == (2, cfg.in_channels, cfg.sample_size, cfg.sample_size)  # tiny: 8x8 fits 256 tokens
    assert t.shape == (2,) and t.dtype == torch.float32 and bool(((t >= 0) & (t < 1000)).all())
    assert text.shape == (2, 16, cfg.caption_channels) and mask.dtype == torch.int64 and bool((mask == 1).all())
    small = lm.make_inputs(seq=4)[0]  # at most 4 image tokens -> 2x2 patches
    assert small.shape[-1] == 2 * cfg.patch_size
    assert lm.wrapper(*lm.make_inputs(batch=2, seq=4)).shape == (2, cfg.out_channels, *small.shape[-2:])


@pytest.mark.parametrize("name", TINY)
def test_onnx_export_matches_torch(name, tmp_path):
    lm = make_diffusion_model(tiny(name, num_layers=2), name)
    path = tmp_path / "model.onnx"
    torch.onnx.export(
        lm.wrapper, lm.make_inputs(), str(path), dynamo=False, opset_version=21,
        input_names=lm.input_names, output_names=lm.output_names, dynamic_axes=lm.dynamic_axes,
    )
    sess = _session(path)
    cases = [dict(batch=1), dict(batch=2, text_len=7)]  # batch and text length are dynamic
    if "height" in lm.dynamic_axes["hidden_states"].values():  # SANA: no positional table
        cases.append(dict(batch=1, seq=16))
    for kw in cases:
        x = list(lm.make_inputs(seed=5, **kw))
        x[3][:, -2:] = 0  # padded text tokens
        with torch.no_grad():
            ref = lm.wrapper(*x).numpy()
        out = sess.run(None, {n: v.numpy() for n, v in zip(lm.input_names, x)})[0]
        assert out.shape == ref.shape
        assert np.abs(out - ref).max() < 1e-4, kw


# ---------------------------------------------------------------------------------------------
# Local folders
# ---------------------------------------------------------------------------------------------
def _save(model, folder, dtype=torch.float32):
    copy.deepcopy(model).to(dtype).save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("name", TINY)
def test_transformer_folder_round_trip(name, tmp_path):
    m = tiny(name)
    _save(m, tmp_path / "t", torch.bfloat16)
    loaded, source = load_diffusers_folder(tmp_path / "t")
    assert type(loaded) is type(m) and next(loaded.parameters()).dtype == torch.float32
    assert source["dtype"] == "bfloat16" and source["layout"] == "transformer"
    assert source["class"] == type(m).__name__
    ref = {k: v.to(torch.bfloat16).float() for k, v in m.state_dict().items()}
    assert all(torch.equal(ref[k], v) for k, v in loaded.state_dict().items())


def test_pipeline_folder_round_trip(tmp_path):
    m = tiny("pixart-sigma")
    _save(m, tmp_path / "pipe" / "transformer")
    index = {"_class_name": "PixArtSigmaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"]}
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps(index))
    loaded, source = load_diffusers_folder(str(tmp_path / "pipe"))
    assert source["layout"] == "pipeline" and source["dtype"] == "float32"
    lm_a, lm_b = make_diffusion_model(m, "a"), make_diffusion_model(loaded, "b", source)
    x = lm_a.make_inputs()
    with torch.no_grad():
        assert torch.allclose(lm_a.wrapper(*x), lm_b.wrapper(*x), atol=1e-5)
    assert lm_b.source["layout"] == "pipeline"


def test_legacy_transformer2d_class_name(tmp_path):
    """PixArt-Sigma's published config says "Transformer2DModel" (diffusers remaps it)."""
    folder = _save(tiny("pixart-sigma"), tmp_path / "t")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["_class_name"] = "Transformer2DModel"
    (folder / "config.json").write_text(json.dumps(cfg))
    loaded, source = load_diffusers_folder(folder)
    assert type(loaded).__name__ == "PixArtTransformer2DModel" == source["class"]


def _one_line_error(path, *words):
    with pytest.raises(UserError) as info:
        load_diffusers_folder(path)
    msg = str(info.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg
    return msg


def test_bad_folders(tmp_path):
    _one_line_error(tmp_path / "nope", "does not exist")
    (tmp_path / "file.txt").write_text("x")
    _one_line_error(tmp_path / "file.txt", "not a folder")
    (tmp_path / "empty").mkdir()
    _one_line_error(tmp_path / "empty", "neither model_index.json nor config.json")

    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "X", "vae": ["diffusers", "AutoencoderKL"]}))
    _one_line_error(pipe, "no 'transformer'")
    (pipe / "model_index.json").write_text("{not json")
    _one_line_error(pipe, "cannot read", "model_index.json")

    folder = _save(tiny("sana-600m"), tmp_path / "t")
    cfg_text = (folder / "config.json").read_text()
    cfg = json.loads(cfg_text)
    cfg["_class_name"] = "UNet2DConditionModel"
    (folder / "config.json").write_text(json.dumps(cfg))
    msg = _one_line_error(folder, "unsupported", "UNet2DConditionModel")
    assert all(name in msg for name in SUPPORTED)
    (folder / "config.json").write_text(json.dumps({"hidden_size": 4}))
    _one_line_error(folder, "_class_name")
    (folder / "config.json").write_text('{"_class_name": ')
    _one_line_error(folder, "cannot read", "config.json")
    (folder / "config.json").write_text(cfg_text)

    weights = folder / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    _one_line_error(folder, "corrupted", "diffusion_pytorch_model.safetensors", "re-download")
    weights.unlink()
    _one_line_error(folder, "no weights file")


def test_trajectory_statistics_follow_the_pipelines_scheduler(monkeypatch):
    """LORAQ_STATS_TRAJECTORY=N: the inputs of N sampling runs of the FP model, 16 // N steps each,
    at the scheduler's own timesteps (an opt-in experiment; the default draws random noise levels)."""
    from loraq_export.evaluate.sampling import scheduler_for
    loaded = make_diffusion_model(tiny("pixart-sigma"), "tiny")
    monkeypatch.setenv("LORAQ_STATS_TRAJECTORY", "2")
    batches = loaded.synthetic_batches(0)
    sched = scheduler_for(loaded.kind)
    sched.set_timesteps(8)
    steps = [float(b[0][1][0]) for b, _ in zip(batches, range(16))]
    assert len(batches) == 16 and steps == [float(t) for t in sched.timesteps] * 2
    first, last = batches[0][0][0], batches[7][0][0]
    assert first.shape == last.shape and not torch.equal(first, last)  # the latents moved along the run
    monkeypatch.setenv("LORAQ_STATS_TRAJECTORY", "many")
    with pytest.raises(UserError, match="LORAQ_STATS_TRAJECTORY"):
        loaded.synthetic_batches(0)
