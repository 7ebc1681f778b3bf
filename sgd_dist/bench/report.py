"""The benchmark's table, its targets and the figure: pure functions over result rows.

A row is one system at one size (d, workers) with one sampling: its per-step median and p90 in milliseconds,
samples per second (global batch / median step), its ratio to the strongest one-process loop of the same
sampling at the same d and global batch, and its physical floor (the bytes the step must read over the memory
bandwidth); or a note saying why it has no numbers. The figure is drawn from results.csv alone.
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from sgd_dist.bench.options import DEFAULT_STARTUP_WORKERS, SAMPLINGS

LOOP_BLOCKS_AUTOGRAD = "one process, contiguous batches, autograd"
LOOP_BLOCKS_FORMULA = "one process, contiguous batches, written-out gradient"
LOOP_SHUFFLE_AUTOGRAD = "one process, X[idx], autograd"
LOOP_SHUFFLE_FORMULA = "one process, X[idx], written-out gradient"
LOOPS = {LOOP_BLOCKS_AUTOGRAD: ("blocks", "autograd"), LOOP_BLOCKS_FORMULA: ("blocks", "formula"),
         LOOP_SHUFFLE_AUTOGRAD: ("shuffle", "autograd"), LOOP_SHUFFLE_FORMULA: ("shuffle", "formula")}
DOCS_PS = "Ray docs PS pattern"
DDP = "torch gloo DDP"
RAY_TRAIN = "Ray Train DDP (gloo)"
SGD_SHM = "sgd_dist shm"
SGD_RAY = "sgd_dist ray"
SGD_SHM_BLOCKS = "sgd_dist shm, blocks"
SGD_RAY_BLOCKS = "sgd_dist ray, blocks"
STRONGEST = "strongest"  # the note of the fastest loop of its sampling: every ratio of that sampling is against it
LOOP = "the strongest loop"  # a target's baseline: the strongest loop of the system's sampling
BANDWIDTH_FLOOR = "the bandwidth floor"  # a target's baseline: the system's own row's floor
NOT_AVAILABLE = "not available"

TARGET_WORKERS = 2
STARTUP_BOUND = 1.15
CLUSTER_BOUND_S = 3.0
MANY_WORKERS_BOUND = 1.3


@dataclass
class Row:
    system: str
    d: int
    workers: int
    global_batch: int
    sampling: str = "shuffle"
    steps: int = 0
    median_ms: float | None = None
    p90_ms: float | None = None
    samples_per_s: float | None = None
    vs_loop: float | None = None
    read_mb: float | None = None
    floor_ms: float | None = None
    vs_floor: float | None = None
    record_ms_per_step: float | None = None
    note: str = ""


@dataclass(frozen=True)
class Target:
    what: str
    d: int
    system: str
    baseline: str  # a row's system, LOOP or BANDWIDTH_FLOOR
    bound: float


# Medians from one run, TARGET_WORKERS workers x 256 rows.
TARGETS = (
    Target("shm vs the strongest one-process loop", 1000, SGD_SHM, LOOP, 1.0),
    Target("shm vs torch gloo DDP", 1000, SGD_SHM, DDP, 0.25),
    Target("shm vs Ray docs PS pattern", 1000, SGD_SHM, DOCS_PS, 0.15),
    Target("ray transport vs Ray docs PS pattern", 1000, SGD_RAY, DOCS_PS, 0.5),
    Target("shm vs the strongest one-process loop (the second core must pay)", 100_000, SGD_SHM, LOOP, 0.7),
    Target("shm vs the bandwidth floor", 100_000, SGD_SHM, BANDWIDTH_FLOOR, 2.0),
    Target("shuffle vs blocks, sgd_dist shm", 100_000, SGD_SHM, SGD_SHM_BLOCKS, 1.3),
)


def measured_row(system: str, d: int, workers: int, global_batch: int, median_ms: float, p90_ms: float,
                 steps: int, **extra) -> Row:
    return Row(system, d, workers, global_batch, steps=steps, median_ms=median_ms, p90_ms=p90_ms,
               samples_per_s=global_batch / (median_ms / 1e3), **extra)


def strongest_loops(rows: list[Row]) -> dict[tuple[str, int, int], Row]:
    """(sampling, d, workers) -> the fastest measured one-process loop there."""
    best: dict[tuple[str, int, int], Row] = {}
    for r in rows:
        if r.system in LOOPS and r.median_ms is not None:
            key = (r.sampling, r.d, r.workers)
            if key not in best or r.median_ms < best[key].median_ms:
                best[key] = r
    return best


def fill_ratios(rows: list[Row], bandwidth_gb_s: float | None) -> list[Row]:
    """Each row's ratio to the strongest loop of its sampling (same d and workers, so the same global batch), its
    bandwidth floor and its ratio to that; the strongest loops' notes say so."""
    best = strongest_loops(rows)
    for r in rows:
        loop = best.get((r.sampling, r.d, r.workers))
        r.vs_loop = r.median_ms / loop.median_ms if r.median_ms is not None and loop else None
        if bandwidth_gb_s and r.read_mb is not None:
            r.floor_ms = r.read_mb / bandwidth_gb_s  # MB / (GB/s) = ms
        r.vs_floor = r.median_ms / r.floor_ms if r.median_ms is not None and r.floor_ms else None
    for loop in best.values():
        loop.note = "; ".join(filter(None, [STRONGEST, loop.note]))
    return rows


