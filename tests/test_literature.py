"""The literature's experiments: each ready experiment file loads and plans (no run), grid keys that vary
together, a diverged run as an outcome, and the figures that draw the critical batch and local SGD's rounds,
from hand-written sweep directories. No Ray."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml
from conftest import assert_png
from matplotlib.figure import Figure

from sgd_dist.config import ConfigError
from sgd_dist.study.experiment import load_experiment
from sgd_dist.study.plots import _noise_scale_overlay, best_steps, plot_sweep
from sgd_dist.study.results import run_row

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "configs" / "experiments"


def test_batch_regimes_plans_batches_1_to_4096_times_the_learning_rates():
    sweep = load_experiment(EXPERIMENTS / "batch_regimes.yaml")
    batches = sorted({r.config.train.batch_size for r in sweep.runs})
    lrs = sorted({r.config.optim.lr for r in sweep.runs})
    assert batches == [2 ** k for k in range(13)] and len(lrs) == 9
    assert len(sweep.runs) == 13 * 9
    for run in sweep.runs:
        config = run.config
        assert config.cluster.num_workers == 1 and config.cluster.backend == "serial"
        assert config.train.gradient_noise_scale == (sweep.experiment.target_gap,)
        assert config.train.eval_every == 1 and config.optim.schedule == "constant"


def test_stragglers_modes_plans_sync_backup_and_async_with_and_without_a_4x_straggler():
    sweep = load_experiment(EXPERIMENTS / "stragglers_modes.yaml")
    seen = {(r.config.train.mode, r.config.train.backup_workers, tuple(r.config.stragglers.slowdown.items()))
            for r in sweep.runs}
    assert seen == {(mode, b, slow) for mode, b in [("sync", 0), ("backup", 1), ("async", 0)]
                    for slow in [(), ((1, 4.0),)]}
    assert all(r.config.cluster.num_workers == 4 for r in sweep.runs) and len(sweep.runs) == 12
    assert len({r.name for r in sweep.runs}) == 12


def test_local_sgd_plans_h_from_1_to_256_with_the_same_rounds():
    sweep = load_experiment(EXPERIMENTS / "local_sgd.yaml")
    assert [r.config.train.local_steps for r in sweep.runs] == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert {(r.config.train.mode, r.config.train.steps, r.config.train.eval_every) for r in sweep.runs} == {
        ("local_sgd", 100, 1)}


def test_scaling_plans_strong_and_weak_over_1_2_4_workers():
    sweep = load_experiment(EXPERIMENTS / "scaling.yaml")
    assert {(r.scaling, r.config.cluster.num_workers) for r in sweep.runs} == {
        (s, k) for s in ("strong", "weak") for k in (1, 2, 4)}


def test_faults_plans_each_fault_in_sync_and_async():
    """Faults are available to sweeps: the faults experiment's grid puts a kill in some runs and none in others."""
    sweep = load_experiment(EXPERIMENTS / "faults.yaml")
    seen = {(r.config.train.mode, tuple((f.kind, f.step) for f in r.config.faults)) for r in sweep.runs}
    assert seen == {(mode, faults) for mode in ("sync", "async")
                    for faults in [(), (("kill_worker", 40),), (("kill_server", 60),)]}
    assert all(r.config.train.checkpoint_every == 25 for r in sweep.runs)
    assert len({r.name for r in sweep.runs}) == 6


def _experiment(tmp_path: Path, grid: dict) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"base": str(REPO / "configs" / "default.yaml"), "grid": grid,
                                    "overrides": ["data.n_samples=1024", "optim.warmup_steps=0", "train.steps=10"]},
                                   sort_keys=False))
    return path


