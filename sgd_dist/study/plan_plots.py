"""A plan's trade-off figure, drawn from plan.csv alone (``sgd-dist plot PLAN_DIR`` redraws it): each config that
reached the target a point at (time to the target, worker-seconds), coloured by mode, the Pareto front joined
and ringed, the recommendation starred. Matplotlib's object API, no pyplot."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sgd_dist.study.plan_results import PLAN_FILE, pareto_front, read_plan

FIGURE_FILE = "plan.png"
COLOURS = {"sync": "tab:blue", "async": "tab:orange", "ssp": "tab:green", "backup": "tab:red",
           "local_sgd": "tab:purple"}


def plot_plan(plan_dir: str | Path) -> Path:
    """Draw plan.png beside plan.csv; ValueError when no config reached the target (nothing to place)."""
    plan_dir = Path(plan_dir)
    rows = read_plan(plan_dir / PLAN_FILE)
    reached = [r for r in rows if r["reached"] == "yes"]
    if not reached:
        raise ValueError(f"{plan_dir / PLAN_FILE}: no config reached the target; there is no trade-off to draw")
    fig = Figure(figsize=(8.5, 6))
    ax = fig.add_subplot(1, 1, 1)
    for mode, colour in COLOURS.items():
        points = [r for r in reached if r["mode"] == mode]
        if points:
            ax.scatter([r["time_to_target_s"] for r in points], [r["worker_seconds"] for r in points], s=28,
                       color=colour, label=mode, alpha=0.8, zorder=3)
    front = pareto_front(reached)
    ax.plot([r["time_to_target_s"] for r in front], [r["worker_seconds"] for r in front], color="black", lw=1,
            drawstyle="steps-post", zorder=2, label="Pareto front")
    ax.scatter([r["time_to_target_s"] for r in front], [r["worker_seconds"] for r in front], s=110,
               facecolors="none", edgecolors="black", zorder=4)
    for r in front:
        ax.annotate(r["config"].replace(", lr none", "").replace(", batch", "\nbatch"),
                    (r["time_to_target_s"], r["worker_seconds"]), textcoords="offset points", xytext=(6, 4),
                    fontsize=7)
    best = min(rows, key=lambda r: r["rank"])
    if best["reached"] == "yes":
        ax.scatter([best["time_to_target_s"]], [best["worker_seconds"]], marker="*", s=260, color="gold",
                   edgecolors="black", zorder=5, label=f"rank 1: {best['config']}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("time to the target (virtual s)")
    ax.set_ylabel("cost: worker-seconds to the target")
    missed = len(rows) - len(reached)
    ax.set_title(f"time against cost to the target: {len(reached)} configs reached it"
                 + (f", {missed} did not (not shown)" if missed else ""), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    path = plan_dir / FIGURE_FILE
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
