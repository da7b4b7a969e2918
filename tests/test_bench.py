"""``loraq bench``: a tiny grid writes valid results, a re-run skips finished pairs, ort-rtn's bits
are counted right, and bad input fails before any fitting with one line and no output."""
import json
import math

import numpy as np
import onnx
import pytest
import torch

from diffusion_fixtures import tiny_config
from loraq_export.cli import main
from loraq_export.commands.bench import build_grid
from loraq_export.errors import UserError
from loraq_export.commands.bench_report import pareto, peer_ratios
from loraq_export.models.diffusion import build_from_config

TINY_RECIPES = "w4a16-g32-r8-w4a16,w4a16-g32-r8-w8a8-asym"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny PixArt-Sigma transformer folder (1 block, width 32): the bench's diffusion path, fast."""
    root = tmp_path_factory.mktemp("tiny_pixart")
    cls, cfg = tiny_config("pixart-sigma")
    build_from_config(cls, cfg, seed=1).save_pretrained(root / "px")
    return root / "px"


def _no_fitting(monkeypatch):
    """Make every way of fitting a pair fail loudly: a test that passes did not fit."""
    import loraq_export.evaluate.bench_rows as rows

    def refuse(*a, **k):
        raise AssertionError("a pair was fitted")
    monkeypatch.setattr(rows, "fit_layers", refuse)
    monkeypatch.setattr(rows, "ort_quantize", refuse)


def _bench(capsys, *args):
    code = main(["bench", *args, "--no-progress"])
    return code, capsys.readouterr()


@pytest.mark.parametrize("args,needle", [
    (["--methods", "rtn,nosuch"], "unknown method 'nosuch'"),
    (["--recipes", "w4a16-g48"], "bad recipe 'w4a16-g48'"),
    (["--recipes", "w4a16-g64-r32"], "bad recipe 'w4a16-g64-r32'"),
    (["--methods", "rtn,loraq", "--recipes", "w4a16-g64-r32-w8a8,w4a16-g64"], "pair loraq x w4a16-g64:"),
    (["--methods", "ort-rtn", "--recipes", "w4a16-gch"], "pair ort-rtn x w4a16-gch:"),
    (["--methods", "ort-rtn", "--recipes", "w4a8-g64"], "pair ort-rtn x w4a8-g64:"),
])
def test_bad_input_fails_before_fitting_with_one_line(tmp_path, capsys, monkeypatch, args, needle):
    _no_fitting(monkeypatch)
    out = tmp_path / "bench"
    code, cap = _bench(capsys, "--out", str(out), *args)
    lines = cap.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("loraq: error:") and needle in lines[0], cap.err
    assert not out.exists()


def test_a_rank_a_layer_cannot_take_fails_before_fitting(tiny_folder, tmp_path, capsys, monkeypatch):
    _no_fitting(monkeypatch)
    out = tmp_path / "bench"
    code, cap = _bench(capsys, str(tiny_folder), "--methods", "rtn,lqer", "--recipes", "w4a16-g32-r64-w8a8", "--out", str(out))
    lines = cap.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "rank 64 is larger" in lines[0], cap.err
    assert not out.exists()


def test_pairs_that_collapse_are_computed_once():
    grid = build_grid("rtn,hqq,loraq", "w4a16-g64-r32-w8a8,w4a16-g64-r16-w4a16")
    pairs = {(p.method, p.recipe): p.requested for p in grid}
    assert pairs == {("rtn", "w4a16-g64"): ["w4a16-g64-r32-w8a8", "w4a16-g64-r16-w4a16"],
                     ("hqq", "w4a16-g64-asym"): ["w4a16-g64-r32-w8a8", "w4a16-g64-r16-w4a16"],
                     ("loraq", "w4a16-g64-r32-w8a8"): ["w4a16-g64-r32-w8a8"],
                     ("loraq", "w4a16-g64-r16-w4a16"): ["w4a16-g64-r16-w4a16"]}


