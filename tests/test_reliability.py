"""Reliability: bad input, interruption and determinism, with nothing lost.

Every bad input ends as one line on stderr (``loraq: error: <problem>; <fix>``), exit status 2, and
leaves nothing behind (no output directory, no staging directory). A run killed with SIGKILL at
any moment leaves the previous output intact (or none) and a partial state that the same command
resumes to a result byte-identical to a fresh run. The same command and seed give byte-identical
files. The rules themselves live in loraq_export/inputs.py, outputs.py, checkpoint.py and
recipes.py; the cases already covered elsewhere (test_cli.py: recipe strings, unknown method,
missing model, rank too large, existing --out for export; test_diffusion_cli.py: empty, pipeline
without transformer, unsupported class, truncated diffusers weights) are not repeated here.
"""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusion_fixtures import tiny_config
from loraq_export.cli import main
from preconditions import require
from loraq_export.models.diffusion import build_from_config

FAST = ["--workers", "1", "--no-progress"]
# how a message states its fix: after a semicolon, or as the requirement itself
FIX_CUES = ("; ", " must ", " needs ", "expected", "supported are", " --help)")


# ------------------------------------------------------------------ helpers
def leftovers(parent: Path, name: str) -> list:
    """Staging, swapped-out and temporary entries that a run may leave beside ``name``."""
    return sorted(p.name for p in parent.iterdir()
                  if p.name.startswith(f".{name}.") and not p.name == f".{name}.partial")


def expect_refusal(capfd, tmp_path, args, *needles, out_name="out"):
    """Run the CLI in-process; assert exit 2, one 'loraq: error:' line naming the problem, no output."""
    out = tmp_path / out_name
    code = main([*args, "--out", str(out)])
    err = capfd.readouterr().err.strip()
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("loraq: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert any(cue in lines[0] for cue in FIX_CUES), f"no fix given: {lines[0]}"
    assert not out.exists()
    assert leftovers(tmp_path, out_name) == []
    assert not (tmp_path / f".{out_name}.partial").exists()
    return lines[0]


def tiny_model(seed=0, num_layers=1):
    cls, cfg = tiny_config("pixart-sigma")
    return build_from_config(cls, {**cfg, "num_layers": num_layers}, seed=seed)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny") / "pixart"
    tiny_model().save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_folder):
    from loraq_export.options import Options
    from loraq_export.commands.quantize import run_quantize
    out = tmp_path_factory.mktemp("ck") / "ckpt"
    run_quantize(Options(model=str(tiny_folder), recipe="w4a8-g32-r4-w8a8", method="lqer", out=out, workers=1,
                         progress=False), echo=lambda s: None)
    return out


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_tensors(ckpt: Path, fn):
    """Rewrite model.safetensors with fn(tensors), keeping its metadata."""
    from safetensors import safe_open
    path = ckpt / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    fn(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)


def edit_config(ckpt: Path, fn):
    cfg = json.loads((ckpt / "config.json").read_text())
    fn(cfg)
    (ckpt / "config.json").write_text(json.dumps(cfg))


# ------------------------------------------------------------------ bad input: checkpoints
Q = "transformer_blocks.0.attn1.to_q"


def _drop_qconfig(c):
    del c["quantization_config"]


def _newer(c):
    c["quantization_config"]["version"] = 99


def _bad_shape(c):
    c["quantization_config"]["layers"][Q]["shape"] = [32, 48]


def _foreign_layer(c):
    c["quantization_config"]["layers"]["transformer_blocks.7.attn1.to_q"] = c["quantization_config"]["layers"][Q]


@pytest.mark.parametrize("edit,needles", [
    (_drop_qconfig, ["config.json has no quantization_config", "model.safetensors is a loraq checkpoint", "restore"]),
    (_newer, ["format version 99", "upgrade loraq"]),
    (_bad_shape, ["disagrees with its tensors", "re-run loraq quantize"]),
    (_foreign_layer, ["disagrees with its tensors", "re-run loraq quantize"]),
], ids=["qconfig-missing", "newer-version", "layer-shape-edited", "foreign-layer"])
def test_checkpoint_config_problems(tmp_path, capfd, tiny_ckpt, edit, needles):
    ck = copy(tiny_ckpt, tmp_path / "ck")
    edit_config(ck, edit)
    expect_refusal(capfd, tmp_path, ["export", str(ck), *FAST], *needles)


