"""Input rules: what every command checks about what the user hands it, in one place.

Each rule raises ``UserError`` (one line: the problem, then the fix; exit status 2) before any
output is created. The output side's rules are in ``outputs.py`` (refuse an existing directory
unless ``--overwrite``, assemble aside and rename). A new command reuses both:

- ``readable(path, what, fix)``: the path exists and can be read (a folder listed, a file opened);
- ``check_finite(named_tensors, where, fix)``: no NaN / Inf in weights (checked for the whole
  model, not only the layers being quantized: one NaN anywhere makes every output NaN).

Rules about model folders and checkpoints live with their loaders (``models/``, ``checkpoint.py``),
which call these; an ONNX file handed to ``loraq check`` is read by ``onnx_files.py``; the
recipe's rules are in ``recipes.py``; per-layer rules (rank <= min(in, out); a layer whose
in_features the group size does not divide is kept in high precision, never padded) in
``fitting.plan_layers``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch

from loraq_export.errors import UserError


def readable(path, what: str, fix: str) -> Path:
    """``path`` as a Path once it is known to exist and be readable; else one UserError line."""
    p = Path(path).expanduser()
    try:
        if p.is_dir():
            os.listdir(p)
            os.stat(os.path.join(p, "."))  # the folder's files can be reached (search permission)
        else:
            with open(p, "rb") as f:
                f.read(1)
    except FileNotFoundError:
        raise UserError(f"{what} {p} does not exist; {fix}") from None
    except PermissionError:
        raise UserError(f"{what} {p} is not readable (permission denied); make it readable "
                        "(chmod -R a+rX) or run loraq as its owner") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {p} ({e.strerror or e}); {fix}") from None
    return p


def check_finite(named_tensors: Iterable[tuple[str, torch.Tensor]], where: str, fix: str) -> None:
    """Refuse the first floating tensor holding NaN or Inf."""
    for name, t in named_tensors:
        if t.is_floating_point() and not torch.isfinite(t).all():
            kind = "NaN" if torch.isnan(t).any() else "Inf"
            raise UserError(f"{where}: {name} has {kind} values; {fix}")

