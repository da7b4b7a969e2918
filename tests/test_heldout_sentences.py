"""tools/heldout_sentences.py: which sentences of a package description it keeps, and that a
request it cannot meet leaves no file behind."""
import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "tools" / "heldout_sentences.py"
_spec = importlib.util.spec_from_file_location("heldout_sentences", _PATH)
heldout = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(heldout)


def test_sentences_keep_plain_prose_only():
    text = ("Short one. This library parses configuration files and reports every error with its line.\n"
            "See https://example.org for the documentation of the parser and its options today.\n\n"
            "Use `parse()` to read a file that has been written by any of the older releases.\n"
            "# Heading that is long enough to pass the length rule of the filter\n\n"
            "It also wraps\nits lines across the paragraph, which the splitter joins back together.\n"
            "NASA uses it, says the readme, without giving any further detail on how or why.")
    got = heldout.sentences(text)
    assert got == ["This library parses configuration files and reports every error with its line.",
                   "It also wraps its lines across the paragraph, which the splitter joins back together."]


def test_a_count_larger_than_the_pool_is_refused_without_output(tmp_path, capsys):
    out = tmp_path / "held.txt"
    assert heldout.main([str(out), "--count", "100000000"]) == 1
    assert "sentences found" in capsys.readouterr().err and not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_the_written_set_is_deterministic_and_excludes_the_bundled_sentences(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    if heldout.main([str(a), "--count", "20"]) != 0:
        pytest.skip("fewer than 20 sentences in this machine's package descriptions")
    assert heldout.main([str(b), "--count", "20"]) == 0
    lines = a.read_text().splitlines()
    assert lines == b.read_text().splitlines() and len(lines) == len(set(lines)) == 20
    assert not set(lines) & set(heldout.BUNDLED.read_text().splitlines())
