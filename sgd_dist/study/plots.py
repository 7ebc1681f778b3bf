"""A sweep's figures, drawn from its results.csv and its runs' metrics.jsonl alone: ``sgd-dist plot SWEEP_DIR``.

Each figure is drawn only when the grid has what it needs; otherwise it is listed in ``skipped`` with why.
Like plots.py: matplotlib's object API, no pyplot, no Ray, no trainer.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sgd_dist.core.noise_scale import fit_steps
from sgd_dist.run.rundir import read_metrics
from sgd_dist.study import cost_model as cm
from sgd_dist.study.model_report import CLUSTER_NETWORK, saved_cores
from sgd_dist.study.results import (
    EXPERIMENT_FILE,
    RESULTS_FILE,
    RUNS_DIR,
    gap_scale_of,
    grid_keys,
    read_results,
    series,
)

WORKERS = "cluster.num_workers"
MAX_LEGEND = 30  # lines beyond which loss_time.png leaves its legend out
FEATURES = "data.n_features"


@dataclass
class Figures:
    drawn: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, why)


def plot_sweep(sweep_dir: str | Path) -> Figures:
    sweep_dir = Path(sweep_dir)
    keys = grid_keys(sweep_dir / RESULTS_FILE)
    rows = [r for r in read_results(sweep_dir / RESULTS_FILE) if r["status"] == "completed"]
    saved = sweep_dir / EXPERIMENT_FILE
    target = ((yaml.safe_load(saved.read_text()) or {}).get("experiment", {}).get("target_gap")
              if saved.is_file() else None)
    figures = Figures()
    for name, draw in [("scaling.png", _scaling), ("time_to_target.png", _time_to_target),
                       ("loss_time.png", _loss_time), ("crossover.png", _crossover), ("batch.png", _batch),
                       ("batch_regimes.png", _batch_regimes), ("local_sgd.png", _local_sgd),
                       ("modes_time.png", _modes_time), ("predicted_speedup.png", _predicted_speedup)]:
        why = draw(sweep_dir / name, rows, keys, target, sweep_dir)
        if why is None:
            figures.drawn.append(sweep_dir / name)
        else:
            figures.skipped.append((name, why))
    return figures


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)


def _finish(fig: Figure, ax, path: Path) -> None:
    """One-axes figures end alike: the log grid, a small legend, saved."""
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def _label(key: tuple) -> str:
    scaling, batch, values = key
    parts = [scaling] + ([f"global batch {batch}"] if batch is not None else [])
    return ", ".join(parts + [f"{k.split('.')[-1]}={v}" for k, v in values])


def _by(rows: list[dict], key) -> dict:
    groups: dict = defaultdict(list)
    for row in rows:
        groups[key(row)].append(row)
    return dict(sorted(groups.items(), key=lambda item: str(item[0])))


def _mean_by_workers(rows: list[dict], column: str) -> tuple[list[int], list[float]]:
    per_k = _by([r for r in rows if r[column] is not None], lambda r: r["num_workers"])
    ks = sorted(per_k)
    return ks, [statistics.fmean(r[column] for r in per_k[k]) for k in ks]


def _need_workers(rows: list[dict]) -> str | None:
    if len({r["num_workers"] for r in rows}) < 2:
        return "needs completed runs at 2 or more worker counts (grid cluster.num_workers)"
    return None


def _scaling(path: Path, rows: list[dict], keys: list[str], target, _dir) -> str | None:
    if (why := _need_workers(rows)) is not None:
        return why
    fig = Figure(figsize=(12, 5), layout="constrained")
    ax_tp, ax_sp = fig.subplots(1, 2)
    top = 1
    for i, (key, group) in enumerate(_by(rows, lambda r: series(r, keys)).items()):
        color = f"C{i % 10}"
        ks, tp = _mean_by_workers(group, "samples_per_s")
        ax_tp.plot(ks, tp, "o-", color=color, label=_label(key))
        ax_tp.plot([r["num_workers"] for r in group], [r["samples_per_s"] for r in group], ".", color=color, alpha=0.4)
        if ks[0] == 1:
            ax_tp.plot(ks, [tp[0] * k for k in ks], ":", color=color, lw=1)
        ks, sp = _mean_by_workers(group, "speedup")
        if ks:
            basis = sorted({r["speedup_basis"] for r in group if r["speedup_basis"]})
            ax_sp.plot(ks, sp, "o-", color=color, label=f"{_label(key)} ({', '.join(basis)})")
            if len(basis) > 1:  # ring the points whose speedup is a throughput ratio (target not reached)
                by_k = _by(group, lambda r: r["num_workers"])
                mixed = [k for k in ks if any(r["speedup_basis"] == "samples_per_s" for r in by_k[k])]
                ax_sp.plot(mixed, [sp[ks.index(k)] for k in mixed], "o", ms=11, mfc="none", color=color)
            top = max(top, *ks)
    ax_sp.plot([1, top], [1, top], "k--", lw=1, label="ideal (speedup = workers)")
    ticks = sorted({r["num_workers"] for r in rows})
    ax_tp.set_xticks(ticks)
    ax_sp.set_xticks(ticks)
    ax_tp.set(xlabel="workers", ylabel="samples/s", title="throughput (dotted: ideal from 1 worker)")
    ax_sp.set(xlabel="workers", ylabel="speedup over 1 worker",
              title="speedup (ringed: a samples/s ratio, target not reached)")
    for ax in (ax_tp, ax_sp):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)
    return None


def _time_to_target(path: Path, rows: list[dict], keys: list[str], target, _dir) -> str | None:
    if (why := _need_workers(rows)) is not None:
        return why
    reached = [r for r in rows if r["target_time_s"] is not None]
    if not reached:
        return f"no run reached the target gap {target}"
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for key, group in _by(reached, lambda r: (r["mode"], series(r, keys, (WORKERS, "train.mode")))).items():
        ks, times = _mean_by_workers(group, "target_time_s")
        ax.plot(ks, times, "o-", label=f"mode {key[0]}: {_label(key[1])}")
    ax.set_xticks(sorted({r["num_workers"] for r in rows}))
    ax.set(xlabel="workers", ylabel="seconds to the target gap", yscale="log",
           title=f"time to relative gap {target} (mean over repeats; runs that never reached it left out)")
    _finish(fig, ax, path)
    return None


def _loss_time(path: Path, rows: list[dict], keys: list[str], target, sweep_dir: Path) -> str | None:
    runs = [r for r in rows if r["repeat"] == 0 and gap_scale_of(r)
            and (sweep_dir / RUNS_DIR / r["run"] / "metrics.jsonl").is_file()]
    if not runs:
        return "no completed run with an optimality gap and its metrics.jsonl"
    scalings = sorted({r["scaling"] for r in runs})
    fig = Figure(figsize=(7 * len(scalings), 5), layout="constrained")
    axes = fig.subplots(1, len(scalings), squeeze=False)[0]
    for ax, scaling in zip(axes, scalings):
        for row in [r for r in runs if r["scaling"] == scaling]:
            evals = [m for m in read_metrics(sweep_dir / RUNS_DIR / row["run"])
                     if m.get("optimality_gap") is not None and m["optimality_gap"] > 0]
            label = f"{row['num_workers']} workers, " + ", ".join(
                f"{k.split('.')[-1]}={row[k]}" for k in keys if k != WORKERS)
            ax.plot([m["wall_time_s"] for m in evals], [m["optimality_gap"] / gap_scale_of(row) for m in evals],
                    lw=1.2, label=label.rstrip(", "))
        if target is not None:
            ax.axhline(target, color="k", ls="--", lw=1, label=f"target {target}")
        ax.set(xlabel="wall time (s)", ylabel="relative optimality gap", yscale="log",
               title=f"{scaling} scaling, repeat 0")
        ax.grid(True, which="both", alpha=0.3)
        if len(ax.get_lines()) <= MAX_LEGEND:
            ax.legend(fontsize=7)
        else:  # a legend of every run would crowd the axes out of the figure
            ax.set_title(f"{scaling} scaling, repeat 0: {len(ax.get_lines())} lines, too many to label")
    _save(fig, path)
    return None


def _crossover(path: Path, rows: list[dict], keys: list[str], target, _dir) -> str | None:
    if len({r["n_features"] for r in rows}) < 2:
        return "needs 2 or more problem sizes (grid data.n_features)"
    rated = [r for r in rows if r["num_workers"] > 1 and r["speedup"] is not None]
    if not rated:
        return "needs 1-worker runs and runs with more workers (grid cluster.num_workers with 1)"
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for key, group in _by(rated, lambda r: series(r, keys, (WORKERS, FEATURES))).items():
        points = []
        for d, at_d in sorted(_by(group, lambda r: r["n_features"]).items()):
            ks, sp = _mean_by_workers(at_d, "speedup")
            best = max(range(len(ks)), key=sp.__getitem__)
            points.append((d, sp[best], ks[best]))
        line, = ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=_label(key))
        for d, s, k in points:
            ax.annotate(f"K={k}", (d, s), textcoords="offset points", xytext=(4, 4), fontsize=7, color=line.get_color())
    ax.axhline(1, color="k", ls="--", lw=1, label="break-even (1 worker as fast)")
    ax.set(xscale="log", xlabel="features d", ylabel="best speedup of K > 1 workers over 1",
           title="where distributing pays on this machine (above the line)")
    _finish(fig, ax, path)
    return None


def update_batch(row: dict) -> int | None:
    """Rows behind one update: the global batch, but one worker's batch in async (each update is one gradient)."""
    if row["mode"] != "async":
        return row["global_batch"]
    text = str(row["worker_batch"])
    return int(text) if text.isdigit() else None


