"""The cost model's output for a sweep: cost_model.json and predicted.csv, and the lines ``sgd-dist sweep`` and
``sgd-dist model`` print (coefficients, measured against predicted, where each curve stops paying)."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path
from typing import Sequence

from sgd_dist.core.time_model import TimeProfile, from_dict
from sgd_dist.errors import UsageError
from sgd_dist.run.rundir import write_text_atomic
from sgd_dist.study.cost_model import Curve, Observation, SweepModel, curves, error_summary, model_sweep, worker_counts

MODEL_FILE = "cost_model.json"
PREDICTED_FILE = "predicted.csv"
CLUSTER_NETWORK = (50e-6, 1e9, "1 Gbit/s, 50 us latency")  # the second curve of predicted_speedup.png


def saved_cores(sweep_dir: str | Path) -> int | None:
    """The cores recorded in cost_model.json by the sweep (the machine the runs were measured on), if any."""
    path = Path(sweep_dir) / MODEL_FILE
    if path.is_file():
        return json.loads(path.read_text()).get("model", {}).get("cores")
    return None


def read_profile(path: str | Path) -> TimeProfile:
    """The time profile at ``path`` (``sgd-dist model --profile``); UsageError in one line naming the flag."""
    where = f"--profile {path}"
    try:
        return from_dict(json.loads(Path(path).read_text()), where)
    except FileNotFoundError:
        raise UsageError(f"{where}: no such file (a profile written by sgd-dist calibrate)") from None
    except OSError as exc:
        raise UsageError(f"{where}: cannot be read ({exc.strerror or exc})") from None
    except ValueError as exc:  # not JSON, or not a profile: from_dict's message names the field
        text = str(exc)
        raise UsageError(text if text.startswith(where) else f"{where}: not JSON ({text})") from None


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def error_lines(observations: Sequence[Observation], predictions: dict[str, dict]) -> list[str]:
    """The table of measured against predicted, one line per run, then the median and worst errors."""
    lines = [f"{'run':<60} {'step ms':>8} {'pred':>8} {'err%':>6} {'samples/s':>10} {'pred':>10} {'err%':>6} "
             f"{'target s':>8} {'pred':>8} {'err%':>6}"]
    for o in observations:
        p = predictions[o.run]
        lines.append(
            f"{o.run[:60]:<60} {o.step_s * 1e3:>8.3f} {p['predicted_step_ms']:>8.3f} {p['step_ms_error_pct']:>+6.0f} "
            f"{o.samples_per_s:>10,.0f} {p['predicted_samples_per_s']:>10,.0f} {p['samples_per_s_error_pct']:>+6.0f} "
            f"{_fmt(o.target_time_s, '8.4f'):>8} {_fmt(p['predicted_seconds_to_target'], '8.4f'):>8} "
            f"{_fmt(p['seconds_to_target_error_pct'], '+6.0f'):>6}")
    names = {"step_ms_error_pct": "step time", "samples_per_s_error_pct": "samples/s",
             "seconds_to_target_error_pct": "time to target"}
    spread = repeat_spread(observations)
    for column, (median, worst, n) in error_summary(predictions.values()).items():
        noise = (f"; repeats of one point differ from their mean by median {spread[column]:.1f} %"
                 if column in spread else "")
        lines.append(f"{names[column]}: median |error| {median:.1f} %, worst {worst:.1f} % over {n} runs{noise}")
    return lines


def repeat_spread(observations: Sequence[Observation]) -> dict[str, float]:
    """The measurement's own noise: median over runs of |run - mean of its point's repeats| / that mean, in %,
    for points run more than once (what no model of the mean can predict)."""
    measured = {"step_ms_error_pct": lambda o: o.step_s, "samples_per_s_error_pct": lambda o: o.samples_per_s,
                "seconds_to_target_error_pct": lambda o: o.target_time_s}
    out = {}
    for column, value in measured.items():
        deviations = []
        for point in dict.fromkeys(o.point for o in observations):
            values = [value(o) for o in observations if o.point == point and value(o) is not None]
            if len(values) > 1:
                mean = statistics.fmean(values)
                deviations += [100 * abs(v - mean) / mean for v in values]
        if deviations:
            out[column] = statistics.median(deviations)
    return out


def extrapolation_caveat(observations: Sequence[Observation]) -> str | None:
    """Why the 1 to 1,024-worker curves mean little, if they do: a fit on one worker count cannot separate the
    per-answer cost (what stops a parameter server scaling) from the rest."""
    counts = {o.scenario.num_workers for o in observations}
    if len(counts) < 2:
        return (f"  not shown: every run had {counts.pop() if counts else '?'} workers, so the per-answer cost that "
                "stops scaling cannot be fitted (vary cluster.num_workers in the grid)")
    return None


def curve_lines(found: Sequence[Curve], table: bool = False) -> list[str]:
    """One line per curve saying where it stops paying; with ``table``, its numbers per worker count too."""
    lines = []
    for c in found:
        scaling, batch, values = c.series
        label = ", ".join([scaling] + ([f"global batch {batch}"] if batch is not None else [])
                          + [f"{k.split('.')[-1]}={v}" for k, v in values])
        lines.append(f"{label}; network {c.network}: {c.stops_paying()} [{c.basis}]")
        if not table:
            continue
        lines.append("  K         " + " ".join(f"{k:>8}" for k in c.workers))
        lines.append("  step ms   " + " ".join(f"{v:>8.3g}" for v in c.step_ms))
        lines.append("  samples/s " + " ".join(f"{v:>8.3g}" for v in c.samples_per_s))
        lines.append("  speedup   " + " ".join(f"{v:>8.3g}" for v in c.speedup))
    return lines


def write_sweep_model(sweep_dir: str | Path, cores: int | None = None,
                      workers_max: int = 1024) -> tuple[SweepModel, list[Curve]]:
    """Fit the sweep's model, write cost_model.json and predicted.csv (1 to workers_max workers, a core per
    process, as measured and over CLUSTER_NETWORK), and return the model and the curves."""
    sweep_dir = Path(sweep_dir)
    result = model_sweep(sweep_dir, cores)
    ks = worker_counts(workers_max)
    latency, bandwidth, words = CLUSTER_NETWORK
    found = (curves(result.observations, result.model, ks, None, network="as measured (no network)")
             + curves(result.observations, result.model, ks, None, latency, bandwidth, words))
    summary = {c: {"median_abs_pct": m, "worst_abs_pct": w, "runs": n}
               for c, (m, w, n) in error_summary(result.predictions.values()).items()}
    write_text_atomic(sweep_dir / MODEL_FILE, json.dumps(
        {"model": result.model.to_dict(), "predictions": "each run from a fit on the other grid points' runs "
         "(leave-one-point-out)", "errors": summary}, indent=2) + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["scaling", "global_batch", "series", "mode", "network", "num_workers", "predicted_step_ms",
                     "predicted_samples_per_s", "predicted_seconds_to_target", "predicted_speedup", "speedup_basis"])
    for c in found:
        for i, k in enumerate(c.workers):
            writer.writerow([c.series[0], c.series[1] or "", ";".join(f"{a}={b}" for a, b in c.series[2]), c.mode,
                             c.network, k, repr(c.step_ms[i]), repr(c.samples_per_s[i]),
                             "" if c.seconds_to_target[i] is None else repr(c.seconds_to_target[i]),
                             repr(c.speedup[i]), c.basis])
    write_text_atomic(sweep_dir / PREDICTED_FILE, buffer.getvalue())
    return result, found
