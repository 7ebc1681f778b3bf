"""Virtual runs beside real runs of the same configs on this machine: does the virtual clock tell the truth here?

Every case runs twice, for real (the ray backend: shm on one node, or 2 simulated nodes with a network's latency)
and on the virtual backend with the same config (C = this machine's cores shared by every process, the server
included; every worker across the network when there is one, as the real runs' workers all sleep the round trip):

- K = 1 and 2 workers on shm; K = 2 and 4 on 2 simulated nodes with 1 ms and 5 ms of latency;
- sync and async, each without and with a 4x straggler (worker 1; worker 0 when K = 1).

It writes DIR/validation.md (a markdown table: the median step time and the time to the target gap real and
virtual with their % error, the sync runs' final weights bit-equal or not, the async runs' median staleness real
and virtual and their final gaps' ratio, and each target PASS or MISS) and DIR/validation.json (every number).
The targets: step time and time to target within 20 %, sync weights bit-equal, async median staleness equal and
final gaps within 2x. Runs already completed under DIR are kept, so ``--virtual-only`` redoes only the virtual
side (a new profile against the same real runs).

usage: .venv/bin/python scripts/virtual_validation.py [--out DIR] [--profile PROFILE.json] [--cores C]
                                                      [--virtual-only]
The real runs are wall-clock measurements: run it on a quiet machine (it prints the load). About 4-5 minutes
here, most of it Ray starting (a simulated cluster for each simulated-node run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import ray

from sgd_dist.backends.ray.cluster import init_ray
from sgd_dist.config import load_config
from sgd_dist.run.rundir import SUMMARY_FILE, read_metrics, read_summary
from sgd_dist.run.trainer import train
from sgd_dist.study.results import first_below, gap_scale_of

ROOT = Path(__file__).resolve().parent.parent
TARGET_GAP = 2e-2
STEP_TOLERANCE = 0.20  # step time and time to target: within 20 %
GAP_RATIO = 2.0  # async final gaps: within 2x
COMMON = ["data.n_samples=100_000", "optim.schedule=constant", "optim.warmup_steps=0", "optim.lr=0.1",
          "train.batch_size=128", "train.steps=200", "train.eval_every=10", "train.log_every=0",
          "train.checkpoint_every=0", "output.plots=false"]


@dataclass(frozen=True)
class Case:
    workers: int
    where: str  # "shm" or "2 nodes"
    latency_ms: float
    mode: str
    straggler: bool

    @property
    def name(self) -> str:
        net = "" if self.where == "shm" else f"-{self.latency_ms:g}ms"
        return (f"k{self.workers}-{self.where.replace(' ', '')}{net}-{self.mode}"
                + ("-straggler" if self.straggler else ""))

    def overrides(self, steps: int | None = None) -> list[str]:
        """The config both runs share."""
        slow = 1 if self.workers > 1 else 0
        common = COMMON if steps is None else [o for o in COMMON if not o.startswith("train.steps=")] + [
            f"train.steps={steps}"]
        out = [*common, f"cluster.num_workers={self.workers}", f"train.mode={self.mode}",
               f"cluster.network.latency_ms={self.latency_ms:g}"]
        if self.straggler:
            out.append(f"stragglers.slowdown={{{slow}: 4.0}}")
        return out

    def real(self, steps: int | None = None) -> list[str]:
        where = ["cluster.transport=shm"] if self.where == "shm" else ["cluster.simulated_nodes=2"]
        return [*self.overrides(steps), "cluster.backend=ray", *where]

    def virtual(self, cores: int | None, profile: Path | None, steps: int | None = None) -> list[str]:
        extra = [] if cores is None else [f"cluster.virtual.cores={cores}"]
        extra += [] if profile is None else [f"cluster.virtual.profile={profile.resolve()}"]
        return [*self.overrides(steps), "cluster.backend=virtual", *extra]


def cases() -> list[Case]:
    out = []
    for mode in ("sync", "async"):
        for straggler in (False, True):
            out += [Case(k, "shm", 0.0, mode, straggler) for k in (1, 2)]
            out += [Case(k, "2 nodes", latency, mode, straggler) for k in (2, 4) for latency in (1.0, 5.0)]
    return out


def train_once(overrides: list[str], run_dir: Path) -> dict:
    """Train ``overrides`` of configs/default.yaml into ``run_dir``, or keep the run completed there; its summary."""
    if (run_dir / SUMMARY_FILE).is_file() and read_summary(run_dir).get("status") == "completed":
        return read_summary(run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    config = load_config(ROOT / "configs" / "default.yaml", [*overrides, f"output.dir={run_dir}"])
    return train(config, console=False, progress=False).summary


def measure(run_dir: Path, target_gap: float = TARGET_GAP) -> dict:
    """What the comparison needs from one run directory."""
    summary = read_summary(run_dir)
    hit = first_below(read_metrics(run_dir), gap_scale_of(summary), target_gap)
    return {"median_step_ms": summary["median_step_ms"], "target_s": None if hit is None else hit["wall_time_s"],
            "target_step": None if hit is None else hit["step"], "weights": summary["weights"],
            "staleness": (summary.get("staleness") or {}).get("median"),
            "final_gap": summary.get("relative_optimality_gap")}


def error_pct(real: float | None, virtual: float | None) -> float | None:
    """(virtual - real) / real in %, None where either is missing."""
    if real is None or virtual is None or real == 0:
        return None
    return 100.0 * (virtual - real) / real


def compare(case: Case, real: dict, virtual: dict) -> dict:
    """One row of the table: the numbers and each target's verdict (PASS/MISS; None: not this mode's target)."""
    step_err = error_pct(real["median_step_ms"], virtual["median_step_ms"])
    target_err = error_pct(real["target_s"], virtual["target_s"])
    row = {"case": case.name, **asdict(case), "real_step_ms": real["median_step_ms"],
           "virtual_step_ms": virtual["median_step_ms"], "step_err_pct": step_err, "real_target_s": real["target_s"],
           "virtual_target_s": virtual["target_s"], "target_err_pct": target_err,
           "step_time": _verdict(step_err is not None and abs(step_err) <= 100 * STEP_TOLERANCE),
           "time_to_target": _verdict(target_err is not None and abs(target_err) <= 100 * STEP_TOLERANCE)}
    if case.mode == "sync":
        equal = real["weights"] == virtual["weights"]
        row.update(bit_equal=equal, weights=_verdict(equal))
    else:
        ratio = (virtual["final_gap"] / real["final_gap"] if real["final_gap"] and virtual["final_gap"] is not None
                 else None)
        row.update(real_staleness=real["staleness"], virtual_staleness=virtual["staleness"], gap_ratio=ratio,
                   staleness=_verdict(real["staleness"] == virtual["staleness"]),
                   final_gap=_verdict(ratio is not None and 1 / GAP_RATIO <= ratio <= GAP_RATIO))
    return row


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


HEADER = ["case", "real ms/step", "virtual ms/step", "error", "real s to target", "virtual s to target", "error",
          "sync weights bit-equal", "async median staleness real / virtual", "async final gap virtual / real"]


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(rows: list[dict]) -> list[str]:
    """The table, each target's cell with its verdict, then the count of PASS per target."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rows:
        sync = r["mode"] == "sync"
        cells = [r["case"], _num(r["real_step_ms"], ".3f"), _num(r["virtual_step_ms"], ".3f"),
                 f"{_num(r['step_err_pct'], '+.0f')} % {r['step_time']}", _num(r["real_target_s"], ".3f"),
                 _num(r["virtual_target_s"], ".3f"), f"{_num(r['target_err_pct'], '+.0f')} % {r['time_to_target']}",
                 f"{'yes' if r['bit_equal'] else 'no'} {r['weights']}" if sync else "",
                 "" if sync else f"{_num(r['real_staleness'], 'g')} / {_num(r['virtual_staleness'], 'g')} "
                                 f"{r['staleness']}",
                 "" if sync else f"{_num(r['gap_ratio'], '.2f')} {r['final_gap']}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for key, what in [("step_time", "step time within 20 %"), ("time_to_target", "time to target within 20 %"),
                      ("weights", "sync weights bit-equal"), ("staleness", "async median staleness equal"),
                      ("final_gap", "async final gap within 2x")]:
        verdicts = [r[key] for r in rows if key in r]
        lines.append(f"- {what}: {verdicts.count('PASS')} of {len(verdicts)} PASS")
    return lines


