"""The driver: build a backend, compute the exact reference, run the policy's schedule, record, close.

``train(config)`` is the whole run as a function a notebook can call; the CLI is a thin layer over it.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import std as tqdm_std

import sgd_dist
from sgd_dist import signals
from sgd_dist.backends import Backend, make_backend
from sgd_dist.backends.base import one_line, policy_for  # noqa: F401 (one_line: the CLI's and the sweep's)
from sgd_dist.backends.capacity import check_this_machine
from sgd_dist.config import Config
from sgd_dist.core import noise_scale, objectives
from sgd_dist.core.data import true_weights
from sgd_dist.engine.delays import find_stragglers
from sgd_dist.engine.evaluations import eval_steps
from sgd_dist.engine.worker import peak_rss_bytes
from sgd_dist.run.checkpoint import load_checkpoint, write_checkpoint
from sgd_dist.run.progress import RunStats
from sgd_dist.run.progress import bar_class as progress_bar
from sgd_dist.run.rundir import (
    CONFIG_FILE,
    FAULTS_FILE,
    METRICS_FILE,
    SCHEDULE_FILE,
    SUMMARY_FILE,
    MetricsWriter,
    check_run_dir,
    default_run_dir,
    last_recorded_step,
    write_config,
    write_json_atomic,
    write_text_atomic,
)
from sgd_dist.run.trackers.fanout import Trackers, trackers_for
from sgd_dist.run.workers import worker_table, worst_worker_ratio


def truncate_jsonl(path: Path, key: str, last: int) -> list[dict]:
    """Rewrite a JSON-lines file atomically keeping the rows whose ``key`` is at most ``last`` (and dropping a
    half-written last line); return the kept rows. The rows taken out are appended to ``<name>.rewound.jsonl``
    beside it first: a rewound run loses nothing it once recorded."""
    kept, lines, rewound = [], [], []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row[key] <= last:
                kept.append(row)
                lines.append(line)
            else:
                rewound.append(line)
    if rewound:
        with open(path.with_name(f"{path.stem}.rewound.jsonl"), "a") as f:
            f.write("".join(f"{line}\n" for line in rewound))
            f.flush()
            os.fsync(f.fileno())
    write_text_atomic(path, "".join(f"{line}\n" for line in lines))
    return kept


def describe_fault(entry: dict) -> str:
    """One console line for a fault record."""
    kind = entry["fault"]
    noticed = f", noticed after {entry['noticed_s']:.2f} s" if entry.get("noticed_s") is not None else ""
    if kind == "worker_lost":
        return f"worker {entry['worker']} lost at step {entry['step']}{noticed}; replacing it"
    if kind == "worker_replaced":
        return (f"worker {entry['worker']} replaced and its command redone in {entry['recovery_s']:.2f} s; "
                f"meanwhile the others answered {entry['answers_meanwhile']} commands and the server made "
                f"{entry['step'] - entry['lost_step']} updates")
    if kind == "server_lost":
        return (f"parameter server lost at step {entry['step']}{noticed}; restored from step {entry['restored_step']} "
                f"({entry['steps_redone']} steps to redo) in {entry['recovery_s']:.2f} s")
    if kind == "resumed":
        return f"resumed from the checkpoint at step {entry['step']}"
    if "skipped" in entry:
        return f"{kind} at step {entry['step']} not injected: {entry['skipped']}"
    where = f"worker {entry['worker']}" if "worker" in entry else f"node {entry.get('node')}" if "node" in entry else "server"
    return f"injected {kind} ({where}) at step {entry['step']}"

class DivergenceError(RuntimeError):
    """The loss stopped being a finite number."""


@dataclass(frozen=True)
class Reference:
    """The exact optimum of the objective SGD minimises (the loss plus the L2 term, if any)."""

    weights: torch.Tensor | None
    objective: float | None
    loss: float | None
    method: str


MAX_REFERENCE_DIM = 8192  # the d x d float64 sums (512 MB) beyond which the exact optimum is not computed


def compute_reference(config: Config, backend: Backend) -> Reference:
    wd = config.optim.weight_decay
    d, n = config.data.dim, config.data.n_samples
    if d > MAX_REFERENCE_DIM:
        if config.data.kind == "linear" and wd == 0 and n <= d:
            # n generic rows in d >= n dimensions have full row rank: least squares fits them exactly
            return Reference(None, 0.0, 0.0, f"n={n} <= d={d}: least squares interpolates, f* = 0 (w* not computed)")
        return Reference(None, None, None, f"not computed: the d x d statistics at d={d} would take "
                                           f"{d * d * 8 / 1e9:.0f} GB (limit d={MAX_REFERENCE_DIM})")
    if config.data.kind == "linear":
        w = objectives.least_squares_optimum(backend.linear_stats(), wd)
        method = "closed-form least squares from X^T X and X^T y summed over the shards (float64)"
    else:
        w, _, iterations = objectives.newton_logistic_optimum(backend.newton_terms, config.data.dim, wd)
        method = f"damped Newton on the full data, sums over the shards in float64 ({iterations} iterations)"
    # f* by the very path a run's evaluation takes (the per-row loss summed over the shards, the penalty from the
    # weights, both in float64), so that the gap of a run at the optimum is 0 to rounding and never negative
    total, rows = backend.loss_sum(w)
    loss = total / rows
    return Reference(w, loss + objectives.penalty(w, wd), loss, method)


def measure_noise_scale(config: Config, backend: Backend, reference: Reference) -> dict:
    """The gradient noise scale at the initial weights and at each train.gradient_noise_scale relative gap on the
    segment from them to the optimum, from the workers' per-example gradient moments summed over the shards."""
    wd = config.optim.weight_decay
    init = config.model.init
    w0 = torch.zeros(config.data.dim, dtype=torch.float64) if init == "zeros" else torch.tensor(init, dtype=torch.float64)
    if reference.weights is None or not reference.loss:
        return {"initial": noise_scale.noise_scale(backend.gradient_moments(w0), w0, wd).as_dict(), "at_gap": [],
                "why": "no exact optimum to measure the gap from"}

    def objective(w: torch.Tensor) -> float:
        total, rows = backend.loss_sum(w)
        return total / rows + objectives.penalty(w, wd)

    t0 = time.perf_counter()
    report = noise_scale.along_the_way(backend.gradient_moments, objective, w0, reference.weights,
                                       reference.objective, reference.loss, config.train.gradient_noise_scale, wd)
    return {**report, "where": "initial: model.init; at_gap: the point w* + s (w0 - w*) with that relative gap; "
                               "final: the last weights", "seconds": time.perf_counter() - t0}