def test_budgets_add_allocated_pairs_except_for_ort_rtn():
    grid = build_grid("ort-rtn,gptq", "w4a16-g64-asym,w4a16-g128-asym@4.8", "4.5625,5")
    assert [(p.method, p.recipe) for p in grid] == [
        ("ort-rtn", "w4a16-g64-asym"), ("gptq", "w4a16-g64-asym"), ("gptq", "w4a16-g64-asym@4.5625"),
        ("gptq", "w4a16-g64-asym@5"), ("gptq", "w4a16-g128-asym@4.8")]
    for bad in ("0", "abc", "-1", "nan"):
        with pytest.raises(UserError, match="not a positive number of bits"):
            build_grid("gptq", "w4a16-g64", bad)
    with pytest.raises(UserError, match="not a positive number of bits"):
        build_grid("gptq", "w4a16-g64@x")


def test_ratio_takes_the_best_peer_at_equal_or_fewer_bits():
    def row(method, bits, err):
        return {"method": method, "recipe": f"{method}-{bits}", "bits_per_weight": bits, "e2e_error": err}
    rows = [row("hqq", 4.28, 0.04), row("ort-rtn", 4.5, 0.03), row("rtn", 4.5, 0.001), row("ort-rtn", 5.2, 0.01),
            row("loraq", 4.5, 0.015), row("loraq", 4.1, 0.02), row("gptq", 4.5, 0.006)]
    rows.append(dict(row("hqq", 4.5, 0.005), recipe="w4a16-g64-asym@4.5"))  # loraq's allocation, not the peer's
    by_recipe = {q["recipe"]: q for q in peer_ratios(rows)}
    assert by_recipe["gptq-4.5"]["ratio"] == pytest.approx(0.2)
    assert by_recipe["loraq-4.5"]["best_peer"]["recipe"] == "ort-rtn-4.5"  # rtn is no peer; 5.2 bits is too many
    assert by_recipe["loraq-4.5"]["ratio"] == pytest.approx(0.5)
    assert by_recipe["loraq-4.1"]["best_peer"] is None and by_recipe["loraq-4.1"]["ratio"] is None
    assert pareto([(4.5, 0.03), (4.28, 0.04), (5.0, 0.05), (5.2, 0.01)]) == [(4.28, 0.04), (4.5, 0.03), (5.2, 0.01)]


