"""What a run says about itself: summary.json's content (completed or failed), the console's lines for
faults and for the mode, and the reader that tells a completed run from one to go on with."""

from __future__ import annotations

import json
import platform
import statistics
from importlib import metadata
from pathlib import Path
from typing import Protocol

import torch

import sgd_dist
from sgd_dist import signals
from sgd_dist.backends import Backend
from sgd_dist.config import MODE_PARAMETERS, Config
from sgd_dist.core.data import true_weights
from sgd_dist.engine.delays import describe_network, find_stragglers
from sgd_dist.engine.worker import peak_rss_bytes
from sgd_dist.errors import DivergenceError, one_line
from sgd_dist.run.reference import Reference
from sgd_dist.run.rundir import SUMMARY_FILE
from sgd_dist.run.workers import worker_table, worst_worker_ratio


class Recorded(Protocol):
    """What the summary reads from the run's recorder."""

    last: dict | None
    last_eval: dict | None
    faults: list[dict]
    traffic: dict[str, int]
    checkpoints: int
    checkpoint_seconds: float

    def median_step_ms(self) -> float | None: ...


def completed_summary(run_dir: str | Path) -> dict | None:
    """The run directory's summary if the run completed, else None."""
    path = Path(run_dir) / SUMMARY_FILE
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("status") == "completed" else None


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
    if kind == "residual_reset":
        return (f"error-feedback residuals of workers {entry['workers']} reset at step {entry['step']} "
                f"({entry['cause']})")
    if "skipped" in entry:
        return f"{kind} at step {entry['step']} not injected: {entry['skipped']}"
    where = (f"worker {entry['worker']}" if "worker" in entry
             else f"node {entry.get('node')}" if "node" in entry else "server")
    return f"injected {kind} ({where}) at step {entry['step']}"


def where(config: Config) -> str:
    """' on 2 simulated nodes (network: 1 ms latency, unlimited bandwidth)' for the console's first line."""
    cluster = config.cluster
    nodes = f" on {cluster.simulated_nodes} simulated nodes" if cluster.simulated_nodes else ""
    return nodes + (f" (network: {describe_network(cluster.network)})" if cluster.network.enabled else "")


def mode_line(s: dict) -> str:
    """The mode, and what it measured: staleness for async and ssp, dropped answers for backup."""
    line = f"mode {s['mode']}"
    for parameter in MODE_PARAMETERS.values():
        if parameter.key in s:
            line += f" ({parameter.key} {s[parameter.key]})"
    stale = s.get("staleness") or {}
    if s["mode"] in ("async", "ssp") and stale.get("max") is not None:
        line += f"; staleness median {stale['median']:g}, max {stale['max']}, mean {stale['mean']:.2f}"
    if s["mode"] == "backup":
        line += f"; {s['num_dropped']} answers dropped (by worker: {s['dropped_per_worker']})"
    return line + f"; transport {s['transport']}"


def failed(config: Config, exc: BaseException, steps_recorded: int, recorder: Recorded | None) -> dict:
    """summary.json of a run that stopped: interrupted (a signal) or failed (the error, on one line). ``diverged``:
    the loss stopped being finite, an outcome of the config (its lr is too large) rather than a fault."""
    interrupted = isinstance(exc, KeyboardInterrupt)
    return {
        "status": "interrupted" if interrupted else "failed",
        "error": signals.describe(exc) if interrupted else one_line(exc),
        "diverged": isinstance(exc, DivergenceError),
        "steps_recorded": steps_recorded, "steps": config.train.steps, "backend": config.cluster.backend,
        "mode": config.train.mode, "num_workers": config.cluster.num_workers,
        "faults": [] if recorder is None else recorder.faults,
        "checkpoints": 0 if recorder is None else recorder.checkpoints,
    }


def completed(config: Config, backend: Backend, reference: Reference, recorder: Recorded, weights: torch.Tensor,
              times: dict, restore: dict | None) -> dict:
    """summary.json of a completed run. ``times``: wall_time_s, setup_time_s and reference_time_s."""
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
        "gap_scale": reference.gap_scale,
        "gap_scale_is": reference.gap_scale_is,
        "relative_optimality_gap": gap / reference.gap_scale if gap is not None and reference.gap_scale else None,
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
        **_traffic_summary(config, backend.loop_stats, recorder.traffic),
        "device": backend.device,
        "ray_address": backend.address,
        **backend.clock_summary(),
        "wall_time_s": times["wall_time_s"],
        "setup_time_s": times["setup_time_s"],
        "reference_time_s": times["reference_time_s"],
        "train_time_s": train_time,
        "median_step_ms": recorder.median_step_ms(),
        "record_ms_per_step": 1e3 * backend.loop_stats.get("record_seconds", 0.0) / max(last["step"], 1),
        "samples_per_s": last["samples_seen"] / train_time if train_time > 0 else None,
        "faults": recorder.faults,
        "replacements": {int(r): n for r, n in backend.loop_stats.get("replacements", {}).items()},
        "checkpoints": recorder.checkpoints,
        "checkpoint_ms_mean": (1e3 * recorder.checkpoint_seconds / recorder.checkpoints
                               if recorder.checkpoints else None),
        "resumed_from": None if restore is None else int(restore["server"]["step"]),
        "driver_peak_rss_bytes": peak_rss_bytes(),
        "workers": backend.info,
        "versions": {"sgd_dist": sgd_dist.__version__, "torch": torch.__version__, "python": platform.python_version(),
                     **({"ray": metadata.version("ray")} if backend.name == "ray" else {})},
    }


def _traffic_summary(config: Config, stats: dict, traffic: dict[str, int]) -> dict:
    """What travelled: the bytes of the recorded rows with the dropped answers' (backup), the compression and outer
    step that shaped them, and where a worker's error feedback restarted (what replay follows)."""
    dropped = stats.get("dropped_bytes", [0, 0])
    out = {"bytes_up": traffic["bytes_up"] + dropped[0], "bytes_down": traffic["bytes_down"] + dropped[1],
           "dropped_bytes": {"up": dropped[0], "down": dropped[1]},
           "compression": config.compression.model_dump(mode="json"),
           "residual_resets": stats.get("residual_resets", [])}
    if config.train.mode == "local_sgd":
        out["outer"] = config.train.outer.model_dump(mode="json")
    return out


def _mode_summary(config: Config, stats: dict) -> dict:
    """The mode's parameters and what the loop measured: every applied gradient's staleness, dropped answers."""
    own = MODE_PARAMETERS.get(config.train.mode)
    params = {own.key: getattr(config.train, own.key)} if own else {}
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
