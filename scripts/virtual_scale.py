"""How far the virtual backend scales on this machine: the default problem (configs/default.yaml) on 1,024 workers,
async for 20,000 updates and sync for 200 updates of 1,024 answers, then 10,000 workers; each run in a process of
its own, so its peak RSS is its own. Prints a markdown table: wall and CPU seconds of the run (its process's CPU:
on a loaded machine the wall time is partly waiting for a core), the setup (data, workers), the exact reference and
the loop apart, the loop's real microseconds per command (answers and evaluations), peak RSS, the virtual time,
the median staleness, and the load average before and after each run (wall times are load-sensitive; the
virtual numbers are not).

usage: .venv/bin/python scripts/virtual_scale.py [--quick] [--growth] [--only CASE ...] [--profile CASE] [--out DIR]
  --quick      a tenth of the updates (a smoke test of the script)
  --growth     instead: how the cost grows with K, async (5,000 updates, or 4 a worker) and sync (51,200
               answers) at K = 64 ... 10,000, batch 64 throughout (a shard of 10,000 workers holds 100 rows)
  --profile C  run only case C under cProfile and print its top functions (by own time) on stderr
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
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
GROWTH_K = (64, 256, 1024, 4096, 10000)
GROWTH_SYNC_ANSWERS = 51_200


def growth_cases() -> dict[str, list[str]]:
    """The --growth series: about the same work at every K (async: 5,000 updates, or 4 per worker where that is
    more, so that every worker is in its steady state), evaluated only at the start and the end."""
    common = ["train.batch_size=64", "train.eval_every=0", "optim.warmup_steps=0"]
    cases = {}
    for k in GROWTH_K:
        cases[f"async-{k}"] = [f"cluster.num_workers={k}", "train.mode=async", f"train.steps={max(5000, 4 * k)}",
                               "optim.staleness_lr=true", *common]
    for k in GROWTH_K:
        steps = max(1, GROWTH_SYNC_ANSWERS // k)
        cases[f"sync-{k}"] = [f"cluster.num_workers={k}", "train.mode=sync", f"train.steps={steps}", *common]
    return cases


def one(name: str, overrides: list[str], out: Path, quick: bool, profile: bool) -> dict:
    """Run case ``name`` in this process; return what the table shows."""
    from sgd_dist.config import load_config
    from sgd_dist.engine.evaluations import eval_steps
    from sgd_dist.run.trainer import train

    if quick:
        overrides = [o if not o.startswith("train.steps=") else f"train.steps={max(1, int(o.split('=')[1]) // 10)}"
                     for o in overrides] + ["optim.warmup_steps=0"]
    config = load_config(ROOT / "configs" / "default.yaml",
                         [*overrides, "cluster.backend=virtual", "train.log_every=0", "output.plots=false",
                          "train.checkpoint_every=0", f"output.dir={out / name}"])
    load_before = os.getloadavg()[0]
    t0, cpu0 = time.perf_counter(), time.process_time()
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        profiler.enable()
    summary = train(config, console=False, progress=False).summary
    if profiler is not None:
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(30)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    k = config.cluster.num_workers
    answers = summary["steps"] * (1 if config.train.mode == "async" else k)
    commands = answers + k * len(eval_steps(config.train.steps, config.train.eval_every))  # the evaluations' too
    loop_s = summary["wall_time_s"] - summary["setup_time_s"] - summary["reference_time_s"]
    return {"case": name, "workers": config.cluster.num_workers, "updates": summary["steps"], "answers": answers,
            "wall_s": wall, "cpu_s": cpu, "setup_s": summary["setup_time_s"],
            "reference_s": summary["reference_time_s"], "loop_s": loop_s, "commands": commands,
            "us_per_command": 1e6 * loop_s / commands,
            "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9, "virtual_s": summary["time_model"]["end_s"],
            "median_staleness": summary["staleness"]["median"], "gap": summary["relative_optimality_gap"],
            "load": [load_before, os.getloadavg()[0]]}


HEADER = ["case", "K", "answers", "wall s", "CPU s", "setup s", "reference s", "loop s", "loop us/command",
          "peak RSS GB", "virtual s", "median staleness", "relative gap", "load (1 min) before/after"]


def markdown_row(r: dict) -> str:
    gap = "-" if r["gap"] is None else f"{r['gap']:.2e}"
    cells = [r["case"], f"{r['workers']:,}", f"{r['answers']:,}", f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}",
             f"{r['setup_s']:.1f}", f"{r['reference_s']:.1f}", f"{r['loop_s']:.1f}", f"{r['us_per_command']:.0f}",
             f"{r['peak_rss_gb']:.2f}", f"{r['virtual_s']:.3f}", f"{r['median_staleness']:g}", gap,
             f"{r['load'][0]:.1f} / {r['load'][1]:.1f}"]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--growth", action="store_true")
    parser.add_argument("--profile", metavar="CASE")
    parser.add_argument("--only", nargs="+", metavar="CASE", help="run only these cases")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # the child process's one case
    args = parser.parse_args()
    cases = growth_cases() if args.growth else CASES
    for name in [*filter(None, (args.case, args.profile)), *(args.only or [])]:
        if name not in cases:
            parser.error(f"no case {name!r}{' in --growth' if args.growth else ''}; choose from {', '.join(cases)}")
    out = args.out or Path(tempfile.mkdtemp(prefix="virtual-scale-"))
    if args.case or args.profile:
        name = args.case or args.profile
        print(json.dumps(one(name, cases[name], out, args.quick, args.profile is not None)), flush=True)
        return
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"<!-- {sys.executable} {' '.join(sys.argv)}; {os.cpu_count()} cores; uptime at the start: {uptime} -->")
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER), flush=True)
    for name in args.only or cases:
        command = [sys.executable, __file__, "--case", name, "--out", str(out)]
        command += ["--quick"] * args.quick + ["--growth"] * args.growth
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines() or ["no output"]
            print(f"| {name} | failed: {lines[-1]} |" + " |" * (len(HEADER) - 2), flush=True)
            continue
        print(markdown_row(json.loads(proc.stdout.strip().splitlines()[-1])), flush=True)


if __name__ == "__main__":
    main()
