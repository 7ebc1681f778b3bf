"""sgd-dist plan: the known best on toy clusters where it is computable by hand, resume, the budget, bad cluster
descriptions as one-line errors, plan.csv's numbers against the runs' own files, the figure from plan.csv alone,
the recommendation from the numbers, and the rank comparison with real runs. Virtual runs only (no Ray), tiny
problems; no timing in any assert."""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from conftest import assert_png

from sgd_dist.cli import main
from sgd_dist.config import ConfigError, load_config
from sgd_dist.errors import UsageError
from sgd_dist.run.rundir import read_metrics, read_summary
from sgd_dist.study import plan as planner
from sgd_dist.study.cluster_spec import load_cluster, stragglers_among
from sgd_dist.study.plan_plots import plot_plan
from sgd_dist.study.plan_results import (
    PLAN_FILE,
    compare,
    pareto_front,
    parse_budget,
    read_plan,
    recommendation,
    spearman,
)

REPO = Path(__file__).resolve().parents[1]
PROBLEM = {"data": {"n_samples": 4096, "n_features": 3, "seed": 3}, "optim": {"lr": 0.05},
           "train": {"steps": 400, "batch_size": 8, "eval_every": 10}}
# a machine whose server and evaluations cost nothing: a sync step is one worker's compute, whatever the count
FREE = {"message_s": 0, "message_s_per_byte": 0, "apply_s": 0, "apply_s_per_param": 0, "eval_s": 0,
        "eval_s_per_elem": 0}


def write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def make_plan(tmp_path: Path, cluster: dict, *, objective: str = "time", modes: str = "sync",
              workers: list[int] | None = None, budget: str | None = None, target: float = 3e-3,
              out: str = "plan", problem_raw: dict = PROBLEM) -> planner.Plan:
    problem = write(tmp_path / "problem.yaml", problem_raw)
    spec, profile = load_cluster(write(tmp_path / "cluster.yaml", cluster))
    space = planner.space_from(spec, workers, modes, [8], "none")
    return planner.Plan(tmp_path / out, problem, planner.load_problem(problem), spec, profile, target, objective,
                        parse_budget(budget), space, say=lambda line: None, progress=False)


def best(rows: list[dict]) -> dict:
    return min(rows, key=lambda r: r["rank"])


# --- the known best ------------------------------------------------------------------------------------------

def test_without_stragglers_or_network_the_most_workers_win_on_time_and_one_worker_on_cost(tmp_path):
    """Every sync step costs one worker's compute at any worker count, so time to the target is the steps to it,
    which fall with the global batch (sync only: the worker count is what is computable by hand); cost is K x
    that, and the steps fall less than K-fold."""
    cluster = {"max_workers": 8, "profile": FREE}
    by_time = planner.run_plan(make_plan(tmp_path, cluster, objective="time", out="time"))
    by_cost = planner.run_plan(make_plan(tmp_path, cluster, objective="cost", out="cost"))
    assert sorted(r["workers"] for r in by_time) == [1, 2, 4, 8]
    assert best(by_time)["workers"] == 8
    assert best(by_cost)["workers"] == 1
    cost = {r["workers"]: r["worker_seconds"] for r in by_cost}
    assert all(cost[k] > cost[1] for k in (2, 4, 8))  # no count cut the updates K-fold


def test_with_a_huge_latency_local_sgd_with_the_most_local_steps_wins(tmp_path):
    """A second each way per message: every update of sync and async costs two seconds, a local SGD round
    costs the same for H steps."""
    rows = planner.run_plan(make_plan(tmp_path, {"max_workers": 2, "network": {"latency_ms": 1000}},
                                      modes="sync,async,local_sgd", target=1e-2))
    top = best(rows)
    assert (top["mode"], top["mode_parameter"]) == ("local_sgd", 32)
    assert {r["mode"] for r in rows} == {"sync", "async", "local_sgd"}
    assert {r["mode_parameter"] for r in rows if r["mode"] == "local_sgd"} == {2, 8, 32}


