"""Sharding the fitting across processes, GPUs and hosts with torch.distributed.

Launched by torchrun (``torchrun --nproc-per-node N -m loraq_export.cli quantize ...``), each
rank fits every N-th layer and sends its records to rank 0, which writes the checkpoint. The
gloo backend carries the records (CPU tensors serialized as bytes), so it also works across
hosts without a shared filesystem. Because every layer is fitted single-threaded with a seed
derived from its name, the checkpoint is byte-identical to a single-process run.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

from loraq_export.store.layer_tensors import record_bytes, record_from_bytes


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=timedelta(hours=6))
        return cls(dist.get_rank(), dist.get_world_size())

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast_error(self, message) -> None:
        """Rank 0's check result reaches every rank, so all fail together with the same line."""
        if self.active:
            box = [message]
            dist.broadcast_object_list(box, src=0)
            message = box[0]
        if message:
            from loraq_export.errors import UserError
            raise UserError(message)

    def gather_records(self, records: dict) -> dict:
        """Union of every rank's records, on rank 0 (other ranks get their own back)."""
        if not self.active:
            return records
        import json
        from loraq_export.store.layer_tensors import record_meta
        payload = {n: (record_bytes(n, r), json.dumps(record_meta(r), sort_keys=True)) for n, r in records.items()}
        gathered = [None] * self.world if self.is_main else None
        dist.gather_object(payload, gathered, dst=0)
        if not self.is_main:
            return records
        merged = {}
        for part in gathered:
            for name, (data, meta) in part.items():
                merged.setdefault(name, record_from_bytes(data, meta, name))
        return merged

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()