class Recorder:
    """The run's sink: adds the optimality gap to evaluated rows, appends every row to metrics.jsonl, prints one
    console line per logged step and drives the progress bar; writes the checkpoints and logs the faults."""

    def __init__(self, run_dir: Path, config: Config, reference: Reference, console: bool, progress: bool | None,
                 bar: type = tqdm_std.tqdm, trackers: Trackers | None = None):
        self.run_dir = run_dir
        self.config = config
        self.reference = reference
        self.console = console
        self.writer = MetricsWriter(run_dir / METRICS_FILE)
        self.schedule = MetricsWriter(run_dir / SCHEDULE_FILE)  # which answers each update averaged: the replay
        self.bar = bar(total=config.train.steps, unit="step", disable=None if progress is None else not progress,
                        file=sys.stderr, dynamic_ncols=True, leave=False)
        self.times: list[float] = []
        self.last: dict | None = None
        self.last_eval: dict | None = None
        self._logged: tuple[int, float] = (0, 0.0)
        faults = run_dir / FAULTS_FILE
        self.faults: list[dict] = [json.loads(line) for line in faults.read_text().splitlines()] if faults.exists() else []
        self._faults_file: MetricsWriter | None = None
        self.checkpoints = 0
        self.checkpoint_seconds = 0.0
        self.trackers = trackers or Trackers()  # TensorBoard, MLflow, Ray's metrics: fed each batch as it comes
        self.stats = RunStats()  # the bar's samples/s and gap

    def checkpoint(self, state: dict) -> None:
        t0 = time.perf_counter()
        write_checkpoint(self.run_dir, state, self.config)
        self.checkpoints += 1
        self.checkpoint_seconds += time.perf_counter() - t0

    def fault(self, entry: dict) -> None:
        self.faults.append(entry)
        if self._faults_file is None:
            self._faults_file = MetricsWriter(self.run_dir / FAULTS_FILE)
        self._faults_file.write(entry)
        self.trackers.fault(entry)
        if self.console:
            self.bar.write(f"fault: {describe_fault(entry)}")

    def rewind(self, step: int) -> None:
        """Keep the rows up to ``step`` (the restored checkpoint's) in the files and in memory; the rest come again."""
        self.writer.close()
        self.schedule.close()
        kept = truncate_jsonl(self.run_dir / METRICS_FILE, "step", step)
        truncate_jsonl(self.run_dir / SCHEDULE_FILE, "update", step)
        self.writer = MetricsWriter(self.run_dir / METRICS_FILE)
        self.schedule = MetricsWriter(self.run_dir / SCHEDULE_FILE)
        self.times = [row["wall_time_s"] for row in kept]
        self.last = kept[-1] if kept else None
        self.last_eval = next((row for row in reversed(kept) if "eval_loss" in row), None)
        self.bar.n = max(step, 0)
        self.bar.refresh()
        self.trackers.rewind(step)
        self.stats.rewind()

    # the backends' Sink interface
    def rows(self, rows: list[dict]) -> None:
        self.record(rows)

    def record(self, rows: list[dict]) -> None:
        log_every, steps = self.config.train.log_every, self.config.train.steps
        schedule = []
        for row in rows:
            applied, answer_s = row.pop("applied", None), row.pop("answer_s", None)
            if applied is not None:
                schedule.append({"update": row["step"], "applied": applied, "answer_s": answer_s})
                self.schedule.write(schedule[-1])
            if "eval_loss" in row:
                if self.reference.objective is not None:
                    row["optimality_gap"] = row["eval_loss"] + row["eval_penalty"] - self.reference.objective
                self.last_eval = row
            self.writer.write(row)
            self.times.append(row["wall_time_s"])
            self.last = row
            if row["loss"] is not None and not math.isfinite(row["loss"]):
                raise DivergenceError(
                    f"the mini-batch loss is {row['loss']} at step {row['step']}: the run diverged; "
                    f"try a smaller optim.lr (step {row['step']} used lr {row['lr']:.4g})"
                )
            step = row["step"]
            if self.console and log_every and (step % log_every == 0 or step == steps):
                self.bar.write(self._line(row))
        if rows:
            self.bar.set_postfix_str(self.stats(rows, self.last_eval), refresh=False)
            self.bar.update(rows[-1]["step"] - self.bar.n)
        self.trackers.rows(rows, schedule)

    def _line(self, row: dict) -> str:
        step, t = row["step"], row["wall_time_s"]
        prev_step, prev_t = self._logged
        self._logged = (step, t)
        width = len(str(self.config.train.steps))
        parts = [f"step {step:>{width}}/{self.config.train.steps}"]
        if step:
            parts.append(f"loss {row['loss']:.6g}")
        if "eval_loss" in row:
            parts.append(f"eval {row['eval_loss']:.6g}")
        if "optimality_gap" in row:
            parts.append(f"gap {row['optimality_gap']:.3e}")
        if step:
            parts += [f"lr {row['lr']:.4g}", f"{1e3 * (t - prev_t) / (step - prev_step):.3f} ms/step"]
        return " | ".join(parts)

    def median_step_ms(self) -> float | None:
        gaps = [b - a for a, b in zip(self.times, self.times[1:])]
        return 1e3 * statistics.median(gaps) if gaps else None

    def close(self) -> None:
        self.bar.close()
        self.writer.close()
        self.schedule.close()
        if self._faults_file is not None:
            self._faults_file.close()


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    summary: dict