def test_where_f_star_is_0_the_plan_reaches_a_gap_relative_to_the_initial_one_and_ranks_by_it(tmp_path):
    """64 rows of 9,000 features: least squares interpolates (f* = 0, no w*), so the target is a fraction of the
    initial gap and the pilot's noise scale is the one at the initial weights, said so in plan.csv."""
    wide = {"data": {"n_samples": 64, "n_features": 9000, "seed": 3}, "optim": {"lr": 5e-4},
            "train": {"steps": 60, "batch_size": 8, "eval_every": 5}}
    lines: list[str] = []
    plan = make_plan(tmp_path, {"max_workers": 2, "profile": FREE}, modes="sync,local_sgd:8", target=0.3,
                     problem_raw=wide)
    rows = planner.run_plan(replace(plan, say=lines.append))
    pilot = next(r for r in rows if r["stage"] == "pilot")
    summary = read_summary(tmp_path / "plan" / pilot["run"])
    assert summary["optimal_loss"] == 0.0 and summary["gap_scale"] > 0
    assert pilot["noise_scale"] == summary["gradient_noise_scale"]["initial"]["b_simple"]
    assert pilot["noise_scale_at"] == "initial weights (no w*)"
    assert any("noise scale B_simple at the initial weights" in line for line in lines)
    reached = [r for r in rows if r["reached"] == "yes"]
    assert {r["mode"] for r in reached} == {"sync", "local_sgd"} and len(reached) == len(rows)
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    times = [r["time_to_target_s"] for r in rows]
    assert times == sorted(times)
    for row in reached:
        summary = read_summary(tmp_path / "plan" / row["run"])
        hit = next(m for m in read_metrics(tmp_path / "plan" / row["run"]) if m.get("optimality_gap") is not None
                   and m["optimality_gap"] / summary["gap_scale"] < 0.3)
        assert row["updates_to_target"] == hit["step"] > 0


# --- resume, budget, plan.csv --------------------------------------------------------------------------------

def test_a_half_done_plan_resumes_keeping_its_finished_runs(tmp_path):
    plan = make_plan(tmp_path, {"max_workers": 4, "profile": FREE})
    first = planner.run_plan(plan)
    summaries = sorted((tmp_path / "plan").glob("stages/*/runs/*/summary.json"))
    assert len(first) == 3 and len(summaries) >= 3  # an extended config's shorter run stays on disk
    kept = {p: p.stat().st_mtime_ns for p in summaries}
    lost = summaries[-1]
    shutil.rmtree(lost.parent)  # a run killed half-way leaves no summary
    (tmp_path / "plan" / PLAN_FILE).unlink()
    again = planner.run_plan(make_plan(tmp_path, {"max_workers": 4, "profile": FREE}))
    assert [p.stat().st_mtime_ns for p in summaries if p != lost] == [t for p, t in kept.items() if p != lost]
    assert lost.is_file()
    strip = [{k: v for k, v in r.items() if k != "candidate"} for r in first]
    assert [{k: v for k, v in r.items() if k != "candidate"} for r in again] == strip  # virtual runs repeat exactly
    with pytest.raises(UsageError, match="other inputs.*objective"):
        planner.run_plan(make_plan(tmp_path, {"max_workers": 4, "profile": FREE}, objective="cost"))


def test_the_budget_prunes_and_says_why(tmp_path):
    plan = make_plan(tmp_path, {"max_workers": 8, "profile": FREE}, budget="runs=2")
    rows = planner.run_plan(plan)
    assert len(rows) == 2
    assert any("over the budget of 2 runs" in line for line in plan.pruned)
    assert (tmp_path / "plan" / "pruned.txt").read_text().splitlines() == plan.pruned
    plan = make_plan(tmp_path, {"max_workers": 8, "profile": FREE}, budget="worker_steps=500", out="steps")
    assert len(planner.run_plan(plan)) == 1
    assert any("over the budget of 500 worker steps" in line for line in plan.pruned)
    with pytest.raises(ValueError, match="unknown 'hours'"):
        parse_budget("hours=2")


