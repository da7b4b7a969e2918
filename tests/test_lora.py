"""LoRA adapters on the quantized model: file layouts, bad input, merge at export (ONNX Runtime
against the FP model with the LoRA merged in float), the Python API, checkpoints."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion_fixtures import tiny_config
from loraq_export.models.synthetic_lora import lora_factors, merge_in_float, save_kohya, save_old_diffusers, save_peft
from loraq_export.cli import main
from loraq_export.errors import UserError
from loraq_export.models import load_model
from loraq_export.models.diffusion import build_from_config
from loraq_export.models.lora_files import model_linears, read_lora
from loraq_export.options import Options

RECIPE = "w4a8-g32-r8-w8a8"


def _folder(root: Path, preset: str) -> Path:
    cls, cfg = tiny_config(preset)
    build_from_config(cls, {**cfg, "num_layers": 2}, seed=1).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_models")
    return {"pixart": _folder(root / "pixart", "pixart-sigma"), "sana": _folder(root / "sana", "sana-600m")}


@pytest.fixture(scope="module")
def pixart(folders):
    return load_model(str(folders["pixart"]))


def _deltas(adapter) -> dict:
    return {n: adapter.total_scaling(n) * (l.b.double() @ l.a.double()) for n, l in adapter.layers.items()}


def test_every_layout_reads_to_the_same_deltas(pixart, tmp_path):
    f = lora_factors(pixart.module, rank=4, seed=2)
    lin = model_linears(pixart.module)
    (tmp_path / "cfg").mkdir()
    files = {"peft_meta": (save_peft(tmp_path / "a.safetensors", f, alpha=8), 2.0),
             "peft_noprefix_cfg": (save_peft(tmp_path / "cfg" / "b.safetensors", f, prefix="", alpha=8,
                                             where="adapter_config"), 2.0),
             "peft_no_alpha": (save_peft(tmp_path / "c.safetensors", f, prefix="base_model.model."), 1.0),
             "old_diffusers": (save_old_diffusers(tmp_path / "d.safetensors", f), 1.0),
             "kohya": (save_kohya(tmp_path / "e.safetensors", f, alpha=2), 0.5)}
    for what, (path, scaling) in files.items():
        ad = read_lora(path, lin, scale=1.5)
        assert set(ad.layers) == set(f), what
        for n, d in _deltas(ad).items():
            a, b = f[n]
            want = 1.5 * scaling * (b.double() @ a.double())
            assert torch.allclose(d, want, rtol=1e-6, atol=0), (what, n)
    assert read_lora(files["kohya"][0], lin).layout == "kohya"
    assert "converted by diffusers" in read_lora(files["old_diffusers"][0], lin).layout
    assert read_lora(files["peft_noprefix_cfg"][0], lin).alpha_source.startswith("adapter_config.json")


def _bad(tmp_path, f, pixart):
    """name -> (file, expected fragment of the error)."""
    out = {}
    other = {"single_transformer_blocks.0.attn.to_q": (torch.randn(4, 32), torch.randn(32, 4))}
    out["other_arch"] = (save_peft(tmp_path / "flux.safetensors", other), "single_transformer_blocks.0.attn.to_q")
    a, b = f["transformer_blocks.0.attn1.to_q"]
    wide = {**f, "transformer_blocks.0.attn1.to_q": (torch.randn(4, 64), torch.randn(32, 4))}
    out["shape"] = (save_peft(tmp_path / "shape.safetensors", wide), "transformer_blocks.0.attn1.to_q")
    rank = {**f, "transformer_blocks.0.attn1.to_q": (a, torch.randn(32, 3))}
    out["rank"] = (save_peft(tmp_path / "rank.safetensors", rank), "has rank 3 but lora_A rank 4")
    nan = {**f, "transformer_blocks.0.attn1.to_k": (a.clone().fill_(float("nan")), b)}
    out["nan"] = (save_peft(tmp_path / "nan.safetensors", nan), "NaN")
    good = save_peft(tmp_path / "good.safetensors", f)
    data = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    out["truncated"] = (tmp_path / "trunc.safetensors", "corrupted, truncated")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 5)
    out["junk"] = (tmp_path / "junk.safetensors", "corrupted, truncated")
    out["missing"] = (tmp_path / "nope.safetensors", "does not exist")
    return out


def test_bad_adapters_one_line_exit_2_nothing_written(pixart, folders, tmp_path, capsys):
    f = lora_factors(pixart.module, rank=4, seed=3)
    for what, (path, fragment) in _bad(tmp_path, f, pixart).items():
        with pytest.raises(UserError, match=None) as e:
            read_lora(path, model_linears(pixart.module))
        assert fragment in str(e.value), (what, str(e.value))
        assert "\n" not in str(e.value)
    # through the CLI: one line on stderr, exit 2, no output directory
    path, fragment = _bad(tmp_path, f, pixart)["other_arch"]
    out = tmp_path / "never"
    rc = main(["export", str(folders["pixart"]), "--recipe", RECIPE, "--out", str(out), "--no-progress",
               "--workers", "1", "--lora", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("loraq: error:") and fragment in err[0]
    assert not out.exists()
    rc = main(["export", str(folders["pixart"]), "--out", str(out), "--lora-scale", "2"])
    assert rc == 2 and not out.exists() and "--lora-scale needs --lora" in capsys.readouterr().err


def _export(folder, out, **kw):
    from loraq_export.commands.export import run_export
    recipe = None if (Path(folder) / "config.json").read_text().count("quantization_config") else RECIPE
    opts = Options(model=str(folder), recipe=recipe, out=out, workers=1, progress=False, quality=False, **kw)
    return run_export(opts, echo=lambda *a: None)


def _ort_outputs(path: Path, loaded, seeds=(7, 8)) -> list:
    from graphs.runtime import ort_session
    s = ort_session(str(path))
    feeds = [{n: t.numpy() for n, t in zip(loaded.input_names, loaded.make_inputs(seed=sd, batch=2))} for sd in seeds]
    return [s.run(None, f)[0] for f in feeds]


def _fp_outputs(loaded, seeds=(7, 8)) -> list:
    with torch.no_grad():
        return [loaded.wrapper(*loaded.make_inputs(seed=sd, batch=2)).numpy() for sd in seeds]


def _rel(a, b) -> float:
    return max(float(np.linalg.norm(x - y) / np.linalg.norm(y)) for x, y in zip(a, b))


@pytest.mark.parametrize("kind", ["pixart", "sana"])
def test_merged_adapter_is_as_close_to_the_float_merge_as_the_plain_export_to_fp(folders, kind, tmp_path):
    folder = folders[kind]
    fp = load_model(str(folder))
    # strength 0.1 (x scale 1.5): the LoRA moves the output by ~10%, as a fine-tune does; docs/lora.md shows
    # how the ratio grows for LoRAs that move a random tiny model much further (0.3-0.4: 1.3-1.6x)
    f = lora_factors(fp.module, rank=8, seed=4, strength=0.1, extra=("caption_projection.linear_1",))
    lora = save_peft(tmp_path / "lora.safetensors", f, alpha=8)
    _export(folder, tmp_path / "plain")
    rep = _export(folder, tmp_path / "lora", lora=[str(lora)], lora_scale=[1.5])
    _export(folder, tmp_path / "zero", lora=[str(lora)], lora_scale=[0.0])
    plain = _ort_outputs(tmp_path / "plain" / "model.onnx", fp)
    fp_plain = _fp_outputs(fp)
    merge_in_float(fp.module, f, 1.5 * 8 / 8)
    fp_lora = _fp_outputs(fp)
    with_lora = _ort_outputs(tmp_path / "lora" / "model.onnx", fp)
    base_err, lora_err, lora_moves = _rel(plain, fp_plain), _rel(with_lora, fp_lora), _rel(fp_lora, fp_plain)
    assert lora_moves > 2 * base_err  # the adapter matters: a dropped adapter would fail the next line
    assert lora_err <= 1.25 * base_err, (lora_err, base_err)
    lo = rep["lora"]
    assert lo["merged_in_float"] == ["caption_projection.linear_1"]
    assert len(lo["quantized_layers"]) == len(f) - 1 and all(v["rank"] == 8 for v in lo["quantized_layers"].values())
    # scale 0: bit-equal to no adapter
    zero = _ort_outputs(tmp_path / "zero" / "model.onnx", fp)
    assert all(np.array_equal(a, b) for a, b in zip(zero, plain))


def test_several_adapters_with_scales_and_the_python_api(folders, tmp_path):
    from loraq_export.commands.quantize import run_quantize
    from loraq_export import load_lora, load_quantized_model, unload_lora
    folder = folders["pixart"]
    fp = load_model(str(folder))
    f1 = lora_factors(fp.module, rank=8, seed=5, strength=0.1)
    f2 = lora_factors(fp.module, rank=4, seed=6, strength=0.1, suffixes=("attn2.to_k", "ff.net.2"))
    l1, l2 = save_peft(tmp_path / "l1.safetensors", f1), save_kohya(tmp_path / "l2.safetensors", f2, alpha=4)
    ckpt = tmp_path / "ckpt"
    # No activation quantization here: with A8 a sub-ulp difference between torch's and ONNX
    # Runtime's float sums can flip one activation code and move the latents by ~1e-3 (measured
    # 3e-7 or 1.6e-3 for the same adapters, depending only on the fitted values), so agreement
    # would be luck; without it the two paths must agree to float rounding.
    run_quantize(Options(model=str(folder), recipe="w4a16-g32-r8-w4a16", out=ckpt, workers=1, progress=False),
                 echo=lambda *a: None)
    _export(ckpt, tmp_path / "two", lora=[str(l1), str(l2)], lora_scale=[0.7, -1.2])
    onnx_two = _ort_outputs(tmp_path / "two" / "model.onnx", fp)
    # the Python API computes what the ONNX computes
    model = load_quantized_model(ckpt)
    loaded = load_model(str(folder))  # for its wrapper and inputs: the same architecture
    before = _wrapped(model, loaded)
    load_lora(model, l1, scale=0.7)
    load_lora(model, l2, scale=-1.2)
    torch_two = _wrapped(model, loaded)
    assert _rel(torch_two, onnx_two) < 1e-5
    assert _rel(torch_two, before) > 0.03
    unload_lora(model)
    assert all(np.array_equal(a, b) for a, b in zip(_wrapped(model, loaded), before))
    # and both adapters against the float merge, as close as the plain model is to FP
    fp_plain = _fp_outputs(fp)
    merge_in_float(fp.module, f1, 0.7)
    merge_in_float(fp.module, f2, -1.2 * 4 / 4)
    assert _rel(onnx_two, _fp_outputs(fp)) <= 1.25 * _rel(before, fp_plain)


def _wrapped(module, like) -> list:
    from loraq_export.models.diffusion import DiffusionWrapper
    w = DiffusionWrapper(module)
    with torch.no_grad():
        return [w(*like.make_inputs(seed=sd, batch=2)).numpy() for sd in (7, 8)]


def test_quantize_with_lora_keeps_it_in_the_checkpoint(folders, tmp_path):
    from loraq_export.commands.quantize import run_quantize
    folder = folders["sana"]
    fp = load_model(str(folder))
    f = lora_factors(fp.module, rank=8, seed=7, extra=("caption_projection.linear_2",))
    lora = save_peft(tmp_path / "l.safetensors", f, alpha=8)
    ckpt = tmp_path / "ckpt"
    rep = run_quantize(Options(model=str(folder), recipe=RECIPE, out=ckpt, workers=1, progress=False,
                               lora=[str(lora)], lora_scale=[0.8]), echo=lambda *a: None)
    q = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert q["lora"]["adapters"][0]["scale"] == 0.8 and q["lora"]["merged_in_float"] == ["caption_projection.linear_2"]
    assert sum("adapter" in m for m in q["layers"].values()) == len(rep["lora"]["quantized_layers"]) == len(f) - 1
    exp = _export(ckpt, tmp_path / "out")
    assert exp["lora"]["checkpoint"]["in_fp_reference"]
    direct = _export(folder, tmp_path / "direct", lora=[str(lora)], lora_scale=[0.8])
    a = _ort_outputs(tmp_path / "out" / "model.onnx", fp)
    b = _ort_outputs(tmp_path / "direct" / "model.onnx", fp)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert exp["validation"]["end_to_end"]["quant_rel_l2_vs_fp"] == pytest.approx(
        direct["validation"]["end_to_end"]["quant_rel_l2_vs_fp"], rel=1e-6)


def test_slots_lora_set_and_a_live_session(folders, tmp_path, capsys):
    from loraq_export.runtime.lora_session import LoraSession
    folder = folders["pixart"]
    fp = load_model(str(folder))
    f8 = lora_factors(fp.module, rank=8, seed=8, strength=0.1)
    f4 = lora_factors(fp.module, rank=4, seed=9, strength=0.1, suffixes=("attn1.to_q", "ff.net.2"))
    l8, l4 = save_peft(tmp_path / "l8.safetensors", f8), save_peft(tmp_path / "l4.safetensors", f4, alpha=8)
    l32 = save_peft(tmp_path / "l32.safetensors", lora_factors(fp.module, rank=32, seed=10, strength=0.1))
    rep = _export(folder, tmp_path / "slot", lora_slot=16)
    assert rep["lora"]["slot"]["rank"] == 16
    _export(folder, tmp_path / "plain")
    _export(folder, tmp_path / "merged", lora=[str(l8)], lora_scale=[0.9])
    slot_onnx = tmp_path / "slot" / "model.onnx"
    plain = _ort_outputs(tmp_path / "plain" / "model.onnx", fp)
    assert all(np.array_equal(a, b) for a, b in zip(_ort_outputs(slot_onnx, fp), plain))  # empty slot = plain
    # lora set: what a fresh export with the merged adapter gives
    assert main(["lora", "set", str(slot_onnx), str(l8), "--scale", "0.9", "--out", str(tmp_path / "set.onnx")]) == 0
    assert "filled" in capsys.readouterr().out
    set_out = _ort_outputs(tmp_path / "set.onnx", fp)
    merged = _ort_outputs(tmp_path / "merged" / "model.onnx", fp)
    assert _rel(set_out, merged) < 1e-5
    fp_plain = _fp_outputs(fp)
    merge_in_float(fp.module, f8, 0.9)
    assert _rel(set_out, _fp_outputs(fp)) <= 1.25 * _rel(plain, fp_plain)
    # a higher rank than the slot's is refused: one line, exit 2, nothing written
    assert main(["lora", "set", str(slot_onnx), str(l32), "--out", str(tmp_path / "no.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rank 32 exceeds the slot's rank 16" in err[0] and not (tmp_path / "no.onnx").exists()
    assert main(["lora", "set", str(tmp_path / "plain" / "model.onnx"), str(l8), "--out", str(tmp_path / "no.onnx")]) == 2
    assert "has no LoRA slots" in capsys.readouterr().err and not (tmp_path / "no.onnx").exists()
    # two adapters (ranks 8 + 4 = 12 <= 16) in a live session, switched without a new session
    assert main(["lora", "set", str(slot_onnx), str(l8), str(l4), "--scale", "0.9", "--scale", "-0.5",
                 "--out", str(tmp_path / "two.onnx")]) == 0
    two = _ort_outputs(tmp_path / "two.onnx", fp)
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # as _ort_outputs' sessions
    sess = LoraSession(slot_onnx, so)
    feeds = [{n: t.numpy() for n, t in zip(fp.input_names, fp.make_inputs(seed=sd, batch=2))} for sd in (7, 8)]
    run = lambda: [sess.run(None, f)[0] for f in feeds]  # noqa: E731
    sess.set_lora(l8, 0.9)
    assert _rel(run(), set_out) < 1e-6
    sess.set_lora([l8, l4], [0.9, -0.5])
    assert _rel(run(), two) < 1e-6
    sess.clear()
    assert all(np.array_equal(a, b) for a, b in zip(run(), plain))


@pytest.mark.parametrize("cmd", [["engine", "build", "{m}", "--refittable", "--shapes", "tokens=1:16:64"],
                                 ["engine", "refit", "{p}", "{l}"]])
def test_tensorrt_refit_without_tensorrt_one_line_exit_2(tmp_path, capsys, monkeypatch, cmd):
    import sys
    import onnx
    from graphs.synthetic import fp32_chain
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt raises ImportError, as where it is absent
    onnx.save(fp32_chain([64, 32]), tmp_path / "m.onnx")
    (tmp_path / "m.plan").write_bytes(b"plan")
    (tmp_path / "l.safetensors").write_bytes(b"x")
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main([a.format(m=tmp_path / "m.onnx", p=tmp_path / "m.plan", l=tmp_path / "l.safetensors") for a in cmd])
    out, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1 and "TensorRT is missing" in err, (out, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_refit_hands_tensorrt_the_slot_initializers(monkeypatch):
    """The Refitter gets every slot initializer by its ONNX name, as fp16 of the slot's shape
    (a stand-in for tensorrt records the calls: TensorRT itself needs a GPU)."""
    import sys
    import types
    from graphs.lora_slots import slot_values
    from loraq_export.engine.trt import refit_engine_bytes
    calls = {}

    class Refitter:
        def __init__(self, engine, logger):
            pass

        def set_named_weights(self, name, w):
            calls[name] = w.arr
            return True

        def get_missing_weights(self):
            return []

        def refit_cuda_engine(self):
            return True

    class Engine:
        refittable = True

        def serialize(self):
            return b"refitted"

    trt = types.SimpleNamespace(Logger=type("L", (), {"WARNING": 0, "__init__": lambda self, *_: None}),
                                Runtime=lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda b: Engine()),
                                Refitter=Refitter, Weights=lambda a: types.SimpleNamespace(arr=a))
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "polygraphy", types.ModuleType("polygraphy"))
    slots = {"a.b": [8, 4, 2], "c": [4, 6, 2]}
    d, u = np.ones((8, 1), np.float32), np.full((1, 4), 0.5, np.float32)
    values = slot_values(slots, {"a.b": (d, u)})
    assert refit_engine_bytes(b"plan", values, "e.plan") == b"refitted"
    assert sorted(calls) == ["a.b.lora_down", "a.b.lora_up", "c.lora_down", "c.lora_up"]
    assert calls["a.b.lora_down"].dtype == np.float16 and calls["a.b.lora_down"].shape == (8, 2)
    assert np.array_equal(calls["a.b.lora_down"][:, 0], np.ones(8)) and not calls["a.b.lora_down"][:, 1].any()
    assert not calls["c.lora_up"].any()


def test_load_lora_on_a_quantize_d_module_adds_exactly_the_adapter_term(tmp_path):
    from loraq_export import load_lora, quantize_, unload_lora
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64))
    quantize_(model, "w4a16-g32-r8-w8a8")
    x = torch.randn(5, 64)
    with torch.no_grad():
        h0 = model[0](x)
        base = model(x)
    a, b = torch.randn(4, 64) / 8, torch.randn(128, 4) / 2
    lora = save_peft(tmp_path / "l.safetensors", {"0": (a, b)}, prefix="base_model.model.", alpha=8)
    rep = load_lora(model, lora, scale=0.5)
    assert list(rep["quantized_layers"]) == ["0"] and rep["quantized_layers"]["0"]["rank"] == 4
    with torch.no_grad():
        h1 = model[0](x)
        up = (0.5 * 8 / 4 * b.T).half().float()
        want = h0 + (x @ a.T.half().float()) @ up
    assert torch.allclose(h1, want, rtol=0, atol=1e-5)
    unload_lora(model)
    with torch.no_grad():
        assert torch.equal(model(x), base)
