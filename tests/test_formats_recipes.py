import json
import re

import pytest

from calibless.config import ConfigError, from_dict, to_dict
from calibless.formats import (ActFormat, BranchFormat, LayerFormat, WeightFormat, branch_format,
                               main_format, BRANCH_FORMATS, MAIN_FORMATS)
from calibless.methods import METHODS, method_options
from loraq_export.errors import UserError
from loraq_export.fit.recipes import load_recipe, parse_layer_recipe, recipe_from_json


@pytest.mark.parametrize("fmt", [WeightFormat(4, True, 64), WeightFormat(6, True, None), WeightFormat(8, False, 128)])
def test_weight_format_json_round_trip(fmt):
    assert from_dict(WeightFormat, json.loads(json.dumps(to_dict(fmt)))) == fmt


@pytest.mark.parametrize("name", sorted(BRANCH_FORMATS))
def test_branch_format_json_round_trip(name):
    f = branch_format(name, 64)
    assert from_dict(BranchFormat, json.loads(json.dumps(to_dict(f)))) == f


@pytest.mark.parametrize("name", sorted(MAIN_FORMATS))
def test_main_format_json_round_trip(name):
    f = main_format(name, 128)
    assert from_dict(LayerFormat, json.loads(json.dumps(to_dict(f)))) == f


