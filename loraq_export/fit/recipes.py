"""Recipes: one name for the whole quantization setup, as a string or a YAML/JSON file.

String form: ``<main>-g<group>[-ag<N>][-r<rank>-<branch>][-had<B>][-asym]``, e.g.
``w4a4-g64-ag64-r32-w8a8-had64`` (main W4A4, weights in groups of 64 along the input dim,
activations quantized per token per 64 channels, rank-32 branch in W8A8, inputs rotated online by
a block Walsh-Hadamard of 64). ``g<group>`` is ``g32``, ``g64``, ``g128`` or ``gch`` (per output
channel); N and B are powers of two.

File form (YAML or JSON)::

    recipe: w4a16-g64-r32-w8a8     # the string form, or spelled out below
    method: loraq
    include: ["transformer_blocks.*"]   # fnmatch patterns on module names (default: the model's own rule)
    exclude: ["*.attn2.*"]
    options: {steps: 100}               # method options
    overrides:                          # first matching pattern wins
      - {pattern: "*.ff.*", recipe: w4a16-g64-r64-w8a8}
"""
from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from calibless.formats import (BRANCH_FORMATS, GROUP_SIZES, MAIN_FORMATS, MAX_BLOCK, MIN_BLOCK, BranchFormat,
                               FitSpec, LayerFormat, branch_format, is_block_size, main_format)
from calibless.methods import METHODS, method_options
from loraq_export.errors import UserError

# What `loraq export` / `quantize` fit when given no --recipe: per target, the recipe and --budget
# on the front of held-out quality, bits and ONNX Runtime latency (docs/defaults.md has the
# measurement). TensorRT takes symmetric INT4 blocks of 64 or 128 only: the symmetric counterpart.
DEFAULT_RECIPES = {"ort": "w4a16-g64-r16-w4a16-asym", "tensorrt": "w4a16-g64-r16-w4a16"}
DEFAULT_BUDGET = 4.8  # bits per weight, applied with a default recipe unless --budget says otherwise
DEFAULT_RECIPE = DEFAULT_RECIPES["ort"]  # a recipe alone (the Python API, recipe files): no budget
DEFAULT_METHOD = "loraq"
_GROUP = re.compile(r"^g(ch|\d+)$")
_RANK = re.compile(r"^r(\d+)$")
EXAMPLE = "e.g. 'w4a4-g64-r32-w8a8' or 'w4a16-g128'"


@dataclass(frozen=True)
class LayerRecipe:
    """The formats of one layer, parsed from the string form."""

    name: str
    main: LayerFormat
    rank: int = 0
    branch: Optional[BranchFormat] = None
    rotation: Optional[int] = None  # -had<B>: online block Hadamard of the input


_AG = re.compile(r"^ag(\d+)$")
_HAD = re.compile(r"^had(\d+)$")
ORDER = "r<rank>-<branch format>, ag<N>, had<B> or asym, in the order <main>-g<group>-ag<N>-r<rank>-<branch>-had<B>-asym"


def _block(m: re.Match, bad: str, what: str, token: str) -> int:
    n = int(m.group(1))
    if not is_block_size(n):
        raise UserError(f"{bad}: {what} {n} is not a power of two from {MIN_BLOCK} to {MAX_BLOCK}; e.g. -{token}64")
    return n


def fusing_branch(main: str) -> str:
    """The cheapest branch format that fuses with a ``main`` path: w4a16 beside a W4A16 main (one
    INT4 GEMM over both), else w8a8."""
    return "w4a16" if main == "w4a16" else "w8a8"


