"""Stragglers: injected slowness, and the detection of slow workers from their recorded answer times. No Ray.

Injection only stretches wall time (a worker sleeps after computing), never the numbers: a run with
stragglers computes bit for bit what the same run without them computes, and the random delays are keyed by
(seed, worker, step) like every other random choice here, so a delay pattern repeats exactly.
"""

from __future__ import annotations

import math
import statistics

import torch

from sgd_dist.config import StragglersConfig
from sgd_dist.data import generator

_STREAM_DELAYS = 3
SLOW_RATIO = 2.0  # a worker whose median answer time is more than this many times the others' is named


def extra_delay_s(cfg: StragglersConfig, worker: int, step: int, compute_s: float) -> float:
    """Seconds worker ``worker`` waits after computing its answer for local step ``step`` in ``compute_s``."""
    extra = (cfg.slowdown.get(worker, 1.0) - 1.0) * compute_s
    if cfg.delay != "none" and (cfg.delay_workers is None or worker in cfg.delay_workers):
        u = torch.rand((), generator=generator(cfg.seed, _STREAM_DELAYS, worker, step), dtype=torch.float64).item()
        mean = cfg.delay_ms / 1e3
        extra += 2 * mean * u if cfg.delay == "uniform" else -mean * math.log1p(-u)
    return extra


def find_stragglers(median_ms: dict[int, float], ratio: float = SLOW_RATIO) -> list[dict]:
    """Workers whose median answer time is more than ``ratio`` x the median of the other workers' medians."""
    slow = []
    for worker, ms in sorted(median_ms.items()):
        others = [m for w, m in median_ms.items() if w != worker]
        if others and statistics.median(others) > 0 and ms / statistics.median(others) > ratio:
            slow.append({"worker": worker, "ratio": ms / statistics.median(others)})
    return slow


def describe(slow: list[dict]) -> list[str]:
    return [f"worker {s['worker']} is {s['ratio']:.1f}x slower than the median" for s in slow]
