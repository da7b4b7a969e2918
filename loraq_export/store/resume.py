"""Resumable fitting: each finished layer is saved at once, atomically, beside the output.

``<out>/../.<out name>.partial/`` holds ``run.json`` (what is being fitted) and one safetensors
file per finished layer. A re-run of the same command loads them instead of fitting again; a
run with a different model, recipe, method or seed refuses to mix its layers with them.
The directory is removed once the checkpoint is complete.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from calibless.record import LayerRecord
from loraq_export.errors import UserError
from loraq_export.store.layer_tensors import record_bytes, record_from_bytes
from loraq_export.store.outputs import write_bytes_atomic


def read_layer_file(path: Path) -> tuple[str, LayerRecord]:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        md = f.metadata()
    name = md["layer"]
    return name, record_from_bytes(path.read_bytes(), md["meta"], name)


class PartialRun:
    def __init__(self, out: Path, identity: dict):
        out = Path(out)
        self.dir = out.resolve().parent / f".{out.name}.partial"
        self.identity = json.loads(json.dumps(identity, sort_keys=True))

    def load(self) -> dict[str, LayerRecord]:
        """Finished layers of an earlier run of the same command (empty if none)."""
        run = self.dir / "run.json"
        if not run.is_file():
            return {}
        try:
            previous = json.loads(run.read_text())
        except ValueError:
            previous = None
        if previous != self.identity:
            raise UserError(f"{self.dir} holds a partial run of a different command; delete it to start afresh, "
                            "or repeat the original command to resume it")
        done = {}
        for f in sorted((self.dir / "layers").glob("*.safetensors")):
            try:
                name, rec = read_layer_file(f)
            except Exception:  # a file cut short by a kill is simply fitted again
                f.unlink(missing_ok=True)
                continue
            done[name] = rec
        return done

    def start(self) -> None:
        (self.dir / "layers").mkdir(parents=True, exist_ok=True)
        for tmp in [*self.dir.glob(".*.tmp"), *(self.dir / "layers").glob(".*.tmp")]:
            tmp.unlink(missing_ok=True)  # cut short by a kill; nothing writes while a run starts
        write_bytes_atomic(self.dir / "run.json", json.dumps(self.identity, sort_keys=True).encode())

    def save(self, name: str, rec: LayerRecord) -> None:
        write_bytes_atomic(self.dir / "layers" / f"{name}.safetensors", record_bytes(name, rec))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
