"""``sgd-dist sweep``: a grid of timed runs, one at a time, on one shared Ray; results.csv; resume.

An experiment file names a base config, overrides applied to every run, a grid (dotted key -> values),
repeats, the target gap and the scaling. Every run's config is built and validated before the first run
starts, so a bad grid key or value fails in one line with nothing run.

Why a plain loop and not Ray Tune: Tune's value is scheduling many trials at once, early stopping and search
algorithms. A sweep here needs the opposite: one run at a time (runs are timed, and two at once on a 2-core
machine would time each other), on the one Ray the whole sweep shares (Tune runs each trial in its own actor,
and ``train`` would then start its worker actors from inside another actor), resumable from the run
directories themselves, with a row per run rebuilt from its files. With Tune, we would still write the
resume rule, the rows and the speedups, plus the glue to keep Tune from running trials in parallel and from
keeping its own trial directories; the loop below is shorter than that glue.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import os
import re
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sgd_dist.config import (
    ClusterConfig,
    Config,
    ConfigError,
    _read_yaml,
    apply_overrides,
    build_config,
    drop_unused_keys,
    format_validation_error,
    set_dotted,
)
from sgd_dist.errors import UsageError, one_line

RESULTS_FILE = "results.csv"
EXPERIMENT_FILE = "experiment.yaml"
RUNS_DIR = "runs"
REPO_ROOT = Path(__file__).resolve().parents[2]
RESERVED_KEYS = ("output.", "cluster.address")
DIVERGED = "DivergenceError"  # a run whose loss stopped being finite: an outcome (its lr is too large), not a failure  # the sweep owns where runs go and which Ray they use
Scaling = Literal["strong", "weak"]


class Experiment(BaseModel):
    """One sweep: every field is one key of the experiment YAML file."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    base: str
    """The base config file, relative to the experiment file, the current directory or the repository."""
    overrides: list[str] = []
    """Dotted key=value overrides applied to every run (after the base, before the grid)."""
    grid: dict[str, list[Any]] = {}
    """Dotted config key -> the values it takes; the runs are the product, in file order. Keys joined by commas
    vary together: "train.mode,train.backup_workers": [[sync, 0], [backup, 1]]."""
    repeats: int = Field(1, ge=1)
    """Each grid point runs this many times (repeat r of every point before repeat r + 1)."""
    target_gap: float = Field(1e-3, gt=0)
    """Relative optimality gap (optimality_gap / optimal_loss) that counts as reaching the target."""
    scaling: list[Scaling] = ["weak"]
    """strong: the global batch (global_batch) is split over the workers; weak: train.batch_size per worker; or both."""
    global_batch: list[int] = []
    """Strong scaling: the global batch size(s); each run's per-worker batch is global_batch / num_workers."""

    @field_validator("scaling", "global_batch", mode="before")
    @classmethod
    def _one_or_list(cls, value: Any) -> Any:
        return value if isinstance(value, (list, tuple)) else [value]

    @field_validator("grid")
    @classmethod
    def _grid(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not values:
                raise ValueError(f"grid {key} lists no values")
            parts = key.split(",")
            for part in (p.strip() for p in parts):
                if part.startswith("output."):
                    raise ValueError(f"grid {key}: the sweep sets {part} itself (each run's directory is under "
                                     "--out); it cannot be gridded")
                if part.startswith("cluster.address"):
                    raise ValueError(f"grid {key}: every run of a sweep uses the one Ray the sweep joins; "
                                     "set cluster.address in the base config")
            if len(parts) > 1 and any(not isinstance(v, list) or len(v) != len(parts) for v in values):
                raise ValueError(f"grid {key}: each value must list {len(parts)} values, one per key")
            texts = [value_text(v) for v in values]
            twice = sorted({t for t in texts if texts.count(t) > 1})
            if twice:
                raise ValueError(f"grid {key} lists {', '.join(twice)} more than once")
        return grid

    @model_validator(mode="after")
    def _check(self) -> Experiment:
        if len(set(self.scaling)) != len(self.scaling) or not self.scaling:
            raise ValueError("scaling must be strong, weak or [strong, weak]")
        if "strong" in self.scaling:
            if not self.global_batch:
                raise ValueError("scaling: strong needs global_batch (the global batch split over the workers)")
            if "train.batch_size" in self.grid:
                raise ValueError("grid train.batch_size: under scaling: strong the per-worker batch is "
                                 "global_batch / num_workers; grid global_batch instead")
            if any(b < 1 for b in self.global_batch) or len(set(self.global_batch)) != len(self.global_batch):
                raise ValueError("global_batch must list distinct positive integers")
        elif self.global_batch:
            raise ValueError("global_batch applies to scaling: strong only")
        for item in self.overrides:
            if item.partition("=")[0].strip().startswith(RESERVED_KEYS):
                raise ValueError(f"overrides: {item!r}: the sweep sets output.* and cluster.address comes from the base")
        return self


def value_text(value: Any) -> str:
    """A grid value as it is written in YAML flow style: 4, 0.5, sync, {1: 4.0}, [64, 32]."""
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).removesuffix("\n...\n").strip()


