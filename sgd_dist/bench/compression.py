"""The benchmark's compression rows: one timed sgd_dist run per kind on the ray transport across simulated nodes, with
a bandwidth limit, the measured saving in step time set beside the saving in bytes.

Each run is a plain ``sgd-dist train`` of the same problem (d = 1e5 by default, 2 workers on 2 simulated nodes,
256 rows each, every message delayed by the network model: latency + bytes x 8 / bandwidth, as the compressed
payloads travelled). Measured: the median step time (the server's clock between updates) and the bytes each update
moved (``summary.json``'s totals over its steps). Every run starts and stops its own simulated cluster, so this
must be called in a process where Ray is not initialised (before the runner starts its embedded Ray, or after it
shut it down). The bytes are exact and load-free; the times are wall clock (run it on a quiet machine).

    from sgd_dist.bench.compression import compression_rows, compression_markdown
    print(compression_markdown(compression_rows()))
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import ray

from sgd_dist.config import build_config
from sgd_dist.run.trainer import train

# label -> the compression section of that row's run
KINDS: dict[str, dict] = {
    "none": {},
    "fp16": {"kind": "fp16"},
    "bf16": {"kind": "bf16"},
    "int8": {"kind": "int8"},
    "topk 1 % + EF": {"kind": "topk", "ratio": 0.01, "error_feedback": True},
    "randk 1 % + EF": {"kind": "randk", "ratio": 0.01, "error_feedback": True},
    "int8, down": {"kind": "int8", "down": True},
    "topk 1 % + EF, down": {"kind": "topk", "ratio": 0.01, "error_feedback": True, "down": True},
}


@dataclass(frozen=True)
class CompressionRow:
    kind: str
    d: int
    workers: int
    nodes: int
    bandwidth_gbps: float
    bytes_per_step: float  # up and down, over the run's updates (evaluations included)
    median_ms: float
    byte_saving: float | None = None  # the uncompressed run's bytes per step over this one's
    time_saving: float | None = None  # the uncompressed run's median step over this one's


def run_kind(compression: dict, *, d: int, workers: int, nodes: int, bandwidth_gbps: float, latency_ms: float,
             steps: int, out: Path) -> tuple[float, float]:
    """(bytes per update, median step ms) of one run with this compression section."""
    raw = {"data": {"n_samples": 2 * 256 * workers, "n_features": d - 1}, "optim": {"lr": 0.01},
           "cluster": {"num_workers": workers, "simulated_nodes": nodes, "transport": "ray",
                       "network": {"bandwidth_gbps": bandwidth_gbps, "latency_ms": latency_ms}},
           "train": {"steps": steps, "batch_size": 256, "eval_every": 0, "log_every": 0, "checkpoint_every": 0},
           "compression": compression, "output": {"dir": str(out), "plots": False, "ray_metrics": False}}
    summary = train(build_config(raw), console=False, progress=False).summary
    return (summary["bytes_up"] + summary["bytes_down"]) / summary["steps"], summary["median_step_ms"]


def compression_rows(kinds: dict[str, dict] = KINDS, *, d: int = 100_000, workers: int = 2, nodes: int = 2,
                     bandwidth_gbps: float = 0.1, latency_ms: float = 0.05, steps: int = 60) -> list[CompressionRow]:
    """One row per kind, the first (``none``) the one the savings are against.

    Raises:
        RuntimeError: Ray is initialised in this process (a simulated cluster needs a process of its own).
    """
    if ray.is_initialized():
        raise RuntimeError("the compression rows start simulated clusters: call them where Ray is not initialised")
    rows = []
    with tempfile.TemporaryDirectory(prefix="sgd-dist-bench-compression-") as tmp:
        for i, (label, compression) in enumerate(kinds.items()):
            nbytes, ms = run_kind(compression, d=d, workers=workers, nodes=nodes, bandwidth_gbps=bandwidth_gbps,
                                  latency_ms=latency_ms, steps=steps, out=Path(tmp) / f"run-{i}")
            base = rows[0] if rows else None
            rows.append(CompressionRow(label, d, workers, nodes, bandwidth_gbps, nbytes, ms,
                                       base.bytes_per_step / nbytes if base else None,
                                       base.median_ms / ms if base else None))
    return rows


def compression_markdown(rows: list[CompressionRow]) -> str:
    """The rows as a markdown table."""
    lines = ["| compression | d | workers / nodes | bandwidth | bytes per update | median ms per update | bytes saved "
             "| time saved |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        saved = (f"{r.byte_saving:.1f}x", f"{r.time_saving:.2f}x") if r.byte_saving else ("-", "-")
        lines.append(f"| {r.kind} | {r.d:,} | {r.workers} / {r.nodes} | {r.bandwidth_gbps:g} Gb/s "
                     f"| {r.bytes_per_step:,.0f} | {r.median_ms:.1f} | {saved[0]} | {saved[1]} |")
    return "\n".join(lines)