def resolve_run_dir(config: Config, config_path: str | Path | None) -> Path:
    """output.dir, else runs/<name>-<timestamp>: output.name, the config file's stem, or (a config built in
    Python) the mode, the workers and the backend, as sync-2w-ray."""
    if config.output.dir is not None:
        run_dir = Path(config.output.dir)
        check_run_dir(run_dir)
        return run_dir
    cluster = config.cluster
    name = config.output.name or (Path(config_path).stem if config_path
                                  else f"{config.train.mode}-{cluster.num_workers}w-{cluster.backend}")
    return default_run_dir(name)


def completed_summary(run_dir: str | Path) -> dict | None:
    """The run directory's summary if the run completed, else None."""
    path = Path(run_dir) / SUMMARY_FILE
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("status") == "completed" else None


def train(
    config: Config,
    *,
    config_path: str | Path | None = None,
    progress: bool | None = None,
    console: bool = True,
    policy=None,
    resume: str | Path | None = None,
) -> RunResult:
    """Run one training as configured; return the run directory and its summary.

    Nothing is written before the backend is up (a bad address or a cluster too small leaves no run
    directory); from then on config.yaml, then every metrics row as it comes, then summary.json and the
    figures. A run that fails leaves summary.json with status 'failed' (or 'interrupted') and the error.

    ``resume``: go on with the run in that directory from its latest checkpoint (``config`` must be the run's
    own config.yaml); the rows after the checkpoint are dropped and computed again, so metrics.jsonl ends with
    every step once. A missing, corrupt or mismatched checkpoint raises CheckpointError before anything is touched.
    A run that already completed is left as it is, byte for byte: its own result comes back.

    What cannot fit this machine (memory, a GPU) is a ConfigError before anything starts. An exception out of a
    started run carries ``run_dir``: the run directory, or None if the run stopped before writing one.
    """
    t_start = time.perf_counter()
    say = print if console else (lambda *a, **k: None)
    restore = None
    if resume is not None:
        run_dir = Path(resume)
        done = completed_summary(run_dir)
        if done is not None:
            say(f"sgd-dist: {run_dir} is complete ({done.get('steps')} steps); nothing to resume")
            return RunResult(run_dir, done)
        restore, _ = load_checkpoint(run_dir, config)
    else:
        run_dir = resolve_run_dir(config, config_path)
    for note in check_this_machine(config):
        say(note)
    say(f"sgd-dist: {config.cluster.backend} backend, {config.cluster.num_workers} workers{_where(config)}, "
        f"{config.data.n_samples:,} rows x {config.data.dim} parameters; generating the shards where they live")
    trackers = trackers_for(config)  # a missing optional package fails here, before anything starts
    try:
        backend = make_backend(config)
    except BaseException as exc:
        exc.run_dir = None  # nothing was written
        raise
    recorder: Recorder | None = None
    summary: dict | None = None
    failed: dict | None = None
    try:
        if restore is None:
            write_config(run_dir, config)
        trackers.start(config, run_dir, resumed=restore is not None)
        t_setup = time.perf_counter() - t_start
        say(f"sgd-dist: run directory {run_dir}  (setup {t_setup:.1f} s, device {backend.device})")
        reference = compute_reference(config, backend)
        t_reference = time.perf_counter() - t_start - t_setup
        noise = measure_noise_scale(config, backend, reference) if config.train.gradient_noise_scale else None
        recorder = Recorder(run_dir, config, reference, console, progress,
                            progress_bar(say) if progress is not False else tqdm_std.tqdm, trackers)
        if restore is not None:
            step = int(restore["server"]["step"])
            recorder.rewind(step)
            recorder.fault({"fault": "resumed", "step": step, "at_unix": time.time()})
        backend.run(policy or policy_for(config), eval_steps(config.train.steps, config.train.eval_every), recorder,
                    restore=restore)
        weights = backend.final_weights()
        backend.info = backend.worker_info()  # again, for the workers' peak memory over the run
        summary = _summary(config, backend, reference, recorder, weights, t_setup, t_reference,
                           time.perf_counter() - t_start, restore)
        if noise is not None:
            final = noise_scale.noise_scale(backend.gradient_moments(weights), weights, config.optim.weight_decay)
            summary["gradient_noise_scale"] = {**noise, "final": final.as_dict()}
        write_json_atomic(run_dir / SUMMARY_FILE, summary)
    except BaseException as exc:
        exc.run_dir = run_dir if (run_dir / CONFIG_FILE).exists() else None
        if exc.run_dir is not None:
            last = last_recorded_step(run_dir / METRICS_FILE)
            write_json_atomic(run_dir / SUMMARY_FILE, failed := {
                "status": "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed",
                "error": signals.describe(exc) if isinstance(exc, KeyboardInterrupt) else one_line(exc),
                "steps_recorded": last, "steps": config.train.steps, "backend": config.cluster.backend,
                "mode": config.train.mode, "num_workers": config.cluster.num_workers,
                "faults": [] if recorder is None else recorder.faults,
                "checkpoints": 0 if recorder is None else recorder.checkpoints,
            })
        raise
    finally:
        if recorder is not None:
            recorder.close()
        # the figures are drawn from the files alone: draw them while the cluster shuts down (about a second each)
        figures = _draw_in_background(run_dir) if config.output.plots and summary is not None else None
        backend.close()
        if failed is not None:
            trackers.finish(failed, failed["status"])
    if figures is not None:
        figures.result()
    trackers.finish(summary, "completed")  # after the figures: they go among its artifacts
    return RunResult(run_dir, summary)


