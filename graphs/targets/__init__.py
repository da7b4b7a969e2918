"""Target legalizers: make a QDQ graph one that the target runtime accepts as it is.

    legalize(model, "ort" | "tensorrt", allow_conversion=False, report=None, calibration=None)

A legalizer applies only rewrites that keep the numerics (exact up to float summation order),
except where the target cannot express the recipe at all: those need ``allow_conversion=True``
(the user asked for the conversion) and are otherwise refused with a one-line TargetError that
names the deployable alternatives. TensorRT's static INT8 activation scales come from a short
data-free calibration (graphs.targets.tensorrt.calibrate) and are recorded in ``report``.
Add a target: one module with ``legalize(model, allow_conversion, report, **kw)`` plus an entry
in TARGETS and its rules in graphs.check.
"""
from __future__ import annotations

import importlib
from typing import Optional

import onnx

TARGETS = {"ort": "graphs.targets.ort", "tensorrt": "graphs.targets.tensorrt"}

ALTERNATIVES = {
    "tensorrt": ("deployable on TensorRT: w4a16 main (INT4 weight-only) with a w4a16 (INT4 weight-only, "
                 "no calibration), w8a8 or fp16 branch, e.g. recipe w4a16-g64-r32-w4a16 or "
                 "w4a16-g64-r32-w8a8, group 64 or 128 (TensorRT's only INT4 blocks); "
                 "or pass --convert (allow_conversion=True) to convert this graph"),
    "ort": ("deployable on ONNX Runtime: INT4 weights blocked along the input dim with a power-of-two "
            "group >= 16 (g32, g64, g128) or per channel (gch), e.g. w4a16-g64-r32-w8a8"),
}


class TargetError(ValueError):
    """The graph cannot be made legal for the target without a conversion the user did not ask for."""


def target_module(target: str):
    if target not in TARGETS:
        raise TargetError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    return importlib.import_module(TARGETS[target])


def legalize(model: onnx.ModelProto, target: str, allow_conversion: bool = False, report: Optional[dict] = None,
             calibration: Optional[list] = None) -> onnx.ModelProto:
    """A new model legal for ``target``; raises TargetError (one line, naming alternatives) when not
    possible without ``allow_conversion``. ``report`` (a dict) receives what was rewritten, the
    calibration inputs and scales (tensorrt) and any remaining violations. ``calibration``: a list
    of input feeds for the tensorrt calibration (default: synthetic inputs from the graph's specs)."""
    return target_module(target).legalize(model, allow_conversion=allow_conversion, report=report,
                                          calibration=calibration)


__all__ = ["ALTERNATIVES", "TARGETS", "TargetError", "legalize"]
