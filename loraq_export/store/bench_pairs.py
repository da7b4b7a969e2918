"""The bench's output directory: one small JSON per finished (method, recipe) pair, so a re-run
with the same ``--out`` skips what is done, and the tables are rebuilt from these files.

``DIR/bench.json`` says what is benchmarked (model, its source, seed, loraq version); a re-run
on another model or seed refuses to mix its rows with these, as ``quantize``'s resume does.
``DIR/pairs/<method>__<recipe>.json`` holds one finished row, written atomically: a run killed
at any moment leaves each pair either finished or absent.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from loraq_export.errors import UserError
from loraq_export.store.outputs import write_json_atomic

IDENTITY = "bench.json"
PAIRS = "pairs"
RESULTS = ("results.json", "results.md", "quality_vs_bits.png")


def pair_file_name(method: str, recipe: str) -> str:
    return f"{method}__{recipe}.json"  # both are [a-z0-9-] only (recipe canonical names, method names)


class BenchDir:
    def __init__(self, out: Path, identity: dict):
        self.dir = Path(out)
        self.identity = json.loads(json.dumps(identity, sort_keys=True))

    def check(self) -> None:
        """Before any fitting: the directory is new, empty, or a bench of the same model and seed."""
        d = self.dir
        if d.exists() and not d.is_dir():
            raise UserError(f"output path {d} exists and is not a directory; choose another --out")
        parent = d.resolve().parent
        if not parent.is_dir():
            raise UserError(f"the parent directory of {d} does not exist; create it first")
        if not os.access(d if d.exists() else parent, os.W_OK):
            raise UserError(f"cannot write to {d if d.exists() else parent}; choose another --out")
        if not d.exists() or not any(d.iterdir()):
            return
        previous = self._read_identity()
        if previous is None:
            raise UserError(f"{d} exists and is not a loraq bench directory (no readable {IDENTITY}); choose another --out")
        if previous != self.identity:
            changed = sorted(k for k in set(previous) | set(self.identity) if previous.get(k) != self.identity.get(k))
            raise UserError(f"{d} holds a bench of a different {'/'.join(changed)} ({_brief(previous, changed)}); "
                            "re-run with the original model and seed to add to it, or choose another --out")

    def _read_identity(self) -> Optional[dict]:
        try:
            return json.loads((self.dir / IDENTITY).read_text())
        except (OSError, ValueError):
            return None

    def start(self) -> None:
        (self.dir / PAIRS).mkdir(parents=True, exist_ok=True)
        for tmp in (self.dir / PAIRS).glob(".*.tmp"):
            tmp.unlink(missing_ok=True)  # cut short by a kill; nothing writes while a run starts
        if self._read_identity() != self.identity:
            write_json_atomic(self.dir / IDENTITY, self.identity)

    def finished(self, method: str, recipe: str) -> Optional[dict]:
        """The stored row of a finished pair, or None (a damaged file counts as not finished)."""
        try:
            row = json.loads((self.dir / PAIRS / pair_file_name(method, recipe)).read_text())
        except (OSError, ValueError):
            return None
        return row if isinstance(row, dict) and row.get("method") == method and row.get("recipe") == recipe else None

    def save(self, row: dict) -> None:
        """One finished pair (what the command asked for, ``requested``, belongs to the run, not the pair)."""
        write_json_atomic(self.dir / PAIRS / pair_file_name(row["method"], row["recipe"]),
                          {k: v for k, v in row.items() if k != "requested"})


def _brief(previous: dict, keys: list) -> str:
    return ", ".join(f"{k} was {previous.get(k)!r}" for k in keys)
