"""Exact replay: re-execute a run's recorded schedule in one process and check it is reproduced bit for bit.

Every run writes ``schedule.jsonl``: for each update, which worker's answer of which local step, computed on
which weights version, it averaged, in order (and ``summary.json`` lists the dropped answers, and under error
feedback the (worker, step) commands at which a worker's residual restarted: after a replacement or a restore).
Since a mini-batch is a pure function of (seed, worker, step) and the server's rule is deterministic, the serial
backend driven by that schedule (``consistency.ReplayPolicy``) recomputes every gradient on the same weights
and every update from the same answers: an asynchronous run becomes a reproducible experiment.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from sgd_dist.config import ConfigError, load_config
from sgd_dist.engine.policies import ReplayPolicy
from sgd_dist.errors import UsageError
from sgd_dist.run.rundir import CONFIG_FILE, SCHEDULE_FILE, SUMMARY_FILE, read_metrics, read_summary
from sgd_dist.run.trainer import train


@dataclass(frozen=True)
class ReplayReport:
    run_dir: Path
    replay_dir: Path
    updates: int
    weights_equal: bool
    losses_compared: int
    losses_equal: int
    first_mismatch: int | None  # the first step whose loss or evaluation differs

    @property
    def exact(self) -> bool:
        return self.weights_equal and self.losses_equal == self.losses_compared


def read_schedule(run_dir: Path) -> list[list[list[int]]]:
    lines = [json.loads(line) for line in (run_dir / SCHEDULE_FILE).read_text().splitlines() if line.strip()]
    lines.sort(key=lambda line: line["update"])
    if [line["update"] for line in lines] != list(range(1, len(lines) + 1)):
        raise ConfigError(f"{run_dir / SCHEDULE_FILE} does not list updates 1..{len(lines)} once each")
    return [line["applied"] for line in lines]


def replay(run_dir: str | Path, out: str | Path | None = None) -> ReplayReport:
    """Replay a completed run on the serial backend into ``out`` (default RUN_DIR-replay-<time>)."""
    run_dir = Path(run_dir)
    for name in (CONFIG_FILE, SCHEDULE_FILE, SUMMARY_FILE):
        if not (run_dir / name).is_file():
            raise UsageError(f"{str(run_dir)!r} is not a run directory with a schedule (it needs {name})")
    original = read_summary(run_dir)
    if original.get("status") != "completed":
        raise UsageError(f"{str(run_dir)!r} did not complete (status {original.get('status')!r}): "
                         "only a completed run's schedule can be replayed")
    schedule = read_schedule(run_dir)
    out = Path(out) if out is not None else run_dir.with_name(f"{run_dir.name}-replay-{time.strftime('%H%M%S')}")
    # the numbers only: injected faults, straggler delays, the simulated network and nodes change wall time, never
    # a value
    config = load_config(run_dir / CONFIG_FILE, ["cluster.backend=serial", "cluster.address=null", "faults=[]",
                                                 "stragglers.slowdown={}", "stragglers.delay=none",
                                                 "stragglers.delay_ms=0", "cluster.simulated_nodes=null",
                                                 "cluster.network.latency_ms=0", "cluster.network.bandwidth_gbps=null",
                                                 f"output.dir={out}"])
    try:
        policy = ReplayPolicy(schedule, config.cluster.num_workers, dropped=original.get("dropped", []),
                              local_steps=config.train.local_steps, model_deltas=config.train.mode == "local_sgd",
                              resets=original.get("residual_resets", []))
    except ValueError as exc:  # a schedule no run could have written: edited, or from another run
        raise ConfigError(f"{run_dir / SCHEDULE_FILE}: {exc}") from None
    result = train(config, policy=policy, console=False, progress=False)
    before = {r["step"]: r for r in read_metrics(run_dir)}
    after = {r["step"]: r for r in read_metrics(result.run_dir)}
    keys = ("loss", "eval_loss")
    compared = [(step, key) for step, row in before.items() for key in keys if row.get(key) is not None]
    mismatched = sorted(step for step, key in compared if after.get(step, {}).get(key) != before[step][key])
    return ReplayReport(run_dir, result.run_dir, len(schedule), result.summary["weights"] == original["weights"],
                        len(compared), len(compared) - len(mismatched), mismatched[0] if mismatched else None)
