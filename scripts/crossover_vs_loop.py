"""Where distributing pays against the loop a user would write: the crossover experiment and the strongest
one-process loop of the same sampling, measured in one invocation.

Runs (or resumes) the sweep of configs/experiments/crossover.yaml, then times, at each of its feature counts, the
one-process loop of the benchmark (``sgd_dist.bench.floor.run_loop``: torch's default threads, the same global
batch, batches drawn from a per-epoch permutation with ``X[idx]``, the gradient by autograd and written out, the
faster kept). Writes crossover_vs_loop.md (the table) and crossover_vs_loop.png under the sweep's directory, and
prints the table. A ratio below 1 means sgd_dist's step at that K is faster than the one-process loop.

usage: .venv/bin/python scripts/crossover_vs_loop.py [--out runs/crossover] [--steps 200]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sgd_dist.bench.floor import GRADIENTS, run_loop  # noqa: E402
from sgd_dist.bench.problem import Problem, measured_intervals, step_stats  # noqa: E402
from sgd_dist.study.experiment import load_experiment  # noqa: E402
from sgd_dist.study.sweep import run_sweep  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = ROOT / "configs" / "experiments" / "crossover.yaml"
WARMUP = 20


def loop_ms(n_features: int, global_batch: int, steps: int) -> tuple[float, str]:
    """The strongest shuffle loop's median ms/step at this size, and which gradient form it was."""
    problem = Problem(dim=n_features + 1, num_workers=1, batch_size=global_batch)
    best = None
    for gradient in GRADIENTS:
        stamps, _ = run_loop(problem, WARMUP + steps, "shuffle", gradient)
        median, _ = step_stats(measured_intervals(stamps, WARMUP))
        if best is None or median < best[0]:
            best = (median, gradient)
    return best


def sweep_ms(results: Path) -> dict[tuple[int, int], float]:
    """(n_features, workers) -> the mean over repeats of each run's median ms/step."""
    cells: dict[tuple[int, int], list[float]] = {}
    with open(results) as f:
        for row in csv.DictReader(f):
            if row["status"] == "completed" and row["median_step_ms"]:
                key = (int(row["n_features"]), int(row["num_workers"]))
                cells.setdefault(key, []).append(float(row["median_step_ms"]))
    return {key: statistics.fmean(values) for key, values in cells.items()}


def table(loops: dict[int, tuple[float, str]], steps: dict[tuple[int, int], float], workers: list[int]) -> list[str]:
    head = ["features", "one-process loop ms", *[f"K={k} ms" for k in workers], "best K",
            "best K vs loop", "best K vs K=1"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for nf, (loop, form) in sorted(loops.items()):
        ks = {k: steps[(nf, k)] for k in workers if (nf, k) in steps}
        best = min(ks, key=ks.get)
        cells = [f"{nf:,}", f"{loop:.3g} ({'written-out' if form == 'formula' else form})",
                 *[f"{ks[k]:.3g}" if k in ks else "-" for k in workers], str(best),
                 f"{ks[best] / loop:.2f}x", f"{ks[best] / ks[min(ks)]:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def figure(loops: dict[int, tuple[float, str]], steps: dict[tuple[int, int], float], workers: list[int],
           path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    features = sorted(loops)
    ax.plot(features, [loops[nf][0] for nf in features], "k-", marker="s", label="one-process loop (all cores)")
    for k in workers:
        xs = [nf for nf in features if (nf, k) in steps]
        ax.plot(xs, [steps[(nf, k)] for nf in xs], marker="o", label=f"sgd_dist sync, {k} worker{'s' * (k > 1)}")
    ax.set(xscale="log", yscale="log", xlabel="features", ylabel="ms per update (median)",
           title="Global batch of 4,096 rows: sgd_dist against the one-process loop")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/crossover", help="the sweep's directory (resumed if it exists)")
    parser.add_argument("--steps", type=int, default=200, help="measured steps of each one-process loop")
    args = parser.parse_args(argv)
    sweep = load_experiment(EXPERIMENT)
    out = Path(args.out)
    run_sweep(sweep, out)
    grid = sweep.experiment.grid
    features, workers = list(grid["data.n_features"]), sorted(grid["cluster.num_workers"])
    loops = {nf: loop_ms(nf, sweep.experiment.global_batch[0], args.steps) for nf in features}
    lines = table(loops, sweep_ms(out / "results.csv"), workers)
    (out / "crossover_vs_loop.md").write_text("\n".join(lines) + "\n")
    figure(loops, sweep_ms(out / "results.csv"), workers, out / "crossover_vs_loop.png")
    print("\n".join(lines))
    print(f"written: {out / 'crossover_vs_loop.md'}, {out / 'crossover_vs_loop.png'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