def test_grid_keys_joined_by_commas_vary_together(tmp_path):
    sweep = load_experiment(_experiment(tmp_path, {"train.mode,train.backup_workers": [["sync", 0], ["backup", 1]],
                                                   "cluster.num_workers": [2, 4]}))
    assert [(r.config.train.mode, r.config.train.backup_workers, r.config.cluster.num_workers) for r in sweep.runs] == [
        ("sync", 0, 2), ("sync", 0, 4), ("backup", 1, 2), ("backup", 1, 4)]
    with pytest.raises(ConfigError, match=r"grid train.mode,train.backup_workers: each value must list 2 values"):
        load_experiment(_experiment(tmp_path, {"train.mode,train.backup_workers": [["sync", 0], "backup"]}))
    with pytest.raises(ConfigError, match=r"grid point train.mode,train.backup_workers=\[sync, 1\]"):
        load_experiment(_experiment(tmp_path, {"train.mode,train.backup_workers": [["sync", 1]]}))


def test_a_diverged_run_is_an_outcome_not_a_failure(tmp_path):
    sweep = load_experiment(_experiment(tmp_path, {"optim.lr": [0.1]}))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text('{"status": "failed", '
                                          '"error": "DivergenceError: the mini-batch loss is nan", "diverged": true}')
    assert run_row(sweep.runs[0], run_dir, 1e-2)["status"] == "diverged"
    (run_dir / "summary.json").write_text('{"status": "failed", "error": "ClusterError: too small", "diverged": false}')
    assert run_row(sweep.runs[0], run_dir, 1e-2)["status"] == "failed"


HEADER = ["run", "scaling", "train.batch_size", "optim.lr", "train.local_steps", "repeat", "num_workers", "mode",
          "n_features", "worker_batch", "global_batch", "status", "optimal_loss", "target_step", "target_time_s",
          "target_samples", "gradient_noise_scale"]


def _rows(b_noise: float | None) -> list[dict]:
    rows = []
    for b in [1, 4, 16, 64, 256, 1024]:
        for lr, factor in [(0.01, 1.0), (0.1, 1.5)]:
            steps = round(10 * (1 + 100 / b) * factor)
            rows.append({"run": f"b{b}-lr{lr}-r0", "scaling": "weak", "train.batch_size": b, "optim.lr": lr,
                         "train.local_steps": "", "repeat": 0, "num_workers": 1, "mode": "sync", "n_features": 3,
                         "worker_batch": b, "global_batch": b, "status": "completed", "optimal_loss": 1.0,
                         "target_step": steps, "target_time_s": 0.1, "target_samples": steps * b,
                         "gradient_noise_scale": b_noise})
    return rows


def _write(sweep_dir: Path, rows: list[dict]) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HEADER)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)


def test_the_batch_figures_draw_the_critical_batch_when_the_sweep_measured_it(tmp_path):
    _write(tmp_path / "with", _rows(120.0))
    figures = plot_sweep(tmp_path / "with")
    drawn = {p.name for p in figures.drawn}
    assert {"batch.png", "batch_regimes.png"} <= drawn
    for name in ("batch.png", "batch_regimes.png"):
        assert_png(tmp_path / "with" / name)
    bs, steps, best = best_steps(_rows(120.0), ["train.batch_size", "optim.lr"])
    assert bs == [1, 4, 16, 64, 256, 1024] and steps == [1010, 260, 72, 26, 14, 11]  # the lr 0.01 row everywhere
    fig = Figure()
    ax = fig.subplots()
    _noise_scale_overlay(ax, _rows(120.0), ["train.batch_size", "optim.lr"])
    vertical = [line for line in ax.get_lines() if list(line.get_xdata()) == [120.0, 120.0]]
    assert len(vertical) == 1 and "120" in vertical[0].get_label()
    [fitted] = [line.get_label() for line in ax.get_lines() if "both fitted" in line.get_label()]
    assert 90 <= float(fitted.rsplit("B_noise = ", 1)[1]) <= 110  # the rows follow 10 (1 + 100 / B), rounded
    fig = Figure()
    ax = fig.subplots()
    _noise_scale_overlay(ax, _rows(None), ["train.batch_size", "optim.lr"])
    assert ax.get_lines() == []  # not measured: nothing drawn