def test_plan_csv_holds_each_runs_own_numbers(tmp_path):
    plan = make_plan(tmp_path, {"max_workers": 2, "profile": FREE, "network": {"latency_ms": 1}})
    planner.run_plan(plan)
    rows = read_plan(tmp_path / "plan" / PLAN_FILE)
    for row in rows:
        run_dir = tmp_path / "plan" / row["run"]
        summary, metrics = read_summary(run_dir), read_metrics(run_dir)
        gap = summary["optimality_gap"] / summary["optimal_loss"]
        assert row["final_gap"] == pytest.approx(gap, rel=1e-12)
        hit = next(m for m in metrics if m.get("optimality_gap") is not None
                   and m["optimality_gap"] / summary["optimal_loss"] < 3e-3)
        assert row["time_to_target_s"] == pytest.approx(hit["wall_time_s"], rel=1e-12)
        assert row["worker_seconds"] == pytest.approx(row["workers"] * hit["wall_time_s"], rel=1e-12)
        assert (row["updates_to_target"], row["samples_to_target"]) == (hit["step"], hit["samples_seen"])
        answers = sum(len(m.get("applied") or []) for m in metrics if m["step"] <= hit["step"])
        evaluations = sum(1 for m in metrics if m["step"] <= hit["step"] and m.get("eval_loss") is not None)
        assert row["bytes_to_target"] == 2 * 4 * 4 * answers + evaluations * row["workers"] * (4 * 4 + 8)
        assert read_summary(run_dir)["clock"] == "virtual"


# --- the figure, from plan.csv alone -------------------------------------------------------------------------

def test_the_figure_is_drawn_from_plan_csv_alone(tmp_path):
    planner.run_plan(make_plan(tmp_path, {"max_workers": 4, "profile": FREE}))
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(tmp_path / "plan" / PLAN_FILE, alone / PLAN_FILE)
    shutil.rmtree(tmp_path / "plan")
    assert main(["plot", str(alone)]) == 0
    assert_png(alone / "plan.png")
    (alone / PLAN_FILE).unlink()
    with pytest.raises(FileNotFoundError):
        plot_plan(alone)


def test_the_pareto_front_keeps_what_nothing_beats_on_both():
    rows = [{"reached": "yes", "time_to_target_s": t, "worker_seconds": c, "config": n}
            for n, t, c in [("a", 1, 10), ("b", 2, 5), ("c", 3, 6), ("d", 4, 1), ("e", 1.5, 10)]]
    assert [r["config"] for r in pareto_front(rows + [{"reached": "no"}])] == ["a", "b", "d"]


# --- the recommendation --------------------------------------------------------------------------------------

def row(mode: str, workers: int, time_s: float, parameter: int | None = None, rank: int = 1) -> dict:
    label = mode if parameter is None else f"{mode} {planner.SHORT[mode]}={parameter}"
    return {"config": f"{label}, {workers} workers", "mode": mode, "workers": workers, "mode_parameter": parameter,
            "reached": "yes", "status": "completed", "time_to_target_s": time_s, "worker_seconds": workers * time_s,
            "rank": rank, "updates_run": 100, "final_gap": 1e-3}


def test_the_recommendation_says_its_numbers_and_its_reason():
    rows = [row("backup", 128, 2.9, 8), row("sync", 128, 4.7), row("async", 128, 3.5)]
    text = recommendation(rows, "time", lambda k: True, lambda r: "")
    assert text.startswith("backup b=8, 128 workers: 2.9 s to the target, 371 worker-seconds, 38 % sooner than "
                           "sync at 128 workers, which waits on the slowest of 128 workers each step")
    local = recommendation([row("local_sgd", 64, 1.0, 32), row("sync", 64, 4.0)], "time", lambda k: False,
                           lambda r: f"BOUND at {r['workers']}")
    assert "75 % sooner than sync at 64 workers" in local and "every 32 steps; BOUND at 64" in local
    one, two = {**row("sync", 1, 3.0), "updates_to_target": 60}, {**row("sync", 2, 2.0), "updates_to_target": 40}
    cheap = recommendation([one, two, row("async", 4, 1.0)], "cost", lambda k: False, lambda r: "")
    assert cheap == ("sync, 1 workers: 3 s to the target, 3 worker-seconds, 25 % cheaper than the best other mode "
                     "(async, 4 workers): 2 workers took 40 updates against 60, too few fewer to pay for 2x the "
                     "workers (1.3x the worker-seconds).")
    assert "No config reached" in recommendation([{**row("sync", 1, 1.0), "reached": "no"}], "time", bool, str)
    even = recommendation([{**row("async", 4, 1.0), "updates_to_target": 300},
                           {**row("sync", 4, 2.0), "updates_to_target": 280}], "time", lambda k: k > 4, str)
    assert "which took 280 updates of 4 answers each against async's 300 of one" in even


