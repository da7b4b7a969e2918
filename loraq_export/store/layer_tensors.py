"""One quantized layer as flat named tensors plus a JSON description, and back.

Tensors use nunchaku's names: ``{layer}.qweight`` (codes; INT4 packed two per byte, low nibble
first, ONNX's layout, in (in, out) order), ``{layer}.wscales``, ``{layer}.wzeros`` (asymmetric
only), and ``{layer}.proj_down.*`` / ``{layer}.proj_up.*`` for the branch factors (the same three
names when quantized, the float16 tensor itself otherwise); a LoRA adapter term (calibless/adapters.py)
the same way under ``{layer}.lora_down`` / ``{layer}.lora_up``. Checkpoints and resumable partial
runs both store layers this way.
"""
from __future__ import annotations

import json

import torch
from safetensors.torch import load, save

from calibless.config import from_dict, to_dict
from calibless.formats import BranchFormat, LayerFormat, WeightFormat, is_block_size
from calibless.packing import pack_int4, unpack_int4
from calibless.record import Branch, LayerRecord, QTensor
from calibless.rotation import Rotation


def _qtensor_tensors(prefix: str, q: QTensor) -> dict[str, torch.Tensor]:
    codes = q.codes.numpy()
    packed = torch.from_numpy(pack_int4(codes)) if q.fmt.bits == 4 else q.codes.contiguous().clone()
    out = {f"{prefix}.qweight": packed, f"{prefix}.wscales": q.scale.contiguous()}
    if q.zero_point is not None:
        out[f"{prefix}.wzeros"] = q.zero_point.contiguous()
    return out


def _qtensor_from(prefix: str, t: dict, fmt: WeightFormat, shape: tuple[int, int]) -> QTensor:
    k, n = shape
    packed = t[f"{prefix}.qweight"]
    if fmt.bits == 4:
        codes = torch.from_numpy(unpack_int4(packed.numpy(), k * n, fmt.symmetric).reshape(k, n).copy())
    else:
        codes = packed
    if tuple(codes.shape) != (k, n):
        raise ValueError(f"{prefix}.qweight holds shape {tuple(codes.shape)}, config says {(k, n)}")
    scale = t[f"{prefix}.wscales"].float()
    if scale.shape[1] != n or k % scale.shape[0]:
        raise ValueError(f"{prefix}.wscales has shape {tuple(scale.shape)}, not compatible with {(k, n)}")
    zp = t.get(f"{prefix}.wzeros")
    if (zp is None) != fmt.symmetric:
        raise ValueError(f"{prefix}: zero points {'missing' if zp is None else 'present'} for this format")
    return QTensor(codes.to(torch.int8 if fmt.symmetric else torch.uint8), scale, zp, fmt)


def record_tensors(name: str, rec: LayerRecord) -> dict[str, torch.Tensor]:
    out = _qtensor_tensors(name, rec.weight)
    for parts, b in ((("proj_down", "proj_up"), rec.branch), (("lora_down", "lora_up"), rec.adapter)):
        if b is None:
            continue
        for part, f in zip(parts, (b.down, b.up)):
            if isinstance(f, QTensor):
                out.update(_qtensor_tensors(f"{name}.{part}", f))
            else:
                out[f"{name}.{part}"] = f.contiguous().clone()
    if rec.rotation is not None and rec.rotation.perm is not None:
        out[f"{name}.rotation_perm"] = rec.rotation.perm.to(torch.int32).contiguous()
    if rec.bias_shift is not None:
        out[f"{name}.bias_shift"] = rec.bias_shift.float().contiguous()
    return out


def _branch_meta(b) -> dict:
    return None if b is None else {"rank": b.rank, "format": to_dict(b.fmt),
                                   "down_format": to_dict(b.down.fmt) if isinstance(b.down, QTensor) else None,
                                   "up_format": to_dict(b.up.fmt) if isinstance(b.up, QTensor) else None}


def record_meta(rec: LayerRecord) -> dict:
    meta = {"shape": [rec.in_features, rec.out_features], "format": to_dict(rec.fmt), "method": rec.method,
            "branch": _branch_meta(rec.branch),
            "rotation": None if rec.rotation is None else {"block": rec.rotation.block, "perm": rec.rotation.perm is not None,
                                                            "folded": rec.rotation.folded},
            "bias_shift": rec.bias_shift is not None,
            "rel_error": round(float(rec.stats.get("rel_error", float("nan"))), 8)}
    if rec.adapter is not None:  # only then: checkpoints without adapters stay byte-identical
        meta["adapter"] = _branch_meta(rec.adapter)
    return meta


def record_from(name: str, t: dict, meta: dict) -> LayerRecord:
    k, n = meta["shape"]
    if meta.get("smooth") or meta.get("act_scales"):  # written by loraq 0.1 from code no command reached
        raise ValueError(f"{name}: smoothing or static activation scales are not supported")
    fmt = from_dict(LayerFormat, meta["format"])
    weight = _qtensor_from(name, t, fmt.weight, (k, n))
    branch = _branch_from(name, t, meta["branch"], ("proj_down", "proj_up"), k, n)
    adapter = _branch_from(name, t, meta.get("adapter"), ("lora_down", "lora_up"), k, n)
    shift = None
    if meta.get("bias_shift"):
        shift = t[f"{name}.bias_shift"].float()
        if tuple(shift.shape) != (n,):
            raise ValueError(f"{name}.bias_shift has shape {tuple(shift.shape)}, config says ({n},)")
    return LayerRecord(weight, fmt, branch, _rotation_from(name, t, meta.get("rotation"), k), method=meta.get("method", ""),
                       stats={"rel_error": meta.get("rel_error")}, bias_shift=shift, adapter=adapter)


def _branch_from(name: str, t: dict, bm, parts: tuple[str, str], k: int, n: int):
    if bm is None:
        return None
    bfmt, r = from_dict(BranchFormat, bm["format"]), bm["rank"]
    factors = []
    for part, shape, fkey in ((parts[0], (k, r), "down_format"), (parts[1], (r, n), "up_format")):
        if bm[fkey] is None:
            f = t[f"{name}.{part}"]
            if tuple(f.shape) != shape:
                raise ValueError(f"{name}.{part} has shape {tuple(f.shape)}, config says {shape}")
        else:
            f = _qtensor_from(f"{name}.{part}", t, from_dict(WeightFormat, bm[fkey]), shape)
        factors.append(f)
    return Branch(factors[0], factors[1], bfmt)


def _rotation_from(name: str, t: dict, meta, k: int):
    if meta is None:
        return None
    block, perm = meta["block"], None
    if not is_block_size(block) or k % block:
        raise ValueError(f"{name}: rotation block {block} is not a power of two dividing {k}")
    if meta["perm"]:
        perm = t[f"{name}.rotation_perm"].to(torch.int64)
        if sorted(perm.tolist()) != list(range(k)):
            raise ValueError(f"{name}.rotation_perm is not a permutation of {k} channels")
    return Rotation(block, perm, meta.get("folded"))


def record_bytes(name: str, rec: LayerRecord) -> bytes:
    """One layer as a self-describing safetensors blob (resumable runs, distributed gathering)."""
    return save(record_tensors(name, rec), metadata={"layer": name, "meta": json.dumps(record_meta(rec), sort_keys=True)})


def record_from_bytes(data: bytes, meta_json: str, name: str) -> LayerRecord:
    return record_from(name, load(data), json.loads(meta_json))
