"""Figures drawn from a run directory's files alone (config.yaml, metrics.jsonl, summary.json).

Imports neither Ray nor the trainer, and uses matplotlib's object API (no pyplot state, no display), so it
works headless and can redraw any finished or killed run: ``sgd-dist plot RUN_DIR``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sgd_dist.config import load_config
from sgd_dist.core.data import generate
from sgd_dist.run.rundir import CONFIG_FILE, SCHEDULE_FILE, SUMMARY_FILE, read_metrics, read_summary

FIT_SAMPLE_ROWS = 2000


def plot_run(run_dir: str | Path) -> list[Path]:
    """Draw loss.png (and fit.png for one-feature problems) into the run directory; return their paths."""
    run_dir = Path(run_dir)
    config = load_config(run_dir / CONFIG_FILE)
    rows = read_metrics(run_dir)
    summary = read_summary(run_dir) if (run_dir / SUMMARY_FILE).exists() else {}
    paths = [_loss_figure(run_dir / "loss.png", rows, summary, config, worker_series(run_dir))]
    if config.data.n_features == 1 and summary.get("weights"):
        paths.append(_fit_figure(run_dir / "fit.png", summary, config))
    return paths


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path


def _title(summary: dict, config) -> str:
    batch = config.train.batch_size
    head = (f"{config.data.kind} regression, {config.data.n_samples:,} rows x {config.data.dim} params, "
            f"{config.cluster.num_workers} workers x batch {batch}, {config.cluster.backend} backend"
            + (f" ({summary['transport']}), {summary['mode']}" if summary.get("transport") else ""))
    if summary.get("status") == "completed":
        rel = summary.get("relative_optimality_gap")
        rel_text = f" (relative {rel:.2e})" if rel is not None else ""
        gap = summary.get("optimality_gap")
        gap_text = (f"final optimality gap {gap:.3e}{rel_text}" if gap is not None
                    else f"final loss {summary['final_loss']:.4g}")
        head += f"\n{gap_text}, {summary['steps']} steps in {summary['train_time_s']:.3g} s (the metrics' clock)"
    elif summary.get("status") == "failed":
        head += f"\nFAILED after step {summary.get('steps_recorded')}: {summary.get('error')}"
    return head


def worker_series(run_dir: Path) -> dict[int, dict[str, list]]:
    """Each worker's applied answers over the run, from schedule.jsonl: the update that applied each, its
    staleness (updates between the weights it was computed on and that update) and its answer time in ms
    (where the schedule has the times)."""
    series: dict[int, dict[str, list]] = {}
    path = run_dir / SCHEDULE_FILE
    lines = path.read_text().splitlines() if path.exists() else []
    for text in lines:
        try:
            line = json.loads(text)
        except ValueError:
            continue  # a half-written last line
        times = line.get("answer_s") or [None] * len(line["applied"])
        for (worker, _, version), seconds in zip(line["applied"], times, strict=True):
            s = series.setdefault(worker, {"update": [], "staleness": [], "answer_ms": []})
            s["update"].append(line["update"])
            s["staleness"].append(line["update"] - 1 - version)
            s["answer_ms"].append(None if seconds is None else 1e3 * seconds)
    return series


def _worker_panels(axes, series: dict[int, dict[str, list]]) -> None:
    """Staleness and answer time per worker against the update that applied the answer."""
    legend = len(series) <= 8  # past that a legend hides the lines
    for worker, s in sorted(series.items()):
        axes[0].plot(s["update"], s["staleness"], ".", ms=4, alpha=0.6, label=f"worker {worker}")
        timed = [(u, ms) for u, ms in zip(s["update"], s["answer_ms"], strict=True) if ms is not None]
        axes[1].plot([u for u, _ in timed], [ms for _, ms in timed], ".", ms=4, alpha=0.6, label=f"worker {worker}")
    axes[0].set(xlabel="update", ylabel="staleness of the applied answer (updates)")
    axes[1].set(xlabel="update", ylabel="answer time (ms)", yscale="log")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        if legend and series:
            ax.legend(markerscale=4)


def _loss_figure(path: Path, rows: list[dict], summary: dict, config, workers: dict | None = None) -> Path:
    fig = Figure(figsize=(12, 12 if workers else 8), layout="constrained")
    axes = fig.subplots(3 if workers else 2, 2)
    if workers:
        _worker_panels(axes[2], workers)
    steps = [r for r in rows if r.get("loss") is not None]
    evals = [r for r in rows if r.get("eval_loss") is not None]
    gaps = [r for r in evals if r.get("optimality_gap") is not None and r["optimality_gap"] > 0]
    optimal = summary.get("optimal_loss")
    for col, (key, label) in enumerate([("step", "step"), ("wall_time_s", "wall time (s)")]):
        ax = axes[0, col]
        ax.plot([r[key] for r in steps], [r["loss"] for r in steps], lw=0.8, alpha=0.6, label="mini-batch loss")
        ax.plot([r[key] for r in evals], [r["eval_loss"] for r in evals], "o-", ms=3, label="full-data loss")
        if optimal is not None:
            ax.axhline(optimal, ls="--", color="k", lw=1, label=f"optimum {optimal:.6g}")
        ax.set(yscale="log", xlabel=label, ylabel="loss")
        ax.legend()
        ax = axes[1, col]
        ax.plot([r[key] for r in gaps], [r["optimality_gap"] for r in gaps], "o-", ms=3, color="C3")
        ax.set(yscale="log", xlabel=label, ylabel="optimality gap  f(w) - f(w*)")
        for a in axes[:, col]:
            a.grid(True, which="both", alpha=0.3)
    fig.suptitle(_title(summary, config))
    return _save(fig, path)


def _fit_figure(path: Path, summary: dict, config) -> Path:
    """The seed's scatter of the data with the fitted and the true line (or sigmoid, for logistic)."""
    X, y = generate(config.data, 0, min(config.data.n_samples, FIT_SAMPLE_ROWS))
    x = X[:, 0]
    grid = torch.linspace(float(x.min()), float(x.max()), 200, dtype=torch.float64)
    design = torch.stack([grid, torch.ones_like(grid)], 1) if config.data.bias else grid.unsqueeze(1)
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.subplots()
    logistic = config.data.kind == "logistic"
    ax.scatter(x, y, s=6, alpha=0.35, label=f"data ({len(x):,} of {config.data.n_samples:,} rows)")
    lines = [("fitted", summary["weights"], "C3", "-"), ("exact optimum", summary["optimal_weights"], "C2", ":"),
             ("true", summary["true_weights"], "k", "--")]
    for name, w, color, style in [line for line in lines if line[1] is not None]:
        w = torch.tensor(w, dtype=torch.float64)
        out = design @ w
        if logistic:
            out = torch.sigmoid(out)
        coeffs = ", ".join(f"{v:.4g}" for v in w.tolist())
        ax.plot(grid, out, style, color=color, lw=2, label=f"{name}: a = ({coeffs})")
    ax.set(xlabel="x", ylabel="P(y = 1)" if logistic else "y", title=_title(summary, config).split("\n")[0])
    ax.title.set_fontsize(8)
    ax.legend()
    return _save(fig, path)