def _batch(path: Path, rows: list[dict], keys: list[str], target, _dir) -> str | None:
    reached = [{**r, "global_batch": update_batch(r)} for r in rows if r["target_step"] is not None]
    reached = [r for r in reached if r["global_batch"] is not None]
    if len({r["global_batch"] for r in reached}) < 2:
        return "needs runs reaching the target at 2 or more global batch sizes"
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    skip = (WORKERS, "train.batch_size", "train.mode")
    for (mode, values), group in _by(reached, lambda r: (r["mode"], series(r, keys, skip)[2])).items():
        per_b = _by(group, lambda r: r["global_batch"])
        bs = sorted(per_b)
        steps = [statistics.fmean(r["target_step"] for r in per_b[b]) for b in bs]
        label = ", ".join([f"mode {mode}"] + [f"{k.split('.')[-1]}={v}" for k, v in values])
        line, = ax.plot(bs, steps, "o-", label=label)
        ax.plot(bs, [steps[0] * bs[0] / b for b in bs], ":", color=line.get_color(), lw=1)
    _noise_scale_overlay(ax, reached, keys)
    ax.set(xscale="log", yscale="log", xlabel="global batch size (rows per update; async: one worker's batch)",
           ylabel="steps to the target gap",
           title=f"steps to relative gap {target} (dotted: perfect scaling, steps x batch constant)")
    _finish(fig, ax, path)
    return None


