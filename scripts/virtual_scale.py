"""How far the virtual backend scales on this machine: the default problem (configs/default.yaml) on 1,024 workers,
async for 20,000 updates and sync for 200 updates of 1,024 answers, then 10,000 workers; each run in a process of
its own, so its peak RSS is its own. Prints wall and CPU seconds (the process's own: on a loaded machine the wall
time is mostly waiting for a core), peak RSS, the virtual time and the median staleness. Setup (generating
the data, the workers, the exact reference) is included.

usage: .venv/bin/python scripts/virtual_scale.py [--quick] [--profile RUN] [--out DIR]
  --quick      a tenth of the updates (a smoke test of the script)
  --profile R  run only case R (async-1024, sync-1024, async-10000) under cProfile and print its top functions
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = {  # name -> overrides of configs/default.yaml
    # async at K = 1,024 with the default learning rate diverges unless each gradient's step is divided by its
    # staleness (optim.staleness_lr)
    "async-1024": ["cluster.num_workers=1024", "train.mode=async", "train.steps=20000", "train.eval_every=5000",
                   "optim.staleness_lr=true"],
    "sync-1024": ["cluster.num_workers=1024", "train.mode=sync", "train.steps=200", "train.eval_every=100"],
    # 100 rows a shard: batches of 64 (the default 256 is more than a shard)
    "async-10000": ["cluster.num_workers=10000", "train.mode=async", "train.steps=20000", "train.eval_every=10000",
                    "train.batch_size=64", "optim.staleness_lr=true"],
}


def one(name: str, out: Path, quick: bool, profile: bool) -> dict:
    """Run case ``name`` in this process; return what the benchmark prints."""
    from sgd_dist.config import load_config
    from sgd_dist.run.trainer import train

    overrides = list(CASES[name])
    if quick:
        overrides = [o if not o.startswith("train.steps=") else f"train.steps={int(o.split('=')[1]) // 10}"
                     for o in overrides] + ["optim.warmup_steps=0"]
    config = load_config(ROOT / "configs" / "default.yaml",
                         [*overrides, "cluster.backend=virtual", "train.log_every=0", "output.plots=false",
                          "train.checkpoint_every=0", f"output.dir={out / name}"])
    t0 = time.perf_counter()
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        profiler.enable()
    summary = train(config, console=False, progress=False).summary
    if profiler is not None:
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"case": name, "wall_s": time.perf_counter() - t0, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9,
            "answers": summary["steps"] * (1 if config.train.mode == "async" else config.cluster.num_workers),
            "virtual_s": summary["time_model"]["end_s"], "median_staleness": summary["staleness"]["median"],
            "gap": summary["relative_optimality_gap"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--profile", choices=sorted(CASES))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)  # the child process's one case
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="virtual-scale-"))
    if args.case or args.profile:
        print(json.dumps(one(args.case or args.profile, out, args.quick, args.profile is not None)), flush=True)
        return
    print(f"{'case':<12} {'wall s':>8} {'CPU s':>8} {'peak RSS GB':>12} {'answers':>9} {'answers/s':>10} "
          f"{'virtual s':>10} {'median staleness':>17} {'relative gap':>13}")
    for name in CASES:
        command = [sys.executable, __file__, "--case", name, "--out", str(out)] + (["--quick"] if args.quick else [])
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{name:<12} failed: {proc.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        gap = "-" if r["gap"] is None else f"{r['gap']:.2e}"
        print(f"{r['case']:<12} {r['wall_s']:>8.1f} {r['cpu_s']:>8.1f} {r['peak_rss_gb']:>12.2f} {r['answers']:>9,} "
              f"{r['answers'] / r['wall_s']:>10,.0f} {r['virtual_s']:>10.3f} {r['median_staleness']:>17} {gap:>13}")


if __name__ == "__main__":
    main()
