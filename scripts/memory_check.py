"""Measure where the data lives: driver and worker peak memory as the dataset grows.

Runs ``sgd-dist train`` once per dataset size (one after another, never two at once) on a fresh embedded
Ray, with 2 workers and a few steps, and prints one table from the runs' summaries: rows, the data each
worker holds, each worker's peak RSS, the driver's peak RSS, and the setup / reference / training times.
The driver's memory should stay flat in the number of rows: the workers generate their shards where they
live and only gradients, weights and d x d statistics travel.

    .venv/bin/python scripts/memory_check.py                 # 1e6, 1e7, 1e8 rows x 10 features
    .venv/bin/python scripts/memory_check.py --rows 1e6 1e7  # a quicker look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

GB = 1e9


def run(rows: int, features: int, steps: int, out: Path) -> dict:
    cmd = [str(Path(sys.executable).with_name("sgd-dist")), "train", "--config", "configs/default.yaml",
           "--out", str(out), "--no-progress", f"data.n_samples={rows}", f"data.n_features={features}",
           f"train.steps={steps}", "train.eval_every=0", "train.log_every=0", "optim.schedule=constant",
           "optim.warmup_steps=0", "output.plots=false"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", type=float, default=[1e6, 1e7, 1e8])
    parser.add_argument("--features", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    header = ("rows", "data/worker GB", "worker peak RSS GB", "driver peak RSS GB", "setup s", "reference s",
              "train s")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    with tempfile.TemporaryDirectory() as tmp:
        for i, rows in enumerate(args.rows):
            s = run(int(rows), args.features, args.steps, Path(tmp) / f"run{i}")
            workers = s["workers"]
            print(" | ".join([
                f"{int(rows):,}",
                "/".join(f"{w['data_bytes'] / GB:.2f}" for w in workers),
                "/".join(f"{w['peak_rss_bytes'] / GB:.2f}" for w in workers),
                f"{s['driver_peak_rss_bytes'] / GB:.2f}",
                f"{s['setup_time_s']:.1f}", f"{s['reference_time_s']:.1f}", f"{s['train_time_s']:.1f}",
            ]), flush=True)


if __name__ == "__main__":
    main()
