"""The one object a run's Recorder calls: every tracker the config asks for (output.tensorboard, output.mlflow,
output.ray_metrics), fed the same batches from the driver. Built before the run starts, so that a missing
optional package is a one-line ConfigError before anything is written; a tracker that fails later warns once and
drops out, and the run goes on.
"""

from __future__ import annotations

from pathlib import Path

from sgd_dist.config import Config
from sgd_dist.run.metrics_ray import RayMetrics
from sgd_dist.run.trackers.base import Tracker
from sgd_dist.run.trackers.mlflow import MlflowTracker
from sgd_dist.run.trackers.tensorboard import TensorBoardTracker


class Trackers:
    """Every tracker of a run, called together: ``start`` once the run directory has its config.yaml, then
    ``rows``/``fault``/``rewind`` as the Recorder gets them, ``finish`` once summary.json and the figures are
    written. Calls before ``start`` (or with no trackers) do nothing."""

    def __init__(self, trackers: list[Tracker] | None = None) -> None:
        self.trackers = list(trackers or [])
        self.started = False

    def start(self, config: Config, run_dir: Path, resumed: bool) -> None:
        for tracker in self.trackers:
            tracker.start(config, run_dir, resumed)
        self.started = True

    def rows(self, rows: list[dict], schedule: list[dict]) -> None:
        """A batch of metrics rows and the schedule lines of the same updates."""
        if self.started:
            for tracker in self.trackers:
                tracker.rows(rows)
                tracker.schedule(schedule)

    def fault(self, entry: dict) -> None:
        if self.started:
            for tracker in self.trackers:
                tracker.fault(entry)

    def rewind(self, step: int) -> None:
        if self.started:
            for tracker in self.trackers:
                tracker.rewind(step)

    def finish(self, summary: dict | None, status: str) -> None:
        if self.started:
            for tracker in self.trackers:
                tracker.finish(summary, status)
            self.started = False


def trackers_for(config: Config) -> Trackers:
    """The trackers ``config.output`` asks for (Ray's metrics only on the ray backend)."""
    output, trackers = config.output, []
    if output.tensorboard:
        trackers.append(TensorBoardTracker(None if output.tensorboard is True else output.tensorboard))
    if output.mlflow is not None:
        m = output.mlflow
        trackers.append(MlflowTracker(m.tracking_uri, m.experiment, m.run_name))
    if output.ray_metrics and config.cluster.backend == "ray":
        trackers.append(RayMetrics())
    return Trackers(trackers)