def parse_layer_recipe(text: str) -> LayerRecipe:
    """``<main>-g<group>[-ag<N>][-r<rank>-<branch>][-had<B>][-asym]``."""
    bad = f"bad recipe {text!r}"
    parts = str(text).strip().lower().split("-")
    if len(parts) < 2:
        raise UserError(f"{bad}: expected <main>-g<group>[-r<rank>-<branch>]; {EXAMPLE}")
    if parts[0] not in MAIN_FORMATS:
        raise UserError(f"{bad}: unknown main format {parts[0]!r}; choose one of {', '.join(MAIN_FORMATS)}")
    m = _GROUP.match(parts[1])
    if not m:
        raise UserError(f"{bad}: {parts[1]!r} is not a group size; use g32, g64, g128 or gch (per channel)")
    group = None if m.group(1) == "ch" else int(m.group(1))
    if group not in GROUP_SIZES:
        raise UserError(f"{bad}: group size {group} is not supported; use g32, g64, g128 or gch")
    tokens = parts[2:]
    asym = bool(tokens) and tokens[-1] == "asym"
    tokens = tokens[:-1] if asym else tokens
    act_group = rotation = branch = None
    rank = 0
    if tokens and _AG.match(tokens[0]):
        act_group = _block(_AG.match(tokens.pop(0)), bad, "activation group", "ag")
    if tokens and _RANK.match(tokens[0]):
        if len(tokens) < 2 or _HAD.match(tokens[1]):
            raise UserError(f"{bad}: after the group size expected r<rank>-<branch format>; {EXAMPLE}")
        rank, branch = int(_RANK.match(tokens[0]).group(1)), tokens[1]
        tokens = tokens[2:]
        if rank < 1:
            raise UserError(f"{bad}: rank must be at least 1")
        if branch not in BRANCH_FORMATS:
            raise UserError(f"{bad}: unknown branch format {branch!r}; choose one of {', '.join(BRANCH_FORMATS)}")
    if tokens and _HAD.match(tokens[0]):
        rotation = _block(_HAD.match(tokens.pop(0)), bad, "Hadamard block", "had")
    if tokens:
        raise UserError(f"{bad}: unexpected {tokens[0]!r}; after the group size expected {ORDER}; {EXAMPLE}")
    main = main_format(parts[0], group, symmetric=not asym, act_group=act_group)
    bformat = None if branch is None else branch_format(branch, group, act_group)
    if act_group is not None and not main.act.enabled and not (bformat is not None and bformat.act.enabled):
        raise UserError(f"{bad}: -ag{act_group} groups quantized activations, and this recipe quantizes none; "
                        "use a w4a8/w4a4 main format or a branch such as w8a8, or drop -ag")
    name = "-".join([parts[0], parts[1]] + ([f"ag{act_group}"] if act_group else [])
                    + ([f"r{rank}", branch] if branch else []) + ([f"had{rotation}"] if rotation else [])
                    + (["asym"] if asym else []))
    return LayerRecipe(name, main, rank, bformat, rotation)


@dataclass(frozen=True)
class Recipe:
    layer: LayerRecipe
    method: str = DEFAULT_METHOD
    include: tuple = ()
    exclude: tuple = ()
    options: tuple = ()  # the method's options as given: sorted (key, value) pairs (checked when set)
    overrides: tuple = ()  # ((pattern, LayerRecipe), ...)
    source: str = ""  # the string or file the recipe came from

    @property
    def name(self) -> str:
        return self.layer.name

    def layer_recipe(self, module_name: str) -> LayerRecipe:
        for pattern, lr in self.overrides:
            if fnmatch.fnmatchcase(module_name, pattern):
                return lr
        return self.layer

    def method_options(self):
        """The method's typed options (its options dataclass); UserError for a key it does not take."""
        try:
            return method_options(self.method, dict(self.options))
        except ValueError as e:
            raise UserError(f"{self.source or 'recipe'}: {e}") from None

    def spec_for(self, module_name: str) -> FitSpec:
        lr = self.layer_recipe(module_name)
        return FitSpec(lr.main, lr.rank, lr.branch, self.method_options(), lr.rotation)

    def pattern_decision(self, module_name: str) -> Optional[tuple[bool, str]]:
        """(quantize?, reason) when the recipe's patterns decide, None to use the model's default."""
        for p in self.exclude:
            if fnmatch.fnmatchcase(module_name, p):
                return False, f"excluded by recipe pattern {p!r}"
        if self.include:
            for p in self.include:
                if fnmatch.fnmatchcase(module_name, p):
                    return True, f"included by recipe pattern {p!r}"
            return False, "matches no recipe include pattern"
        return None

    def to_dict(self) -> dict:
        return {"recipe": self.name, "method": self.method, "include": list(self.include),
                "exclude": list(self.exclude), "options": dict(self.options),
                "overrides": [{"pattern": p, "recipe": lr.name} for p, lr in self.overrides]}

    def for_target(self, target: str) -> "Recipe":
        """Symmetric grids as the target runs them: signed scales for ONNX Runtime (the value of
        largest magnitude maps to -8 whatever its sign: one more level per block), positive
        scales for TensorRT (its rule)."""
        signed = target == "ort"

        def grid(w):
            return w if w is None or not w.symmetric else replace(w, signed_scales=signed)

        def fix(lr: LayerRecipe) -> LayerRecipe:
            branch = None if lr.branch is None else replace(lr.branch, weight=grid(lr.branch.weight))
            return replace(lr, main=replace(lr.main, weight=grid(lr.main.weight)), branch=branch)
        return replace(self, layer=fix(self.layer), overrides=tuple((p, fix(lr)) for p, lr in self.overrides))

    def with_method(self, method: Optional[str]) -> "Recipe":
        out = self if method is None else replace(self, method=_check_method(method))
        out.method_options()  # options given for one method may not fit another
        return out


