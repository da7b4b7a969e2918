"""Every `--help` lists every choice its command takes, and a usage error is one line with one prefix."""
import argparse
import re

import pytest

from calibless.formats import BRANCH_FORMATS, MAIN_FORMATS
from calibless.methods import METHODS
from loraq_export.cli import build_parser, main
from loraq_export.commands.bench import all_methods
from loraq_export.models.diffusion_presets import PRESETS


def commands(parser, path=()):
    """(path, parser) of the top-level parser and every (sub)command under it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, path + (name,))


def flat(text: str) -> str:
    """Help text with argparse's line wrapping undone (it may break a name at a hyphen)."""
    return re.sub(r"-\s*\n\s*", "-", re.sub(r"(?<!-)\s*\n\s*", " ", text))


ALL = list(commands(build_parser()))


def test_every_command_is_walked():
    names = {" ".join(p) for p, _ in ALL}
    assert {"export", "quantize", "bench", "check", "engine", "engine build", "engine bench"} <= names


@pytest.mark.parametrize("path,parser", ALL, ids=[" ".join(p) or "loraq" for p, _ in ALL])
def test_help_lists_every_choice(path, parser):
    text = flat(parser.format_help())
    for action in parser._actions:
        for choice in action.choices or ():
            assert choice in text, f"loraq {' '.join(path)} --help does not list {choice!r} of {action.dest}"


@pytest.mark.parametrize("command", ["export", "quantize"])
def test_method_recipe_and_model_help_come_from_the_registries(command):
    text = flat(dict(ALL)[(command,)].format_help())
    for name in [*METHODS, *MAIN_FORMATS, *BRANCH_FORMATS, *PRESETS, "g32", "g64", "g128", "gch"]:
        assert name in text, f"loraq {command} --help does not list {name!r}"


def test_bench_help_lists_every_method_and_peer():
    text = flat(dict(ALL)[("bench",)].format_help())
    assert "ort-rtn" in all_methods()
    for name in all_methods():
        assert name in text


@pytest.mark.parametrize("argv,needle", [
    (["bogus"], "invalid choice: 'bogus'"),
    (["export", "--target", "nope"], "invalid choice: 'nope'"),
    (["export", "--dtype", "int3"], "invalid choice: 'int3'"),
    (["export", "--bogus-flag"], "unrecognized arguments"),
    (["check"], "the following arguments are required"),
    (["engine", "bench"], "the following arguments are required"),
    (["export", "--budget", "many"], "invalid float value"),
])
def test_usage_error_has_one_prefix_and_names_the_help(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loraq: error: ") and needle in lines[0], err
    assert lines[0].count("error:") == 1 and not lines[0].startswith("loraq: error: loraq"), err
    assert re.search(r"\(see loraq( \w+)* --help\)$", lines[0]), err