@pytest.mark.parametrize("data,needle", [
    ({"bits": 4, "symmetric": True, "group_size": 64, "groupsize": 32}, "unknown key(s) groupsize"),
    ({"bits": "4", "symmetric": True, "group_size": 64}, "WeightFormat.bits: expected an integer"),
    ({"bits": 4, "symmetric": 1, "group_size": 64}, "WeightFormat.symmetric: expected true or false"),
    ({"bits": 4, "symmetric": True, "group_size": 64, "version": 7}, "version 7 is newer"),
    ([4, True, 64], "expected a mapping"),
])
def test_config_reader_refuses_what_it_does_not_know(data, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        from_dict(WeightFormat, data)


def test_nested_config_errors_name_the_field():
    d = to_dict(branch_format("w8a8"))
    d["weight"]["bits"] = 5.5
    with pytest.raises(ConfigError, match=r"BranchFormat.weight.bits: expected an integer"):
        from_dict(BranchFormat, d)


def test_method_options_are_typed_and_checked():
    assert method_options("loraq", {"steps": 12}).steps == 12
    assert method_options("loraq").steps == type(method_options("loraq"))().steps  # defaults
    with pytest.raises(ValueError, match="unknown key.*stesp.*known: init_iters, input_stats, lr, steps"):
        method_options("loraq", {"stesp": 12})
    with pytest.raises(ValueError, match="steps: expected an integer"):
        method_options("loraq", {"steps": "many"})
    with pytest.raises(ValueError, match="unknown key"):
        method_options("rtn", {"steps": 1})  # rtn takes none
    assert set(METHODS) >= {"rtn", "lqer", "svdquant", "loraq"}


def test_recipe_file_options_typo_is_one_error(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("recipe: w4a16-g64-r32-w8a8\nmethod: loraq\noptions: {stesp: 10}\n")
    with pytest.raises(UserError, match="stesp"):
        load_recipe(str(f))
    f.write_text("recipe: w4a16-g64-r32-w8a8\nmethod: loraq\noptions: {steps: 10}\n")
    assert load_recipe(str(f)).spec_for("x").options.steps == 10
    with pytest.raises(UserError, match="options of method 'svdquant'.*steps"):
        load_recipe(str(f), "svdquant")  # options given for one method do not silently pass to another


def test_format_ranges():
    assert (WeightFormat(4).qmin, WeightFormat(4).qmax) == (-8, 7)
    assert (WeightFormat(6).qmin, WeightFormat(6).qmax) == (-32, 31)
    assert (WeightFormat(4, symmetric=False).qmin, WeightFormat(4, symmetric=False).qmax) == (0, 15)
    assert branch_format("w6a6").weight.storage_bits == 8
    with pytest.raises(ValueError):
        WeightFormat(5)
    with pytest.raises(ValueError):
        ActFormat(8, "per_channel")


def test_recipe_string():
    r = load_recipe("w4a4-g64-r32-w8a8")
    spec = r.spec_for("any.layer")
    assert spec.main.act == ActFormat(4, "dynamic_per_token") and spec.main.weight.group_size == 64
    assert spec.rank == 32 and spec.branch.name == "w8a8" and spec.branch.act.bits == 8
    assert load_recipe("w4a16-gch").spec_for("x").main.weight.group_size is None
    assert not load_recipe("w4a16-g128-asym").spec_for("x").main.weight.symmetric


@pytest.mark.parametrize("bad", ["", "w4a4", "w5a4-g64", "w4a4-g63", "w4a4-g64-r32", "w4a4-g64-rx-w8a8",
                                 "w4a4-g64-r0-w8a8", "w4a4-g64-r32-w9a9", "w4a4-g64-r32-w8a8-extra"])
def test_bad_recipe_strings(bad):
    with pytest.raises(UserError) as e:
        parse_layer_recipe(bad)
    assert "\n" not in str(e.value) and "recipe" in str(e.value)


def test_recipe_file_yaml_and_json(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text("recipe: w4a8-g64-r16-w6a6\nmethod: svdquant\ninclude: ['encoder.*']\nexclude: ['*.value']\n"
                 "overrides:\n  - {pattern: '*.intermediate.*', recipe: w4a16-g128-r64-w8a8}\n")
    r = load_recipe(str(y))
    assert r.method == "svdquant" and r.name == "w4a8-g64-r16-w6a6"
    assert r.pattern_decision("encoder.layer.0.attention.self.value")[0] is False
    assert r.pattern_decision("encoder.layer.0.attention.self.query")[0] is True
    assert r.pattern_decision("pooler.dense")[0] is False
    assert r.spec_for("encoder.layer.0.intermediate.dense").rank == 64
    j = tmp_path / "r.json"
    j.write_text(json.dumps(r.to_dict()))
    assert load_recipe(str(j)).to_dict() == r.to_dict() == recipe_from_json(r.to_dict()).to_dict()
    assert load_recipe(str(j), method="rtn").method == "rtn"


@pytest.mark.parametrize("text", ["recipe: [unclosed", "method: loraq", "recipe: w4a4-g64\nbogus: 1",
                                  "recipe: w4a4-g64\nmethod: nope", "recipe: w4a4-g64\ninclude: 3"])
def test_bad_recipe_files(tmp_path, text):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(UserError) as e:
        load_recipe(str(p))
    assert "\n" not in str(e.value) and "bad.yaml" in str(e.value)


def test_defaults_per_target_recipe_plus_budget():
    """No --recipe: the target's default recipe under the default budget (a user's --budget wins);
    a user's --recipe comes without a budget unless they give one. The TensorRT default is the
    symmetric counterpart of the ONNX Runtime one, with a block size TensorRT takes."""
    from graphs.constants import TRT_INT4_BLOCK_SIZES
    from loraq_export.export.deploy import refuse_undeployable
    from loraq_export.fit.recipes import DEFAULT_BUDGET, DEFAULT_RECIPES, with_defaults
    from loraq_export.options import Options
    assert with_defaults(None, None, "ort") == (DEFAULT_RECIPES["ort"], DEFAULT_BUDGET)
    assert with_defaults(None, 5.5, "tensorrt") == (DEFAULT_RECIPES["tensorrt"], 5.5)
    assert with_defaults("w4a16-g128", None, "ort") == ("w4a16-g128", None)
    assert with_defaults("w4a16-g128", 4.4, "tensorrt") == ("w4a16-g128", 4.4)
    ort, trt = (parse_layer_recipe(DEFAULT_RECIPES[t]) for t in ("ort", "tensorrt"))
    assert trt.main.weight.symmetric and trt.branch.weight.symmetric and trt.main.weight.group_size in TRT_INT4_BLOCK_SIZES
    assert trt.name + "-asym" == ort.name  # the same recipe, symmetric
    refuse_undeployable(load_recipe(DEFAULT_RECIPES["tensorrt"]).for_target("tensorrt"), Options(target="tensorrt"))