def test_the_local_sgd_figure_counts_samples_and_rounds(tmp_path):
    rows = []
    for h in [1, 2, 4, 8]:
        rounds = max(1, 64 // h)
        rows.append({"run": f"h{h}-r0", "scaling": "weak", "train.batch_size": "", "optim.lr": "",
                     "train.local_steps": h, "repeat": 0, "num_workers": 2, "mode": "local_sgd", "n_features": 3,
                     "worker_batch": 16, "global_batch": 32, "status": "completed", "optimal_loss": 1.0,
                     "target_step": rounds, "target_time_s": 0.1, "target_samples": rounds * h * 32,
                     "gradient_noise_scale": None})
    _write(tmp_path, rows)
    figures = plot_sweep(tmp_path)
    assert "local_sgd.png" in {p.name for p in figures.drawn}
    assert_png(tmp_path / "local_sgd.png")


def test_the_modes_figure_compares_seconds_to_target_per_mode_and_straggler(tmp_path):
    header = ["run", "scaling", "stragglers.slowdown", "train.mode,train.backup_workers", "repeat", "num_workers",
              "mode", "n_features", "worker_batch", "global_batch", "status", "optimal_loss", "target_step",
              "target_time_s"]
    rows = []
    for slow in ["{}", "{1: 4.0}"]:
        for mode, b in [("sync", 0), ("backup", 1), ("async", 0)]:
            for repeat in (0, 1):
                rows.append({"run": f"{slow}-{mode}-r{repeat}", "scaling": "weak", "stragglers.slowdown": slow,
                             "train.mode,train.backup_workers": f"[{mode}, {b}]", "repeat": repeat, "num_workers": 4,
                             "mode": mode, "n_features": 10, "worker_batch": 64, "global_batch": 256,
                             "status": "completed", "optimal_loss": 1.0, "target_step": 60,
                             "target_time_s": 0.1 * (1 + repeat) * (2 if slow != "{}" and mode == "sync" else 1)})
    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    figures = plot_sweep(tmp_path)
    assert "modes_time.png" in {p.name for p in figures.drawn}
    assert_png(tmp_path / "modes_time.png")


def test_scaling_strong_weak_plans_8192_rows_split_and_4096_per_worker():
    sweep = load_experiment(EXPERIMENTS / "scaling_strong_weak.yaml")
    plans = {(r.scaling, r.config.cluster.num_workers, r.config.train.batch_size) for r in sweep.runs}
    assert plans == {("strong", 1, 8192), ("strong", 2, 4096), ("strong", 4, 2048),
                     ("weak", 1, 4096), ("weak", 2, 4096), ("weak", 4, 4096)}
    assert len(sweep.runs) == 18 and {r.config.train.mode for r in sweep.runs} == {"sync"}


def test_crossover_plans_4096_rows_split_over_1_2_4_workers_at_each_problem_size():
    sweep = load_experiment(EXPERIMENTS / "crossover.yaml")
    plans = {(r.config.data.n_features, r.config.cluster.num_workers, r.config.train.batch_size) for r in sweep.runs}
    assert plans == {(d, k, 4096 // k) for d in (2, 20, 200, 2000) for k in (1, 2, 4)}
    assert len(sweep.runs) == 24 and {r.scaling for r in sweep.runs} == {"strong"}


def test_local_sgd_counts_its_communication_rounds_and_local_steps():
    from sgd_dist.engine.policies import Dispatch, LocalSGDPolicy

    policy = LocalSGDPolicy(num_workers=2, num_steps=5, local_steps=4)
    actions, dispatched = policy.start(), 0
    while not policy.done:
        sent = [a for a in actions if isinstance(a, Dispatch)]
        dispatched += len(sent)
        actions = [b for a in sent for b in policy.on_gradient(a.worker, a.step)]
    assert policy.summary() == {"mode": "local_sgd", "local_steps": 4, "rounds": 5, "local_steps_per_worker": 20}
    assert dispatched == 2 * 5  # one message per worker per round, whatever H