def _drop_scales(t):
    del t[f"{Q}.wscales"]


def _drop_bias_of_kept_layer(t):
    del t["proj_out.bias"]


def _reshape_kept(t):
    t["proj_out.weight"] = torch.zeros(7, 32)


def _nan_scale(t):
    t[f"{Q}.wscales"][0, 0] = float("nan")


def _inf_kept(t):
    t["proj_out.weight"][0, 0] = float("inf")


@pytest.mark.parametrize("edit,needles", [
    (_drop_scales, [f"{Q}.wscales", "disagrees with its tensors"]),
    (_drop_bias_of_kept_layer, ["missing", "proj_out.bias"]),
    (_reshape_kept, ["do not fit the model", "re-run loraq quantize"]),
    (_nan_scale, [f"{Q}.wscales has NaN", "damaged"]),
    (_inf_kept, ["proj_out.weight has Inf", "damaged"]),
], ids=["quantized-tensor-missing", "kept-tensor-missing", "kept-tensor-reshaped", "nan-scale", "inf-weight"])
def test_checkpoint_tensors_disagree(tmp_path, capfd, tiny_ckpt, edit, needles):
    ck = copy(tiny_ckpt, tmp_path / "ck")
    edit_tensors(ck, edit)
    expect_refusal(capfd, tmp_path, ["export", str(ck), *FAST], *needles)


def test_checkpoint_truncated(tmp_path, capfd, tiny_ckpt):
    ck = copy(tiny_ckpt, tmp_path / "ck")
    st = ck / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size * 2 // 3])
    expect_refusal(capfd, tmp_path, ["export", str(ck), *FAST], "corrupted or truncated", "re-run loraq quantize")


def test_checkpoint_given_to_quantize(tmp_path, capfd, tiny_ckpt):
    expect_refusal(capfd, tmp_path, ["quantize", str(tiny_ckpt), *FAST], "already quantized", "loraq export")


# ------------------------------------------------------------------ bad input: model folders
def test_missing_weight_is_not_filled_with_random_values(tmp_path, capfd, tiny_folder):
    folder = copy(tiny_folder, tmp_path / "m")
    st = next(folder.glob("*.safetensors"))
    t = load_file(str(st))
    del t[f"{Q}.weight"]
    save_file(t, str(st), metadata={"format": "pt"})
    for cmd in ("export", "quantize"):
        expect_refusal(capfd, tmp_path, [cmd, str(folder), "--method", "rtn", "--recipe", "w4a16-g32", *FAST],
                       "missing", f"{Q}.weight", "re-download")


@pytest.mark.parametrize("layer,value,kind", [(f"{Q}.weight", float("nan"), "NaN"),
                                              ("proj_out.weight", float("-inf"), "Inf")],
                         ids=["nan-in-quantized-layer", "inf-in-kept-layer"])
def test_nan_inf_weights_in_a_saved_folder(tmp_path, capfd, layer, value, kind):
    m = tiny_model()
    with torch.no_grad():
        m.get_parameter(layer)[3, 5] = value
    m.save_pretrained(tmp_path / "m")
    for cmd in ("export", "quantize"):
        expect_refusal(capfd, tmp_path, [cmd, str(tmp_path / "m"), "--method", "rtn", "--recipe", "w4a16-g32", *FAST],
                       f"{layer} has {kind}", "damaged")


@pytest.mark.parametrize("make,needles", [
    (lambda p: p.mkdir(), ["neither model_index.json nor config.json"]),
    (lambda p: (p.mkdir(), (p / "model_index.json").write_text('{"vae": ["diffusers", "AutoencoderKL"]}')),
     ["no 'transformer' entry"]),
    (lambda p: (p.mkdir(), (p / "config.json").write_text('{"_class_name": "FluxTransformer2DModel"}')),
     ["unsupported diffusers class", "supported are"]),
    (lambda p: p.write_text("not a folder"), ["not a folder"]),
    (lambda p: p.symlink_to(p.parent / "nowhere"), ["does not exist"]),
], ids=["no-transformer", "pipeline-without-transformer", "unsupported-class", "a-file", "dangling-link"])
def test_bad_model_paths_for_quantize_too(tmp_path, capfd, make, needles):
    """The model rules are shared: quantize refuses what export refuses (export: test_diffusion_cli.py)."""
    make(tmp_path / "m")
    expect_refusal(capfd, tmp_path, ["quantize", str(tmp_path / "m"), *FAST], *needles)


