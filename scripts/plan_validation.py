"""Does the planner rank configs as real runs on this machine do?

Plans ``configs/plan/validation.yaml`` (worker 1 four times slower) for ``configs/clusters/this_machine.yaml``
(2 cores, every worker on the server's node) over sync, async, backup b=1 and local SGD H=2 and 4 at K = 1 and 2
(8 configs: async and backup need two workers) on virtual clusters, then runs the very same configs for real
(``cluster.backend: ray`` on this machine, one at a time, shared memory) and compares the times to the target:
Spearman's rank correlation (target >= 0.8 over >= 6 configs) and the real time of the planner's top choice
against the real best (target within 20 %). Prints PASS or MISS and writes OUT/validation.json.

    .venv/bin/python scripts/plan_validation.py [--out DIR] [--target-gap G] [--cluster FILE] [--virtual-only]

The real runs are timed: run it on a quiet machine (8 runs, each mostly Ray's start-up: a few minutes here).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from sgd_dist.run.rundir import write_json_atomic
from sgd_dist.study import plan as planner
from sgd_dist.study.cluster_spec import load_cluster
from sgd_dist.study.plan_results import compare, parse_budget
from sgd_dist.study.sweep import run_sweep

REPO = Path(__file__).resolve().parents[1]
MODES = "sync,async,backup:1,local_sgd:2,local_sgd:4"


def make_plan(problem: Path, cluster: Path, target_gap: float, out: Path) -> planner.Plan:
    raw = planner.load_problem(problem)
    spec, profile = load_cluster(cluster)
    space = planner.space_from(spec, [1, 2], MODES, [int(raw["train"]["batch_size"])], "none")
    return planner.Plan(out / "plan", problem.resolve(), raw, spec, profile, target_gap, "time", parse_budget(None),
                        space, prune=False)  # every config, to compare with the real runs


def real_times(plan: planner.Plan, out: Path) -> dict[str, float | None]:
    """The same configs (each with its plan run's length) on the ray backend: seconds to the target by config."""
    candidates = [row["candidate"] for row in plan.rows]
    raw = yaml.safe_load(yaml.safe_dump(planner.base_raw(plan)))
    raw["cluster"] = {**raw["cluster"], "backend": "ray", "virtual": {}}
    sweep = planner.stage_sweep(plan, "real", candidates, raw)
    result = run_sweep(sweep, out / "real", plots=False, desc="real runs", model=False)
    return {c.label(): row["target_time_s"] for c, row in zip(candidates, result.rows)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", type=Path, default=REPO / "configs" / "plan" / "validation.yaml")
    parser.add_argument("--cluster", type=Path, default=REPO / "configs" / "clusters" / "this_machine.yaml",
                        help="this machine's description (name a calibrated profile in it)")
    parser.add_argument("--target-gap", type=float, default=5e-3)
    parser.add_argument("--out", type=Path, default=Path("runs") / "plan-validation")
    parser.add_argument("--virtual-only", action="store_true", help="plan only; no real runs")
    args = parser.parse_args()
    plan = make_plan(args.problem, args.cluster, args.target_gap, args.out)
    ranked = planner.run_plan(plan)
    for line in planner.report(plan, ranked):
        print(line)
    if args.virtual_only:
        return 0
    virtual = {row["config"]: row.get("time_to_target_s") for row in plan.rows}
    comparison = compare(virtual, real_times(plan, args.out))
    for line in comparison.lines():
        print(line)
    write_json_atomic(args.out / "validation.json", {
        "configs": comparison.configs, "virtual_s": comparison.virtual_s, "real_s": comparison.real_s,
        "spearman": comparison.rho, "top": comparison.top, "real_best": comparison.real_best,
        "top_over_best": comparison.top_over_best, "passed": comparison.passed,
        "problem": str(args.problem), "cluster": str(args.cluster), "target_gap": args.target_gap})
    print(json.dumps({"passed": comparison.passed, "spearman": comparison.rho}))
    return 0 if comparison.passed else 1


if __name__ == "__main__":
    sys.exit(main())
