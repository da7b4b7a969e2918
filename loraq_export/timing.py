"""Stage timings for the reports."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Timer:
    """``with timer("stage"):`` adds the block's seconds to ``times[stage]``."""

    times: dict = field(default_factory=dict)

    @contextmanager
    def __call__(self, stage: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.times[stage] = round(self.times.get(stage, 0.0) + time.perf_counter() - t, 3)
