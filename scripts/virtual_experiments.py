"""The literature at cluster scale, on virtual clusters: runs the shipped configs/experiments/virtual_*.yaml sweeps
(or reads them where they are done: a sweep resumes), draws one figure per experiment and prints its numbers as a
markdown table, for docs/experiments.md.

usage: .venv/bin/python scripts/virtual_experiments.py [--only NAME ...] [--runs DIR] [--figures DIR]
                                                       [--profile PROFILE.json]
  --only      some of: async_staleness, backup, local_sgd, strong_scaling (default: all four)
  --runs      where the sweeps go (default runs/virtual_experiments; each in DIR/NAME)
  --figures   where the PNGs go (default docs/)
  --profile   a time profile (sgd-dist calibrate's) for every run instead of the shipped one; the sweeps then go
              in DIR/NAME-<profile file's stem>

Every number is virtual time from the time model (deterministic: the machine's load changes how long this takes,
never what it prints). Each sweep is the same as ``sgd-dist sweep --config configs/experiments/virtual_NAME.yaml
--out DIR/NAME``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sgd_dist.backends.virtual import load_profile
from sgd_dist.core.time_model import compute_s, message_s, server_answer_s, server_update_s
from sgd_dist.engine.delays import message_bytes
from sgd_dist.run.rundir import CONFIG_FILE, SUMMARY_FILE, read_summary
from sgd_dist.study.experiment import load_experiment
from sgd_dist.study.results import RESULTS_FILE, RUNS_DIR, read_results
from sgd_dist.study.sweep import run_sweep

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ("async_staleness", "backup", "local_sgd", "strong_scaling")
EXPLODED = 100.0  # async's figure draws a final relative gap above this at this height, as a diverged run


def experiment_file(name: str, runs: Path, profile: Path | None) -> Path:
    """The shipped experiment file, or (with a profile) a copy of it that names the profile, written under runs."""
    path = ROOT / "configs" / "experiments" / f"virtual_{name}.yaml"
    if profile is None:
        return path
    raw = yaml.safe_load(path.read_text())
    raw["base"] = str((path.parent / raw["base"]).resolve())
    raw["overrides"] = [*raw.get("overrides", []), f"cluster.virtual.profile={profile.resolve()}"]
    copy = runs / f"virtual_{name}-{profile.stem}.yaml"
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_text(yaml.safe_dump(raw, sort_keys=False))
    return copy


def run(name: str, runs: Path, profile: Path | None) -> Path:
    """Run (or resume) one experiment's sweep; its directory."""
    out = runs / (name if profile is None else f"{name}-{profile.stem}")
    result = run_sweep(load_experiment(experiment_file(name, runs, profile)), out, plots=False, progress=False)
    print(f"{name}: {result.ran} runs made, {result.kept} kept, {result.failed} failed -> {out}", file=sys.stderr)
    return out


def completed(out: Path) -> list[dict]:
    """results.csv's rows, each with its summary (the diverged ones too: their summary says so)."""
    rows = []
    for row in read_results(out / RESULTS_FILE):
        run_dir = out / RUNS_DIR / row["run"]
        row["summary"] = read_summary(run_dir) if (run_dir / SUMMARY_FILE).is_file() else {}
        row["config"] = yaml.safe_load((run_dir / CONFIG_FILE).read_text()) if (run_dir / CONFIG_FILE).is_file() else {}
        rows.append(row)
    return rows


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)


def _fmt(value, spec: str = ".3g", none: str = "-") -> str:
    return none if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def _target(out: Path) -> float:
    return float(yaml.safe_load((out / "experiment.yaml").read_text())["experiment"]["target_gap"])


# -- async: the gap after a fixed number of samples against K ---------------------------------------------------
def async_staleness(out: Path, figure: Path) -> list[str]:
    rows = completed(out)
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for i, aware in enumerate(["false", "true"]):
        group = sorted((r for r in rows if r["optim.staleness_lr"] == aware), key=lambda r: r["num_workers"])
        shown = [r for r in group if r["status"] == "completed" and r["final_relative_gap"] <= EXPLODED]
        label = "lr / staleness (optim.staleness_lr)" if aware == "true" else "plain lr"
        ax.plot([r["num_workers"] for r in shown], [r["final_relative_gap"] for r in shown], "o-", color=f"C{i}",
                label=label)
        gone = [r["num_workers"] for r in group if r not in shown]
        if gone:
            ax.plot(gone, [EXPLODED] * len(gone), "x", color=f"C{i}", ms=10, mew=2,
                    label=f"{label}: diverged, or a gap above {EXPLODED:g} (drawn at {EXPLODED:g})")
    ax.set_xscale("log", base=2)
    ax.set(yscale="log", xlabel="workers K (an update's staleness is about K - 1)",
           ylabel="relative optimality gap after 5,000 updates (1.28 M samples)",
           title="async SGD on a virtual cluster: the gap after a fixed number of samples")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, figure)
    lines = ["| K | median staleness | gap, plain lr | gap, lr / staleness | virtual s |", "|---|---|---|---|---|"]
    by_k: dict[int, dict[str, dict]] = {}
    for r in rows:
        by_k.setdefault(r["num_workers"], {})[r["optim.staleness_lr"]] = r
    for k, pair in sorted(by_k.items()):
        cells = []
        for aware in ("false", "true"):
            r = pair.get(aware)
            gap = None if r is None else _fmt(r["final_relative_gap"], ".2e")
            cells.append("-" if r is None else "diverged" if r["status"] == "diverged" else gap)
        any_run = pair.get("true") or pair.get("false")
        stale = (any_run["summary"].get("staleness") or {}).get("median")
        lines.append(f"| {k:,} | {_fmt(stale, 'g')} | {cells[0]} | {cells[1]} | "
                     f"{_fmt(any_run.get('train_time_s'), '.3f')} |")
    return lines