# --- comparing with real runs --------------------------------------------------------------------------------

def test_spearman_matches_hand_computed_values():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)  # ties: mean ranks
    assert math.isnan(spearman([1, 1], [1, 2]))


def test_the_comparison_passes_and_misses_as_it_should():
    virtual = {f"c{i}": float(i) for i in range(1, 7)}
    same = compare(virtual, {c: 10 * t for c, t in virtual.items()})
    assert same.rho == pytest.approx(1.0) and same.top == same.real_best == "c1" and same.passed
    assert same.lines()[-1] == "PASS"
    # the planner's top choice is the real third: 1.5x the real best, though the rest agree
    swapped = compare(virtual, {**{c: 10 * t for c, t in virtual.items()}, "c1": 15.0, "c2": 10.0, "c3": 12.0})
    assert swapped.real_best == "c2" and swapped.top_over_best == pytest.approx(1.5) and not swapped.passed
    assert compare(virtual, {c: 10 * (7 - t) for c, t in virtual.items()}).rho == pytest.approx(-1.0)
    unreached = compare({**virtual, "c6": None}, {**virtual, "c6": None})
    assert unreached.rho == pytest.approx(1.0) and unreached.passed
    few = compare({"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 2.0})
    assert few.rho == pytest.approx(1.0) and not few.passed  # fewer than 6 configs


# --- bad descriptions ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, message", [
    ({"max_workers": 0}, "max_workers: Input should be greater than or equal to 1"),
    ({}, "max_workers: Field required"),
    ({"max_workers": 4, "network": {"bandwidth_gbps": -1}}, "network.bandwidth_gbps: Input should be greater than 0"),
    ({"max_workers": 4, "speed": {"workers": {7: 2.0}}}, "speed.workers names worker 7; workers are 0..3"),
    ({"max_workers": 4, "speed": {"workers": {1: 0}}}, "speed.workers: needs worker index >= 0 -> factor > 0"),
    ({"max_workers": 4, "speed": {"nodes": {1: 2.0}}}, "speed.nodes needs workers_per_node"),
    ({"max_workers": 4, "workers_per_node": 2, "speed": {"nodes": {2: 2.0}}},
     "speed.nodes names node 2; nodes are 0..1"),
    ({"max_workers": 4, "stragglers": {"delay": "exponential"}},
     "stragglers.delay=exponential needs stragglers.delay_ms"),
    ({"max_workers": 4, "stragglers": {"slowdown": {9: 4.0}}}, "stragglers.slowdown names worker 9"),
    ({"max_workers": 4, "failures": {"worker_mtbf_s": 0}}, "failures.worker_mtbf_s: Input should be greater than 0"),
    ({"max_workers": 4, "latency_ms": 1}, "latency_ms: unknown key"),
    ({"max_workers": 4, "profile": "nowhere.json"}, "profile: cluster.virtual.profile="),
    ({"max_workers": 4, "profile": {"grad_s": -1}}, "profile: grad_s must be >= 0"),
    ({"max_workers": 4, "profile": {"grad_z": 1}}, "profile: unknown field 'grad_z'"),
])
def test_a_bad_description_is_one_line_naming_the_field(tmp_path, raw, message):
    path = write(tmp_path / "bad.yaml", raw)
    with pytest.raises(ConfigError) as caught:
        load_cluster(path)
    text = str(caught.value)
    assert "\n" not in text and message in text and text.startswith(f"cluster {str(path)!r}"), text