def _predicted_speedup(path: Path, rows: list[dict], keys: list[str], target, sweep_dir: Path) -> str | None:
    """The measured speedups (points) and the cost model's (sgd_dist.study.cost_model) for 1 to 1,024 workers."""
    if (why := _need_workers(rows)) is not None:
        return why
    if not any(r["speedup"] is not None for r in rows):
        return "needs 1-worker runs to measure a speedup against"
    cores = saved_cores(sweep_dir) or cm.machine_cores()
    try:
        observations = cm.load_observations(sweep_dir, cores)
        model = cm.fit(observations, cores)
    except (ValueError, OSError, KeyError) as exc:
        return f"the cost model cannot be fitted on these runs ({exc})"
    ks = cm.worker_counts(1024)
    latency, bandwidth, words = CLUSTER_NETWORK
    measured_max = max(r["num_workers"] for r in rows)
    cluster = cm.curves(observations, model, ks, None)
    network = {c.series: c for c in cm.curves(observations, model, ks, None, latency, bandwidth, words)}
    here = {c.series: c for c in cm.curves(observations, model, [k for k in ks if k <= measured_max], cores)}
    scalings = sorted({c.series[0] for c in cluster})
    if not scalings:
        return "the cost model predicts no series with a 1-worker run"
    fig = Figure(figsize=(7.5 * len(scalings), 5.5), layout="constrained")
    axes = fig.subplots(1, len(scalings), squeeze=False)[0]
    for ax, scaling in zip(axes, scalings):
        top = 1
        for i, c in enumerate(x for x in cluster if x.series[0] == scaling):
            color = f"C{i % 10}"
            label = _label(c.series)
            measured = [r for r in rows if series(r, keys) == c.series]
            mk, msp = _mean_by_workers(measured, "speedup")
            ax.plot(mk, msp, "o", color=color, ms=7, label=f"{label}: measured ({c.basis})")
            ax.plot(c.workers, c.speedup, "-", color=color, lw=1.8, label=f"{label}: predicted, a core per process")
            if c.series in network:
                n = network[c.series]
                ax.plot(n.workers, n.speedup, "--", color=color, lw=1.2, label=f"{label}: predicted, {words}")
            if c.series in here:
                h = here[c.series]
                ax.plot(h.workers, h.speedup, ":", color=color, lw=1.2,
                        label=f"{label}: predicted on {cores} cores (fit)")
            knee = c.knee()
            s = c.speedup[c.workers.index(knee)]
            ax.plot([knee], [s], "*", color=color, ms=15, mec="k")
            ax.annotate(f"stops paying at K\u2248{knee}" if knee != c.workers[-1] else f"still paying at K={knee}",
                        (knee, s), textcoords="offset points", xytext=(6, 8 + 12 * i), fontsize=8, color=color)
            top = max(top, c.workers[-1])
        ax.plot([1, top], [1, top], "k--", lw=0.8, alpha=0.6, label="ideal (speedup = workers)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set(xlabel="workers", ylabel="speedup over 1 worker",
               title=f"{scaling} scaling: measured (points) and predicted by the cost model")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6.5, loc="upper left")
    _save(fig, path)
    return None


