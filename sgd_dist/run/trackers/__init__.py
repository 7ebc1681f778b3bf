"""Trackers: where a run's records go besides its directory (TensorBoard, MLflow), and export_run, which sends a
run directory to one from its files."""

from sgd_dist.run.trackers.base import SCALARS, STATUSES, MissingExtra, Tracker, export_run
from sgd_dist.run.trackers.mlflow import MlflowTracker
from sgd_dist.run.trackers.tensorboard import TensorBoardTracker

__all__ = ["SCALARS", "STATUSES", "MissingExtra", "MlflowTracker", "TensorBoardTracker", "Tracker", "export_run"]