UNREADABLE_SCRIPT = textwrap.dedent("""
    import contextlib, io, json, sys
    from loraq_export.cli import main
    results = {}
    for case, argv in json.loads(sys.argv[1]).items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(argv)
        results[case] = [code, err.getvalue()]
    print(json.dumps(results))
""")


def test_unreadable_model_paths(tmp_path, tiny_folder, quantized_onnx):
    """Tests run as root, which reads anything: the run drops CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH
    with setpriv, so file permissions apply to it as to any user."""
    require(os.geteuid() == 0, "runs as root, to drop the capabilities that bypass file permissions "
                               "(as another user, permissions apply anyway but the setup differs)")
    require(shutil.which("setpriv") is not None, "needs setpriv (util-linux) to drop capabilities")
    cases = {"dir": "", "dir-no-search": "", "config": "config.json", "weights": "diffusion_pytorch_model.safetensors"}
    runs = {}
    for case, inner in cases.items():
        copy(tiny_folder, tmp_path / case)
        target = tmp_path / case / inner if inner else tmp_path / case
        os.chmod(target, 0o444 if case == "dir-no-search" else 0)
        runs[case] = ["export", case, "--out", f"out-{case}", "--method", "rtn", "--recipe", "w4a16-g32", "--no-progress"]
    shutil.copy(quantized_onnx, tmp_path / "model.onnx")
    os.chmod(tmp_path / "model.onnx", 0)
    runs["onnx"] = ["check", "model.onnx"]
    drop = "-dac_override,-dac_read_search"
    try:
        p = subprocess.run(["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", sys.executable, "-c",
                            UNREADABLE_SCRIPT, json.dumps(runs)], cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)
    finally:
        for case in cases:
            os.chmod(tmp_path / case, 0o755)
            for f in (tmp_path / case).iterdir():
                os.chmod(f, 0o644)
    require(not (p.returncode and "setpriv" in p.stderr), f"setpriv cannot drop capabilities here: {p.stderr.strip()}")
    assert p.returncode == 0 and p.stderr.strip() == "", p.stderr[-3000:]
    results = json.loads(p.stdout.strip().splitlines()[-1])
    assert set(results) == set(runs)
    for case, (code, err) in results.items():
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("loraq: error:"), (case, err)
        assert "permission denied" in lines[0].lower(), (case, lines[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*cases, "model.onnx"])  # no output, no staging


# ------------------------------------------------------------------ bad input: recipes, outputs
@pytest.mark.parametrize("text,needles", [
    ("recipe: [unclosed", ["is not valid YAML"]),
    ("- just\n- a list\n", ["expected a mapping"]),
    ("recipe: w4a16-g64\nmystery: 1\n", ["unknown key(s) mystery", "allowed:"]),
    ("method: loraq\n", ["missing 'recipe'"]),
    ("recipe: w4a16-g48\n", ["group size 48 is not supported"]),
    ("recipe: w4a16-g64-r32-w8a8\nmethod: magic\n", ["unknown method 'magic'"]),
    ("recipe: w4a16-g64\ninclude: 3\n", ["'include' must be a list"]),
    ("recipe: w4a16-g64\noverrides: [{pattern: '*'}]\n", ["each override needs exactly 'pattern' and 'recipe'"]),
    ("recipe: w4a16-g64\noverrides: [{pattern: '*', recipe: w9}]\n", ["bad recipe 'w9'"]),
    ("recipe: w4a16-g64\noptions: 5\n", ["'options' must be a mapping"]),
], ids=["yaml-syntax", "not-a-mapping", "unknown-key", "no-recipe", "bad-group", "bad-method", "bad-include",
        "override-without-recipe", "bad-override-recipe", "bad-options"])