# --- the literature's shapes: batch regimes with the gradient noise scale, local SGD's rounds -------------------

LR = "optim.lr"
LOCAL_STEPS = "train.local_steps"


def best_steps(rows: list[dict], keys: list[str]) -> tuple[list[int], list[float], list[dict]]:
    """Per update batch, the fewest steps to target over the grid's other values (each the mean over its repeats):
    Shallue et al.'s protocol of tuning the metaparameters at each batch size. Returns (batches, steps, best row)."""
    skip = (WORKERS, "train.batch_size")
    per_point = _by(rows, lambda r: (update_batch(r), series(r, keys, skip)[2]))
    best: dict[int, tuple[float, dict]] = {}
    for (b, _), group in per_point.items():
        steps = statistics.fmean(r["target_step"] for r in group)
        if b is not None and (b not in best or steps < best[b][0]):
            best[b] = (steps, group[0])
    bs = sorted(best)
    return bs, [best[b][0] for b in bs], [best[b][1] for b in bs]


def _noise_scale_overlay(ax, reached: list[dict], keys: list[str]) -> None:
    """The critical batch predicted by the gradient noise scale (results.csv gradient_noise_scale: B_simple at the
    target gap) as a vertical line, and McCandlish et al.'s S = S_min (1 + B_noise / B) through the fewest steps
    at each batch: with B_noise = B_simple (S_min fitted), and with both fitted."""
    values = [r["gradient_noise_scale"] for r in reached if r.get("gradient_noise_scale")]
    if not values:
        return
    b_simple = statistics.fmean(values)
    ax.axvline(b_simple, color="crimson", lw=1.5, label=f"B_simple = tr(Sigma)/|G|^2 at the target gap: {b_simple:.0f}")
    bs, steps, _ = best_steps(reached, keys)
    if len(bs) < 2:
        return
    xs = [bs[0] * (bs[-1] / bs[0]) ** (i / 200) for i in range(201)]
    s_min, _ = fit_steps(bs, steps, b_simple)
    ax.plot(xs, [s_min * (1 + b_simple / x) for x in xs], "--", color="crimson", lw=1.2,
            label=f"S_min (1 + B_simple / B), S_min = {s_min:.3g} fitted")
    s_fit, b_fit = fit_steps(bs, steps)
    ax.plot(xs, [s_fit * (1 + b_fit / x) for x in xs], "-.", color="dimgray", lw=1.2,
            label=f"S_min (1 + B_noise / B), both fitted: S_min = {s_fit:.3g}, B_noise = {b_fit:.0f}")


