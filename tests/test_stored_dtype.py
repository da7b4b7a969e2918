"""Large models in bounded memory: a 16-bit checkpoint keeps its Linear weights as stored (computed
in float32), and input statistics that do not fit in memory are gathered group by group and
spilled to disk. Both must leave every result exactly what the float32, all-in-memory flow gives."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from loraq_export.cli import main
from loraq_export.fit.input_stats import (SpilledStats, layers_sharing_an_input, model_input_stats, resolve_stats,
                                          stats_bytes, stats_groups)
from loraq_export.fit.parallel import fit_layers
from loraq_export.fit.prepare import prepare_fit
from loraq_export.fit.recipes import load_recipe
from loraq_export.models import load_model
from loraq_export.models.pipeline_folders import write_pipeline_folder
from loraq_export.models.stored_dtype import Float32ComputeLinear
from loraq_export.models.random_text_encoders import TINY_GEMMA2, TINY_T5
from loraq_export.models.text_encoders import load_tokenizer, make_text_encoder_model

pytestmark = pytest.mark.filterwarnings("ignore")
RECIPE = "w4a16-g32-r8-w8a8"
ONE_LAYER = stats_bytes(32) + 1  # the tiny encoders are 32 wide: one accumulator per group


@pytest.fixture(scope="module")
def t5_bf16(tmp_path_factory):
    """A bare T5 encoder folder saved in bfloat16 (as published encoders are), with its tokenizer."""
    import transformers
    root = tmp_path_factory.mktemp("stored")
    pipe = write_pipeline_folder(root / "pipe", "pixart-sigma", seed=1)
    bare = root / "t5"
    transformers.T5EncoderModel.from_pretrained(str(pipe / "text_encoder")).to(torch.bfloat16).save_pretrained(str(bare))
    for f in (pipe / "tokenizer").iterdir():
        shutil.copy(f, bare / f.name)
    return bare


def _float32_twin(folder):
    """The same checkpoint loaded in float32, as the flow loaded every model before."""
    import transformers
    model = transformers.T5EncoderModel.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager")
    return make_text_encoder_model(model, load_tokenizer(folder, ""), "float32 twin", {})


def test_bf16_checkpoint_keeps_its_weights_and_computes_the_float32_result(t5_bf16):
    loaded = load_model(str(t5_bf16), None, 0, None)
    lin = {n: m for n, m in loaded.module.named_modules() if isinstance(m, torch.nn.Linear)}
    kept = {n for n, m in lin.items() if m.weight.dtype == torch.bfloat16}
    # every Linear but T5's wo (transformers keeps it float32: _keep_in_fp32_modules) stays bfloat16
    assert kept == {n for n in lin if not n.endswith(".wo")} and all(isinstance(lin[n], Float32ComputeLinear) for n in kept)
    assert all(lin[n].weight.dtype == torch.float32 for n in lin if n.endswith(".wo"))
    assert all(p.dtype == torch.float32 for n, p in loaded.module.named_parameters() if "embed" in n or "norm" in n)
    twin = _float32_twin(t5_bf16)
    ids, mask = loaded.make_inputs(3, 2)
    with torch.no_grad():
        assert torch.equal(loaded.wrapper(ids, mask), twin.wrapper(ids, mask))


def test_statistics_in_groups_equal_one_pass_and_the_fit_is_unchanged(t5_bf16):
    loaded = load_model(str(t5_bf16), None, 0, None)
    names = [n for n, m in loaded.module.named_modules() if isinstance(m, torch.nn.Linear)]
    one = model_input_stats(loaded, names, 0, limit=1 << 40)
    spilled = model_input_stats(loaded, names, 0, limit=ONE_LAYER)
    assert all(isinstance(s, SpilledStats) for s in spilled.values())
    for n in names:
        a, b = one[n], resolve_stats(spilled[n])
        assert a.count == b.count > 0 and torch.equal(a.gram, b.gram) and torch.equal(a.total, b.total), n
    assert len(stats_groups(names, {n: 32 for n in names}, ONE_LAYER)) == len(names)
    # k and v read q's input, wi_1 reads wi_0's (gated T5 v1.1): they share its accumulator, no group of their own
    sharing = layers_sharing_an_input(loaded.module, names, loaded.synthetic_batches(0)[0], lambda i: loaded.wrapper(*i))
    assert sharing == {n for n in names if n.endswith((".k", ".v", ".wi_1"))} and sharing
    assert len(stats_groups(names, {n: 32 for n in names}, ONE_LAYER, sharing)) == len(names) - len(sharing)

    import loraq_export.fit.input_stats as input_stats
    results = []
    for model, limit in ((loaded, ONE_LAYER), (_float32_twin(t5_bf16), 1 << 40)):
        original, input_stats.stats_memory_limit = input_stats.stats_memory_limit, lambda: limit
        try:
            recipe, plans, alloc = prepare_fit(model, load_recipe(RECIPE), 0, budget=5.6)
        finally:
            input_stats.stats_memory_limit = original
        results.append((fit_layers(model.module, plans, recipe.method, workers=2, progress=False), alloc))
    (spill, alloc_a), (mem, alloc_b) = results
    assert alloc_a["layers"] == alloc_b["layers"] and spill.keys() == mem.keys()
    for n in spill:
        assert torch.equal(spill[n].weight.codes, mem[n].weight.codes), n
        assert torch.equal(spill[n].effective_weight(), mem[n].effective_weight()), n


def test_spilled_statistics_export_is_byte_identical(t5_bf16, tmp_path, monkeypatch):
    outs = []
    for limit in ("0.01", None):
        if limit:
            monkeypatch.setenv("LORAQ_STATS_MEMORY_MB", limit)
        else:
            monkeypatch.delenv("LORAQ_STATS_MEMORY_MB", raising=False)
        out = tmp_path / f"out{limit}"
        assert main(["export", str(t5_bf16), "--recipe", RECIPE, "--out", str(out), "--no-progress", "--workers", "1"]) == 0
        outs.append(out)
    assert (outs[0] / "model.onnx").read_bytes() == (outs[1] / "model.onnx").read_bytes()
    rep = json.loads((outs[0] / "report.json").read_text())
    assert rep["model"]["dtype"] == "bfloat16" and rep["quality"]["onnx"]["mean"] > 0.99


def test_bad_stats_memory_setting_is_one_line(t5_bf16, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORAQ_STATS_MEMORY_MB", "lots")
    out = tmp_path / "out"
    assert main(["export", str(t5_bf16), "--recipe", RECIPE, "--out", str(out), "--no-progress"]) == 2
    assert "LORAQ_STATS_MEMORY_MB" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("cls_name,config", [("T5EncoderModel", {**TINY_T5, "vocab_size": 300}),
                                             ("Gemma2Model", {**TINY_GEMMA2, "vocab_size": 300})])
def test_preset_by_name_is_built_in_bf16_and_equals_its_written_folder(cls_name, config, tmp_path, monkeypatch):
    """A preset by name holds its Linear weights in bfloat16 (a full T5-XXL: 9.5 GB, not 19 in
    float32) and is tensor for tensor the folder tools/write_text_encoder_folder.py writes."""
    import importlib.util
    import pathlib
    from loraq_export.models import text_encoder_presets
    monkeypatch.setitem(text_encoder_presets.TEXT_ENCODER_PRESETS, "tiny", (cls_name, config))
    by_name = load_model("tiny", None, 3, None)
    lin = {n: m for n, m in by_name.module.named_modules() if isinstance(m, torch.nn.Linear)}
    assert lin and all(m.weight.dtype == torch.bfloat16 for n, m in lin.items() if not n.endswith(".wo"))
    tool = pathlib.Path(__file__).parents[1] / "tools" / "write_text_encoder_folder.py"
    spec = importlib.util.spec_from_file_location("write_text_encoder_folder", tool)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["tiny", str(tmp_path / "enc"), "--seed", "3"]) == 0
    folder = load_model(str(tmp_path / "enc"), None, 3, None)
    a, b = by_name.module.state_dict(), folder.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(x, y) for x, y in zip(by_name.module.buffers(), folder.module.buffers()))
    ids = torch.randint(5, 300, (2, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.equal(by_name.wrapper(ids, mask), folder.wrapper(ids, mask))
