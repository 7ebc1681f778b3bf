"""The virtual-cluster experiments (configs/experiments/virtual_*.yaml, scripts/virtual_experiments.py) and the
validation against real runs (scripts/virtual_validation.py), on shrunken versions that run in seconds."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import yaml
from conftest import assert_png

from sgd_dist.study.experiment import load_experiment
from sgd_dist.study.results import RESULTS_FILE, read_results
from sgd_dist.study.sweep import run_sweep

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


experiments = _script("virtual_experiments")
validation = _script("virtual_validation")


def _sweep(tmp_path: Path, overrides: list[str], grid: dict, **extra) -> Path:
    """A shrunken experiment on the default problem, swept on the virtual backend; its sweep directory."""
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump({"base": str(ROOT / "configs" / "default.yaml"),
                                    "overrides": ["cluster.backend=virtual", "train.log_every=0", *overrides],
                                    "grid": grid, **extra}))
    out = tmp_path / "sweep"
    result = run_sweep(load_experiment(path), out, plots=False, progress=False)
    assert result.failed == 0
    return out


def test_the_shipped_virtual_experiments_run_on_the_virtual_backend_with_the_literatures_setups():
    plans = {name: load_experiment(ROOT / "configs" / "experiments" / f"virtual_{name}.yaml").runs
             for name in experiments.EXPERIMENTS}
    assert all(p.config.cluster.backend == "virtual" for runs in plans.values() for p in runs)
    async_runs = plans["async_staleness"]
    assert sorted({p.config.cluster.num_workers for p in async_runs}) == [2 ** i for i in range(11)]
    assert {p.config.optim.staleness_lr for p in async_runs} == {False, True}
    assert len({p.config.train.steps * p.config.train.batch_size for p in async_runs}) == 1  # the same samples
    backup = plans["backup"]
    assert {p.config.cluster.num_workers for p in backup} == {256}
    assert {p.config.stragglers.delay for p in backup} == {"exponential"}
    assert {p.config.train.mode for p in backup} == {"sync", "backup", "async"}
    local = plans["local_sgd"]
    assert {(p.config.cluster.num_workers, p.config.cluster.network.bandwidth_gbps,
             p.config.cluster.network.latency_ms) for p in local} == {(64, 1.0, 1.0)}
    assert len({p.config.train.local_steps * p.config.train.steps for p in local}) == 1  # the same local steps
    strong = plans["strong_scaling"]
    assert {(p.config.data.dim, p.config.cluster.network.bandwidth_gbps) for p in strong} == {(100_000, 10.0)}
    assert {p.config.global_batch_size() for p in strong} == {1024}
    assert max(p.config.cluster.num_workers for p in strong) == 1024


def test_the_async_figure_and_table_show_staleness_k_minus_1_and_the_same_run_at_one_worker(tmp_path):
    out = _sweep(tmp_path, ["data.n_samples=4096", "train.mode=async", "train.steps=200", "train.batch_size=16",
                            "train.eval_every=0", "optim.warmup_steps=0", "optim.lr=0.05"],
                 {"optim.staleness_lr": [False, True], "cluster.num_workers": [1, 2, 4]})
    lines = experiments.async_staleness(out, tmp_path / "async.png")
    assert_png(tmp_path / "async.png")
    table = {int(cells[0]): cells for cells in (re.split(r"\s*\|\s*", line.strip("| ")) for line in lines[2:])}
    assert sorted(table) == [1, 2, 4]
    assert [table[k][1] for k in (1, 2, 4)] == ["0", "1", "3"]  # median staleness K - 1
    assert table[1][2] == table[1][3]  # dividing by a staleness of 0 (taken as 1) changes nothing
    assert table[4][2] != table[4][3]


def test_a_sync_step_over_the_shared_link_takes_what_the_time_model_says(tmp_path):
    """d = 10,000 (40 KB messages) at 10 Gbit/s: each step's K answers queue on the server's link, and the virtual
    runs' median step equals (K + 1) m + 2 latency + c(B / K) + a + u to rounding."""
    out = _sweep(tmp_path, ["data.n_samples=64", "data.n_features=10000", "data.bias=false", "train.mode=sync",
                            "cluster.network.latency_ms=0.05", "cluster.network.bandwidth_gbps=10", "train.steps=5",
                            "train.eval_every=0", "optim.schedule=constant", "optim.warmup_steps=0", "optim.lr=0.01"],
                 {"cluster.num_workers": [1, 2, 4, 8]}, scaling="strong", global_batch=64)
    lines = experiments.strong_scaling(out, tmp_path / "strong.png")
    assert_png(tmp_path / "strong.png")
    rows = [re.split(r"\s*\|\s*", line.strip("| ")) for line in lines[2:]]
    assert [int(r[0]) for r in rows] == [1, 2, 4, 8]
    measured = {r["num_workers"]: r["median_step_ms"] for r in read_results(out / RESULTS_FILE)}
    profile = experiments.load_profile(None)
    for k, ms in measured.items():
        modelled = experiments.modelled_sync_step_s(profile, k, 64, 10_000, 0.05e-3, 10e9)
        assert ms == pytest.approx(1e3 * modelled, rel=1e-9), k