def _batch_regimes(path: Path, rows: list[dict], keys: list[str], target, _dir) -> str | None:
    if LR not in keys:
        return "needs 2 or more learning rates (grid optim.lr) to tune at each batch size"
    reached = [r for r in rows if r["target_step"] is not None and update_batch(r) is not None]
    if len({update_batch(r) for r in reached}) < 2 or len({r[LR] for r in reached}) < 2:
        return "needs runs reaching the target at 2 or more batch sizes and learning rates"
    fig = Figure(figsize=(13, 5.2), layout="constrained")
    ax, ax_lr = fig.subplots(1, 2, width_ratios=[1.6, 1])
    for i, (lr, group) in enumerate(_by(reached, lambda r: float(r[LR])).items()):
        per_b = _by(group, update_batch)
        bs = sorted(per_b)
        ax.plot(bs, [statistics.fmean(r["target_step"] for r in per_b[b]) for b in bs], ".-", lw=0.8, ms=4,
                alpha=0.45, color=f"C{i % 10}", label=f"lr {lr:g}")
    bs, steps, best = best_steps(reached, keys)
    ax.plot(bs, steps, "ko-", lw=2, ms=5, label="fewest steps over the learning rates (tuned per batch)")
    ax.plot(bs, [steps[0] * bs[0] / b for b in bs], "k:", lw=1, label="perfect scaling from the smallest batch")
    _noise_scale_overlay(ax, reached, keys)
    top = max(r["target_step"] for r in reached)
    ax.set(xscale="log", yscale="log", xlabel="global batch size B (rows per update)", ylabel="steps to the target gap",
           ylim=(max(0.5, min(steps) / 2), top * 2),
           title=f"steps to relative gap {target} against batch size (runs that diverged or never reached it left out)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax_lr.plot(bs, [float(r[LR]) for r in best], "ko-")
    ax_lr.set(xscale="log", yscale="log", xlabel="global batch size B", ylabel="learning rate",
              title="the learning rate of the fewest steps")
    ax_lr.grid(True, which="both", alpha=0.3)
    _save(fig, path)
    return None


def _local_sgd(path: Path, rows: list[dict], keys: list[str], target, _dir) -> str | None:
    local = [r for r in rows if r["mode"] == "local_sgd" and r["target_step"] is not None]
    if LOCAL_STEPS not in keys or len({r[LOCAL_STEPS] for r in local}) < 2:
        return "needs local_sgd runs reaching the target at 2 or more train.local_steps"
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    ax_rounds = ax.twinx()
    for i, (key, group) in enumerate(_by(local, lambda r: series(r, keys, (LOCAL_STEPS,))).items()):
        per_h = _by(group, lambda r: int(r[LOCAL_STEPS]))
        hs = sorted(per_h)
        samples = [statistics.fmean(r["target_samples"] for r in per_h[h]) for h in hs]
        rounds = [statistics.fmean(r["target_step"] for r in per_h[h]) for h in hs]
        label = _label(key)
        ax.plot(hs, samples, "o-", color=f"C{i % 10}", label=f"samples to target ({label})")
        ax_rounds.plot(hs, rounds, "s--", color=f"C{i % 10}", alpha=0.6, label=f"rounds to target ({label})")
        ax_rounds.plot(hs, [rounds[0] / h for h in hs], ":", color=f"C{i % 10}", lw=1,
                       label="rounds / H from H = 1 (H-fold fewer rounds)")
    ax.set(xscale="log", xlabel="local steps H between two averagings", ylabel="samples to the target gap (solid)",
           title=f"local SGD: samples and communication rounds to relative gap {target}")
    ticks = sorted({int(r[LOCAL_STEPS]) for r in local})
    ax.set_xticks(ticks, labels=[str(h) for h in ticks])
    ax.set_ylim(bottom=0)
    ax_rounds.set(yscale="log", ylabel="communication rounds to the target gap (dashed)")
    ax.grid(True, which="both", alpha=0.3)
    lines = ax.get_legend_handles_labels()[0] + ax_rounds.get_legend_handles_labels()[0]
    ax.legend(lines, [line.get_label() for line in lines], fontsize=7, loc="upper center")
    _save(fig, path)
    return None


MODE_ORDER = ["sync", "backup", "ssp", "local_sgd", "async"]


def _modes_time(path: Path, rows: list[dict], keys: list[str], target, _dir) -> str | None:
    reached = [r for r in rows if r["target_time_s"] is not None]
    modes = sorted({r["mode"] for r in reached}, key=lambda m: MODE_ORDER.index(m) if m in MODE_ORDER else 99)
    if len(modes) < 2:
        return "needs runs of 2 or more train.mode reaching the target"
    mode_keys = tuple(k for k in keys if "train.mode" in [part.strip() for part in k.split(",")])
    groups = _by(reached, lambda r: series(r, keys, mode_keys))
    fig = Figure(figsize=(max(7.0, 2.2 * len(groups) + 2), 5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(modes)
    for g, group in enumerate(groups.values()):
        for m, mode in enumerate(modes):
            times = [r["target_time_s"] for r in group if r["mode"] == mode]
            if not times:
                continue
            x, mean = g + (m - (len(modes) - 1) / 2) * width, statistics.fmean(times)
            ax.bar(x, mean, width * 0.9, color=f"C{m}", label=f"mode {mode}" if g == 0 else None)
            ax.plot([x] * len(times), times, "k.", ms=5)
            ax.annotate(f"{mean:.3g} s", (x, mean), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
    ax.set_xticks(range(len(groups)), [_label(key) for key in groups], fontsize=8)
    ax.set(ylabel="seconds to the target gap",
           title=f"wall time to relative gap {target} by mode\n(bars: mean over repeats; dots: each repeat)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return None