@pytest.mark.parametrize("cmd", ["export", "quantize"])
def test_malformed_recipe_files(tmp_path, capfd, cmd, text, needles):
    f = tmp_path / "r.yaml"
    f.write_text(text)
    expect_refusal(capfd, tmp_path, [cmd, "pixart-sigma", "--num-layers", "1", "--recipe", str(f), *FAST], *needles)


@pytest.mark.parametrize("recipe,needle", [
    ("", "bad recipe"), ("w4a16-g64-r32", "expected r<rank>-<branch format>"), ("w4a16-g64-rx-w8a8", "expected r<rank>"),
    ("w4a16-g64-r0-w8a8", "rank must be at least 1"), ("w5a16-g64", "unknown main format"),
    ("w4a16-gxx", "is not a group size"), ("w4a16-g64-r8-w8a8-extra", "expected r<rank>"),
])
def test_malformed_recipe_strings_for_quantize(tmp_path, capfd, recipe, needle):
    expect_refusal(capfd, tmp_path, ["quantize", "--recipe", recipe, *FAST], needle)


def test_malformed_json_recipe(tmp_path, capfd):
    f = tmp_path / "r.json"
    f.write_text('{"recipe": "w4a16-g64",')
    expect_refusal(capfd, tmp_path, ["quantize", "--recipe", str(f), *FAST], "is not valid JSON")


def test_rank_larger_than_layer_for_quantize(tmp_path, capfd, tiny_folder):
    expect_refusal(capfd, tmp_path, ["quantize", str(tiny_folder), "--recipe", "w4a16-g32-r64-w8a8", *FAST],
                   "rank 64 is larger than min(in, out) = 32", "lower the rank")


def test_existing_output_is_refused_by_quantize(tmp_path, capfd, tiny_folder):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    code = main(["quantize", str(tiny_folder), "--out", str(out), *FAST])
    err = capfd.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--overwrite" in err
    assert (out / "keep").read_text() == "x" and leftovers(tmp_path, "out") == []
    (tmp_path / "file").write_text("x")
    code = main(["quantize", str(tiny_folder), "--out", str(tmp_path / "file"), "--overwrite", *FAST])
    err = capfd.readouterr().err.strip()
    assert code == 2 and "not a directory" in err and (tmp_path / "file").read_text() == "x"


def test_group_not_dividing_in_features_is_refused_per_layer(tmp_path, tiny_folder):
    """The rule (docs/methods.md, 'Recipes'): never padded; the layer stays in high precision, and the
    report says why. The tiny model's attention layers have 32 inputs: g64 leaves them out."""
    from loraq_export.options import Options
    from loraq_export.commands.quantize import run_quantize
    rep = run_quantize(Options(model=str(tiny_folder), recipe="w4a16-g64-r8-w8a8", method="lqer",
                               out=tmp_path / "ck", workers=1, progress=False), echo=lambda s: None)
    layers = {l["name"]: l for l in rep["layers"]}
    assert not layers[Q]["quantized"]
    assert layers[Q]["reason"] == "in_features 32 not divisible by group size 64: kept in high precision"
    assert layers["transformer_blocks.0.ff.net.2"]["quantized"]  # 128 inputs: two groups of 64
    q = json.loads((tmp_path / "ck" / "config.json").read_text())["quantization_config"]
    assert Q in q["skipped"] and "not divisible" in q["skipped"][Q]


def test_a_group_no_layer_can_take_names_the_width_and_the_group():
    from loraq_export.errors import UserError
    from loraq_export.fit.plan import plan_layers
    from loraq_export.fit.recipes import load_recipe
    narrow = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    with pytest.raises(UserError, match="2 selected layer.*in_features \\(32 for 0\\).*group size 128 does not divide"):
        plan_layers(narrow, load_recipe("w4a16-g128-r8-w8a8"), lambda n, m: (True, "selected"))