# -- backup workers: time to target against b ---------------------------------------------------------------------
def _backup_label(r: dict) -> str:
    if r["mode"] == "async":
        optim = r["config"]["optim"]
        return f"async, lr {optim['lr']:g}" + (" / staleness" if optim["staleness_lr"] else "")
    return "sync (b = 0)" if r["mode"] == "sync" else f"b = {r['summary']['backup_workers']}"


def backup(out: Path, figure: Path) -> list[str]:
    rows = [r for r in completed(out) if r["status"] == "completed"]
    target = _target(out)
    sync_like = sorted((r for r in rows if r["mode"] in ("sync", "backup")),
                       key=lambda r: r["summary"].get("backup_workers", 0))
    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.subplots()
    bs = [r["summary"].get("backup_workers", 0) for r in sync_like]
    xs = [max(b, 0.5) for b in bs]  # b = 0 drawn at 0.5 on the log axis
    _time_to_target(ax, xs, sync_like, "sync (b = 0, drawn at 0.5) and backup workers b",
                    "target not reached in 200 updates")
    steps_ax = ax.twinx()
    steps_ax.plot(xs, [r["target_step"] for r in sync_like], "s--", color="C2", alpha=0.6,
                  label="updates to the target (right)")
    for i, r in enumerate(r for r in rows if r["mode"] == "async" and r["target_time_s"] is not None):
        ax.axhline(r["target_time_s"], color=f"C{3 + i}", ls=":",
                   label=f"{_backup_label(r)} ({r['target_time_s']:.3g} s)")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="backup workers b (an update averages the first K - b of K = 256 answers)",
           ylabel="virtual seconds to the target gap", yscale="log",
           title=f"backup workers at K = 256 with exponential straggler delays: time to relative gap {target:g}")
    steps_ax.set(ylabel="updates to the target gap (dashed)", yscale="log")
    ax.grid(True, which="both", alpha=0.3)
    handles = ax.get_legend_handles_labels()[0] + steps_ax.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8)
    _save(fig, figure)
    lines = ["| mode | median update ms | updates to target | virtual s to target | final gap | dropped answers |",
             "|---|---|---|---|---|---|"]
    for r in [*sync_like, *(r for r in rows if r["mode"] == "async")]:
        lines.append(f"| {_backup_label(r)} | {_fmt(r['median_step_ms'])} | {_fmt(r['target_step'], 'd')} | "
                     f"{_fmt(r['target_time_s'])} | {_fmt(r['final_relative_gap'], '.2e')} | "
                     f"{r['summary'].get('num_dropped', 0):,} |")
    return lines


def _time_to_target(ax, xs: list, rows: list[dict], label: str, missed_label: str) -> None:
    """Each run's time to the target against its x; the runs that missed it as crosses above the slowest that
    reached it."""
    reached = [(x, r["target_time_s"]) for x, r in zip(xs, rows) if r["target_time_s"] is not None]
    ax.plot([p[0] for p in reached], [p[1] for p in reached], "o-", color="C0", label=label)
    missed = [x for x, r in zip(xs, rows) if r["target_time_s"] is None]
    if missed:
        top = max(p[1] for p in reached) * 1.5
        ax.plot(missed, [top] * len(missed), "x", color="C0", ms=10, mew=2,
                label=f"{missed_label} (drawn at {top:.2g} s)")


