"""sgd-dist sweep: the grid, target detection and speedup arithmetic without Ray; the smoke sweep on the
session's Ray (rows, resume, refusals, figures). No timing in any assert."""

from __future__ import annotations

import csv
import json
import shutil
import statistics
from pathlib import Path

import pytest
import yaml
from conftest import assert_png

from sgd_dist.cli import main
from sgd_dist.config import ConfigError, load_config
from sgd_dist.core.data import generate
from sgd_dist.run.rundir import read_metrics
from sgd_dist.study.experiment import load_experiment
from sgd_dist.study.plots import plot_sweep
from sgd_dist.study.results import RESULTS_FILE, add_speedups, first_below, gap_scale_of, read_results
from sgd_dist.study.sweep import run_sweep

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "experiments" / "smoke.yaml"
PNG = b"\x89PNG\r\n\x1a\n"


def experiment(tmp_path: Path, name: str = "exp.yaml", **fields) -> Path:
    raw = {"base": str(REPO / "configs" / "default.yaml"),
           "overrides": ["data.n_samples=1024", "train.steps=10", "optim.warmup_steps=0"],
           "grid": {"cluster.num_workers": [1, 2]}, **fields}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# --- pure functions, no Ray ---------------------------------------------------------------------------------

def test_the_grid_expands_in_a_deterministic_order_with_each_runs_batch(tmp_path):
    sweep = load_experiment(experiment(tmp_path,
                                       grid={"cluster.num_workers": [1, 2, 4], "train.mode": ["sync", "async"]},
                                       scaling=["strong", "weak"], global_batch=[64, 128], repeats=2))
    runs = sweep.runs
    assert len(runs) == 2 * (2 * 3 * 2 + 3 * 2)  # repeats x (strong: batches x workers x modes + weak)
    assert [r.repeat for r in runs] == [0] * 18 + [1] * 18  # repeats outermost
    assert [(r.scaling, r.global_batch, dict(r.point)["cluster.num_workers"], dict(r.point)["train.mode"])
            for r in runs[:4]] == [("strong", 64, 1, "sync"), ("strong", 64, 1, "async"), ("strong", 64, 2, "sync"),
                                   ("strong", 64, 2, "async")]
    for run in runs:
        k = run.config.cluster.num_workers
        if run.scaling == "strong":
            assert run.config.train.batch_size * k == run.global_batch
        else:
            assert run.config.train.batch_size == 256  # the default job's per-worker batch
    assert len({r.name for r in runs}) == len(runs)
    assert runs[0].name == "strong,global_batch=64,cluster.num_workers=1,train.mode=sync-r0"
    assert load_experiment(experiment(tmp_path)).runs == load_experiment(experiment(tmp_path)).runs


def test_grid_values_of_any_shape_get_distinct_directory_names(tmp_path):
    sweep = load_experiment(experiment(tmp_path,
                                       grid={"cluster.num_workers": [2], "stragglers.slowdown": [{}, {1: 4.0}]}))
    assert [r.name for r in sweep.runs] == ["cluster.num_workers=2,stragglers.slowdown=empty-r0",
                                            "cluster.num_workers=2,stragglers.slowdown=1_4.0-r0"]
    assert sweep.runs[1].config.stragglers.slowdown == {1: 4.0}