# ------------------------------------------------------------------ all-zero rows and columns
def test_all_zero_rows_columns_and_layers_export_cleanly(tmp_path):
    import onnx
    from onnx import numpy_helper
    m = tiny_model(seed=1)
    with torch.no_grad():
        m.get_parameter(f"{Q}.weight").zero_()  # a whole layer
        w = m.get_parameter("transformer_blocks.0.attn1.to_k.weight")  # (out, in)
        w[:5] = 0  # output channels
        w[:, 7:19] = 0  # input rows, across a group boundary
        m.get_parameter("transformer_blocks.0.ff.net.2.weight")[:, :32] = 0  # a whole group of 32 inputs
    m.save_pretrained(tmp_path / "m")
    out = tmp_path / "out"
    code = main(["export", str(tmp_path / "m"), "--recipe", "w4a4-g32-r4-w8a8", "--out", str(out), *FAST])
    assert code == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["validation"]["passed"] and np.isfinite(rep["validation"]["worst_layer"]["rel_l2"])
    errs = {l["name"]: l["rel_error"] for l in rep["layers"] if l["quantized"]}
    assert all(np.isfinite(e) for e in errs.values())
    assert errs[Q] == 0.0  # a zero layer is exactly zero, not NaN
    model = onnx.load(str(out / "model.onnx"))
    scales = [numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("_scale")]
    assert scales and all(np.isfinite(s).all() and (s != 0).all() for s in scales)  # signed for ORT, never 0
    from graphs.runtime import ort_session
    feeds = dict(zip([i.name for i in model.graph.input], [t.numpy() for t in _inputs(m)]))
    y = ort_session(str(out / "model.onnx")).run(None, feeds)[0]
    assert np.isfinite(y).all()


def _inputs(module):
    from loraq_export.models.diffusion import make_diffusion_model
    return make_diffusion_model(module, "x").make_inputs(seed=3, batch=2)


# ------------------------------------------------------------------ ONNX files to check / validate
def _fp_onnx(path: Path):
    import onnx
    from onnx import TensorProto, helper
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], np.ones(12, np.float32))
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), str(path))


@pytest.fixture(scope="module")
def quantized_onnx(tmp_path_factory, tiny_folder):
    from loraq_export.commands.export import run_export
    from loraq_export.options import Options
    out = tmp_path_factory.mktemp("qonnx") / "out"
    run_export(Options(model=str(tiny_folder), recipe="w4a16-g32", method="rtn", out=out, workers=1,
                       progress=False, quality=False), echo=lambda s: None)
    return out / "model.onnx"


