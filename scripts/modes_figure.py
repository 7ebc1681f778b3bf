"""Compare the consistency modes on one problem: optimality gap against updates, samples and wall time.

Runs ``sgd-dist train``'s function once per mode (one after another, on one embedded Ray), then draws one
figure from the runs' metrics files. The modes figures of docs/experiments.md are made with the defaults:

    .venv/bin/python scripts/modes_figure.py --out docs/modes.png
    .venv/bin/python scripts/modes_figure.py --slowdown 1:4 --out docs/modes_straggler.png   # worker 1 4x slower
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sgd_dist.config import load_config
from sgd_dist.run.rundir import read_metrics
from sgd_dist.run.trainer import train

ROOT = Path(__file__).resolve().parent.parent
MODES = {
    "sync": [],
    "async": ["train.mode=async"],
    "ssp (s=2)": ["train.mode=ssp", "train.staleness_bound=2"],
    "backup (b=1)": ["train.mode=backup", "train.backup_workers=1"],
    "local_sgd (H=4)": ["train.mode=local_sgd", "train.local_steps=4"],  # a quarter of the rounds: the same samples
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/modes.png")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--slowdown", help="WORKER:FACTOR, a straggler (stragglers.slowdown)")
    args = parser.parse_args()
    straggler = []
    if args.slowdown:
        worker, factor = args.slowdown.split(":")
        straggler = [f"stragglers.slowdown={{{int(worker)}: {float(factor)}}}"]
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, overrides) in enumerate(MODES.items()):
            steps = args.steps // 4 if "train.mode=local_sgd" in overrides else args.steps
            config = load_config(ROOT / "configs" / "default.yaml", [
                "data.n_samples=1e5", f"train.steps={steps}", "train.eval_every=25", "train.log_every=0",
                f"cluster.num_workers={args.workers}", "optim.warmup_steps=0", *overrides, *straggler,
                f"output.dir={tmp}/{i}", "output.plots=false"])
            summary = train(config, console=False, progress=False).summary
            runs[name] = (read_metrics(Path(tmp) / str(i)), summary)
            print(f"{name}: {summary['steps']} updates in {summary['train_time_s']:.2f} s, relative gap "
                  f"{summary['relative_optimality_gap']:.2e}, transport {summary['transport']}", flush=True)
    fig = Figure(figsize=(15, 4.6), layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)
    for name, (rows, _summary) in runs.items():
        evals = [r for r in rows if r.get("optimality_gap") is not None and r["optimality_gap"] > 0]
        for ax, key in zip(axes, ["step", "samples_seen", "wall_time_s"]):
            ax.plot([r[key] for r in evals], [r["optimality_gap"] for r in evals], "o-", ms=2.5, label=name)
    for ax, label in zip(axes, ["updates (rounds for local_sgd)", "samples seen", "wall time (s)"]):
        ax.set(xlabel=label, yscale="log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("optimality gap f(w) - f(w*)")
    axes[0].legend()
    slow = f"; worker {args.slowdown.split(':')[0]} {args.slowdown.split(':')[1]}x slower" if args.slowdown else ""
    fig.suptitle(f"consistency modes: 1e5 rows x 11 parameters, {args.workers} workers x 256, cosine lr 0.2"
                 f"{slow} (one 2-core machine, shm transport)")
    FigureCanvasAgg(fig)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(args.out)


if __name__ == "__main__":
    main()
