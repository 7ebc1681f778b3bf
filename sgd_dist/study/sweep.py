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

import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import yaml

from sgd_dist.backends.capacity import check_this_machine
from sgd_dist.backends.ray.cluster import init_ray
from sgd_dist.errors import UsageError, one_line
from sgd_dist.run.progress import progress_bar
from sgd_dist.run.rundir import SUMMARY_FILE, read_summary, write_text_atomic
from sgd_dist.run.trainer import train
from sgd_dist.study.experiment import Experiment, RunPlan, Sweep
from sgd_dist.study.model_report import curve_lines, error_lines, extrapolation_caveat, write_sweep_model
from sgd_dist.study.plots import plot_sweep
from sgd_dist.study.results import (
    EXPERIMENT_FILE,
    RESULTS_FILE,
    RUNS_DIR,
    add_speedups,
    run_row,
    write_results,
)
from sgd_dist.transports.channel import sweep_stale_semaphores


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


def run_sweep(sweep: Sweep, out: str | Path, *, plots: bool = True, stderr=None,
              progress: bool | None = None, desc: str = "sweep", model: bool = True) -> SweepResult:
    """Run every run not finished under ``out`` one at a time, rewriting results.csv after each.

    Ray is initialised once for the whole sweep (or the process's existing Ray is used and left running).
    ``progress``: a bar over the runs (ETA, the last run's samples/s and gap) and each run's own; None shows
    them on a terminal or in a notebook only; ``desc`` names the bar. ``model``: fit the cost model on the runs
    at the end (a plan's virtual runs need none).
    """
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
    bar = progress_bar(len(sweep.runs), "run", desc, enabled=progress)
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
                error = _run_one(plan, run_dir, progress)
                ran += 1
            row = run_row(plan, run_dir, experiment.target_gap, error)
            failed += row["status"] == "failed"
            rows.append(row)
            write_results(out / RESULTS_FILE, experiment, add_speedups(rows, list(experiment.grid)))
            _note(bar, stderr, f"{head}: {_describe(row, kept_before=done)}", row)
    finally:
        bar.close()
        if started:
            ray.shutdown()
            sweep_stale_semaphores()
    result = SweepResult(out, rows, ran, kept, failed)
    result.model_lines = add_predictions(out, experiment, rows) if model else []
    if plots:
        result.figures = plot_sweep(out)
    return result


def add_predictions(out: Path, experiment: Experiment, rows: list[dict]) -> list[str]:
    """Fit the cost model on the sweep's runs, put each run's leave-one-point-out prediction and its error in
    its row, rewrite results.csv; return the lines to print (the coefficients, the table, the errors)."""
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
    cpus = max(math.ceil(p.config.cluster.num_workers * p.config.cluster.cpus_per_worker) for p in sweep.runs)
    address = sweep.runs[0].config.cluster.address
    return init_ray(address, num_cpus=None if address else max(os.cpu_count() or 1, cpus))


def _run_one(plan: RunPlan, run_dir: Path, progress: bool | None = False) -> str | None:
    """Train one run into run_dir; the error in one line if it failed (KeyboardInterrupt stops the sweep)."""
    config = plan.config.model_copy(update={"output": plan.config.output.model_copy(update={"dir": str(run_dir)})})
    try:
        train(config, console=False, progress=progress)
    except Exception as exc:
        return one_line(exc)
    return None


def _finished(summary: dict) -> bool:
    """Completed, or diverged (the same config would diverge again): kept on resume."""
    return summary.get("status") == "completed" or bool(summary.get("diverged"))


def _note(bar, stderr, line: str, row: dict) -> None:
    """A run's line above the sweep's bar, and the bar one run on with the run's samples/s and final gap."""
    bar.write(line, file=stderr)
    stderr.flush()
    if row["status"] != "completed":
        bar.set_postfix_str(f"last run {row['status']}", refresh=False)
    else:
        gap = f", gap {row['final_relative_gap']:.1e}" if row["final_relative_gap"] is not None else ""
        bar.set_postfix_str(f"last run {row['samples_per_s']:,.0f} samples/s{gap}", refresh=False)
    bar.update(1)


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