@dataclass(frozen=True)
class RunPlan:
    """One run of the sweep: its place, its grid point, its repeat and its validated config."""

    index: int
    name: str  # the run directory's name under runs/
    scaling: Scaling
    global_batch: int | None  # strong scaling only: the global batch the point fixes
    point: tuple[tuple[str, Any], ...]  # (grid key, value) in grid order
    repeat: int
    config: Config

    def label(self, with_scaling: bool) -> str:
        parts = [self.scaling] if with_scaling else []
        if self.global_batch is not None:
            parts.append(f"global_batch={self.global_batch}")
        parts += [f"{key}={value_text(value)}" for key, value in self.point]
        return " ".join(parts + [f"r{self.repeat}"])


def _slug(text: str) -> str:
    """A value as a file name's part: characters other than letters, digits and ._+- become _."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "empty"


def resolve_base(base: str, experiment_path: Path) -> Path:
    """The base config: beside the experiment file, else from the current directory, else from the repo."""
    for root in (experiment_path.parent, Path.cwd(), REPO_ROOT):
        path = root / base
        if path.is_file():
            return path.resolve()
    raise ConfigError(f"experiment {str(experiment_path)!r}: base config {base!r} not found beside the experiment "
                      "file, in the current directory or in the repository")


@dataclass(frozen=True)
class Sweep:
    """A validated experiment, its resolved base and every run, in order."""

    path: Path
    experiment: Experiment
    base_path: Path
    base_raw: dict
    runs: list[RunPlan]

    def resolved(self) -> dict:
        """What experiment.yaml records: the experiment as given, and the base config it resolved to."""
        return {"experiment": self.experiment.model_dump(mode="python"),
                "base_config": yaml.safe_load(yaml.safe_dump(self.base_raw)),
                "num_runs": len(self.runs)}


def load_experiment(path: str | Path) -> Sweep:
    """Read and validate an experiment file and build every run's config; ConfigError in one line if not."""
    path = Path(path)
    raw = _read_yaml(path)
    where = f"experiment {str(path)!r}"
    if "base" not in raw and set(raw) & set(Config.model_fields):
        raise ConfigError(f"{str(path)!r} is a training config, not an experiment: run it with sgd-dist train "
                          f"--config {path}, or sweep it from an experiment file that names it as its base "
                          "(see configs/experiments/)")
    try:
        experiment = Experiment.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {format_validation_error(exc)}") from None
    base_path = resolve_base(experiment.base, path)
    base_raw = _read_yaml(base_path)
    try:
        apply_overrides(base_raw, experiment.overrides)
    except ConfigError as exc:
        raise ConfigError(f"{where}: overrides: {exc}") from None
    base_raw.setdefault("output", {}).setdefault("plots", False)  # the sweep draws its own figures
    return Sweep(path, experiment, base_path, base_raw, plan_runs(experiment, base_raw, where))


def plan_runs(experiment: Experiment, base_raw: dict, where: str = "experiment") -> list[RunPlan]:
    """Every run in order: repeats outermost (noise spreads over the repeats), then scaling, global batch,
    then the grid's product in file order (last key fastest). Each config is built and validated here."""
    keys = list(experiment.grid)
    points = list(itertools.product(*(experiment.grid[k] for k in keys)))
    runs: list[RunPlan] = []
    names: set[str] = set()
    validated: dict[tuple, Config] = {}
    with_scaling = len(experiment.scaling) > 1
    for repeat in range(experiment.repeats):
        for scaling in experiment.scaling:
            for global_batch in (experiment.global_batch if scaling == "strong" else [None]):
                for values in points:
                    point = tuple(zip(keys, values))
                    cache_key = (scaling, global_batch, tuple(value_text(v) for v in values))
                    if cache_key not in validated:
                        validated[cache_key] = _point_config(base_raw, point, global_batch, where)
                    config = validated[cache_key]
                    parts = ([scaling] if with_scaling else []) + (
                        [f"global_batch={global_batch}"] if global_batch is not None else []) + [
                        f"{k}={_slug(value_text(v))}" for k, v in point]
                    stem = ",".join(parts) if parts else "base"
                    name, n = f"{stem}-r{repeat}", 2
                    while name in names:  # two values that slug alike
                        name, n = f"{stem}~{n}-r{repeat}", n + 1
                    names.add(name)
                    runs.append(RunPlan(len(runs), name, scaling, global_batch, point, repeat, config))
    return runs


