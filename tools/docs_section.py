"""Write a measuring tool's output into its own section of docs/benchmarks.md.

Each tool owns the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->``; with
``--write-docs`` it replaces that text with what it just measured, the command that measured it
and the machine it ran on, so the document never holds a number no tool can regenerate.
"""
from __future__ import annotations

import datetime
import os
import platform
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def machine() -> str:
    import onnxruntime
    import torch
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{platform.processor() or platform.machine()}, {cores} cores; Python {platform.python_version()}, "
            f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")


def write_section(name: str, body: str, argv=None) -> None:
    """Replace section ``name`` of docs/benchmarks.md with ``body`` plus how it was measured."""
    cmd = " ".join(["python", os.path.relpath(sys.argv[0], DOC.parent.parent)] + list(sys.argv[1:] if argv is None else argv))
    stamp = datetime.date.today().isoformat()
    text = DOC.read_text()
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    if begin not in text or end not in text:
        raise SystemExit(f"{DOC} has no section {name!r} ({begin} ... {end}); add the markers first")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    block = f"{begin}\n`{cmd}` ({stamp}; {machine()}):\n\n{body.strip()}\n{end}"
    tmp = DOC.with_suffix(".md.tmp")
    tmp.write_text(head + block + tail)
    os.replace(tmp, DOC)
    print(f"wrote section {name!r} of {DOC}")


def publish(text: str, section=None) -> None:
    """Print a tool's result; with ``section`` (its --write-docs), also write it into the document."""
    print(text)
    if section:
        write_section(section, text)
