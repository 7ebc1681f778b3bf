"""The benchmark's table, the issue's target ratios and the figure: pure functions over result rows.

A row is one system at one size (d, workers): its per-step median and p90 in milliseconds, samples per
second (global batch / median step) and its ratio to the floor (one torch process, same d, same global
batch), or a note saying why it has no numbers. The figure is drawn from results.csv alone.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

FLOOR = "one torch process"
DOCS_PS = "Ray docs PS pattern"
DDP = "torch gloo DDP"
RAY_TRAIN = "Ray Train DDP (gloo)"
SGD_SHM = "sgd_dist shm"
SGD_RAY = "sgd_dist ray"
SGD_SYNC = "sgd_dist sync"  # the code before the step engine: no cluster.transport key

TARGET_WORKERS = 2
STARTUP_BOUND = 1.15


@dataclass
class Row:
    system: str
    d: int
    workers: int
    global_batch: int
    steps: int = 0
    median_ms: float | None = None
    p90_ms: float | None = None
    samples_per_s: float | None = None
    vs_floor: float | None = None
    record_ms_per_step: float | None = None
    note: str = ""


@dataclass(frozen=True)
class Target:
    what: str
    d: int
    system: str
    baseline: str | None  # None: a fraction of the system's own step (recording overhead)
    bound: float


# Issue 11, point 5: medians from one run, 2 workers x 256.
TARGETS = (
    Target("shm vs one process", 1000, SGD_SHM, FLOOR, 1.3),
    Target("shm vs torch gloo DDP", 1000, SGD_SHM, DDP, 0.25),
    Target("shm vs Ray docs PS pattern", 1000, SGD_SHM, DOCS_PS, 0.15),
    Target("ray transport vs Ray docs PS pattern", 1000, SGD_RAY, DOCS_PS, 0.5),
    Target("shm vs one process (the second core must pay)", 100_000, SGD_SHM, FLOOR, 0.7),
)


def measured_row(system: str, d: int, workers: int, global_batch: int, median_ms: float, p90_ms: float,
                 steps: int, **extra) -> Row:
    return Row(system, d, workers, global_batch, steps, median_ms, p90_ms,
               samples_per_s=global_batch / (median_ms / 1e3), **extra)


def fill_vs_floor(rows: list[Row]) -> list[Row]:
    """Set each measured row's ratio to the floor's median at the same d and workers (so the same global batch)."""
    floors = {(r.d, r.workers): r.median_ms for r in rows if r.system == FLOOR and r.median_ms}
    for r in rows:
        floor = floors.get((r.d, r.workers))
        r.vs_floor = r.median_ms / floor if r.median_ms is not None and floor else None
    return rows


def _median(rows: list[Row], system: str, d: int, workers: int) -> float | None:
    for r in rows:
        if (r.system, r.d, r.workers) == (system, d, workers) and r.median_ms is not None:
            return r.median_ms
    return None


def target_rows(rows: list[Row], startup_ratio: float | None = None) -> list[dict]:
    """The issue's targets as ratios of this run's medians; 'not measured' where a side is missing.

    Without a cluster.transport key (the code before the step engine) the single ``sgd_dist sync`` row
    stands for both transports, so the table shows today's misses.
    """
    present = {r.system for r in rows if r.median_ms is not None}
    out = []
    for t in TARGETS:
        system = t.system if t.system in present or SGD_SYNC not in present else SGD_SYNC
        num = _median(rows, system, t.d, TARGET_WORKERS)
        den = _median(rows, t.baseline, t.d, TARGET_WORKERS)
        ratio = num / den if num is not None and den else None
        out.append(_target(f"{t.what}", t.d, system, t.baseline, ratio, t.bound))
    for r in rows:
        if r.record_ms_per_step is not None and r.median_ms and r.workers == TARGET_WORKERS:
            out.append(_target("metrics recording, share of the step", r.d, r.system, None,
                               r.record_ms_per_step / r.median_ms, 0.05))
    out.append(_target("1-step lesson2 run vs bare torch + Ray program, start to exit", None, "sgd-dist train",
                       "bare program", startup_ratio, STARTUP_BOUND))
    return out


def _target(what: str, d: int | None, system: str, baseline: str | None, ratio: float | None,
            bound: float) -> dict:
    verdict = "not measured" if ratio is None else ("met" if ratio <= bound else "missed")
    return {"target": what, "d": d, "system": system, "baseline": baseline, "vs": baseline or "its own step",
            "ratio": ratio, "bound": bound, "verdict": verdict}


# -- text ------------------------------------------------------------------------------------------------

def fmt_ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def fmt_d(d: int) -> str:
    if d >= 10_000 and d == 10 ** round(math.log10(d)):
        return f"1e{round(math.log10(d))}"
    return str(d)


def results_markdown(rows: list[Row]) -> str:
    lines = ["| system | d | workers | global batch | median ms/step | p90 ms/step | samples/s | vs one process | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sps = "-" if r.samples_per_s is None else f"{r.samples_per_s:,.0f}"
        lines.append(f"| {r.system} | {fmt_d(r.d)} | {r.workers} | {r.global_batch} | {fmt_ms(r.median_ms)} | "
                     f"{fmt_ms(r.p90_ms)} | {sps} | {fmt_ratio(r.vs_floor)} | {r.note} |")
    return "\n".join(lines)


def targets_markdown(targets: list[dict]) -> str:
    lines = ["| target (issue 11) | d | system | vs | ratio | bound | verdict |", "|---|---|---|---|---|---|---|"]
    for t in targets:
        d = "-" if t["d"] is None else fmt_d(t["d"])
        if t["baseline"] is None:  # a share of the system's own step
            ratio = "-" if t["ratio"] is None else f"{100 * t['ratio']:.2g} %"
            bound = f"< {100 * t['bound']:g} %"
        else:
            ratio, bound = fmt_ratio(t["ratio"]), f"<= {t['bound']:g}x"
        lines.append(f"| {t['target']} | {d} | {t['system']} | {t['vs']} | {ratio} | {bound} | {t['verdict']} |")
    return "\n".join(lines)


def startup_markdown(startup: dict) -> str:
    if startup.get("note"):
        return f"Start-up: {startup['note']}"
    sgd, bare = startup["sgd_dist_s"], startup["bare_s"]
    return (f"| start-up, command start to exit | runs | median s |\n|---|---|---|\n"
            f"| `sgd-dist train --config configs/lesson2.yaml train.steps=1` | {len(sgd)} | {startup['sgd_dist_median_s']:.2f} |\n"
            f"| bare program: import torch and Ray, local Ray, 2 actors importing torch, shutdown | {len(bare)} | "
            f"{startup['bare_median_s']:.2f} |\n\nratio {startup['ratio']:.2f}x (target <= {STARTUP_BOUND}x)")


# -- files -----------------------------------------------------------------------------------------------

COLUMNS = [f.name for f in fields(Row)]
_INTS = {"d", "workers", "global_batch", "steps"}
_FLOATS = {"median_ms", "p90_ms", "samples_per_s", "vs_floor", "record_ms_per_step"}


def write_csv(rows: list[Row], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if v is None else v for k, v in asdict(r).items()})
    return path


def read_csv(path: Path) -> list[Row]:
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            values = {}
            for k, v in raw.items():
                if k in _INTS:
                    values[k] = int(v)
                elif k in _FLOATS:
                    values[k] = float(v) if v != "" else None
                else:
                    values[k] = v
            rows.append(Row(**values))
    return rows


def write_targets_csv(targets: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(targets[0]))
        writer.writeheader()
        for t in targets:
            writer.writerow({k: "" if v is None else v for k, v in t.items()})
    return path


# -- the figure ------------------------------------------------------------------------------------------

def plot_results(csv_path: Path, png_path: Path) -> Path:
    """ms/step of every system, grouped by d, log scale, one panel per worker count; from results.csv only."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in read_csv(csv_path) if r.median_ms is not None]
    all_rows = read_csv(csv_path)
    workers = sorted({r.workers for r in all_rows})
    dims = sorted({r.d for r in all_rows})
    systems = list(dict.fromkeys(r.system for r in all_rows))
    fig = Figure(figsize=(4.2 * max(len(workers), 1) + 1.5, 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(len(workers), 1), sharey=True, squeeze=False)[0]
    width = 0.8 / max(len(systems), 1)
    colors = [f"C{i}" for i in range(len(systems))]
    for ax, k in zip(axes, workers):
        for i, system in enumerate(systems):
            xs, ys = [], []
            for j, d in enumerate(dims):
                value = _median(rows, system, d, k)
                if value is not None:
                    xs.append(j - 0.4 + width * (i + 0.5))
                    ys.append(value)
            ax.bar(xs, ys, width=width, color=colors[i], label=system)
        ax.set_yscale("log")
        ax.set_xticks(range(len(dims)), [f"d={fmt_d(d)}" for d in dims])
        ax.set_title(f"{k} worker{'s' if k > 1 else ''} x {all_rows[0].global_batch // all_rows[0].workers} rows")
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[0].set_ylabel("median ms per step (log)")
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 1.5 / fig.get_figwidth(), 1))
    fig.savefig(png_path, dpi=110)
    return png_path