def _measured(step_ms=1.0, target_s=0.5, weights=(1.0, 2.0), staleness=None, final_gap=1e-3) -> dict:
    return {"median_step_ms": step_ms, "target_s": target_s, "target_step": 10, "weights": list(weights),
            "staleness": staleness, "final_gap": final_gap}


def test_the_comparison_marks_each_target_pass_or_miss():
    sync = validation.Case(2, "shm", 0.0, "sync", False)
    row = validation.compare(sync, _measured(), _measured(step_ms=1.1, target_s=0.45))
    assert (row["step_err_pct"], row["target_err_pct"]) == (pytest.approx(10.0), pytest.approx(-10.0))
    assert (row["step_time"], row["time_to_target"], row["weights"]) == ("PASS", "PASS", "PASS")
    row = validation.compare(sync, _measured(), _measured(step_ms=1.3, target_s=None, weights=(1.0, 2.0000002)))
    assert (row["step_time"], row["time_to_target"], row["weights"], row["bit_equal"]) == ("MISS", "MISS", "MISS",
                                                                                        False)
    asyn = validation.Case(4, "2 nodes", 5.0, "async", True)
    row = validation.compare(asyn, _measured(staleness=3, final_gap=1e-3), _measured(staleness=3, final_gap=1.9e-3))
    assert (row["staleness"], row["final_gap"], row["gap_ratio"]) == ("PASS", "PASS", pytest.approx(1.9))
    row = validation.compare(asyn, _measured(staleness=3, final_gap=1e-3), _measured(staleness=2, final_gap=2.1e-3))
    assert (row["staleness"], row["final_gap"]) == ("MISS", "MISS")
    assert "weights" not in row
    text = "\n".join(validation.markdown([row]))
    assert "3 / 2 MISS" in text and "2.10 MISS" in text and "async final gap within 2x: 0 of 1 PASS" in text


def test_the_validation_covers_the_issues_cases():
    cases = validation.cases()
    assert len(cases) == len({c.name for c in cases}) == 24
    assert {(c.workers, c.where, c.latency_ms) for c in cases} == {
        (1, "shm", 0.0), (2, "shm", 0.0), (2, "2 nodes", 1.0), (2, "2 nodes", 5.0), (4, "2 nodes", 1.0),
        (4, "2 nodes", 5.0)}
    straggler = validation.Case(4, "2 nodes", 5.0, "async", True)
    assert "stragglers.slowdown={1: 4.0}" in straggler.real()
    assert {"cluster.simulated_nodes=2", "cluster.backend=ray"} <= set(straggler.real())
    virtual = straggler.virtual(2, None)
    assert "cluster.backend=virtual" in virtual and "cluster.virtual.cores=2" in virtual
    assert not any(o.startswith("cluster.simulated_nodes") for o in virtual)


def test_a_real_and_a_virtual_run_of_one_worker_compare_bit_equal(tmp_path, ray_session):
    case = validation.Case(1, "shm", 0.0, "sync", False)
    rows = validation.run_cases([case], tmp_path, None, 2, virtual_only=False, steps=20)
    assert rows[0]["bit_equal"] and rows[0]["weights"] == "PASS"
    assert rows[0]["real_step_ms"] > 0 and rows[0]["virtual_step_ms"] > 0
    summaries = [yaml.safe_load((tmp_path / side / case.name / "config.yaml").read_text())["cluster"]["backend"]
                 for side in ("real", "virtual")]
    assert summaries == ["ray", "virtual"]
