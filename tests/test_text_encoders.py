"""The pipelines' text encoders (T5 for PixArt-Sigma, Gemma-2 for SANA) as models: a pipeline folder
with --component text_encoder, or a bare transformers folder, quantized, exported and validated in
ONNX Runtime like every model; bad folders end as one line, exit 2, nothing written."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from loraq_export.cli import main
from loraq_export.models.pipeline_folders import write_pipeline_folder

pytestmark = pytest.mark.filterwarnings("ignore")
RECIPE = "w4a16-g32-r8-w8a8"  # the tiny encoders are 32 wide: g32 quantizes every Linear
CLASSES = {"pixart-sigma": "T5EncoderModel", "sana": "Gemma2Model"}


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {kind: write_pipeline_folder(root / kind, kind, seed=0) for kind in CLASSES}


def run(*args) -> int:
    return main([*map(str, args), "--no-progress", "--workers", "1"])


def int4_elements(model: onnx.ModelProto) -> int:
    """INT4 weight elements in the graph (the passes may concatenate layers that read one input)."""
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer
               if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4))


def linear_elements(rep: dict) -> int:
    return sum(k * n for k, n in (l["shape"] for l in rep["layers"]))


def _fp_states(folder, texts):
    """The FP encoder's hidden states of the real tokens, loaded as the pipeline would load it."""
    import transformers
    from transformers import AutoTokenizer
    cls = getattr(transformers, json.loads((folder / "model_index.json").read_text())["text_encoder"][1])
    enc = cls.from_pretrained(str(folder / "text_encoder")).eval()
    tok = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
    tok.padding_side = "right"
    b = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = enc(b["input_ids"], attention_mask=b["attention_mask"])[0]
    return b, h[b["attention_mask"].bool()].numpy()


def _onnx_states(path, batch):
    from graphs.runtime import ort_session
    s = ort_session(str(path))
    out = s.run(None, {"input_ids": batch["input_ids"].numpy(), "attention_mask": batch["attention_mask"].numpy()})[0]
    return out[batch["attention_mask"].numpy().astype(bool)]


def _cosine(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


PROMPTS = ["a photo of a cat sitting on a red chair", "an oil painting of a castle by the sea at sunset",
           "two dogs running in the snow, cinematic lighting"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(CLASSES))
def test_pipeline_text_encoder_every_linear_int4_and_loraq_beats_rtn(pipes, kind, tmp_path):
    cos = {}
    for method in ("loraq", "rtn"):
        out = tmp_path / method
        assert run("export", pipes[kind], "--component", "text_encoder", "--recipe", RECIPE, "--method", method,
                   "--out", out) == 0
        rep = json.loads((out / "report.json").read_text())
        assert rep["model"]["class"] == CLASSES[kind] and rep["model"]["component"] == "text_encoder"
        assert rep["summary"]["skipped_layers"] == 0 and rep["summary"]["quantized_layers"] == 14
        assert rep["validation"]["passed"] and rep["validation"]["worst_layer"]["rel_l2"] < 1e-3
        assert rep["onnx"] == {**rep["onnx"], "inputs": ["input_ids", "attention_mask"], "outputs": ["last_hidden_state"]}
        g = onnx.load(str(out / "model.onnx"))
        assert [i.name for i in g.graph.input] == ["input_ids", "attention_mask"]
        assert int4_elements(g) == linear_elements(rep)  # every encoder Linear's weight is INT4 in the graph
        batch, fp = _fp_states(pipes[kind], PROMPTS)
        cos[method] = _cosine(fp, _onnx_states(out / "model.onnx", batch))
        q = rep["quality"]
        assert q["tokens"] > 100 and abs(q["onnx"]["mean"] - q["torch"]["mean"]) < 1e-4
    assert 0.9 < cos["rtn"] < cos["loraq"] < 1.0, cos


def test_bare_t5_folder_quantize_then_export_checkpoint(pipes, tmp_path):
    bare = tmp_path / "t5"
    shutil.copytree(pipes["pixart-sigma"] / "text_encoder", bare)
    for f in (pipes["pixart-sigma"] / "tokenizer").iterdir():
        shutil.copy(f, bare / f.name)
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    assert run("quantize", bare, "--recipe", RECIPE, "--out", ckpt) == 0
    assert (ckpt / "tokenizer.json").is_file()
    assert run("export", ckpt, "--out", out) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["model"]["kind"] == "t5" and rep["summary"]["quantized_layers"] == 14
    assert rep["quality"]["onnx"]["mean"] > 0.99  # the FP original was found again and compared against


def _edit_index(folder, **changes):
    index = json.loads((folder / "model_index.json").read_text())
    index.update(changes)
    (folder / "model_index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("case", ["unsupported_class", "no_tokenizer", "no_component", "not_a_pipeline",
                                  "bare_without_tokenizer"])
