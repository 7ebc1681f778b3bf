"""The results.csv format of a sweep directory: its columns, one row per run (from the plan and the run's files),
reading and writing it, each row's series and the speedups against the 1-worker runs of that series. The file
names of a sweep directory live here too."""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path
from typing import Any

from sgd_dist.core.noise_scale import at_relative_gap
from sgd_dist.run.rundir import METRICS_FILE, SUMMARY_FILE, read_metrics, read_summary, write_text_atomic
from sgd_dist.study.experiment import Experiment, RunPlan, value_text

RESULTS_FILE = "results.csv"
EXPERIMENT_FILE = "experiment.yaml"
RUNS_DIR = "runs"


def relative_gaps(rows: list[dict], gap_scale: float | None) -> list[tuple[dict, float]]:
    """(row, optimality_gap / gap_scale) for every evaluated row; empty without a positive scale."""
    if not gap_scale or gap_scale <= 0:
        return []
    return [(row, row["optimality_gap"] / gap_scale) for row in rows
            if row.get("optimality_gap") is not None]


def first_below(rows: list[dict], gap_scale: float | None, target_gap: float) -> dict | None:
    """The first evaluated row (in step order) whose relative gap is below target_gap, or None."""
    for row, rel in sorted(relative_gaps(rows, gap_scale), key=lambda pair: pair[0]["step"]):
        if rel < target_gap:
            return row
    return None


def gap_scale_of(record: dict) -> float | None:
    """What a run's relative gap divides by, from its summary.json or its results.csv row (run/reference.py: f* if
    positive, else the initial gap f(w0) - f*); f* for a record written before the scale was."""
    return record["gap_scale"] if "gap_scale" in record else record.get("optimal_loss")


COLUMNS_HEAD = ["run", "scaling"]
COLUMNS_TAIL = [
    "repeat", "num_workers", "mode", "n_features", "worker_batch", "global_batch", "status",
    "samples_per_s", "median_step_ms", "steps", "train_time_s", "optimal_loss",
    "gap_scale", "target_step", "target_time_s", "target_samples", "final_relative_gap",
    "speedup", "efficiency", "speedup_basis", "error",
    "gradient_noise_scale", "worst_worker_ratio",
]
# the cost model's prediction of each run (sgd_dist.study.cost_model), filled once every run is done
PREDICTION_COLUMNS = ["predicted_step_ms", "step_ms_error_pct", "predicted_samples_per_s", "samples_per_s_error_pct",
                      "predicted_seconds_to_target", "seconds_to_target_error_pct", "prediction_fit"]


def columns(experiment: Experiment) -> list[str]:
    return COLUMNS_HEAD + list(experiment.grid) + COLUMNS_TAIL + PREDICTION_COLUMNS


def run_row(plan: RunPlan, run_dir: Path, target_gap: float, error: str | None = None) -> dict:
    """One results row from the plan (what was asked) and the run directory's files (what happened)."""
    config = plan.config
    row: dict[str, Any] = {
        "run": plan.name, "scaling": plan.scaling, **{k: value_text(v) for k, v in plan.point},
        "repeat": plan.repeat, "num_workers": config.cluster.num_workers, "mode": config.train.mode,
        "n_features": config.data.n_features, "worker_batch": value_text(config.train.batch_size),
        "global_batch": config.global_batch_size(),
    }
    summary = read_summary(run_dir) if (run_dir / SUMMARY_FILE).is_file() else {}
    if summary.get("status") != "completed":
        why = error or summary.get("error") or "no summary.json"
        # a run whose loss stopped being finite is an outcome (its lr is too large), not a failure
        row.update(status="diverged" if summary.get("diverged") else "failed", error=why)
        return row
    optimal, scale = summary.get("optimal_loss"), gap_scale_of(summary)
    hit = first_below(read_metrics(run_dir), scale, target_gap) if (run_dir / METRICS_FILE).is_file() else None
    gap = summary.get("optimality_gap")
    row.update(
        status="completed", samples_per_s=summary["samples_per_s"], median_step_ms=summary["median_step_ms"],
        steps=summary["steps"], train_time_s=summary["train_time_s"], optimal_loss=optimal, gap_scale=scale,
        target_step=None if hit is None else hit["step"], target_time_s=None if hit is None else hit["wall_time_s"],
        target_samples=None if hit is None else hit["samples_seen"],
        final_relative_gap=gap / scale if gap is not None and scale else None,
        worst_worker_ratio=summary.get("worst_worker_ratio"),
    )
    if "gradient_noise_scale" in summary:
        row["gradient_noise_scale"] = at_relative_gap(summary["gradient_noise_scale"], target_gap)
    return row


