import json

import pytest

from calibless.formats import (ActFormat, BranchFormat, FitSpec, LayerFormat, WeightFormat, branch_format,
                               main_format, BRANCH_FORMATS, MAIN_FORMATS)
from loraq_export.errors import UserError
from loraq_export.recipes import load_recipe, parse_layer_recipe, recipe_from_json


@pytest.mark.parametrize("fmt", [WeightFormat(4, True, 64), WeightFormat(6, True, None), WeightFormat(8, False, 128)])
def test_weight_format_json_round_trip(fmt):
    assert WeightFormat.from_dict(json.loads(json.dumps(fmt.to_dict()))) == fmt


@pytest.mark.parametrize("name", sorted(BRANCH_FORMATS))
def test_branch_format_json_round_trip(name):
    f = branch_format(name, 64)
    assert BranchFormat.from_dict(json.loads(json.dumps(f.to_dict()))) == f


@pytest.mark.parametrize("name", sorted(MAIN_FORMATS))
def test_main_format_json_round_trip(name):
    f = main_format(name, 128)
    assert LayerFormat.from_dict(json.loads(json.dumps(f.to_dict()))) == f


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
