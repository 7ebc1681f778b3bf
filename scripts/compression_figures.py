"""The figures and tables of docs/experiments.md's "Less communication", from the recorded files of a sweep alone.

Reads every run under SWEEP_DIR/runs/ (its config.yaml, metrics.jsonl and summary.json) and draws the gap (relative
to f* when f* > 0, else to the gap at the start: on an interpolating problem f* = 0) against one of: the bytes moved
(``bytes``: up and down, cumulated over the rows; and against updates), the run's clock (``time``: virtual seconds
on the virtual backend) or the communication rounds (``rounds``). Prints one markdown row per run: its final gap,
its byte totals, the most updates it needed (as a multiple of the first run's: the uncompressed one, or sync) to
reach a gap the first run had in its first half, and its time to ``--target``.

    .venv/bin/python scripts/compression_figures.py runs/compression --x bytes --out docs/compression.png
    .venv/bin/python scripts/compression_figures.py runs/compression_64 --x time --target 1e-1 \
        --out docs/compression_64.png
    .venv/bin/python scripts/compression_figures.py runs/diloco --x rounds --out docs/diloco.png
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sgd_dist.run.rundir import read_metrics
from sgd_dist.study.results import gap_scale_of


def label(config: dict) -> str:
    """What a run compressed and how it averaged, in a few words."""
    c, train = config["compression"], config["train"]
    name = c["kind"] + (f" {100 * c['ratio']:g} %" if c.get("ratio") else "")
    name += " + EF" if c["error_feedback"] else ""
    name += " + down" if c.get("down") else ""
    if train["mode"] == "local_sgd":
        outer = train["outer"]
        h = train["local_steps"]
        if outer["optimizer"] == "nesterov":
            how = f"DiLoCo H={h} (nesterov lr {outer['lr']:g}, m {outer['momentum']:g})"
        else:
            how = "local SGD H=1 (sync)" if h == 1 else f"local SGD H={h}"
        return how if c["kind"] == "none" else f"{how}, {name}"
    return name


def load(sweep: Path) -> list[dict]:
    """The sweep's completed runs, in results.csv's order (the grid's: the first is the one compared against)."""
    with open(sweep / "results.csv", newline="") as f:
        names = [row["run"] for row in csv.DictReader(f)]
    runs = []
    for run_dir in (sweep / "runs" / name for name in names):
        if not (run_dir / "summary.json").is_file():
            continue
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        summary = json.loads((run_dir / "summary.json").read_text())
        if summary["status"] != "completed":  # diverged: in the table, not in the figure
            runs.append({"name": label(config), "config": config, "summary": summary, "failed": summary["error"]})
            continue
        rows = read_metrics(run_dir)
        moved, total = [], [0, 0]
        for row in rows:
            total = [total[0] + row.get("bytes_up", 0), total[1] + row.get("bytes_down", 0)]
            moved.append(tuple(total))
        evaluated = [(row, b) for row, b in zip(rows, moved) if row.get("optimality_gap") is not None]
        f_star = summary.get("optimal_loss") or 0.0
        # the run's own scale (f*, or f(w0) - f* where f* = 0); the first evaluation's gap for an older summary
        scale = gap_scale_of(summary) or evaluated[0][0]["optimality_gap"]
        runs.append({"name": label(config), "config": config, "summary": summary,
                     "step": [r["step"] for r, _ in evaluated], "time": [r["wall_time_s"] for r, _ in evaluated],
                     "bytes_up": [b[0] for _, b in evaluated], "bytes": [sum(b) for _, b in evaluated],
                     "gap": [r["optimality_gap"] / scale for r, _ in evaluated],
                     "relative_to": "f*" if f_star > 0 else "the start"})
    return runs


def first_below(run: dict, level: float, axis: str) -> float | None:
    """Where the run's gap first reaches ``level``, interpolated (log gap, linear x) between two evaluations."""
    points = list(zip(run[axis], run["gap"]))
    for (x0, g0), (x1, g1) in zip([(None, None)] + points, points):
        if g1 <= level:
            if x0 is None or g0 <= 0 or g1 <= 0 or g0 == g1:
                return x1
            return x0 + (x1 - x0) * math.log(g0 / level) / math.log(g0 / g1)
    return None


def slowdowns(run: dict, base: dict) -> list[tuple[int, float | None]]:
    """For each evaluation u in the base run's first half: the updates this run needed to reach the base run's gap
    at u, as a multiple of u (None: never)."""
    last = base["step"][-1]
    out = []
    for u, g in zip(base["step"], base["gap"]):
        if 0 < u <= last / 2:
            reach = first_below(run, g, "step")
            out.append((u, None if reach is None else reach / u))
    return out


def describe_slowdown(ratios: list[tuple[int, float | None]]) -> str:
    """'1.44x at 750 (worst 4.1x, at 25)': the ratio at the base run's half-way point and the worst one."""
    if not ratios:
        return "-"
    u, at_half = ratios[-1]
    if at_half is None:
        return "never"
    worst_u, worst = max(ratios, key=lambda r: math.inf if r[1] is None else r[1])
    return f"{at_half:.2f}x at {u} (worst {'never' if worst is None else f'{worst:.2f}x'}, at {worst_u})"


def table(runs: list[dict], target: float | None) -> list[str]:
    base = runs[0]
    lines = [f"| run | updates | final gap (rel. to {base['relative_to']}) | bytes up | bytes down | updates to "
             f"{base['name']}'s gap, as a multiple of its updates |" + (f" time to {target:g} (s) |" if target else ""),
             "|---|---|---|---|---|---|" + ("---|" if target else "")]
    for run in runs:
        s = run["summary"]
        if "failed" in run:
            lines.append(f"| {run['name']} | {s['steps_recorded']} | {run['failed'][:60]} | - | - | - |"
                         + (" - |" if target else ""))
            continue
        line = (f"| {run['name']} | {run['step'][-1]} | {run['gap'][-1]:.3e} | {s['bytes_up']:,} | {s['bytes_down']:,} "
                f"| {describe_slowdown(slowdowns(run, base))} |")
        if target:
            hit = first_below(run, target, "time")
            line += f" {'-' if hit is None else f'{hit:.3f}'} |"
        lines.append(line)
    return lines


def draw(runs: list[dict], x: str, out: Path, title: str) -> None:
    panels = [("bytes_up", "bytes the answers moved (up)"), ("bytes", "bytes moved, up and down (the weights "
                                                                    "dense unless compression.down)"),
              ("step", "updates")] if x == "bytes" else \
        [("time", "seconds (the run's clock)")] if x == "time" else [("step", "communication rounds")]
    fig = Figure(figsize=(5.5 * len(panels), 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (axis, name) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for run in (r for r in runs if "failed" not in r):
            style = "-" if run["config"]["compression"]["error_feedback"] or run is runs[0] else "--"
            ax.plot(run[axis], run["gap"], style, label=run["name"])
        ax.set_yscale("log")
        ax.set_ylim(top=10)  # a diverging run leaves the figure there
        if axis.startswith("bytes"):
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel(f"optimality gap relative to {runs[0]['relative_to']}")
        ax.grid(True, which="both", alpha=0.3)
    fig.axes[-1].legend(fontsize=7)
    fig.suptitle(title)
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--x", choices=["bytes", "time", "rounds"], default="bytes")
    parser.add_argument("--target", type=float, help="a relative gap: each run's time to reach it")
    parser.add_argument("--title", default="")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    runs = load(args.sweep)
    print("\n".join(table(runs, args.target)))
    draw(runs, args.x, args.out, args.title or args.sweep.name)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
