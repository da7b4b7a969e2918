"""Atomic outputs: nothing a user can load is ever half-written.

Files are written to a temporary name in the same directory and renamed into place; a whole
output directory is assembled in a hidden staging directory beside it and renamed into place
when complete, so an interrupted or failed run leaves either the old state or nothing.
"""
from __future__ import annotations

import ctypes
import glob
import json
import os
import re
import shutil
import socket
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


def _owner_tag() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(out: Path) -> None:
    """Remove what a run killed outright (SIGKILL, power loss) left beside ``out``: staging and
    swapped-out directories tagged with this host and a process id that no longer runs."""
    out = Path(out)
    host = re.escape(socket.gethostname())
    tag = re.compile(rf"^\.{re.escape(out.name)}\.(?:staging|old)-{host}-(\d+)(?:-.*)?$")
    parent = out.resolve().parent
    for p in parent.glob(f".{glob.escape(out.name)}.*-*"):
        m = tag.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where not supported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0


@contextmanager
def staged_dir(out: Path, overwrite: bool = False):
    """Yield a staging directory; on success it replaces ``out``, on failure it is removed.
    Replacing an existing ``out`` is one atomic exchange where the OS offers it: a kill at any
    moment leaves the old directory or the new one at ``out``, never neither."""
    out = Path(out)
    check_output_dir(out, overwrite)
    remove_stale(out)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-{_owner_tag()}-", dir=out.resolve().parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    for p in [stage, *stage.rglob("*")]:
        _publish_permissions(p)
    if out.exists() and _exchange(stage, out):
        shutil.rmtree(stage, ignore_errors=True)  # it now holds the old output
        return
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{_owner_tag()}")
        os.replace(out, old)
    os.replace(stage, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