def _draw_in_background(run_dir: Path) -> Future:
    from sgd_dist.run.plots import plot_run

    pool = ThreadPoolExecutor(max_workers=1)
    figures = pool.submit(plot_run, run_dir)
    pool.shutdown(wait=False)  # the caller waits on the future
    return figures


def _summary(config: Config, backend: Backend, reference: Reference, recorder: Recorder, weights: torch.Tensor,
             t_setup: float, t_reference: float, wall: float, restore: dict | None) -> dict:
    last, last_eval = recorder.last, recorder.last_eval
    assert last is not None and last_eval is not None and last_eval["step"] == config.train.steps
    # The training time is the metrics' own clock (the server's, from the loop's start to the last update): the
    # console, this summary and the plots all use it. A resumed or restored run's clock goes on from its
    # checkpoint's, so the time covers exactly the steps metrics.jsonl records, each once.
    train_time = last["wall_time_s"]
    gap = last_eval.get("optimality_gap")
    return {
        "status": "completed",
        "final_loss": last_eval["eval_loss"],
        "optimal_loss": reference.loss,
        "optimality_gap": gap,
        "relative_optimality_gap": gap / reference.objective if gap is not None and reference.objective else None,
        "final_minibatch_loss": last["loss"],
        "weights": weights.tolist(),
        "optimal_weights": None if reference.weights is None else reference.weights.tolist(),
        "true_weights": true_weights(config.data).tolist(),
        "reference": reference.method,
        "objective": "mean squared error" if config.data.kind == "linear" else "mean logistic loss",
        "weight_decay": config.optim.weight_decay,
        "steps": last["step"],
        "samples_seen": last["samples_seen"],
        "global_batch_size": config.global_batch_size(),
        "num_workers": config.cluster.num_workers,
        "backend": backend.name,
        "transport": backend.transport,
        "simulated_nodes": config.cluster.simulated_nodes,
        "network": config.cluster.network.model_dump(),
        "mode": config.train.mode,
        **_mode_summary(config, backend.loop_stats),
        "device": backend.device,
        "ray_address": backend.address,
        **backend.clock_summary(),
        "wall_time_s": wall,
        "setup_time_s": t_setup,
        "reference_time_s": t_reference,
        "train_time_s": train_time,
        "median_step_ms": recorder.median_step_ms(),
        "record_ms_per_step": 1e3 * backend.loop_stats.get("record_seconds", 0.0) / max(last["step"], 1),
        "samples_per_s": last["samples_seen"] / train_time if train_time > 0 else None,
        "faults": recorder.faults,
        "replacements": {int(r): n for r, n in backend.loop_stats.get("replacements", {}).items()},
        "checkpoints": recorder.checkpoints,
        "checkpoint_ms_mean": 1e3 * recorder.checkpoint_seconds / recorder.checkpoints if recorder.checkpoints else None,
        "resumed_from": None if restore is None else int(restore["server"]["step"]),
        "driver_peak_rss_bytes": peak_rss_bytes(),
        "workers": backend.info,
        "versions": {"sgd_dist": sgd_dist.__version__, "torch": torch.__version__, "python": platform.python_version(),
                     **_ray_version(backend)},
    }