def _independent_bits(model: onnx.ModelProto) -> tuple[int, int]:
    """(stored bits, weights) of every MatMulNBits node, from its attributes and initializer dims only."""
    inits = {i.name: i for i in model.graph.initializer}
    bits = weights = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
        blocks = math.ceil(a["K"] / a["block_size"])
        assert a["bits"] == 4 and list(inits[node.input[1]].dims) == [a["N"], blocks, a["block_size"] // 2]
        assert list(inits[node.input[2]].dims) in ([a["N"], blocks], [a["N"] * blocks])
        assert inits[node.input[2]].data_type == onnx.TensorProto.FLOAT
        bits += a["N"] * blocks * a["block_size"] * 4 + a["N"] * blocks * 32  # 4-bit codes, fp32 scales
        if len(node.input) > 3 and node.input[3]:
            bits += a["N"] * blocks * 4  # 4-bit zero points
        weights += a["K"] * a["N"]
    return bits, weights


def _ort_rtn(folder, recipe):
    """ONNX Runtime's quantizer on ``folder``'s FP graph, as the bench runs it: (loaded, plans,
    FP weights, FP graph, layer -> node, quantized graph, per-layer figures)."""
    from loraq_export.commands.bench import plan_pair
    from loraq_export.evaluate.peers import matmul_layers, ort_quantize, ort_rtn_layers
    from loraq_export.export.onnx_export import export_graph
    from loraq_export.models import load_model
    loaded = load_model(str(folder))
    rec, plans = plan_pair(loaded, build_grid("ort-rtn", recipe)[0])
    mods = dict(loaded.module.named_modules())
    weights = {p.name: mods[p.name].weight.detach().T.contiguous().numpy() for p in plans if p.quantize}
    fp = export_graph(loaded, loaded.make_inputs(seed=0, batch=2))[0]
    nodes = matmul_layers(fp, weights)
    model, _ = ort_quantize(fp, nodes, rec.layer.main.weight)
    return loaded, plans, weights, fp, nodes, model, ort_rtn_layers(model, nodes, weights)


@pytest.mark.parametrize("recipe", ["w4a16-g32", "w4a16-g32-asym"])
def test_ort_rtn_bits_and_weights_are_read_right(tiny_folder, recipe):
    _, plans, weights, fp, nodes, model, layers = _ort_rtn(tiny_folder, recipe)
    bits, n = _independent_bits(model)
    assert sum(v["bits"] for v in layers.values()) == bits and sum(v["weights"] for v in layers.values()) == n
    assert bits / n == pytest.approx(4 + 32 / 32 + (4 / 32 if "asym" in recipe else 0))
    # only the layers loraq selects: the other MatMuls (outside transformer_blocks) keep their float weights
    fp_mm = {x.name for x in fp.graph.node if x.op_type == "MatMul"}
    left = {x.name for x in model.graph.node if x.op_type == "MatMul"}
    assert left == fp_mm - set(nodes.values()) and any(not p.quantize for p in plans)
    # dequantized back, each layer is within a 4-bit grid's reach of its FP weight, not a garbled copy
    for name, v in layers.items():
        step = np.abs(weights[name]).max() / 7
        assert np.abs(v["weight_kn"] - weights[name]).max() <= step and 0 < v["rel_error"] < 0.2


@pytest.fixture(scope="module")
def tiny_bench(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    args = ["bench", str(tiny_folder), "--methods", "rtn,loraq", "--recipes", TINY_RECIPES, "--out", str(out),
            "--workers", "1", "--no-progress", "--latency"]
    assert main(args) == 0
    return out, args


@pytest.mark.slow
def test_tiny_grid_writes_json_markdown_and_png(tiny_bench):
    out, _ = tiny_bench
    res = json.loads((out / "results.json").read_text())
    assert {(r["method"], r["recipe"]) for r in res["rows"]} == {
        ("rtn", "w4a16-g32"), ("rtn", "w4a16-g32-asym"), ("loraq", "w4a16-g32-r8-w4a16"), ("loraq", "w4a16-g32-r8-w8a8-asym")}
    bits = [r["bits_per_weight"] for r in res["rows"]]
    assert bits == sorted(bits)
    for r in res["rows"]:
        assert 0 < r["weight_error"]["mean"] <= r["weight_error"]["max"] < 0.3
        assert 0 < r["e2e_error"] < 0.05 and r["quality"]["onnx"]["psnr_db"] > 20
        assert abs(r["quality"]["torch"]["psnr_db"] - r["quality"]["onnx"]["psnr_db"]) < 3
        assert r["timings_s"]["fit"] > 0 and r["onnx_check"]["worst_layer_rel_l2"] < 1e-3
        lat = r["latency"]
        assert lat["accuracy_level"] == 4 and lat["fp_ms"] > 0 and lat["ratio"] == pytest.approx(
            lat["quantized_ms"] / lat["fp_ms"], rel=1e-2)
    loraq = {r["recipe"]: r for r in res["rows"] if r["method"] == "loraq"}
    assert loraq["w4a16-g32-r8-w8a8-asym"]["bits_per_weight"] > 5.125  # the branch costs bits
    assert {"loraq", "torch", "onnxruntime", "onnx"} <= set(res["versions"]) and res["machine"]["cores"] >= 1
    assert res["command"].startswith("loraq bench ") and "--methods rtn,loraq" in res["command"]
    assert [q["best_peer"] for q in res["ratios"]] == [None, None]  # no hqq / ort-rtn in this grid
    md = (out / "results.md").read_text()
    assert md.count("\n| rtn |") == 2 and md.count("\n| loraq |") == 2 and "ORT latency vs FP" in md
    png = (out / "quality_vs_bits.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < len(png) < 300_000
    import matplotlib.image
    h, w = matplotlib.image.imread(str(out / "quality_vs_bits.png")).shape[:2]
    assert h >= 400 and w >= 600


@pytest.mark.slow
def test_rerun_skips_finished_pairs_and_adds_new_ones(tiny_bench, monkeypatch, capsys):
    out, args = tiny_bench
    before = {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in (out / "pairs").glob("*.json")}
    assert len(before) == 4
    _no_fitting(monkeypatch)
    assert main(args) == 0  # every pair is finished: nothing is fitted, the results are rebuilt
    after = {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in (out / "pairs").glob("*.json")}
    assert after == before
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 4
    # a changed seed refuses to mix, before any fitting
    capsys.readouterr()
    assert main(args + ["--seed", "1"]) == 2
    assert "holds a bench of a different seed" in capsys.readouterr().err
    monkeypatch.undo()
    fitted = []
    import loraq_export.evaluate.bench_rows as bench_rows
    real = bench_rows.fit_layers
    monkeypatch.setattr(bench_rows, "fit_layers", lambda m, plans, method, **k: fitted.append(method) or real(m, plans, method, **k))
    grown = [a if a != "rtn,loraq" else "rtn,hqq,loraq" for a in args]
    assert main(grown) == 0
    assert fitted == ["hqq"]  # only the new pair
    assert len(json.loads((out / "results.json").read_text())["rows"]) == 5


def test_dequantized_ort_weights_are_what_onnx_runtime_computes(tiny_folder):
    """The torch twin of an ort-rtn model (its dequantized weights) computes what ONNX Runtime does."""
    from graphs.runtime import ort_session
    from loraq_export.evaluate.peers import replaced_weights
    loaded, _, _, _, _, model, layers = _ort_rtn(tiny_folder, "w4a16-g32-asym")
    inputs = loaded.make_inputs(seed=4, batch=2)
    got = ort_session(model).run(None, {n: t.numpy() for n, t in zip(loaded.input_names, inputs)})[0]
    with torch.no_grad(), replaced_weights(loaded.module, {k: v["weight_kn"] for k, v in layers.items()}):
        want = loaded.wrapper(*inputs).numpy()
    with torch.no_grad():
        fp_out = loaded.wrapper(*inputs).numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
    assert np.linalg.norm(got - fp_out) / np.linalg.norm(fp_out) > 1e-4  # and it is quantized


@pytest.mark.slow
def test_torchrun_ranks_share_the_grid_and_agree_with_one_process(tiny_folder, tiny_bench, tmp_path):
    import os
    import subprocess
    import sys
    single, _ = tiny_bench
    out = tmp_path / "dist"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "loraq_export.cli",
                        "bench", str(tiny_folder),
                        "--methods", "rtn,ort-rtn", "--recipes", "w4a16-g32,w4a16-g32-asym", "--out", str(out),
                        "--no-progress"], capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {(r["method"], r["recipe"]): r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert len(rows) == 4 and len(list((out / "pairs").glob("*.json"))) == 4
    ref = {(r["method"], r["recipe"]): r for r in json.loads((single / "results.json").read_text())["rows"]}
    for key in [("rtn", "w4a16-g32"), ("rtn", "w4a16-g32-asym")]:
        assert rows[key]["weight_error"] == ref[key]["weight_error"] and rows[key]["quality"] == ref[key]["quality"]
    # ONNX Runtime's asymmetric round to nearest is the same grid as ours: the same numbers
    assert rows[("ort-rtn", "w4a16-g32-asym")]["quality"]["onnx"] == pytest.approx(
        rows[("rtn", "w4a16-g32-asym")]["quality"]["onnx"], rel=1e-4)
