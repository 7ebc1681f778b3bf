"""A run's metrics in Ray's own metrics system (``ray.util.metrics``): the step, samples/s, the loss and the
optimality gap, the bytes the step's messages carried (up: the answers as sent; down: the weights), a histogram
of the applied gradients' staleness, each worker's answer times and the faults the run survived, every one
labelled by run. Ray exports them with its own metrics (Prometheus, the dashboard's
Grafana), so a cluster's users see training beside the cluster: `sgd_dist_step{run="..."}` and so on.

Recorded from the driver as the Recorder's batches come, off the step path; Ray's metrics agent reports them
every few seconds (RAY_metrics_report_interval_ms).
"""

from __future__ import annotations

from pathlib import Path

import ray
from ray.util import metrics

from sgd_dist.config import Config
from sgd_dist.run.trackers.base import Tracker, guarded

PREFIX = "sgd_dist_"
# an age is a whole number of updates: a bucket per age up to 4, then doubling
STALENESS_BOUNDARIES = [0.5, 1.5, 2.5, 3.5, 4.5, 8.5, 16.5, 32.5, 64.5]
ANSWER_BOUNDARIES_S = [1e-4 * 2 ** i for i in range(20)]  # 0.1 ms to ~52 s
SURVIVED = ("worker_replaced", "server_lost")  # the fault records that say the run recovered and went on


class RayMetrics(Tracker):
    """The run's metrics through ``ray.util.metrics`` (this process must be connected to Ray when it starts)."""

    name = "Ray metrics"
    where = "this Ray cluster's metrics agent"

    def __init__(self) -> None:
        self._metrics: dict = {}
        self._previous: dict | None = None

    @guarded
    def start(self, config: Config, run_dir: Path, resumed: bool) -> None:
        if not ray.is_initialized():
            raise RuntimeError("this process is not connected to Ray")
        self.run_dir = run_dir
        run = {"run": run_dir.name}
        made = {
            "step": metrics.Gauge(f"{PREFIX}step", "The run's last update.", ("run",)),
            "samples_per_s": metrics.Gauge(f"{PREFIX}samples_per_second", "Training samples per second.", ("run",)),
            "loss": metrics.Gauge(f"{PREFIX}loss", "The last mini-batch loss.", ("run",)),
            "gap": metrics.Gauge(f"{PREFIX}optimality_gap", "The last evaluated f(w) - f(w*).", ("run",)),
            "staleness": metrics.Histogram(f"{PREFIX}staleness", "Updates between the weights a gradient was "
                                           "computed on and the update that applied it.", STALENESS_BOUNDARIES,
                                           ("run",)),
            "answer": metrics.Histogram(f"{PREFIX}answer_seconds", "A worker's time on a command, for each applied "
                                        "answer.", ANSWER_BOUNDARIES_S, ("run", "worker")),
            "faults": metrics.Counter(f"{PREFIX}faults_survived", "Faults the run recovered from.", ("run", "kind")),
            "bytes": metrics.Counter(f"{PREFIX}bytes", "Bytes the run's messages carried: up, the workers' answers "
                                     "as sent; down, the weights sent to them.", ("run", "direction")),
        }
        for metric in made.values():
            metric.set_default_tags(run)
        self._metrics = made

    @guarded
    def rows(self, rows: list[dict]) -> None:
        if not rows:
            return
        m, last = self._metrics, rows[-1]
        m["step"].set(last["step"])
        first = self._previous if self._previous is not None and self._previous["step"] < rows[0]["step"] else rows[0]
        if last["wall_time_s"] > first["wall_time_s"]:
            m["samples_per_s"].set((last["samples_seen"] - first["samples_seen"])
                                   / (last["wall_time_s"] - first["wall_time_s"]))
        self._previous = last
        for row in rows:
            if row.get("loss") is not None:
                m["loss"].set(row["loss"])
            if row.get("optimality_gap") is not None:
                m["gap"].set(row["optimality_gap"])
            for direction in ("up", "down"):
                if row.get(f"bytes_{direction}"):
                    m["bytes"].inc(float(row[f"bytes_{direction}"]), {"direction": direction})

    @guarded
    def schedule(self, lines: list[dict]) -> None:
        staleness, answer = self._metrics["staleness"], self._metrics["answer"]
        for line in lines:
            for _, _, version in line["applied"]:
                staleness.observe(line["update"] - 1 - version)
            for (worker, _, _), seconds in zip(line["applied"], line.get("answer_s", []), strict=False):
                answer.observe(seconds, {"worker": str(worker)})

    @guarded
    def fault(self, entry: dict) -> None:
        if entry["fault"] in SURVIVED:
            self._metrics["faults"].inc(1.0, {"kind": entry["fault"]})

    def rewind(self, step: int) -> None:
        """Nothing to take back: Ray's metrics are the live view (the counts go on across a restore)."""
        self._previous = None

    def finish(self, summary: dict | None, status: str) -> None:
        """Nothing to close: Ray's metrics agent reports the last values."""