def _where(config: Config) -> str:
    """' on 2 simulated nodes (network: 1 ms latency, unlimited bandwidth)' for the console's first line."""
    from sgd_dist.engine.delays import describe_network as describe

    cluster = config.cluster
    nodes = f" on {cluster.simulated_nodes} simulated nodes" if cluster.simulated_nodes else ""
    return nodes + (f" (network: {describe(cluster.network)})" if cluster.network.enabled else "")


def _mode_summary(config: Config, stats: dict) -> dict:
    """The mode's parameters and what the loop measured: every applied gradient's staleness, dropped answers."""
    train = config.train
    params = {"ssp": {"staleness_bound": train.staleness_bound}, "backup": {"backup_workers": train.backup_workers},
              "local_sgd": {"local_steps": train.local_steps}}.get(train.mode, {})
    counts = {int(age): n for age, n in sorted(stats.get("staleness", {}).items())}
    ages = [age for age, n in counts.items() for _ in range(n)]
    dropped = stats.get("dropped", [])
    per_worker = {r: sum(1 for d in dropped if d[0] == r) for r in range(config.cluster.num_workers)}
    table = worker_table(config.cluster.num_workers, stats.get("answer_s", {}), dropped, stats.get("replacements", {}))
    return {
        **params,
        "staleness": {"median": statistics.median(ages) if ages else None, "max": max(ages, default=None),
                      "mean": statistics.fmean(ages) if ages else None, "counts": counts},
        "answer_ms": {int(r): ms for r, ms in stats.get("answer_ms", {}).items()},
        "stragglers": find_stragglers({int(r): ms for r, ms in stats.get("answer_ms", {}).items()}),
        "num_dropped": len(dropped),
        "dropped_per_worker": per_worker,
        "dropped": dropped,
        "per_worker": table,
        "worst_worker_ratio": worst_worker_ratio(table),
        "policy": stats.get("policy", {}),
    }


def _ray_version(backend: Backend) -> dict:
    if backend.name != "ray":
        return {}
    import ray

    return {"ray": ray.__version__}