def bandwidth_of(rows: list[Row]) -> float | None:
    """The memory bandwidth (GB/s) the rows' floors were computed with."""
    for r in rows:
        if r.floor_ms and r.read_mb:
            return r.read_mb / r.floor_ms
    return None


def _find(rows: list[Row], system: str, d: int, workers: int) -> Row | None:
    for r in rows:
        if (r.system, r.d, r.workers) == (system, d, workers):
            return r
    return None


def _median(rows: list[Row], system: str, d: int, workers: int) -> float | None:
    r = _find(rows, system, d, workers)
    return r.median_ms if r is not None else None


def _baseline(rows: list[Row], t: Target, row: Row | None) -> tuple[str, float | None, str]:
    """(what the target is measured against, its milliseconds, why it is not available or '')."""
    if t.baseline == BANDWIDTH_FLOOR:
        return BANDWIDTH_FLOOR, row.floor_ms if row is not None else None, ""
    if t.baseline == LOOP:
        sampling = row.sampling if row is not None else "shuffle"
        loop = strongest_loops(rows).get((sampling, t.d, TARGET_WORKERS))
        return (loop.system if loop else f"{LOOP} ({sampling})"), loop.median_ms if loop else None, ""
    base = _find(rows, t.baseline, t.d, TARGET_WORKERS)
    why = base.note if base is not None and base.note.startswith(NOT_AVAILABLE) else ""
    return t.baseline, base.median_ms if base is not None else None, why


def target_rows(rows: list[Row], startup: dict | None = None) -> list[dict]:
    """Every target with its measured value and PASS or MISS; 'not measured' where a side is missing, and
    'not available: why' where sgd_dist cannot run that way yet."""
    out = []
    for t in TARGETS:
        row = _find(rows, t.system, t.d, TARGET_WORKERS)
        vs, den, why = _baseline(rows, t, row)
        if row is not None and row.note.startswith(NOT_AVAILABLE):
            why = row.note
        num = row.median_ms if row is not None else None
        ratio = num / den if num is not None and den else None
        out.append(target(t.what, t.d, t.system, vs, ratio, t.bound, "x", why))
    for r in rows:
        if r.record_ms_per_step is not None and r.median_ms and r.workers == TARGET_WORKERS:
            out.append(target("metrics recording, share of the step", r.d, r.system, "its own step",
                              r.record_ms_per_step / r.median_ms, 0.05, "%"))
    return out + startup_targets(startup)


def startup_targets(startup: dict | None) -> list[dict]:
    """The start-up targets from ``startup.measure_startup``'s result (all 'not measured' without one)."""
    startup = startup or {}
    local, cluster = startup.get("lesson2") or {}, startup.get("cluster") or {}
    out = [target("1-step lesson2 run vs bare Ray + torch program, start to exit", None, "sgd-dist train",
                  "bare program", local.get("ratio"), STARTUP_BOUND, "x"),
           target("1-step lesson2 run on a running local cluster (--address auto), start to exit", None,
                  "sgd-dist train", "wall clock", cluster.get("median_s"), CLUSTER_BOUND_S, "s")]
    many_workers = startup.get("workers") or {str(k): {} for k in DEFAULT_STARTUP_WORKERS}
    for k, many in sorted(many_workers.items(), key=lambda item: int(item[0])):
        out.append(target(f"setup with {k} workers vs a bare program starting {k} actors that import torch", None,
                          "sgd-dist train", "bare program", many.get("ratio"), MANY_WORKERS_BOUND, "x"))
    return out