def _point_config(base_raw: dict, point, global_batch: int | None, where: str) -> Config:
    raw = yaml.safe_load(yaml.safe_dump(base_raw))  # a deep copy
    label = " ".join(f"{k}={value_text(v)}" for k, v in point) or "the base"
    try:
        explicit = set()
        for key, value in point:
            for part, one in zip(key.split(","), value) if "," in key else [(key, value)]:
                set_dotted(raw, part.strip(), one)
                explicit.add(part.strip())
        drop_unused_keys(raw, explicit)  # a grid over data.kind or train.mode, as an override switching them
        if global_batch is not None:
            try:
                workers = ClusterConfig.model_validate(
                    {k: v for k, v in raw.get("cluster", {}).items() if k == "num_workers"}).num_workers
            except ValidationError:
                return build_config(raw)  # reports the bad cluster.num_workers with its dotted name
            if global_batch % workers:
                raise ConfigError(f"global_batch={global_batch} does not split evenly over "
                                  f"cluster.num_workers={workers} (strong scaling)")
            set_dotted(raw, "train.batch_size", global_batch // workers)
        return build_config(raw)
    except (ConfigError, ValidationError) as exc:
        message = format_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
        batch = f" global_batch={global_batch}" if global_batch is not None else ""
        raise ConfigError(f"{where}: grid point {label}{batch}: {message}") from None


# ---------------------------------------------------------------------------------------------------------
# The numbers of one run, from its files


def relative_gaps(rows: list[dict], optimal_loss: float | None) -> list[tuple[dict, float]]:
    """(row, optimality_gap / optimal_loss) for every evaluated row; empty without a positive optimum."""
    if not optimal_loss or optimal_loss <= 0:
        return []
    return [(row, row["optimality_gap"] / optimal_loss) for row in rows
            if row.get("optimality_gap") is not None]


def first_below(rows: list[dict], optimal_loss: float | None, target_gap: float) -> dict | None:
    """The first evaluated row (in step order) whose relative gap is below target_gap, or None."""
    for row, rel in sorted(relative_gaps(rows, optimal_loss), key=lambda pair: pair[0]["step"]):
        if rel < target_gap:
            return row
    return None


COLUMNS_HEAD = ["run", "scaling"]
COLUMNS_TAIL = [
    "repeat", "num_workers", "mode", "n_features", "worker_batch", "global_batch", "status",
    "samples_per_s", "median_step_ms", "steps", "train_time_s", "optimal_loss",
    "target_step", "target_time_s", "target_samples", "final_relative_gap",
    "speedup", "efficiency", "speedup_basis", "error",
    "gradient_noise_scale",
]
# the cost model's prediction of each run (sgd_dist.study.cost_model), filled once every run is done
PREDICTION_COLUMNS = ["predicted_step_ms", "step_ms_error_pct", "predicted_samples_per_s", "samples_per_s_error_pct",
                      "predicted_seconds_to_target", "seconds_to_target_error_pct", "prediction_fit"]


def columns(experiment: Experiment) -> list[str]:
    return COLUMNS_HEAD + list(experiment.grid) + COLUMNS_TAIL + PREDICTION_COLUMNS


def run_row(plan: RunPlan, run_dir: Path, target_gap: float, error: str | None = None) -> dict:
    """One results row from the plan (what was asked) and the run directory's files (what happened)."""
    from sgd_dist.run.rundir import METRICS_FILE, SUMMARY_FILE, read_metrics, read_summary

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
        row.update(status="diverged" if why.startswith(DIVERGED) else "failed", error=why)
        return row
    optimal = summary.get("optimal_loss")
    hit = first_below(read_metrics(run_dir), optimal, target_gap) if (run_dir / METRICS_FILE).is_file() else None
    gap = summary.get("optimality_gap")
    row.update(
        status="completed", samples_per_s=summary["samples_per_s"], median_step_ms=summary["median_step_ms"],
        steps=summary["steps"], train_time_s=summary["train_time_s"], optimal_loss=optimal,
        target_step=None if hit is None else hit["step"], target_time_s=None if hit is None else hit["wall_time_s"],
        target_samples=None if hit is None else hit["samples_seen"],
        final_relative_gap=gap / optimal if gap is not None and optimal else None,
    )
    if "gradient_noise_scale" in summary:
        from sgd_dist.core.noise_scale import at_relative_gap

        row["gradient_noise_scale"] = at_relative_gap(summary["gradient_noise_scale"], target_gap)
    return row


def series(row: dict, grid_keys: list[str], without: tuple[str, ...] = ("cluster.num_workers",)) -> tuple:
    """The row's series: its scaling, its global batch under strong scaling, and its grid values but ``without``."""
    return (row["scaling"], row["global_batch"] if row["scaling"] == "strong" else None,
            tuple((k, row[k]) for k in grid_keys if k not in without))


def add_speedups(rows: list[dict], grid_keys: list[str]) -> list[dict]:
    """Fill speedup, efficiency and speedup_basis in place against the 1-worker runs of the same series.

    The series of a row: its scaling, its global batch under strong scaling, and every grid value but
    cluster.num_workers. Strong scaling: the mean time to target of the 1-worker repeats over this run's, if this run and
    every completed baseline repeat reached the target, else the ratio of samples/s. Weak scaling: the ratio of
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


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    return str(value)


def write_results(path: Path, experiment: Experiment, rows: list[dict]) -> None:
    from sgd_dist.run.rundir import write_text_atomic

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns(experiment), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    write_text_atomic(path, buffer.getvalue())


def read_results(path: str | Path) -> list[dict]:
    """results.csv's rows, numbers as numbers and empty cells as None (grid values stay text)."""
    numeric_int = {"repeat", "num_workers", "n_features", "global_batch", "steps", "target_step", "target_samples"}
    numeric = {"samples_per_s", "median_step_ms", "train_time_s", "optimal_loss", "target_time_s",
               "final_relative_gap", "speedup", "efficiency", "gradient_noise_scale", *PREDICTION_COLUMNS[:-1]}
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


# ---------------------------------------------------------------------------------------------------------
# Running


@dataclass
class SweepResult:
    out: Path
    rows: list[dict]
    ran: int  # runs executed by this call
    kept: int  # finished runs found on disk and not redone
    failed: int
    figures: Any = None  # the sweep_plots.Figures drawn at the end, if any
    model_lines: list[str] = field(default_factory=list)  # the cost model's coefficients and errors, to print


def check_out(out: Path, sweep: Sweep) -> None:
    """--out must be new, empty, or a sweep directory of this very experiment (then the sweep resumes)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file, not a directory")
    saved_path = out / EXPERIMENT_FILE
    if not saved_path.is_file():
        if any(out.iterdir()):
            raise UsageError(f"--out {str(out)!r} is not empty and holds no {EXPERIMENT_FILE}: not a sweep to "
                             "resume; choose another --out")
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    current = yaml.safe_load(yaml.safe_dump(sweep.resolved()))
    if saved != current:
        differ = sorted({*_differences(saved.get("experiment") or {}, current["experiment"]),
                         *(["the base config"] if saved.get("base_config") != current["base_config"] else [])})
        raise UsageError(f"--out {str(out)!r} holds a different experiment ({', '.join(differ) or 'its file'} "
                         "differ); resume it with its own experiment file, or choose another --out")


def _differences(a: dict, b: dict) -> list[str]:
    return [key for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


def run_sweep(sweep: Sweep, out: str | Path, *, plots: bool = True, stderr=None) -> SweepResult:
    """Run every run not finished under ``out`` one at a time, rewriting results.csv after each.

    Ray is initialised once for the whole sweep (or the process's existing Ray is used and left running).
    """
    from sgd_dist.backends.capacity import check_this_machine
    from sgd_dist.run.rundir import SUMMARY_FILE, read_summary, write_text_atomic

    stderr = stderr or sys.stderr
    out = Path(out)
    check_out(out, sweep)
    for config in {id(plan.config): plan.config for plan in sweep.runs}.values():
        check_this_machine(config)  # a run too big for this machine fails the sweep before any run starts
    (out / RUNS_DIR).mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / EXPERIMENT_FILE, yaml.safe_dump(sweep.resolved(), sort_keys=False))
    experiment = sweep.experiment
    with_scaling = len(experiment.scaling) > 1
    rows: list[dict] = []
    ran = kept = failed = 0
    started = _start_ray(sweep)
    try:
        for plan in sweep.runs:
            run_dir = out / RUNS_DIR / plan.name
            head = f"sweep [{plan.index + 1}/{len(sweep.runs)}] {plan.label(with_scaling)}"
            done = (run_dir / SUMMARY_FILE).is_file() and _finished(read_summary(run_dir))
            error = None
            if done:
                kept += 1
            else:
                if run_dir.exists():  # half-written (killed) or failed: clear it and run again
                    shutil.rmtree(run_dir)
                error = _run_one(plan, run_dir)
                ran += 1
            row = run_row(plan, run_dir, experiment.target_gap, error)
            failed += row["status"] == "failed"
            rows.append(row)
            write_results(out / RESULTS_FILE, experiment, add_speedups(rows, list(experiment.grid)))
            print(f"{head}: {_describe(row, kept_before=done)}", file=stderr, flush=True)
    finally:
        if started:
            import ray

            from sgd_dist.transports.channel import sweep_stale_semaphores

            ray.shutdown()
            sweep_stale_semaphores()
    result = SweepResult(out, rows, ran, kept, failed)
    result.model_lines = add_predictions(out, experiment, rows)
    if plots:
        from sgd_dist.study.plots import plot_sweep

        result.figures = plot_sweep(out)
    return result


def add_predictions(out: Path, experiment: Experiment, rows: list[dict]) -> list[str]:
    """Fit the cost model on the sweep's runs, put each run's leave-one-point-out prediction and its error in
    its row, rewrite results.csv; return the lines to print (the coefficients, the table, the errors)."""
    from sgd_dist.study.cost_model import curve_lines, error_lines, extrapolation_caveat, write_sweep_model

    try:
        result, found = write_sweep_model(out)
    except (ValueError, OSError, KeyError) as exc:  # the runs are done and recorded: report, do not fail the sweep
        return [f"cost model: none ({type(exc).__name__}: {exc})"]
    for row in rows:
        row.update(result.predictions.get(row["run"], {}))
    write_results(out / RESULTS_FILE, experiment, rows)
    return (["cost model (sgd_dist.study.cost_model), fitted on every completed run:"]
            + [f"  {line}" for line in result.model.describe()]
            + ["measured against predicted, each run from a fit on the other grid points' runs:"]
            + error_lines(result.observations, result.predictions)
            + ["predicted on a cluster (a core per process), 1 to 1,024 workers:"]
            + ([caveat] if (caveat := extrapolation_caveat(result.observations)) else curve_lines(found)))


def _start_ray(sweep: Sweep) -> bool:
    if all(plan.config.cluster.backend != "ray" for plan in sweep.runs):
        return False
    if any(plan.config.cluster.simulated_nodes for plan in sweep.runs):
        return False  # a simulated cluster needs a process without Ray: every run starts and stops its own
    from sgd_dist.backends.ray.backend import init_ray

    cpus = max(math.ceil(p.config.cluster.num_workers * p.config.cluster.cpus_per_worker) for p in sweep.runs)
    address = sweep.runs[0].config.cluster.address
    return init_ray(address, num_cpus=None if address else max(os.cpu_count() or 1, cpus))


def _run_one(plan: RunPlan, run_dir: Path) -> str | None:
    """Train one run into run_dir; the error in one line if it failed (KeyboardInterrupt stops the sweep)."""
    from sgd_dist.run.trainer import train

    config = plan.config.model_copy(update={"output": plan.config.output.model_copy(update={"dir": str(run_dir)})})
    try:
        train(config, console=False, progress=False)
    except Exception as exc:
        return one_line(exc)
    return None


def _finished(summary: dict) -> bool:
    """Completed, or diverged (the same config would diverge again): kept on resume."""
    return summary.get("status") == "completed" or str(summary.get("error", "")).startswith(DIVERGED)


def _describe(row: dict, kept_before: bool) -> str:
    if row["status"] == "diverged":
        return f"diverged ({row['error']})" + (" (done before, kept)" if kept_before else "")
    if row["status"] != "completed":
        return f"FAILED: {row['error']}"
    text = f"{row['median_step_ms']:.3g} ms/step, {row['samples_per_s']:,.0f} samples/s, "
    if row["target_step"] is None:
        text += "target not reached"
    else:
        text += f"target at step {row['target_step']} ({row['target_time_s']:.2f} s)"
    if row["final_relative_gap"] is not None:
        text += f", gap {row['final_relative_gap']:.1e}"
    return text + (" (done before, kept)" if kept_before else "")