def _check_method(method: str, where: str = "") -> str:
    if method not in METHODS:
        prefix = f"{where}: " if where else ""
        raise UserError(f"{prefix}unknown method {method!r}; choose one of {', '.join(sorted(METHODS))}")
    return method


def _strings(value, key: str, where: str) -> tuple:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"{where}: '{key}' must be a list of name patterns")
    return tuple(value)


def recipe_from_dict(d: dict, where: str = "recipe") -> Recipe:
    if not isinstance(d, dict):
        raise UserError(f"{where}: expected a mapping with at least a 'recipe' key")
    known = {"recipe", "method", "include", "exclude", "options", "overrides"}
    unknown = set(d) - known
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(known))}")
    if "recipe" not in d:
        raise UserError(f"{where}: missing 'recipe'; add it (the string form, {EXAMPLE})")
    options = d.get("options") or {}
    if not isinstance(options, dict):
        raise UserError(f"{where}: 'options' must be a mapping")
    overrides = []
    for o in d.get("overrides") or []:
        if not isinstance(o, dict) or set(o) != {"pattern", "recipe"}:
            raise UserError(f"{where}: each override needs exactly 'pattern' and 'recipe'")
        overrides.append((str(o["pattern"]), parse_layer_recipe(o["recipe"])))
    recipe = Recipe(parse_layer_recipe(d["recipe"]), _check_method(str(d.get("method", DEFAULT_METHOD)), where),
                    _strings(d.get("include"), "include", where), _strings(d.get("exclude"), "exclude", where),
                    tuple(sorted(options.items())), tuple(overrides), source=where)
    recipe.method_options()
    return recipe


def load_recipe(text: Optional[str] = None, method: Optional[str] = None) -> Recipe:
    """A recipe from a string, a .yaml/.yml/.json file, or the default; ``method`` overrides the file's."""
    text = DEFAULT_RECIPE if text is None else text
    p = Path(text)
    if p.suffix.lower() in (".yaml", ".yml", ".json"):
        if not p.is_file():
            raise UserError(f"recipe file {text} does not exist; pass an existing file or a recipe string ({EXAMPLE})")
        try:
            raw = p.read_text()
            if p.suffix.lower() == ".json":
                d = json.loads(raw)
            else:
                import yaml
                d = yaml.safe_load(raw)
        except Exception as e:  # the parsers' own messages say where the syntax broke
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"recipe file {text} is not valid {p.suffix[1:].upper()}: {first}; fix its syntax") from None
        return recipe_from_dict(d, where=f"recipe file {text}").with_method(method)
    return Recipe(parse_layer_recipe(text), source=text).with_method(method)


def with_defaults(recipe: Optional[str], budget: Optional[float], target: str) -> tuple[str, Optional[float]]:
    """(recipe, budget) of a command-line run: the user's recipe with their budget (or none), or,
    without --recipe, the target's default recipe under their budget or DEFAULT_BUDGET."""
    if recipe is not None:
        return recipe, budget
    return DEFAULT_RECIPES.get(target, DEFAULT_RECIPE), DEFAULT_BUDGET if budget is None else budget


def recipe_from_json(d: dict) -> Recipe:
    """Inverse of ``Recipe.to_dict`` (checkpoints store it)."""
    return recipe_from_dict({k: v for k, v in d.items() if v not in (None, [], {})} | {"recipe": d["recipe"]})