def _bad_onnx_files(tmp_path: Path, good: Path) -> dict:
    files = {"text": b"this is not onnx\n", "empty": b"", "json": b'{"graph": 1}', "random": os.urandom(4096),
             "truncated": good.read_bytes()[: good.stat().st_size // 3]}
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / f"{name}.onnx"
        paths[name].write_bytes(data)
    paths["fp"] = tmp_path / "fp.onnx"
    _fp_onnx(paths["fp"])
    paths["folder"] = tmp_path / "folder.onnx"
    paths["folder"].mkdir()
    paths["missing"] = tmp_path / "missing.onnx"
    return paths


# messages of loraq_export.export.onnx_files.load_onnx_for_check, the one reader of `loraq check`'s file
ONNX_NEEDLES = {"text": "is not an ONNX model", "empty": "is not an ONNX model", "json": "is not an ONNX model",
                "random": "is not an ONNX model", "truncated": "is not an ONNX model", "fp": "has no quantized layers",
                "folder": "folder", "missing": "does not exist"}


def test_check_command_refuses_bad_onnx_files(tmp_path, capfd, quantized_onnx):
    for case, path in _bad_onnx_files(tmp_path, quantized_onnx).items():
        code = main(["check", str(path), "--target", "tensorrt"])
        err = capfd.readouterr().err.strip()
        lines = err.splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("loraq: error:"), (case, err)
        assert any(cue in lines[0] for cue in FIX_CUES), (case, lines[0])
        assert ONNX_NEEDLES[case] in lines[0], (case, lines[0])
    assert main(["check", str(quantized_onnx), "--target", "ort"]) == 0  # the real file is checked, and passes
    assert capfd.readouterr().out.strip() == "OK: no violations of the ort rules"


# ------------------------------------------------------------------ determinism
@pytest.mark.slow
def test_export_is_byte_identical_across_runs_and_processes(tmp_path, tiny_folder):
    """Same command, same seed: the same model.onnx, in one process (twice) and from the CLI."""
    from loraq_export.commands.export import run_export
    from loraq_export.options import Options
    args = dict(model=str(tiny_folder), recipe="w4a8-g32-r8-w8a8", method="loraq", workers=1, progress=False,
                quality=False, seed=3)
    for name in ("a", "b"):
        run_export(Options(**args, out=tmp_path / name), echo=lambda s: None)
    p = subprocess.run([sys.executable, "-m", "loraq_export.cli", "export", str(tiny_folder), "--recipe",
                        "w4a8-g32-r8-w8a8", "--seed", "3", "--no-quality", "--out", str(tmp_path / "c"), *FAST],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    a = (tmp_path / "a" / "model.onnx").read_bytes()
    assert a == (tmp_path / "b" / "model.onnx").read_bytes() == (tmp_path / "c" / "model.onnx").read_bytes()


# ------------------------------------------------------------------ interruption (kill -9)
def kill_when(args, trigger, timeout=240) -> bool:
    """Start the CLI, SIGKILL it as soon as ``trigger(seconds)`` holds; False if it finished first."""
    p = subprocess.Popen([sys.executable, "-m", "loraq_export.cli", *args], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    try:
        while p.poll() is None:
            if trigger(time.monotonic() - t0):
                p.kill()
                p.wait()
                return True
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"{args[0]} ran past {timeout} s")
            time.sleep(0.005)
        return False
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def staging_appeared(parent: Path, name: str, trigger_file: str = None):
    """A trigger: a new staging directory (holding ``trigger_file``) appeared since the run started."""
    before = []

    def check(_t):
        now = set(parent.glob(f".{name}.staging-*"))
        if not before:  # the first call comes right after the start: stale ones from earlier kills
            before.append(now)
            return False
        return any(trigger_file is None or (s / trigger_file).exists() for s in now - before[0])
    return check


def assert_partial_resumable(partial: Path):
    """Whatever a kill left in the partial directory is either absent or loads correctly."""
    from loraq_export.store.resume import read_layer_file
    if not partial.exists():
        return 0
    if (partial / "run.json").exists():
        json.loads((partial / "run.json").read_text())
    files = sorted((partial / "layers").glob("*.safetensors")) if (partial / "layers").exists() else []
    for f in files:
        name, rec = read_layer_file(f)
        assert f.name == f"{name}.safetensors" and torch.isfinite(rec.effective_weight()).all()
    return len(files)


FAST_LORAQ = "recipe: w4a16-g64-r16-w8a8\nmethod: loraq\noptions: {steps: 20, init_iters: 2}\n"


@pytest.mark.slow
def test_kill_quantize_at_any_moment_keeps_old_output_and_resumes_byte_identically(tmp_path):
    from loraq_export.store.checkpoint import load_checkpoint
    from loraq_export.options import Options
    from loraq_export.commands.quantize import run_quantize
    recipe = tmp_path / "fast.yaml"
    recipe.write_text(FAST_LORAQ)
    preset = dict(model="pixart-sigma", num_layers=1, workers=1, progress=False)
    ref, out = tmp_path / "ref", tmp_path / "ck"
    run_quantize(Options(**preset, recipe="w4a16-g64", method="rtn", out=out), echo=lambda s: None)  # the old state
    old = {f: (out / f).read_bytes() for f in ("model.safetensors", "config.json", "report.json")}
    partial = tmp_path / ".ck.partial"
    args = ["quantize", "pixart-sigma", "--num-layers", "1", "--recipe", str(recipe), "--out", str(out),
            "--overwrite", *FAST]
    # the fresh, uninterrupted run in a process like the killed ones: the statistics pass runs on
    # the process's intra-op threads (this test process has one), and its float sums, hence GPTQ's
    # roundings, depend on that thread count
    fresh = [a if a != str(out) else str(ref) for a in args]
    p = subprocess.run([sys.executable, "-m", "loraq_export.cli", *fresh], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    moments = [("after 1 s", lambda t: t >= 1.0), ("after 3 s", lambda t: t >= 3.0),
               ("3 layers fitted", lambda t: len(list(partial.glob("layers/*.safetensors"))) >= 3),
               ("writing the checkpoint", staging_appeared(tmp_path, "ck"))]
    for what, trigger in moments:
        assert kill_when(args, trigger), f"the run finished before the kill ({what})"
        assert {f: (out / f).read_bytes() for f in old} == old, f"old checkpoint changed by a kill {what}"
        assert_partial_resumable(partial)
        if what == "writing the checkpoint":
            assert leftovers(tmp_path, "ck"), "the kill came after the checkpoint was complete"
    assert assert_partial_resumable(partial) >= 3
    load_checkpoint(out)  # the old checkpoint still loads
    p = subprocess.run([sys.executable, "-m", "loraq_export.cli", *args], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    for f in ("model.safetensors", "config.json"):
        assert (out / f).read_bytes() == (ref / f).read_bytes(), f"resumed {f} differs from a fresh run"
    assert not partial.exists() and leftovers(tmp_path, "ck") == []  # stale staging of the killed runs removed


@pytest.mark.slow
def test_kill_export_at_any_moment_keeps_old_output(tmp_path, tiny_folder):
    import onnx
    from loraq_export.commands.export import run_export
    from loraq_export.options import Options
    from graphs.runtime import ort_session
    ref, out = tmp_path / "ref", tmp_path / "out"
    common = dict(model=str(tiny_folder), workers=1, progress=False)
    run_export(Options(**common, recipe="w4a8-g32-r8-w8a8", method="lqer", out=ref), echo=lambda s: None)
    run_export(Options(**common, recipe="w4a16-g32", method="rtn", out=out), echo=lambda s: None)  # the old state
    old = {f: (out / f).read_bytes() for f in ("model.onnx", "report.json")}
    args = ["export", str(tiny_folder), "--recipe", "w4a8-g32-r8-w8a8", "--method", "lqer", "--out", str(out),
            "--overwrite", *FAST]
    moments = [("after 1 s", lambda t: t >= 1.0),
               ("staging created", staging_appeared(tmp_path, "out")),
               ("model.onnx being written or validated", staging_appeared(tmp_path, "out", "model.onnx"))]
    for what, trigger in moments:
        assert kill_when(args, trigger), f"the run finished before the kill ({what})"
        assert {f: (out / f).read_bytes() for f in old} == old, f"old output changed by a kill {what}"
        assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "report.json"]
        if what != "after 1 s":
            assert leftovers(tmp_path, "out"), "the kill came after the output was complete"
    ort_session(str(out / "model.onnx"))
    onnx.checker.check_model(str(out / "model.onnx"))
    p = subprocess.run([sys.executable, "-m", "loraq_export.cli", *args], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (out / "model.onnx").read_bytes() == (ref / "model.onnx").read_bytes()
    assert leftovers(tmp_path, "out") == []


def test_overwrite_is_one_atomic_exchange_and_stale_staging_is_removed(tmp_path, monkeypatch):
    import socket
    from loraq_export.store import outputs
    out = tmp_path / "o"
    out.mkdir()
    (out / "f").write_text("old")
    # renameat2(RENAME_EXCHANGE) of a path with itself: a no-op where the OS offers it
    require(outputs._exchange(out, out), "no renameat2 RENAME_EXCHANGE on this platform (Linux >= 3.15 with glibc "
                                         ">= 2.28): staged_dir falls back to two renames, not tested here")
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    stale = tmp_path / f".o.staging-{host}-{dead.pid}-abc"
    live = tmp_path / f".o.staging-{host}-1-abc"  # pid 1 runs: another run's staging is left alone
    for d in (stale, live):
        d.mkdir()
    replaced = []
    real = os.replace
    monkeypatch.setattr(outputs.os, "replace", lambda a, b: (replaced.append((a, b)), real(a, b))[1])
    with outputs.staged_dir(out, overwrite=True) as stage:
        (stage / "f").write_text("new")
    assert (out / "f").read_text() == "new" and replaced == []  # no moment without an 'o'
    assert not stale.exists() and live.exists()
    assert leftovers(tmp_path, "o") == [live.name]