# -- local SGD: time to target against H --------------------------------------------------------------------------
def local_sgd(out: Path, figure: Path) -> list[str]:
    rows = sorted((r for r in completed(out) if r["status"] == "completed"), key=lambda r: r["summary"]["local_steps"])
    target = _target(out)
    hs = [r["summary"]["local_steps"] for r in rows]
    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.subplots()
    _time_to_target(ax, hs, rows, "virtual seconds to the target", "target not reached in 1,024 local steps")
    gap_ax = ax.twinx()
    gap_ax.plot(hs, [r["final_relative_gap"] for r in rows], "s--", color="C1", alpha=0.7,
                label="final gap after 1,024 local steps (right)")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="local steps H between two averagings", ylabel="virtual seconds to the target gap", yscale="log",
           title=f"local SGD, K = 64, 1 Gbit/s and 1 ms: time to relative gap {target:g}")
    gap_ax.set(ylabel="final relative gap (dashed)", yscale="log")
    ax.grid(True, which="both", alpha=0.3)
    handles = ax.get_legend_handles_labels()[0] + gap_ax.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8)
    _save(fig, figure)
    lines = ["| H | rounds | median round ms | rounds to target | virtual s to target | final gap |",
             "|---|---|---|---|---|---|"]
    for h, r in zip(hs, rows):
        lines.append(f"| {h} | {r['steps']} | {_fmt(r['median_step_ms'])} | {_fmt(r['target_step'], 'd')} | "
                     f"{_fmt(r['target_time_s'])} | {_fmt(r['final_relative_gap'], '.2e')} |")
    return lines


# -- sync strong scaling: where the server's link stops the speedup ----------------------------------------------
def modelled_sync_step_s(profile, k: int, global_batch: int, dim: int, latency_s: float,
                         bandwidth_bps: float | None) -> float:
    """A sync step of K workers on their own cores, every worker across the network, from the time model's terms:
    the K commands leave one after another on the server's link (each m = bytes x 8 / bandwidth), each worker
    computes c, its answer crosses the latency and then the link. While the server handles an answer (a) faster than
    the link brings the next (a <= m), the last answer is handled at (K + 1) m + 2 latency + c + a; then the
    update (u)."""
    sent, answered = message_bytes(dim, 4)
    m = message_s(0.0, bandwidth_bps, sent)
    assert sent == answered
    c = compute_s(profile, "gradient", global_batch // k, dim)
    a = server_answer_s(profile, answered)
    last = (k + 1) * m + 2 * latency_s + c + a if a <= m else m + 2 * latency_s + c + k * a
    return last + server_update_s(profile, dim)


def strong_scaling(out: Path, figure: Path) -> list[str]:
    rows = sorted((r for r in completed(out) if r["status"] == "completed"), key=lambda r: r["num_workers"])
    config = yaml.safe_load((out / RUNS_DIR / rows[0]["run"] / "config.yaml").read_text())
    profile = load_profile(config["cluster"]["virtual"]["profile"])
    network, dim = config["cluster"]["network"], config["data"]["n_features"] + bool(config["data"]["bias"])
    latency_s, bandwidth = network["latency_ms"] / 1e3, network["bandwidth_gbps"] * 1e9
    global_batch = rows[0]["global_batch"]
    ks = [r["num_workers"] for r in rows]
    base = rows[0]["samples_per_s"]
    model = [modelled_sync_step_s(profile, k, global_batch, dim, latency_s, bandwidth) for k in ks]
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    ax.plot(ks, [r["samples_per_s"] / base for r in rows], "o", color="C0", ms=7,
            label="virtual runs (samples/s ratio)")
    ax.plot(ks, [model[0] / s for s in model], "-", color="C0", lw=1.2,
            label="(K + 1) m + 2 latency + c(B / K) + a + u, from core/time_model.py")
    ax.plot([1, ks[-1]], [1, ks[-1]], "k--", lw=0.8, alpha=0.6, label="ideal (speedup = K)")
    best = max(rows, key=lambda r: r["samples_per_s"])
    ax.annotate(f"best: K = {best['num_workers']}, {best['samples_per_s'] / base:.1f}x",
                (best["num_workers"], best["samples_per_s"] / base), textcoords="offset points", xytext=(8, 8))
    ax.set_xscale("log", base=2)
    ax.set(yscale="log", xlabel="workers K (global batch 1,024 split over them)", ylabel="speedup over 1 worker",
           title="sync strong scaling, d = 1e5, 10 Gbit/s: the server's link stops the speedup")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, figure)
    lines = ["| K | rows a worker | median step ms | modelled step ms | speedup | efficiency |",
             "|---|---|---|---|---|---|"]
    for r, s in zip(rows, model):
        speedup = r["samples_per_s"] / base
        lines.append(f"| {r['num_workers']:,} | {global_batch // r['num_workers']:,} | {_fmt(r['median_step_ms'])} | "
                     f"{1e3 * s:.3g} | {speedup:.2f} | {speedup / r['num_workers']:.2f} |")
    return lines


DRAW = {"async_staleness": async_staleness, "backup": backup, "local_sgd": local_sgd,
        "strong_scaling": strong_scaling}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=EXPERIMENTS, default=list(EXPERIMENTS))
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "virtual_experiments")
    parser.add_argument("--figures", type=Path, default=ROOT / "docs")
    parser.add_argument("--profile", type=Path)
    args = parser.parse_args()
    args.figures.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        out = run(name, args.runs, args.profile)
        figure = args.figures / f"virtual_{name}.png"
        lines = DRAW[name](out, figure)
        print(f"\n### {name} ({figure}; sweep {out})\n")
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
