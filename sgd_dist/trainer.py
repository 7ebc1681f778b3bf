"""The driver: build a backend, compute the exact reference, run the policy's schedule, record, close.

``train(config)`` is the whole run as a function a notebook can call; the CLI is a thin layer over it.
"""

from __future__ import annotations

import math
import platform
import statistics
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import sgd_dist
from sgd_dist import objectives
from sgd_dist.backends import Backend, make_backend
from sgd_dist.backends.base import policy_for
from sgd_dist.config import Config
from sgd_dist.data import true_weights
from sgd_dist.stragglers import find_stragglers
from sgd_dist.recording import (
    METRICS_FILE,
    SCHEDULE_FILE,
    SUMMARY_FILE,
    MetricsWriter,
    check_run_dir,
    default_run_dir,
    last_recorded_step,
    write_config,
    write_json_atomic,
)
from sgd_dist.worker import peak_rss_bytes

def eval_steps(num_steps: int, every: int) -> frozenset[int]:
    """Step 0 (the start, as in the seed), every ``every`` steps, and the last step."""
    steps = {0, num_steps}
    if every:
        steps.update(range(every, num_steps, every))
    return frozenset(steps)


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
        stats = backend.linear_stats()
        w = objectives.least_squares_optimum(stats, wd)
        value = objectives.linear_objective(w, stats, wd)
        method = "closed-form least squares from X^T X and X^T y summed over the shards (float64)"
    else:
        w, value, iterations = objectives.newton_logistic_optimum(backend.newton_terms, config.data.dim, wd)
        method = f"damped Newton on the full data, sums over the shards in float64 ({iterations} iterations)"
    return Reference(w, value, value - objectives.penalty(w, wd), method)


class Recorder:
    """Adds the optimality gap to evaluated rows, appends every row to metrics.jsonl, prints one console
    line per logged step and drives the progress bar."""

    def __init__(self, run_dir: Path, config: Config, reference: Reference, console: bool, progress: bool | None):
        self.config = config
        self.reference = reference
        self.console = console
        self.writer = MetricsWriter(run_dir / METRICS_FILE)
        self.schedule = MetricsWriter(run_dir / SCHEDULE_FILE)  # which answers each update averaged: the replay
        self.bar = tqdm(total=config.train.steps, unit="step", disable=None if progress is None else not progress,
                        file=sys.stderr, dynamic_ncols=True, leave=False)
        self.times: list[float] = []
        self.last: dict | None = None
        self.last_eval: dict | None = None
        self._logged: tuple[int, float] = (0, 0.0)

    def record(self, rows: list[dict]) -> None:
        log_every, steps = self.config.train.log_every, self.config.train.steps
        for row in rows:
            applied = row.pop("applied", None)
            if applied is not None:
                self.schedule.write({"update": row["step"], "applied": applied})
            if "eval_loss" in row:
                if self.reference.objective is not None:
                    penalty = objectives.penalty_from_norm(row["weight_norm"], self.config.optim.weight_decay)
                    row["optimality_gap"] = row["eval_loss"] + penalty - self.reference.objective
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
            self.bar.update(rows[-1]["step"] - self.bar.n)

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


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    summary: dict


def resolve_run_dir(config: Config, config_path: str | Path | None) -> Path:
    if config.output.dir is not None:
        run_dir = Path(config.output.dir)
        check_run_dir(run_dir)
        return run_dir
    name = config.output.name or (Path(config_path).stem if config_path else "run")
    return default_run_dir(name)