def test_bad_text_encoder_input_one_line_nothing_written(pipes, tmp_path, capsys, case):
    src = tmp_path / "pipe"
    shutil.copytree(pipes["pixart-sigma"], src)
    args = [src, "--component", "text_encoder"]
    expect = {"unsupported_class": "supported are T5EncoderModel, Gemma2Model", "no_tokenizer": "no tokenizer/",
              "no_component": "has no text_encoder component", "not_a_pipeline": "--component needs a pipeline",
              "bare_without_tokenizer": "no tokenizer in"}[case]
    if case == "unsupported_class":
        _edit_index(src, text_encoder=["transformers", "CLIPTextModel"])
    elif case == "no_tokenizer":
        shutil.rmtree(src / "tokenizer")
    elif case == "no_component":
        _edit_index(src, text_encoder=[None, None])
    elif case == "not_a_pipeline":
        args = [src / "text_encoder", "--component", "text_encoder"]
    else:
        args = [src / "text_encoder"]
    out = tmp_path / "out"
    assert run("export", *args, "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("loraq: error:") and expect in err, err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_t5_float16_graph_keeps_wo_in_float32(pipes, tmp_path):
    """wo's outputs beyond float16's range (x1e6 weights): the float16 export keeps wo, the residual
    stream and the norm statistics in float32 and agrees with torch; the same graph converted with
    no such region is wrong (weights clamped to float16's range, outputs overflowing)."""
    from safetensors.torch import load_file, save_file
    from graphs.float16 import to_float16
    from graphs.runtime import ort_session
    from loraq_export.models.text_encoders import T5_FLOAT32
    src = tmp_path / "pipe"
    shutil.copytree(pipes["pixart-sigma"], src)
    f = src / "text_encoder" / "model.safetensors"
    sd = load_file(str(f))
    save_file({k: v * 1e6 if ".wo." in k else v for k, v in sd.items()}, str(f), metadata={"format": "pt"})
    out = tmp_path / "out"
    assert run("export", src, "--component", "text_encoder", "--recipe", RECIPE, "--dtype", "fp16", "--fp-onnx",
               "--out", out) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["validation"]["fp16"]["passed"]
    ops = rep["graph"]["float32_regions"]["ops"]
    assert ops["MatMul"] >= 2 and ops["Pow"] == 5  # wo in both blocks, the 5 norms' statistics
    fp32 = onnx.load(str(out / "model_fp.onnx"))
    batch, _ = _fp_states(src, PROMPTS)
    feeds = {"input_ids": batch["input_ids"].numpy(), "attention_mask": batch["attention_mask"].numpy()}
    ref = ort_session(fp32).run(None, feeds)[0]
    assert np.abs(ref).max() < 1e3  # the final norm brings the hidden states back into range
    kept = ort_session(to_float16(fp32, keep=tuple(T5_FLOAT32))).run(None, feeds)[0].astype(np.float32)
    plain = ort_session(to_float16(fp32)).run(None, feeds)[0].astype(np.float32)
    real = batch["attention_mask"].numpy().astype(bool)
    assert np.isfinite(kept).all() and _cosine(ref[real], kept[real]) > 0.99  # float16 elsewhere, 1e6-sized residuals
    # without the region: wo's weights clamp to float16's max and its outputs overflow
    assert not np.isfinite(plain[real]).all() or _cosine(ref[real], plain[real]) < 0.9, _cosine(ref[real], plain[real])


def test_gemma2_float16_export_agrees_with_float32_on_real_tokens(pipes, tmp_path):
    """SANA's Gemma-2 in float16: the RMS-norm statistics and their epsilon stay float32 (an eps of
    1e-6 raised to float16's smallest normal swamped the tiny encoder's mean squares: relative L2
    0.57); the export validates and its hidden states agree with the float32 graph's."""
    from graphs.runtime import ort_session
    out = tmp_path / "out"
    assert run("export", pipes["sana"], "--component", "text_encoder", "--recipe", RECIPE, "--dtype", "fp16",
               "--fp-onnx", "--out", out) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["validation"]["fp16"]["passed"], rep["validation"]["fp16"]
    assert rep["graph"]["float32_regions"]["ops"]["Pow"] >= 3  # every norm's statistics
    batch, _ = _fp_states(pipes["sana"], PROMPTS)
    feeds = {"input_ids": batch["input_ids"].numpy(), "attention_mask": batch["attention_mask"].numpy()}
    real = batch["attention_mask"].numpy().astype(bool)
    ref = ort_session(str(out / "model_fp.onnx")).run(None, feeds)[0][real]
    half = onnx.load(str(out / "model.onnx"))
    assert half.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    y = ort_session(half).run(None, feeds)[0][real].astype(np.float32)
    assert _cosine(ref, y) > 0.99  # INT4 weights + float16 vs FP: 0.998; without the fix the export fails validation


def test_component_all_writes_each_component_and_the_memory_table(pipes, tmp_path, capsys):
    out = tmp_path / "out"
    assert run("export", pipes["sana"], "--component", "all", "--recipe", RECIPE, "--out", out) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["components"] == {"transformer": "transformer/report.json", "text_encoder": "text_encoder/report.json"}
    for comp in ("transformer", "text_encoder"):
        assert (out / comp / "model.onnx").is_file()
    rows = {r["component"]: r for r in rep["memory"]["rows"]}
    assert set(rows) == {"transformer", "text_encoder", "vae"}
    te = json.loads((out / "text_encoder" / "report.json").read_text())
    z = te["sizes"]
    assert rows["text_encoder"]["fp16_bytes"] == 2 * z["model_params"]
    assert rows["text_encoder"]["quantized_bytes"] == z["quantized_layers_bytes"] + 2 * (z["model_params"] - z["quantized_weights"])
    assert rows["vae"]["quantized_bytes"] == rows["vae"]["fp16_bytes"] > 0
    t = rep["memory"]["total"]
    assert t["fp16_bytes"] == sum(r["fp16_bytes"] for r in rows.values()) and t["quantized_bytes"] < t["fp16_bytes"]
    assert "pipeline" in capsys.readouterr().out


def test_memory_from_shapes_matches_the_fitted_count(pipes):
    """The full-size memory table counts bits from shapes alone; on a model that is fitted, the same
    count comes out of the records."""
    from loraq_export.evaluate.memory import row_from_module, row_from_report, preset_pipeline_memory
    from loraq_export.fit.parallel import fit_layers
    from loraq_export.fit.prepare import prepare_fit
    from loraq_export.fit.recipes import load_recipe
    from loraq_export.models import load_model
    from loraq_export.report import size_summary
    loaded = load_model(str(pipes["pixart-sigma"]), None, 0, "text_encoder")
    recipe, plans, _ = prepare_fit(loaded, load_recipe(RECIPE, "rtn"), 0)
    records = fit_layers(loaded.module, plans, "rtn", workers=1)
    fitted = row_from_report("te", {"sizes": size_summary(loaded, records)})
    assert row_from_module("te", loaded.module, recipe, loaded.select, "rtn") == fitted
    table = preset_pipeline_memory("pixart-sigma")
    te = next(r for r in table["rows"] if r["component"] == "text_encoder")
    assert 4.7e9 < te["params"] < 4.8e9 and te["fp16_bytes"] > 9e9  # T5-XXL encoder: 4.76B parameters


def test_token_priors_read_the_tokenizers_own_frequencies():
    import math
    from loraq_export.models.pipeline_folders import build_gemma_tokenizer, build_t5_tokenizer
    from loraq_export.models.token_priors import prior_token_batches, token_prior, tokenizer_model
    t5 = build_t5_tokenizer()
    ids, p, name = token_prior(t5, "auto")
    assert name == "scores"
    scores = {i: s for i, (_, s) in enumerate(tokenizer_model(t5)["model"]["vocab"])}
    a, b = int(ids[0]), int(ids[5])
    assert math.isclose(float(p[0] / p[5]), math.exp(scores[a] - scores[b]), rel_tol=1e-9)  # p = exp(score)
    assert not set(ids.tolist()) & set(t5.all_special_ids)  # no <pad>, </s>, <unk>, sentinels
    gemma = build_gemma_tokenizer()
    ids, p, name = token_prior(gemma, "auto")
    assert name == "merges"
    tokens = gemma.convert_ids_to_tokens(ids.tolist())
    assert not any(t.startswith("<0x") for t in tokens)  # byte-fallback tokens are not drawn
    merges = tokenizer_model(gemma)["model"]["merges"]
    first = "".join(merges[0])
    later = "".join(merges[len(merges) // 2])
    assert p[tokens.index(first)] > p[tokens.index(later)]  # an early merge is more frequent
    for tok, first_id, last_id in ((t5, None, t5.eos_token_id), (gemma, gemma.bos_token_id, None)):
        (ids_b, mask), rows = prior_token_batches(tok, sequences=8, batch=8, seed=0)[0]
        assert torch.equal(rows, mask.reshape(-1).bool())
        for seq, m in zip(ids_b, mask):
            real = seq[m.bool()]
            assert (first_id is None or real[0] == first_id) and (last_id is None or real[-1] == last_id)
            assert (seq[~m.bool()] == tok.pad_token_id).all()
    with pytest.raises(Exception, match="needs a BPE tokenizer"):
        token_prior(t5, "merges")