def run_cases(selected: list[Case], out: Path, profile: Path | None, cores: int | None, virtual_only: bool,
              steps: int | None = None) -> list[dict]:
    """Every case's real run (shm ones on one embedded Ray, then each simulated-node one on its own cluster) and
    its virtual twin; the comparison rows."""
    if not virtual_only:
        shm = [c for c in selected if c.where == "shm"]
        started = init_ray(num_cpus=os.cpu_count()) if shm else False
        try:
            for case in shm:
                train_once(case.real(steps), out / "real" / case.name)
        finally:
            if started:
                ray.shutdown()
        for case in (c for c in selected if c.where != "shm"):
            train_once(case.real(steps), out / "real" / case.name)
    rows = []
    for case in selected:
        train_once(case.virtual(cores, profile, steps), out / "virtual" / case.name)
        rows.append(compare(case, measure(out / "real" / case.name), measure(out / "virtual" / case.name)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "virtual_validation")
    parser.add_argument("--profile", type=Path, help="a time profile for the virtual runs (default: the shipped one)")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="cluster.virtual.cores (default: this "
                        "machine's)")
    parser.add_argument("--virtual-only", action="store_true", help="keep the real runs under --out; redo the virtual")
    args = parser.parse_args()
    if args.virtual_only:
        shutil.rmtree(args.out / "virtual", ignore_errors=True)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    t0 = time.perf_counter()
    rows = run_cases(cases(), args.out, args.profile, args.cores, args.virtual_only)
    after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    head = [f"<!-- {sys.executable} {' '.join(sys.argv)}; profile {args.profile or 'shipped'}, "
            f"cluster.virtual.cores={args.cores}; {time.perf_counter() - t0:.0f} s; "
            f"uptime before: {uptime}; after: {after} -->", ""]
    lines = head + markdown(rows)
    (args.out / "validation.md").write_text("\n".join(lines) + "\n")
    (args.out / "validation.json").write_text(json.dumps({"rows": rows, "profile": str(args.profile),
                                                          "cores": args.cores, "uptime": [uptime, after]}, indent=1))
    print("\n".join(lines))
    print(f"\nmedian real ms/step {statistics.median(r['real_step_ms'] for r in rows):.3f}; "
          f"written {args.out / 'validation.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
