"""What ``sgd-dist bench`` can be asked to run, and its defaults. Light: no torch, no Ray (the CLI imports it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

SYSTEMS = ("floor", "docs-ps", "ddp", "ray-train", "sgd-dist")
SAMPLINGS = ("shuffle", "blocks")
"""shuffle: a per-epoch permutation, each batch gathered with ``X[idx]`` (a copy); blocks: contiguous batches."""
DEFAULT_DIMS = (2, 1000, 100_000)
DEFAULT_WORKERS = (1, 2, 4)
DEFAULT_STEPS = 300
DEFAULT_WARMUP = 30
DEFAULT_STARTUP_REPEATS = 3
DEFAULT_STARTUP_WORKERS = (8, 16)


@dataclass
class BenchOptions:
    dims: Sequence[int] = DEFAULT_DIMS
    """Parameter counts d: d - 1 features plus the bias column."""
    workers: Sequence[int] = DEFAULT_WORKERS
    steps: int = DEFAULT_STEPS
    """Measured steps per system and size, after the warm-up (a tenth of both at d >= 10,000)."""
    warmup: int = DEFAULT_WARMUP
    systems: Sequence[str] = SYSTEMS
    repeats: int = 1
    """Each system is measured this many times per size, interleaved with the others; the steps are pooled."""
    batch_size: int = 256
    """Rows per worker per step; the one-process loops take workers x batch_size."""
    startup_repeats: int = DEFAULT_STARTUP_REPEATS
    """Runs of each start-up program; 0 skips the start-up measurement."""
    startup_config: Path | None = None
    """The config of the 1-step start-up run; None: configs/lesson2.yaml of the source tree."""
    startup_workers: Sequence[int] = DEFAULT_STARTUP_WORKERS
    """Worker counts at which ``sgd-dist train``'s setup is timed against a bare program starting as many actors."""
    startup_cluster: bool = True
    """Also time the 1-step run with ``--address auto`` on a local cluster the benchmark starts and stops."""
    bandwidth_bytes: int = 1 << 30
    """Size of the tensor copied to measure the memory bandwidth (two such tensors are allocated)."""
    compression: bool = False
    """Also time one run per compression kind on the ray transport across simulated nodes (bench/compression.py)."""
    progress: bool | None = None
    """A bar over the measurements (ETA, the last median): None shows it on a terminal or in a notebook only."""