def train(
    config: Config,
    *,
    config_path: str | Path | None = None,
    progress: bool | None = None,
    console: bool = True,
    policy=None,
) -> RunResult:
    """Run one training as configured; return the run directory and its summary.

    Nothing is written before the backend is up (a bad address or a cluster too small leaves no run
    directory); from then on config.yaml, then every metrics row as it comes, then summary.json and the
    figures. A run that fails leaves summary.json with status 'failed' and the error.
    """
    t_start = time.perf_counter()
    run_dir = resolve_run_dir(config, config_path)
    say = print if console else (lambda *a, **k: None)
    say(f"sgd-dist: {config.cluster.backend} backend, {config.cluster.num_workers} workers{_where(config)}, "
        f"{config.data.n_samples:,} rows x {config.data.dim} parameters; generating the shards where they live")
    backend = make_backend(config)
    recorder: Recorder | None = None
    summary: dict | None = None
    try:
        write_config(run_dir, config)
        t_setup = time.perf_counter() - t_start
        say(f"sgd-dist: run directory {run_dir}  (setup {t_setup:.1f} s, device {backend.device})")
        reference = compute_reference(config, backend)
        t_reference = time.perf_counter() - t_start - t_setup
        recorder = Recorder(run_dir, config, reference, console, progress)
        t0 = time.perf_counter()
        backend.run(policy or policy_for(config), eval_steps(config.train.steps, config.train.eval_every),
                    recorder.record)
        train_time = time.perf_counter() - t0
        weights = backend.final_weights()
        backend.info = backend.worker_info()  # again, for the workers' peak memory over the run
        summary = _summary(config, backend, reference, recorder, weights, t_setup, t_reference, train_time,
                           time.perf_counter() - t_start)
        write_json_atomic(run_dir / SUMMARY_FILE, summary)
    except BaseException as exc:
        if run_dir.exists():
            last = last_recorded_step(run_dir / METRICS_FILE)
            write_json_atomic(run_dir / SUMMARY_FILE, {
                "status": "failed", "error": one_line(exc),
                "steps_recorded": last, "steps": config.train.steps, "backend": config.cluster.backend,
                "mode": config.train.mode, "num_workers": config.cluster.num_workers,
            })
        raise
    finally:
        if recorder is not None:
            recorder.close()
        # the figures are drawn from the files alone: draw them while the cluster shuts down (about a second each)
        figures = _draw_in_background(run_dir) if config.output.plots and summary is not None else None
        backend.close()
    if figures is not None:
        figures.result()
    return RunResult(run_dir, summary)


def _draw_in_background(run_dir: Path) -> Future:
    from sgd_dist.plots import plot_run

    pool = ThreadPoolExecutor(max_workers=1)
    figures = pool.submit(plot_run, run_dir)
    pool.shutdown(wait=False)  # the caller waits on the future
    return figures


def _summary(config: Config, backend: Backend, reference: Reference, recorder: Recorder, weights: torch.Tensor,
             t_setup: float, t_reference: float, train_time: float, wall: float) -> dict:
    last, last_eval = recorder.last, recorder.last_eval
    assert last is not None and last_eval is not None and last_eval["step"] == config.train.steps
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
        "wall_time_s": wall,
        "setup_time_s": t_setup,
        "reference_time_s": t_reference,
        "train_time_s": train_time,
        "median_step_ms": recorder.median_step_ms(),
        "record_ms_per_step": 1e3 * backend.loop_stats.get("record_seconds", 0.0) / max(last["step"], 1),
        "samples_per_s": last["samples_seen"] / train_time,
        "driver_peak_rss_bytes": peak_rss_bytes(),
        "workers": backend.info,
        "versions": {"sgd_dist": sgd_dist.__version__, "torch": torch.__version__, "python": platform.python_version(),
                     **_ray_version(backend)},
    }


def _where(config: Config) -> str:
    """' on 2 simulated nodes (network: 1 ms latency, unlimited bandwidth)' for the console's first line."""
    from sgd_dist.network import describe

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
    return {
        **params,
        "staleness": {"median": statistics.median(ages) if ages else None, "max": max(ages, default=None),
                      "mean": statistics.fmean(ages) if ages else None, "counts": counts},
        "answer_ms": {int(r): ms for r, ms in stats.get("answer_ms", {}).items()},
        "stragglers": find_stragglers({int(r): ms for r, ms in stats.get("answer_ms", {}).items()}),
        "num_dropped": len(dropped),
        "dropped_per_worker": per_worker,
        "dropped": dropped,
        "policy": stats.get("policy", {}),
    }


def one_line(exc: BaseException) -> str:
    """The exception's type and the first line of its message (Ray's errors carry whole remote tracebacks)."""
    cause = getattr(exc, "cause", None)  # a Ray task's error: its first line is Ray's header, the cause says why
    if isinstance(cause, BaseException):
        exc = cause
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _ray_version(backend: Backend) -> dict:
    if backend.name != "ray":
        return {}
    import ray

    return {"ray": ray.__version__}