def grid_keys(results: Path) -> list[str]:
    """The grid's keys: results.csv's columns between scaling and repeat."""
    with open(results, newline="") as f:
        header = next(csv.reader(f))
    return header[header.index("scaling") + 1:header.index("repeat")]


def series(row: dict, grid_keys: list[str], without: tuple[str, ...] = ("cluster.num_workers",)) -> tuple:
    """The row's series: its scaling, its global batch under strong scaling, and its grid values but ``without``."""
    return (row["scaling"], row["global_batch"] if row["scaling"] == "strong" else None,
            tuple((k, row[k]) for k in grid_keys if k not in without))


def add_speedups(rows: list[dict], grid_keys: list[str]) -> list[dict]:
    """Fill speedup, efficiency and speedup_basis in place against the 1-worker runs of the same series.

    The series of a row: its scaling, its global batch under strong scaling, and every grid value but
    cluster.num_workers. Strong scaling: the mean time to target of the 1-worker repeats over this run's, if this run
    and every completed baseline repeat reached the target, else the ratio of samples/s. Weak scaling: the ratio of
    samples/s (the same work per worker; efficiency is then the throughput per worker against one worker's).
    Efficiency is speedup / num_workers in both.
    """
    baselines: dict[Any, list[dict]] = {}
    for row in rows:
        if row.get("status") == "completed" and int(row["num_workers"]) == 1:
            baselines.setdefault(series(row, grid_keys), []).append(row)
    for row in rows:
        base = baselines.get(series(row, grid_keys))
        row.update(speedup=None, efficiency=None, speedup_basis=None)
        if row.get("status") != "completed" or not base:
            continue
        times = [b["target_time_s"] for b in base]
        if row["scaling"] == "strong" and row["target_time_s"] is not None and None not in times:
            row["speedup"] = statistics.fmean(times) / row["target_time_s"]
            row["speedup_basis"] = "time_to_target"
        else:
            row["speedup"] = row["samples_per_s"] / statistics.fmean(b["samples_per_s"] for b in base)
            row["speedup_basis"] = "samples_per_s"
        row["efficiency"] = row["speedup"] / int(row["num_workers"])
    return rows


def csv_cell(value: Any) -> str:
    """A CSV cell: empty for None and non-finite floats, repr for floats (exact round trip)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    return str(value)


def write_results(path: Path, experiment: Experiment, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns(experiment), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: csv_cell(v) for k, v in row.items()})
    write_text_atomic(path, buffer.getvalue())


def read_results(path: str | Path) -> list[dict]:
    """results.csv's rows, numbers as numbers and empty cells as None (grid values stay text)."""
    numeric_int = {"repeat", "num_workers", "n_features", "global_batch", "steps", "target_step", "target_samples"}
    numeric = {"samples_per_s", "median_step_ms", "train_time_s", "optimal_loss", "gap_scale", "target_time_s",
               "final_relative_gap", "speedup", "efficiency", "gradient_noise_scale", "worst_worker_ratio",
               *PREDICTION_COLUMNS[:-1]}
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row: dict[str, Any] = {}
            for key, text in raw.items():
                if text == "" and key not in COLUMNS_HEAD:
                    row[key] = None
                elif key in numeric_int:
                    row[key] = int(text)
                elif key in numeric:
                    row[key] = float(text)
                else:
                    row[key] = text
            rows.append(row)
    return rows