def test_the_cli_refuses_a_bad_description_in_one_line_and_writes_nothing(tmp_path, capsys):
    problem = write(tmp_path / "problem.yaml", PROBLEM)
    cluster = write(tmp_path / "cluster.yaml", {"max_workers": 4, "network": {"latency": 1}})
    code = main(["plan", "--config", str(problem), "--cluster", str(cluster), "--target-gap", "1e-3",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "network.latency: unknown key" in err
    assert not (tmp_path / "out").exists()


def test_a_problem_with_a_decaying_lr_is_refused(tmp_path):
    path = write(tmp_path / "p.yaml", {**PROBLEM, "optim": {"lr": 0.1, "schedule": "cosine"}})
    with pytest.raises(ConfigError, match="optim.schedule=cosine: a plan sets each run's length"):
        planner.load_problem(path)


# --- the description maps onto the virtual cluster -----------------------------------------------------------

def test_the_description_becomes_the_virtual_runs_cluster(tmp_path):
    cluster = {"max_workers": 8, "workers_per_node": 4, "network": {"latency_ms": 2, "bandwidth_gbps": 1},
               "speed": {"nodes": {1: 3.0}, "workers": {5: 2.0}, "sigma": 0.1},
               "stragglers": {"slowdown": {1: 4.0, 6: 2.0}, "delay": "exponential", "delay_ms": 1.0},
               "failures": {"worker_mtbf_s": 600, "server_mtbf_s": 3600}, "cores": 2, "seed": 4}
    plan = make_plan(tmp_path, cluster)
    c = planner.Candidate(4, "sync", None, 8, "none", 50)
    raw = planner.base_raw(plan)
    for key, value in zip(planner.KEYS, planner.values(plan, c)):
        planner.set_dotted(raw, key, value)
    config = load_config(write(tmp_path / "run.yaml", raw))
    v = config.cluster.virtual
    assert config.cluster.backend == "virtual" and config.cluster.num_workers == 4
    assert (config.cluster.network.latency_ms, config.cluster.network.bandwidth_gbps) == (2, 1)
    assert (v.workers_per_node, v.cores, v.speed_sigma, v.worker_mtbf_s, v.server_mtbf_s, v.seed) == (
        4, 2, 0.1, 600, 3600, 4)
    assert v.speed == {}  # node 1 and worker 5 are beyond 4 workers
    assert dict(config.stragglers.slowdown) == {1: 4.0} and config.stragglers.delay == "exponential"
    raw = planner.base_raw(plan)
    for key, value in zip(planner.KEYS, planner.values(plan, replace(c, workers=8))):
        planner.set_dotted(raw, key, value)
    eight = load_config(write(tmp_path / "run8.yaml", raw))
    assert eight.cluster.virtual.speed == {4: 3.0, 5: 6.0, 6: 3.0, 7: 3.0}
    assert dict(eight.stragglers.slowdown) == {1: 4.0, 6: 2.0}


def test_the_shipped_cluster_descriptions_load():
    names = sorted(p.name for p in (REPO / "configs" / "clusters").glob("*.yaml"))
    assert {"this_machine.yaml", "64_workers_1gbit.yaml", "512_workers_10gbit_failures.yaml"} <= set(names)
    for name in names:
        spec, profile = load_cluster(REPO / "configs" / "clusters" / name)
        assert spec.max_workers >= 2 and profile.grad_s > 0


# --- the command ---------------------------------------------------------------------------------------------

def test_the_command_prints_the_table_the_recommendation_and_the_figure_with_a_bar(tmp_path, capsys):
    problem = write(tmp_path / "problem.yaml", PROBLEM)
    cluster = write(tmp_path / "cluster.yaml", {"max_workers": 2, "profile": FREE})
    args = ["plan", "--config", str(problem), "--cluster", str(cluster), "--target-gap", "3e-3", "--out",
            str(tmp_path / "out"), "--modes", "sync,async", "--batches", "8", "--lr-scaling", "none", "--progress"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    rows = read_plan(tmp_path / "out" / PLAN_FILE)
    top = best(rows)
    assert f"   1  {top['config']}" in out
    assert f"recommendation: {top['config']}: {top['time_to_target_s']:.3g} s to the target" in out
    assert f"figure: {tmp_path / 'out' / 'plan.png'}" in out
    assert_png(tmp_path / "out" / "plan.png")
    assert "plan: pilot" in err and "plan: workers" in err  # the stages' progress bars


def test_stragglers_are_told_apart_by_worker_count(tmp_path):
    spec, _ = load_cluster(REPO / "configs" / "clusters" / "64_workers_1gbit.yaml")  # node 7 three times slower
    assert not spec.uneven(8) and not spec.uneven(56) and spec.uneven(57) and spec.uneven(64)
    assert not stragglers_among({"slowdown": {1: 4.0}}, 1) and stragglers_among({"slowdown": {1: 4.0}}, 2)
    late = {"delay": "exponential", "delay_ms": 1.0, "delay_workers": [5]}
    assert not stragglers_among(late, 5) and stragglers_among(late, 6)
    assert stragglers_among({**late, "delay_workers": None}, 1) and not stragglers_among({"delay": "none"}, 8)