@pytest.mark.parametrize("fields, message", [
    ({"grid": {"cluster.num_wrkers": [1, 2]}}, r"grid point cluster.num_wrkers=1: cluster.num_wrkers: unknown key"),
    ({"grid": {"cluster.num_workers": [1, 0]}},
     r"grid point cluster.num_workers=0: cluster.num_workers: .*greater than or equal to 1"),
    ({"grid": {"train.mode": ["sync", "fast"]}}, r"grid point train.mode=fast: train.mode: Input should be"),
    ({"grid": {"cluster.num_workers": []}}, r"^experiment '.*': grid cluster\.num_workers lists no values$"),
    # one message per reserved key, read as a sentence (no "grid: grid ...", no advice about another key)
    ({"grid": {"output.dir": ["x"]}}, r"^experiment '.*': grid output\.dir: the sweep sets output\.dir itself \(each "
                                      r"run's directory is under --out\); it cannot be gridded$"),
    ({"grid": {"cluster.address": ["auto"]}}, r"^experiment '.*': grid cluster\.address: every run of a sweep uses the "
                                              r"one Ray the sweep joins; set cluster\.address in the base config$"),
    ({"scaling": "strong"}, r"scaling: strong needs global_batch"),
    ({"scaling": "strong", "global_batch": 3}, r"global_batch=3 does not split evenly over cluster.num_workers=2"),
    ({"scaling": "sideways"}, r"scaling.0: Input should be 'strong' or 'weak'"),
    ({"repeat": 2}, r"repeat: unknown key"),
    ({"base": "nowhere.yaml"}, r"base config 'nowhere.yaml' not found"),
])
def test_a_bad_experiment_is_one_line_naming_the_field(tmp_path, fields, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_experiment(experiment(tmp_path, **fields))
    assert "\n" not in str(info.value)


def test_the_target_is_the_first_evaluated_row_below_the_relative_gap():
    rows = [{"step": 0, "optimality_gap": 1.0}, {"step": 1, "loss": 2.0},
            {"step": 5, "optimality_gap": 0.02}, {"step": 10, "optimality_gap": 0.004},
            {"step": 15, "optimality_gap": 0.0001}]
    assert first_below(rows, 4.0, 1e-2)["step"] == 5  # 0.02 / 4 = 0.005
    assert first_below(rows, 2.0, 1e-2)["step"] == 10  # 0.02 / 2 = 0.01 is not below 1e-2
    assert first_below(list(reversed(rows)), 1.0, 1e-2)["step"] == 10
    assert first_below(rows, 1.0, 1e-5) is None
    assert first_below(rows, None, 1e-2) is None and first_below(rows, 0.0, 1e-2) is None


def test_a_relative_gap_divides_by_f_star_and_by_the_initial_gap_where_f_star_is_0():
    assert gap_scale_of({"optimal_loss": 2.0, "gap_scale": 2.0}) == 2.0
    assert gap_scale_of({"optimal_loss": 0.0, "gap_scale": 5.0}) == 5.0
    assert gap_scale_of({"optimal_loss": 2.0}) == 2.0  # a record written before the scale was


def test_a_sweep_where_least_squares_interpolates_measures_its_target_against_the_initial_gap(tmp_path):
    # 64 rows of 9,000 features: f* = 0 without w* (the exact optimum is not computed past d = 8,192)
    overrides = ["data.n_samples=64", "data.n_features=9000", "train.steps=30", "train.batch_size=16",
                 "train.eval_every=2", "optim.lr=1e-3", "optim.warmup_steps=0", "cluster.backend=serial"]
    path = experiment(tmp_path, overrides=overrides,
                      target_gap=0.3)
    out = tmp_path / "out"
    run_sweep(load_experiment(path), out, plots=False)
    for row in read_results(out / RESULTS_FILE):
        _, y = generate(load_config(out / "runs" / row["run"] / "config.yaml").data)
        initial = float((y.double() ** 2).mean())  # f(w0) at w0 = 0, by hand; f* = 0
        metrics = read_metrics(out / "runs" / row["run"])
        summary = json.loads((out / "runs" / row["run"] / "summary.json").read_text())
        assert row["optimal_loss"] == 0.0 and summary["gap_scale_is"].startswith("f(w0) - f*")
        assert row["gap_scale"] == summary["gap_scale"] == pytest.approx(initial, rel=1e-6)
        # divided by f* = 0 there would be no relative gap and no target
        hit = next(m for m in metrics if m.get("optimality_gap") is not None and m["optimality_gap"] / initial < 0.3)
        assert 0 < row["target_step"] == hit["step"] < 30
        assert row["final_relative_gap"] == pytest.approx(metrics[-1]["optimality_gap"] / initial, rel=1e-6)
        assert summary["relative_optimality_gap"] == pytest.approx(row["final_relative_gap"], rel=1e-12)


def _row(scaling, k, repeat, sps, t, gb, mode="sync"):
    return {"scaling": scaling, "cluster.num_workers": str(k), "train.mode": mode, "num_workers": k, "repeat": repeat,
            "status": "completed", "samples_per_s": sps, "target_time_s": t, "global_batch": gb}


def test_speedup_and_efficiency_against_the_mean_of_the_one_worker_repeats():
    keys = ["cluster.num_workers", "train.mode"]
    rows = add_speedups([
        _row("strong", 1, 0, 100.0, 4.0, 64), _row("strong", 1, 1, 120.0, 6.0, 64),
        _row("strong", 2, 0, 150.0, 2.5, 64), _row("strong", 4, 0, 300.0, None, 64),
        _row("weak", 1, 0, 100.0, 1.0, 32), _row("weak", 4, 0, 320.0, 9.0, 128),
        _row("weak", 2, 0, 999.0, 1.0, 64, mode="async"),  # no 1-worker async run: no speedup
    ], keys)
    assert rows[2]["speedup"] == pytest.approx(5.0 / 2.5) and rows[2]["speedup_basis"] == "time_to_target"
    assert rows[2]["efficiency"] == pytest.approx(1.0)
    assert rows[3]["speedup"] == pytest.approx(300 / 110) and rows[3]["speedup_basis"] == "samples_per_s"
    assert rows[5]["speedup"] == pytest.approx(3.2) and rows[5]["efficiency"] == pytest.approx(0.8)
    assert rows[5]["speedup_basis"] == "samples_per_s"
    assert rows[6]["speedup"] is None and rows[6]["efficiency"] is None


def test_figures_from_a_hand_written_sweep_directory(tmp_path):
    """Every figure from results.csv and metrics.jsonl alone, no Ray: a crossover over two problem sizes."""
    grid = ["cluster.num_workers", "data.n_features"]
    rows = []
    for d in (10, 1000):
        for k in (1, 2, 4):
            name = f"cluster.num_workers={k},data.n_features={d}-r0"
            run = tmp_path / "runs" / name
            run.mkdir(parents=True)
            with open(run / "metrics.jsonl", "w") as f:
                for step in range(0, 101, 10):
                    metric = {"step": step, "wall_time_s": step * 0.01 / k, "optimality_gap": 2.0 / (1 + step)}
                    f.write(json.dumps(metric) + "\n")
            rows.append({"run": name, "scaling": "weak", "cluster.num_workers": k, "data.n_features": d, "repeat": 0,
                         "num_workers": k, "mode": "sync", "n_features": d, "worker_batch": 32, "global_batch": 32 * k,
                         "status": "completed", "samples_per_s": 1000.0 * (k if d == 1000 else 1 / k),
                         "optimal_loss": 1.0, "target_step": 100 // k, "target_time_s": 1.0 / k})
    add_speedups(rows, grid)
    with open(tmp_path / RESULTS_FILE, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["run", "scaling", *grid, "repeat", "num_workers", "mode", "n_features",
                                               "worker_batch", "global_batch", "status", "samples_per_s",
                                               "optimal_loss", "target_step", "target_time_s", "speedup", "efficiency",
                                               "speedup_basis"],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    figures = plot_sweep(tmp_path)
    # no run directory holds a config.yaml or summary.json here: nothing to fit the cost model on
    skipped = dict(figures.skipped)
    assert set(skipped) == {"batch_regimes.png", "local_sgd.png", "modes_time.png", "predicted_speedup.png"}
    assert "cannot be fitted" in skipped["predicted_speedup.png"]
    assert {p.name for p in figures.drawn} == {"scaling.png", "time_to_target.png", "loss_time.png", "crossover.png",
                                               "batch.png"}
    for path in figures.drawn:
        assert_png(path)


# --- the smoke sweep on the session's Ray -------------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke(ray_session, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep") / "smoke"
    result = run_sweep(load_experiment(SMOKE), out, plots=False)
    assert (result.ran, result.kept, result.failed) == (4, 0, 0)
    return out


@pytest.mark.slow
def test_the_smoke_sweep_writes_one_well_formed_row_per_run(smoke):
    rows = read_results(smoke / RESULTS_FILE)
    sweep = load_experiment(SMOKE)
    assert [r["run"] for r in rows] == [p.name for p in sweep.runs]
    assert [(r["scaling"], r["num_workers"], r["global_batch"]) for r in rows] == [
        ("strong", 1, 32), ("strong", 2, 32), ("weak", 1, 16), ("weak", 2, 32)]
    assert (smoke / "experiment.yaml").is_file()
    for row in rows:
        assert row["status"] == "completed" and row["error"] is None
        assert row["samples_per_s"] > 0 and row["median_step_ms"] > 0 and row["steps"] == 60
        summary = json.loads((smoke / "runs" / row["run"] / "summary.json").read_text())
        assert summary["num_workers"] == row["num_workers"]
    by_time = []
    for scaling in ("strong", "weak"):
        base = [r for r in rows if r["scaling"] == scaling and r["num_workers"] == 1]
        for row in (r for r in rows if r["scaling"] == scaling):
            if scaling == "strong" and row["target_time_s"] is not None and all(b["target_time_s"] for b in base):
                assert row["speedup_basis"] == "time_to_target"
                expected = statistics.fmean(b["target_time_s"] for b in base) / row["target_time_s"]
                by_time.append(row["run"])
            else:
                assert row["speedup_basis"] == "samples_per_s"
                expected = row["samples_per_s"] / statistics.fmean(b["samples_per_s"] for b in base)
            assert row["speedup"] == pytest.approx(expected, rel=1e-12)
            assert row["efficiency"] == pytest.approx(expected / row["num_workers"], rel=1e-12)
    assert by_time, "no strong-scaling run reached the target: the time-to-target speedup went unchecked"


def test_steps_to_target_match_the_metrics_rows(smoke):
    rows = read_results(smoke / RESULTS_FILE)
    assert any(row["target_step"] is not None for row in rows), "no run reached the target"
    for row in rows:
        metrics = read_metrics(smoke / "runs" / row["run"])
        below = [m for m in metrics if m.get("optimality_gap") is not None
                 and m["optimality_gap"] / row["optimal_loss"] < 1e-2]
        first = min(below, key=lambda m: m["step"]) if below else None
        assert row["target_step"] == (first and first["step"])
        assert row["target_time_s"] == (first and first["wall_time_s"])
        last = max((m for m in metrics if m.get("optimality_gap") is not None), key=lambda m: m["step"])
        assert row["final_relative_gap"] == pytest.approx(last["optimality_gap"] / row["optimal_loss"])


@pytest.mark.slow
def test_resume_keeps_finished_runs_and_redoes_half_written_ones(smoke, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(smoke, out)
    runs = sorted((out / "runs").iterdir())
    shutil.rmtree(runs[1])  # never started
    (runs[3] / "summary.json").unlink()  # killed mid-run: metrics but no summary
    kept = {p.name: (p / "summary.json").read_bytes() for p in (runs[0], runs[2])}
    mtimes = {p.name: (p / "summary.json").stat().st_mtime_ns for p in (runs[0], runs[2])}
    result = run_sweep(load_experiment(SMOKE), out, plots=False)
    assert (result.ran, result.kept, result.failed) == (2, 2, 0)
    for name, data in kept.items():
        assert (out / "runs" / name / "summary.json").read_bytes() == data
        assert (out / "runs" / name / "summary.json").stat().st_mtime_ns == mtimes[name]
    assert json.loads((runs[3] / "summary.json").read_text())["status"] == "completed"
    rows = read_results(out / RESULTS_FILE)
    assert len(rows) == 4 and all(r["status"] == "completed" for r in rows)


def test_a_different_experiment_in_the_same_out_is_refused(smoke, tmp_path, capsys):
    other = tmp_path / "other.yaml"
    raw = yaml.safe_load(SMOKE.read_text())
    other.write_text(yaml.safe_dump({**raw, "base": str(REPO / "configs" / "default.yaml"), "repeats": 2}))
    before = {p: p.stat().st_mtime_ns for p in smoke.rglob("*")}
    assert main(["sweep", "--config", str(other), "--out", str(smoke)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sgd-dist: error: --out") and "different experiment (base, repeats differ)" in err
    assert "\n" not in err
    assert {p: p.stat().st_mtime_ns for p in smoke.rglob("*")} == before


def test_a_bad_grid_exits_2_in_one_line_before_any_run(tmp_path, capsys):
    path = experiment(tmp_path, grid={"cluster.num_workers": [1, 2], "train.batch_size": [16, -1]})
    out = tmp_path / "out"
    assert main(["sweep", "--config", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "grid point cluster.num_workers=1 train.batch_size=-1: train.batch_size" in err and "\n" not in err
    assert not out.exists()


def test_plot_draws_the_sweeps_figures_and_reports_the_rest(smoke, capsys):
    assert main(["plot", str(smoke)]) == 0
    lines = capsys.readouterr().out.splitlines()
    drawn = [Path(line) for line in lines if not line.startswith("skipped ")]
    skipped = [line for line in lines if line.startswith("skipped ")]
    assert {p.name for p in drawn} >= {"scaling.png", "loss_time.png", "predicted_speedup.png"}
    for path in drawn:
        assert path.read_bytes()[:8] == PNG
        assert_png(path)
    assert "skipped crossover.png: needs 2 or more problem sizes (grid data.n_features)" in skipped
    assert len(drawn) + len(skipped) == 9


def test_the_sweep_reports_the_cost_models_prediction_beside_every_run(smoke):
    from sgd_dist.study.model_report import MODEL_FILE, PREDICTED_FILE
    from sgd_dist.study.results import PREDICTION_COLUMNS

    with open(smoke / RESULTS_FILE, newline="") as f:
        header = next(csv.reader(f))
    assert header[-len(PREDICTION_COLUMNS):] == PREDICTION_COLUMNS  # appended at the end: old readers unchanged
    timed = 0
    for row in read_results(smoke / RESULTS_FILE):
        assert row["predicted_step_ms"] > 0 and row["predicted_samples_per_s"] > 0
        assert row["step_ms_error_pct"] == pytest.approx(
            100 * (row["predicted_step_ms"] - row["median_step_ms"]) / row["median_step_ms"], rel=1e-9)
        assert row["samples_per_s_error_pct"] == pytest.approx(
            100 * (row["predicted_samples_per_s"] - row["samples_per_s"]) / row["samples_per_s"], rel=1e-9)
        if row["target_time_s"] is not None and row["predicted_seconds_to_target"] is not None:
            assert row["seconds_to_target_error_pct"] == pytest.approx(
                100 * (row["predicted_seconds_to_target"] - row["target_time_s"]) / row["target_time_s"], rel=1e-9)
            timed += 1
        assert row["prediction_fit"] in ("leave-one-point-out", "all runs (nothing else to fit)")
    assert timed, "no run reached the target with a predicted time to it: its error went unchecked"
    saved = json.loads((smoke / MODEL_FILE).read_text())
    model = saved["model"]
    assert model["num_runs"] == 4
    # fitted from timings, so either gradient term may come out at 0 on a noisy machine (CI's fit once put all of a
    # 16-row gradient in the per-element term); a zero is then named unidentified, and the gradient is never free
    profile = model["profile"]
    assert profile["grad_s"] >= 0 and profile["grad_s_per_elem"] >= 0
    assert profile["grad_s"] + profile["grad_s_per_elem"] * 16 * 3 > 0
    for name in ("grad_s", "grad_s_per_elem"):
        assert (profile[name] == 0) == (name in model["unidentified"]), name
    assert "step_ms_error_pct" in saved["errors"]
    with open(smoke / PREDICTED_FILE, newline="") as f:
        predicted = list(csv.DictReader(f))
    measured = [r for r in predicted if r["network"].startswith("as measured")]
    weak = [int(r["num_workers"]) for r in measured if r["scaling"] == "weak"]
    assert weak == [2 ** i for i in range(11)]
    strong = [int(r["num_workers"]) for r in measured if r["scaling"] == "strong"]
    assert strong == [1, 2, 4, 8, 16, 32]  # a global batch of 32 splits over at most 32 workers


def test_sgd_dist_model_prints_the_coefficients_errors_and_predicted_table(smoke, capsys):
    assert main(["model", str(smoke), "--workers-max", "64", "--latency-us", "50", "--bandwidth-gbps", "1"]) == 0
    out = capsys.readouterr().out
    assert "gradient" in out and "server answer" in out and "median |error|" in out
    assert "network 1.0 Gbit/s, 50 us latency" in out and ("stops paying" in out or "still paying" in out)
    assert main(["model", str(smoke / "runs")]) == 2


def test_plot_draws_the_predicted_speedup_from_an_old_results_csv(smoke, tmp_path):
    """A sweep directory from before the cost model: results.csv without its columns, no cost_model.json."""
    from sgd_dist.study.results import PREDICTION_COLUMNS

    old = tmp_path / "old"
    shutil.copytree(smoke, old)
    (old / "cost_model.json").unlink()
    with open(old / RESULTS_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(old / RESULTS_FILE, "w", newline="") as f:
        fields = [c for c in rows[0] if c not in PREDICTION_COLUMNS]
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    figures = plot_sweep(old)
    assert "predicted_speedup.png" in {p.name for p in figures.drawn}
    assert_png(old / "predicted_speedup.png")


def test_a_failing_run_is_a_row_and_exit_1_and_is_tried_again_on_resume(ray_session, tmp_path, capsys):
    """9 workers on the session's 8 CPUs: the run fails at once (nothing started), the sweep goes on."""
    path = experiment(tmp_path, grid={"cluster.num_workers": [9], "train.batch_size": [16]})
    out = tmp_path / "out"
    assert main(["sweep", "--config", str(path), "--out", str(out), "--no-plots"]) == 1
    captured = capsys.readouterr()
    assert ("sweep [1/1] cluster.num_workers=9 train.batch_size=16 r0: FAILED: ClusterError: "
            "cluster.num_workers=9 needs 9 CPUs") in captured.err
    assert "1 runs: 1 run now, 0 kept from before, 1 failed" in captured.out
    [row] = read_results(out / RESULTS_FILE)
    assert row["status"] == "failed" and "needs 9 CPUs" in row["error"] and row["speedup"] is None
    assert run_sweep(load_experiment(path), out, plots=False).ran == 1  # not kept: tried again


def test_a_diverged_run_is_a_row_not_a_failure_and_is_kept_on_resume(tmp_path, capsys):
    """Serial runs, no Ray: lr 1e6 diverges. The sweep records it as diverged, exits 0, and on resume keeps it (the
    same config would diverge again) without touching its files."""
    path = experiment(tmp_path, overrides=["data.n_samples=1024", "train.steps=10", "optim.warmup_steps=0",
                                           "cluster.backend=serial"], grid={"optim.lr": [0.01, 1e6]})
    out = tmp_path / "out"
    assert main(["sweep", "--config", str(path), "--out", str(out), "--no-plots"]) == 0
    assert "2 runs: 2 run now, 0 kept from before, 0 failed" in capsys.readouterr().out
    rows = read_results(out / RESULTS_FILE)
    assert [r["status"] for r in rows] == ["completed", "diverged"]
    assert rows[1]["error"].startswith("DivergenceError: the mini-batch loss is")
    diverged = out / "runs" / rows[1]["run"]
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in diverged.iterdir()}
    assert main(["sweep", "--config", str(path), "--out", str(out), "--no-plots"]) == 0
    captured = capsys.readouterr()
    assert "2 runs: 0 run now, 2 kept from before, 0 failed" in captured.out
    assert "optim.lr=1000000.0 r0: diverged (DivergenceError: " in captured.err
    assert "(done before, kept)" in captured.err
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in diverged.iterdir()} == before
    assert [r["status"] for r in read_results(out / RESULTS_FILE)] == ["completed", "diverged"]


@pytest.mark.slow
def test_ctrl_c_stops_a_sweep_with_exit_130_and_the_command_that_resumes_it(tmp_path, capsys):
    """SIGINT (as a terminal sends it) during the second of two serial runs: exit 130 and one line saying how to
    resume; the same command then keeps the first run and redoes the interrupted one."""
    import signal
    import subprocess
    import sys
    import time

    path = experiment(tmp_path, overrides=["data.n_samples=1024", "optim.warmup_steps=0", "cluster.backend=serial",
                                           "stragglers.delay=uniform", "stragglers.delay_ms=20"],
                      grid={"train.steps": [10, 100]})
    out = tmp_path / "out"
    second = out / "runs" / "train.steps=100-r0" / "metrics.jsonl"
    proc = subprocess.Popen([str(Path(sys.executable).with_name("sgd-dist")), "sweep", "--config", str(path),
                             "--out", str(out), "--no-plots"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not (second.is_file() and len(second.read_text().splitlines()) >= 5):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert stderr.splitlines()[-1] == (f"sgd-dist: error: interrupted; run the same command again (--out {out}) "
                                       "to resume")
    assert [r["status"] for r in read_results(out / RESULTS_FILE)] == ["completed"]
    assert json.loads((second.parent / "summary.json").read_text())["status"] == "interrupted"
    assert main(["sweep", "--config", str(path), "--out", str(out), "--no-plots"]) == 0
    assert "2 runs: 1 run now, 1 kept from before, 0 failed" in capsys.readouterr().out
    assert [r["status"] for r in read_results(out / RESULTS_FILE)] == ["completed", "completed"]
