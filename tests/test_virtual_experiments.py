"""The virtual-cluster experiments (configs/experiments/virtual_*.yaml, scripts/virtual_experiments.py), on shrunken
versions that run in seconds."""

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
