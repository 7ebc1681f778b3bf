"""The driver: build a backend, compute the exact reference, run the policy's schedule, record, close.

``train(config)`` is the whole run as a function a notebook can call; the CLI is a thin layer over it.
"""

from __future__ import annotations

import importlib
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import std as tqdm_std

from sgd_dist.backends import Backend, make_backend
from sgd_dist.backends.base import policy_for
from sgd_dist.backends.capacity import check_this_machine
from sgd_dist.config import Config
from sgd_dist.engine.evaluations import eval_steps
from sgd_dist.run import summary as summaries
from sgd_dist.run.checkpoint import load_checkpoint
from sgd_dist.run.progress import bar_class as progress_bar
from sgd_dist.run.recorder import Recorder
from sgd_dist.run.reference import Reference, compute_reference, final_noise_scale, measure_noise_scale
from sgd_dist.run.rundir import (
    CONFIG_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    check_run_dir,
    default_run_dir,
    last_recorded_step,
    write_config,
    write_json_atomic,
)
from sgd_dist.run.trackers.fanout import trackers_for

PLOTS_MODULE = "sgd_dist.run.plots"  # matplotlib: imported on a thread while the cluster starts (see _prefetch)


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


def train(config: Config, *, config_path: str | Path | None = None, progress: bool | None = None,
          console: bool = True, policy=None, resume: str | Path | None = None) -> RunResult:
    """Run one training as configured; return the run directory and its summary.

    Nothing is written before the backend is up (a bad address or a cluster too small leaves no run directory);
    from then on config.yaml, then every metrics row as it comes, then summary.json and the figures. A run that
    fails leaves summary.json with status 'failed' (or 'interrupted') and the error.

    ``resume``: go on with the run in that directory from its latest checkpoint (``config`` must be the run's own
    config.yaml); the rows after the checkpoint are dropped and computed again, so metrics.jsonl ends with every
    step once. A missing, corrupt or mismatched checkpoint raises CheckpointError before anything is touched. A
    run that already completed is left as it is, byte for byte: its own result comes back.

    What cannot fit this machine (memory, a GPU) is a ConfigError before anything starts. An exception out of a
    started run carries ``run_dir``: the run directory, or None if the run stopped before writing one."""
    t_start = time.perf_counter()
    plots = _prefetch(PLOTS_MODULE) if config.output.plots else None
    say = print if console else _quiet
    done = summaries.completed_summary(resume) if resume is not None else None
    if done is not None:
        say(f"sgd-dist: {resume} is complete ({done.get('steps')} steps); nothing to resume")
        return RunResult(Path(resume), done)
    run_dir, restore = _run_dir(config, config_path, resume)
    trackers = trackers_for(config)  # a missing optional package fails here, before anything starts
    backend = _start(config, say)
    recorder: Recorder | None = None
    summary = failed = None
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
            _rewind(recorder, restore)
        backend.run(policy or policy_for(config), eval_steps(config.train.steps, config.train.eval_every), recorder,
                    restore=restore)
        times = {"wall_time_s": time.perf_counter() - t_start, "setup_time_s": t_setup, "reference_time_s": t_reference}
        summary = _summarise(config, backend, reference, recorder, noise, times, restore)
        write_json_atomic(run_dir / SUMMARY_FILE, summary)
    except BaseException as exc:
        failed = _record_failure(run_dir, config, exc, recorder)
        raise
    finally:
        if recorder is not None:
            recorder.close()
        # the figures are drawn from the files alone: draw them while the cluster shuts down (about a second each)
        figures = _draw_in_background(plots, run_dir) if plots is not None and summary is not None else None
        backend.close()
        if failed is not None:
            trackers.finish(failed, failed["status"])
    if figures is not None:
        figures.result()
    trackers.finish(summary, "completed")  # after the figures: they go among its artifacts
    return RunResult(run_dir, summary)


def _run_dir(config: Config, config_path: str | Path | None, resume: str | Path | None) -> tuple[Path, dict | None]:
    """The run directory and, when resuming, the checkpoint's state to restore."""
    if resume is None:
        return resolve_run_dir(config, config_path), None
    restore, _ = load_checkpoint(Path(resume), config)
    return Path(resume), restore


def _rewind(recorder: Recorder, restore: dict) -> None:
    """A resumed run's files go back to its checkpoint's step, and the resumption is logged as a fault."""
    step = int(restore["server"]["step"])
    recorder.rewind(step)
    recorder.fault({"fault": "resumed", "step": step, "at_unix": time.time()})


def _summarise(config: Config, backend: Backend, reference: Reference, recorder: Recorder, noise: dict | None,
               times: dict, restore: dict | None) -> dict:
    """The completed run's summary, with the noise scale at its final weights when it was measured."""
    weights = backend.final_weights()
    backend.info = backend.worker_info()  # again, for the workers' peak memory over the run
    summary = summaries.completed(config, backend, reference, recorder, weights, times, restore)
    if noise is not None:
        summary["gradient_noise_scale"] = {**noise, "final": final_noise_scale(config, backend, weights)}
    return summary


def _quiet(*args, **kwargs) -> None:
    """``say`` when the console is off."""


def _start(config: Config, say) -> Backend:
    """The console's first lines, then the backend; a backend that cannot start leaves nothing written."""
    for note in check_this_machine(config):
        say(note)
    say(f"sgd-dist: {config.cluster.backend} backend, {config.cluster.num_workers} workers{summaries.where(config)}, "
        f"{config.data.n_samples:,} rows x {config.data.dim} parameters; generating the shards where they live")
    try:
        return make_backend(config)
    except BaseException as exc:
        exc.run_dir = None  # nothing was written
        raise


def _record_failure(run_dir: Path, config: Config, exc: BaseException, recorder: Recorder | None) -> dict | None:
    """Mark the exception with the run directory (None if nothing was written) and leave a failed summary there;
    return that summary."""
    exc.run_dir = run_dir if (run_dir / CONFIG_FILE).exists() else None
    if exc.run_dir is None:
        return None
    failed = summaries.failed(config, exc, last_recorded_step(run_dir / METRICS_FILE), recorder)
    write_json_atomic(run_dir / SUMMARY_FILE, failed)
    return failed


def _prefetch(module: str) -> Future:
    """``module`` imported on a thread of its own: matplotlib's import (most of a second) overlaps the cluster's
    start-up, which mostly waits on other processes, instead of adding to the command's time.

    A daemon thread, which the interpreter does not wait for at exit: a Ctrl-C that lands in the main thread's
    own imports (ray.init imports as it goes) can leave a module's import lock held, and an import on this thread
    would then wait on it forever, holding the interrupted process open (a pool's thread is joined at exit)."""
    imported: Future = Future()

    def run() -> None:
        try:
            imported.set_result(importlib.import_module(module))
        except BaseException as exc:  # noqa: BLE001  (handed to whoever asks for the module)
            imported.set_exception(exc)

    threading.Thread(target=run, name="sgd-dist-import", daemon=True).start()
    return imported


def _draw_in_background(plots: Future, run_dir: Path) -> Future:
    pool = ThreadPoolExecutor(max_workers=1)
    figures = pool.submit(lambda: plots.result().plot_run(run_dir))
    pool.shutdown(wait=False)  # the caller waits on the future
    return figures