def target(what: str, d: int | None, system: str, vs: str, value: float | None, bound: float, unit: str,
           unavailable: str = "") -> dict:
    """One target: ``value`` (a ratio, a share or seconds, as ``unit`` says) against ``bound``."""
    if unavailable:
        verdict = unavailable
    elif value is None:
        verdict = "not measured"
    else:
        verdict = "PASS" if value <= bound else "MISS"
    return {"target": what, "d": d, "system": system, "vs": vs, "value": value, "unit": unit, "bound": bound,
            "verdict": verdict}


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
    lines = ["| system | sampling | d | workers | global batch | median ms/step | p90 ms/step | samples/s | "
             "vs loop | floor ms | vs floor | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sps = "-" if r.samples_per_s is None else f"{r.samples_per_s:,.0f}"
        lines.append(f"| {r.system} | {r.sampling} | {fmt_d(r.d)} | {r.workers} | {r.global_batch} | "
                     f"{fmt_ms(r.median_ms)} | {fmt_ms(r.p90_ms)} | {sps} | {fmt_ratio(r.vs_loop)} | "
                     f"{fmt_ms(r.floor_ms)} | {fmt_ratio(r.vs_floor)} | {r.note} |")
    bandwidth = bandwidth_of(rows)
    memory = ("not measured" if bandwidth is None
              else f"{bandwidth:.1f} GB/s, a tensor copy at all threads (read plus written)")
    lines += ["", "vs loop: against the strongest one-process loop of the same sampling, same d and global batch "
              f"(its note says '{STRONGEST}'); shuffle draws a per-epoch permutation with X[idx], blocks takes "
              "contiguous batches.",
              "floor ms: the bytes a step must read, 4 x (B x (d + 1) + 2 d) for the batch's rows and targets, the "
              f"weights and the gradient, over the memory bandwidth: {memory}."]
    floors = floors_markdown(rows)
    if floors:
        lines += ["", "The baseline of each sampling's ratios, and the physical floor, at each size:", "", floors]
    return "\n".join(lines)


def floors_markdown(rows: list[Row]) -> str:
    """Per size, the strongest one-process loop of each sampling (the baseline of that sampling's ratios) and the
    bandwidth floor; '' when no loop was measured."""
    best = strongest_loops(rows)
    if not best:
        return ""
    head = "".join(f" strongest loop, {sampling} | ms |" for sampling in SAMPLINGS)
    lines = [f"| d | workers | global batch |{head} bandwidth floor ms |", "|---" * (4 + 2 * len(SAMPLINGS)) + "|"]
    for d, k, batch in dict.fromkeys((r.d, r.workers, r.global_batch) for r in rows):
        cells = []
        for sampling in SAMPLINGS:
            loop = best.get((sampling, d, k))
            cells += [loop.system, fmt_ms(loop.median_ms)] if loop else ["not measured", "-"]
        floor = next((r.floor_ms for r in rows if (r.d, r.workers) == (d, k) and r.floor_ms), None)
        lines.append(f"| {fmt_d(d)} | {k} | {batch} | {' | '.join(cells)} | {fmt_ms(floor)} |")
    return "\n".join(lines)


def fmt_value(t: dict) -> tuple[str, str]:
    """A target's value and bound as text: ratios '0.88x' and '<= 1x', shares '3.4 %' and '< 5 %', seconds."""
    value, bound = t["value"], t["bound"]
    if t["unit"] == "%":
        return ("-" if value is None else f"{100 * value:.2g} %"), f"< {100 * bound:g} %"
    if t["unit"] == "s":
        return ("-" if value is None else f"{value:.2f} s"), f"<= {bound:g} s"
    return fmt_ratio(value), f"<= {bound:g}x"


def targets_markdown(targets: list[dict]) -> str:
    lines = ["| target | d | system | vs | measured | bound | verdict |", "|---|---|---|---|---|---|---|"]
    for t in targets:
        d = "-" if t["d"] is None else fmt_d(t["d"])
        value, bound = fmt_value(t)
        lines.append(f"| {t['target']} | {d} | {t['system']} | {t['vs']} | {value} | {bound} | {t['verdict']} |")
    return "\n".join(lines)


def startup_markdown(startup: dict) -> str:
    """The start-up section: each program's runs and median, command start to exit (and setup for many workers)."""
    if startup.get("note"):
        return f"Start-up: {startup['note']}"
    lines = ["| start-up | runs | median s | note |", "|---|---|---|---|"]
    local = startup.get("lesson2") or {}
    if local.get("note"):
        lines.append(f"| 1-step lesson2 run, local Ray | - | - | {local['note']} |")
    elif local:
        lines += [f"| `sgd-dist train --config {startup['config_name']} train.steps=1`, start to exit | "
                  f"{len(local['sgd_dist_s'])} | {local['sgd_dist_median_s']:.2f} | |",
                  f"| bare program: import torch and Ray, local Ray, {local['workers']} actors importing torch, "
                  f"shutdown | {len(local['bare_s'])} | {local['bare_median_s']:.2f} | ratio {local['ratio']:.2f}x |"]
    cluster = startup.get("cluster") or {}
    if cluster:
        label = "the same with `--address auto`, on a running local cluster, start to exit"
        lines.append(f"| {label} | - | - | {cluster['note']} |" if cluster.get("note") else
                     f"| {label} | {len(cluster['sgd_dist_s'])} | {cluster['median_s']:.2f} | |")
    for k, many in sorted((startup.get("workers") or {}).items(), key=lambda item: int(item[0])):
        if many.get("note"):
            lines.append(f"| setup with {k} workers | - | - | {many['note']} |")
            continue
        lines += [f"| `sgd-dist train` with {k} workers: setup (summary's setup_time_s) | "
                  f"{len(many['sgd_dist_setup_s'])} | {many['sgd_dist_setup_median_s']:.2f} | "
                  f"start to exit {many['sgd_dist_median_s']:.2f} s |",
                  f"| bare program with {k} actors: ray.init to every actor's first answer | "
                  f"{len(many['bare_setup_s'])} | {many['bare_setup_median_s']:.2f} | "
                  f"start to exit {many['bare_median_s']:.2f} s; setup ratio {many['ratio']:.2f}x |"]
    return "\n".join(lines)


# -- files -----------------------------------------------------------------------------------------------

COLUMNS = [f.name for f in fields(Row)]
_INTS = {f.name for f in fields(Row) if f.type == "int"}
_FLOATS = {f.name for f in fields(Row) if "float" in f.type}


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
    """ms/step of every system, grouped by d, log scale, one panel per worker count, each group's bandwidth floor
    a dashed line; from results.csv only."""
    from matplotlib import colormaps
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
    colors = [colormaps["tab20"](i % 20) for i in range(len(systems))]
    for ax, k in zip(axes, workers, strict=True):
        for i, system in enumerate(systems):
            xs, ys = [], []
            for j, d in enumerate(dims):
                value = _median(rows, system, d, k)
                if value is not None:
                    xs.append(j - 0.4 + width * (i + 0.5))
                    ys.append(value)
            ax.bar(xs, ys, width=width, color=colors[i], label=system)
        floors = [(j, next((r.floor_ms for r in all_rows if (r.d, r.workers) == (d, k) and r.floor_ms), None))
                  for j, d in enumerate(dims)]
        for n, (j, floor) in enumerate((j, f) for j, f in floors if f):
            ax.hlines(floor, j - 0.45, j + 0.45, colors="k", linestyles="--", linewidth=1,
                      label="bandwidth floor" if n == 0 else None)
        ax.set_yscale("log")
        ax.set_xticks(range(len(dims)), [f"d={fmt_d(d)}" for d in dims])
        ax.set_title(f"{k} worker{'s' if k > 1 else ''} x {all_rows[0].global_batch // all_rows[0].workers} rows")
        ax.grid(True, axis="y", which="both", alpha=0.3)
    axes[0].set_ylabel("median ms per step (log)")
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 1.5 / fig.get_figwidth(), 1))
    fig.savefig(png_path, dpi=110)
    return png_path
