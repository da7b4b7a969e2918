"""``loraq generate`` with the quantized text encoder's ONNX (GraphTextEncoder as pipe.text_encoder):
``--onnx DIR`` from ``loraq export --component all`` runs both graphs, the text encoder's output is
the ONNX's and agrees with the torch quantized encoder; bad input is one line, exit 2, no OUT."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from loraq_export.cli import main
from loraq_export.evaluate.images import psnr
from loraq_export.models.pipeline_folders import write_pipeline_folder
from test_generate import _bad, _generate

pytestmark = pytest.mark.filterwarnings("ignore")
PROMPT = "a photo of a cat sitting on a red chair"
STEPS = "2"
QUICK = ["--recipe", "w4a16-g32-r8-w8a8", "--method", "rtn", "--workers", "1", "--no-progress"]


@pytest.fixture(scope="module")
def pix(tmp_path_factory):
    """(tiny PixArt-Sigma pipeline folder, its --component all export, a checkpoint of its text encoder)."""
    root = tmp_path_factory.mktemp("te-gen")
    folder = write_pipeline_folder(root / "pipe", "pixart-sigma", seed=0)
    q, ckpt = root / "q", root / "ckpt"
    assert main(["export", str(folder), "--component", "all", "--no-quality", "--out", str(q), *QUICK]) == 0
    assert main(["quantize", str(folder), "--component", "text_encoder", "--out", str(ckpt), *QUICK]) == 0
    return folder, q, ckpt


def _run(capsys, out, *args):
    code, stdout, err = _generate(capsys, *args, "--prompt", PROMPT, "--steps", STEPS, "--compare", "--out", out)
    assert code == 0, err
    return json.loads((out / "generate.json").read_text()), stdout


def test_onnx_folder_runs_the_text_encoder_graph(pix, tmp_path, capsys):
    from loraq_export.runtime import GraphTextEncoder, GraphTransformer, open_onnx
    from loraq_export.runtime.pipeline import generate, load_pipeline, read_pipeline_folder, with_components
    from loraq_export.store.checkpoint import load_quantized_model

    folder, q, ckpt = pix
    both, stdout = _run(capsys, tmp_path / "both", folder, "--onnx", q)
    assert both["components"] == ["transformer", "text_encoder"] and "transformer + text_encoder" in stdout
    assert both["onnx"] == str((q / "transformer/model.onnx").resolve())
    assert both["text_encoder_onnx"] == str((q / "text_encoder/model.onnx").resolve())
    assert both["text_encoder_backend"] == "onnxruntime-cpu"
    assert set(both["text_encoder_seconds_per_call"]) == {"onnxruntime-cpu", "torch-fp"}
    only_t, _ = _run(capsys, tmp_path / "t", folder, "--onnx", q / "transformer/model.onnx")
    assert only_t["components"] == ["transformer"] and only_t["text_encoder_onnx"] is None
    assert list(only_t["text_encoder_seconds_per_call"]) == ["torch-fp"]
    only_te, _ = _run(capsys, tmp_path / "te", folder, "--text-encoder-onnx", q / "text_encoder/model.onnx")
    assert only_te["components"] == ["text_encoder"] and only_te["onnx"] is None and only_te["backend"] == "torch-fp"
    img = {k: Image.open(tmp_path / k / "quantized/0.png") for k in ("both", "t", "te")}
    assert psnr(img["both"], img["t"]) < 60 and psnr(img["te"], img["t"]) < 60  # the quantized encoder changes them

    # In process: the ONNX text encoder against the checkpoint's torch quantized one, same ONNX transformer.
    pf = read_pipeline_folder(folder)
    fp_pipe = load_pipeline(pf)
    transformer = GraphTransformer(open_onnx(q / "transformer/model.onnx"), pf.transformer_config)
    encoder = GraphTextEncoder(open_onnx(q / "text_encoder/model.onnx"), pf.text_encoder_config)
    assert encoder.config.d_model == 32 and type(encoder.config).__name__ == "T5Config"
    args = dict(seed=0, steps=int(STEPS), height=both["height"], width=both["width"], progress=False)
    onnx_q = with_components(fp_pipe, transformer=transformer, text_encoder=encoder)
    torch_q = with_components(fp_pipe, transformer=transformer, text_encoder=load_quantized_model(ckpt))
    fp_te = with_components(fp_pipe, transformer=transformer)
    lat = {name: generate(p, PROMPT, output_type="latent", **args)
           for name, p in (("onnx", onnx_q), ("torch", torch_q), ("fp", fp_te))}
    assert encoder.calls == 2  # the prompt and the negative prompt (guidance)
    rel = float((lat["onnx"] - lat["torch"]).norm() / lat["torch"].norm())
    rel_fp = float((lat["fp"] - lat["torch"]).norm() / lat["torch"].norm())
    print(f"ONNX vs torch-quantized text encoder: latents rel L2 {rel:.3g}; FP encoder vs torch-quantized {rel_fp:.3g}")
    assert rel < 1e-4 < rel_fp / 100, (rel, rel_fp)  # float summation order apart, the ONNX is the quantized encoder
    assert psnr(generate(onnx_q, PROMPT, **args), img["both"]) == float("inf")  # the command's image is this pipeline's
    out = encoder(np.array([[5, 6, 1]]), attention_mask=np.array([[1, 1, 1]]))
    assert out[0] is out.last_hidden_state and tuple(out[0].shape) == (1, 3, 32)


def _wrong_width_encoder(path, hidden=48):
    """A graph with the text encoder's interface (input_ids, attention_mask -> states) 48 wide."""
    emb = numpy_helper.from_array(np.zeros((100, hidden), np.float32), "emb")
    out = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", hidden])
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb", "input_ids"], ["g"]),
         helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
         helper.make_node("Unsqueeze", ["m", "axis"], ["m3"]),
         helper.make_node("Mul", ["g", "m3"], ["last_hidden_state"])], "te",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"]) for n in ("input_ids", "attention_mask")],
        [out], [emb, numpy_helper.from_array(np.array([-1], np.int64), "axis")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_bad_text_encoder_input_one_line_no_out(pix, tmp_path, capsys):
    folder, q, _ = pix
    p = ["--prompt", "a cat"]
    wrong = _wrong_width_encoder(tmp_path / "wide.onnx")
    _bad(capsys, tmp_path, folder, "--onnx", q, "--text-encoder-onnx", wrong, *p, match="hidden size 48")
    q_wrong = tmp_path / "q-wrong"
    shutil.copytree(q, q_wrong)
    shutil.copy(wrong, q_wrong / "text_encoder/model.onnx")
    _bad(capsys, tmp_path, folder, "--onnx", q_wrong, *p, match="does not fit the pipeline's text encoder")
    _bad(capsys, tmp_path, folder, "--text-encoder-onnx", tmp_path / "missing.onnx", *p, match="does not exist")
    _bad(capsys, tmp_path, folder, "--onnx", q, "--text-encoder-onnx", q / "transformer/model.onnx", *p,
         match="diffusion transformer's graph")
    _bad(capsys, tmp_path, folder, "--onnx", q / "text_encoder/model.onnx", *p, match="--text-encoder-onnx")
    (tmp_path / "empty").mkdir()
    _bad(capsys, tmp_path, folder, "--onnx", tmp_path / "empty", *p, match="neither model.onnx nor transformer/")
    _bad(capsys, tmp_path, folder, *p, match="give a quantized model")
    _bad(capsys, tmp_path, folder, "--onnx", q / "transformer/model.onnx", "--text-encoder-engine",
         tmp_path / "te.plan", *p, match="--text-encoder-engine needs")
    _bad(capsys, tmp_path, folder, "--onnx", q, "--text-encoder-engine", tmp_path / "missing.plan", *p,
         match="engine file")
