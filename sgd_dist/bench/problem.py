"""The one problem every system of the benchmark solves, and the step statistics. No Ray, no torch.distributed.

Linear regression from ``sgd_dist.core.data.generate``: d parameters are d - 1 features plus the bias column
(so d = 2 is lesson 2's shape), rows x = [U(-1, 1)^(d-1), 1], y = x @ a + U(0, 1). K workers each hold
one shard of ``rows_per_worker`` rows and take ``batch_size`` rows a step; the one-process loops take
K x batch_size rows a step from the whole dataset. Every system starts at w = 0 and applies ``w.sub_(lr * g)``.
A step's physical floor is the bytes it must read over the memory bandwidth.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from sgd_dist.config import DataConfig

ITEMSIZE = 4  # float32
MAX_ROWS_PER_WORKER = 8192
DATA_BYTES_PER_WORKER = 256 << 20  # wide problems get fewer rows per shard, never fewer than one batch


@dataclass(frozen=True)
class Problem:
    dim: int
    num_workers: int
    batch_size: int = 256
    seed: int = 0

    @property
    def rows_per_worker(self) -> int:
        """Up to 8,192 rows, fewer when a shard would pass 256 MB, a whole number of batches (at least 2)."""
        fit = DATA_BYTES_PER_WORKER // (ITEMSIZE * (self.dim + 1))
        rows = min(MAX_ROWS_PER_WORKER, fit) // self.batch_size * self.batch_size
        return max(rows, 2 * self.batch_size)

    @property
    def n_samples(self) -> int:
        return self.rows_per_worker * self.num_workers

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_workers

    @property
    def lr(self) -> float:
        """Constant and small enough not to diverge: the mini-batch curvature grows like d / batch."""
        return 0.1 * min(1.0, self.batch_size / self.dim)

    @property
    def read_bytes(self) -> int:
        """Bytes one step must read: the global batch's rows and targets, B x (d + 1), the weights (d) and the
        gradient (d), each once, in float32. A second pass over the rows (X @ w, then r @ X) is not counted."""
        return ITEMSIZE * (self.global_batch * (self.dim + 1) + 2 * self.dim)

    def data_config(self) -> DataConfig:
        return DataConfig(kind="linear", n_samples=self.n_samples, n_features=self.dim - 1, bias=True,
                          seed=self.seed, dtype="float32")


def floor_ms(read_bytes: int, bandwidth_gb_s: float) -> float:
    """Milliseconds to stream ``read_bytes`` at ``bandwidth_gb_s`` (1 GB = 1e9 bytes)."""
    return read_bytes / (bandwidth_gb_s * 1e9) * 1e3


def measured_intervals(stamps: list[float], warmup: int) -> list[float]:
    """Seconds per step from the times at which consecutive steps ended, the first ``warmup`` dropped."""
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return gaps[warmup:]


def step_stats(seconds: list[float]) -> tuple[float, float]:
    """(median, p90) in milliseconds of per-step times in seconds."""
    if not seconds:
        raise ValueError("no measured steps")
    ms = sorted(1e3 * s for s in seconds)
    return statistics.median(ms), percentile(ms, 90)


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on a sorted list."""
    pos = (len(sorted_values) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)
