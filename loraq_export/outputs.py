"""Atomic outputs: nothing a user can load is ever half-written.

Files are written to a temporary name in the same directory and renamed into place; a whole
output directory is assembled in a hidden staging directory beside it and renamed into place
when complete, so an interrupted or failed run leaves either the old state or nothing.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from loraq_export.errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_permissions(path: Path) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give them the user's usual modes."""
    mask = _umask()
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _publish_permissions(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n").encode())


def _jsonable(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def check_output_dir(out: Path, overwrite: bool) -> None:
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"output directory {out} already exists; pass --overwrite to replace it or choose another --out")
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a directory; choose another --out")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise UserError(f"the parent directory of {out} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write to {parent}; choose another --out")


@contextmanager
def staged_dir(out: Path, overwrite: bool = False):
    """Yield a staging directory; on success it replaces ``out``, on failure it is removed."""
    out = Path(out)
    check_output_dir(out, overwrite)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.resolve().parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    for p in [stage, *stage.rglob("*")]:
        _publish_permissions(p)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(stage, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
