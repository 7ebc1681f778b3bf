"""Observability wired into real runs: train() with output.tensorboard and output.mlflow read back with each
sink's own reader and compared with metrics.jsonl (an interrupted and resumed run included, and a tracker that
cannot be reached); the settings' one-line errors; the per-worker table in summary.json and on the console,
checked against numpy on the answer times schedule.jsonl records; loss.png's per-worker panel; results.csv's
worst-worker ratio."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_png, make_config
from deploy_support import free_port
from test_trackers import assert_mlflow_run, assert_scalars, board, client, needs

from sgd_dist.cli import main
from sgd_dist.config import ConfigError, dump_config
from sgd_dist.run.plots import plot_run, worker_series
from sgd_dist.run.recorder import Recorder
from sgd_dist.run.rundir import read_metrics, read_summary
from sgd_dist.run.trackers import MissingExtra, MlflowTracker, export_run
from sgd_dist.run.trainer import train

STEPS = 30  # test_trackers' assert_mlflow_run expects the run's last step to be 30


def async_config(run_dir: Path, *overrides: str, **sections):
    """A serial run of 3 asynchronous workers, worker 2 three times slower (stale gradients to show)."""
    return make_config("cluster.backend=serial", "cluster.num_workers=3", "train.mode=async", f"train.steps={STEPS}",
                       f"output.dir={run_dir}", *overrides, stragglers={"slowdown": {"2": 3.0}}, **sections)


def schedule_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "schedule.jsonl").read_text().splitlines()]


@pytest.fixture
def file_store(tmp_path, monkeypatch) -> str:
    needs("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return f"file:{tmp_path / 'mlruns'}"


# TensorBoard and MLflow from train()

def test_a_run_with_tensorboard_on_writes_every_step_metrics_jsonl_has(tmp_path):
    needs("tensorboard")
    run = train(async_config(tmp_path / "run", "output.tensorboard=true"), console=False).run_dir
    assert_scalars(board(run / "tensorboard"), read_metrics(run))
    assert board(run / "tensorboard")["status/text_summary"] == [(STEPS, "completed")]


def test_a_tensorboard_directory_named_in_the_config_gets_one_directory_per_run(tmp_path):
    needs("tensorboard")
    root = tmp_path / "board"
    for name in ("a", "b"):
        train(async_config(tmp_path / name, f"output.tensorboard={root}"), console=False)
    assert sorted(p.name for p in root.iterdir()) == ["a", "b"]
    assert not (tmp_path / "a" / "tensorboard").exists()
    assert_scalars(board(root / "a"), read_metrics(tmp_path / "a"))


def test_a_run_with_mlflow_on_records_params_metrics_summary_artifacts_and_status(tmp_path, file_store):
    mlflow = {"tracking_uri": file_store, "experiment": "e", "run_name": "mine"}
    run = train(async_config(tmp_path / "run", "output.plots=true", output={"mlflow": mlflow}), console=False).run_dir
    run_id = json.loads((run / "mlflow.json").read_text())["run_id"]
    assert client(file_store).get_run(run_id).info.run_name == "mine"
    assert client(file_store).get_experiment_by_name("e").experiment_id == client(file_store).get_run(
        run_id).info.experiment_id
    assert_mlflow_run(file_store, run_id, run, "FINISHED")
    assert {a.path for a in client(file_store).list_artifacts(run_id)} >= {"loss.png", "schedule.jsonl"}


def interrupt_at(monkeypatch, step: int) -> None:
    """Ctrl-C right after the checkpoint at ``step`` is written."""
    original = Recorder.checkpoint

    def checkpoint_then_interrupt(self, state):
        original(self, state)
        if state["server"]["step"] >= step:
            monkeypatch.setattr(Recorder, "checkpoint", original)
            raise KeyboardInterrupt

    monkeypatch.setattr(Recorder, "checkpoint", checkpoint_then_interrupt)


def test_an_interrupted_run_is_killed_in_mlflow_and_its_resume_goes_on_in_the_same_mlflow_run(
        tmp_path, file_store, monkeypatch):
    needs("tensorboard")
    config = make_config("cluster.backend=serial", f"train.steps={STEPS}", "train.checkpoint_every=10",
                         f"output.dir={tmp_path / 'run'}", "output.tensorboard=true",
                         output={"mlflow": {"tracking_uri": file_store}})
    interrupt_at(monkeypatch, 20)
    with pytest.raises(KeyboardInterrupt):
        train(config, console=False)
    run = tmp_path / "run"
    first = json.loads((run / "mlflow.json").read_text())["run_id"]
    assert client(file_store).get_run(first).info.status == "KILLED"
    assert board(run / "tensorboard")["status/text_summary"][-1][1].startswith("interrupted")
    train(config, console=False, resume=run)
    assert json.loads((run / "mlflow.json").read_text())["run_id"] == first
    assert_mlflow_run(file_store, first, run, "FINISHED")  # each step once, with metrics.jsonl's values
    assert_scalars(board(run / "tensorboard"), read_metrics(run))


def test_an_unreachable_tracking_server_is_one_warning_and_nothing_is_lost(tmp_path, file_store, capsys):
    needs("mlflow")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = train(async_config(tmp_path / "run", output={"mlflow": {"tracking_uri": uri}}), console=False)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"sgd-dist: warning: MLflow at {uri} failed: ")
    assert result.summary["status"] == "completed"
    assert [r["step"] for r in read_metrics(result.run_dir)] == list(range(STEPS + 1))
    exporter = MlflowTracker(file_store)  # later, to a store that is there: the whole run
    assert export_run(result.run_dir, exporter) is None
    assert_mlflow_run(file_store, exporter.run_id, result.run_dir, "FINISHED")


@pytest.mark.parametrize("overrides, message", [
    (("output.tensorboard=' '",), r"^output\.tensorboard: must be true, false or a directory path"),
    (("output.mlflow.experiment=''",), r"^output\.mlflow\.experiment: must not be empty"),
    (("output.mlflow.uri=x",), r"^output\.mlflow\.uri: unknown key$"),
    (("output.ray_metrics=maybe",), r"^output\.ray_metrics: "),
])
def test_a_bad_tracker_setting_is_one_line_naming_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        make_config(*overrides, output={"mlflow": {}})
    assert "\n" not in str(error.value)


def test_mlflow_true_stands_for_its_defaults_and_false_for_none():
    assert make_config("output.mlflow=true").output.mlflow.experiment == "sgd_dist"
    assert make_config("output.mlflow=false").output.mlflow is None


def test_a_missing_tracker_package_fails_the_run_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(MissingExtra, match=r"^output\.tensorboard needs the tensorboard package: "
                                           r"pip install 'sgd_dist\[tensorboard\]'$"):
        train(async_config(tmp_path / "run", "output.tensorboard=true"), console=False)
    assert not (tmp_path / "run").exists()


# Per-worker views

def applied_times(run_dir: Path) -> dict[int, list[float]]:
    """Each worker's answer times in ms, from schedule.jsonl (every answer, when none was dropped)."""
    times: dict[int, list[float]] = {}
    for line in schedule_of(run_dir):
        for (worker, _, _), seconds in zip(line["applied"], line["answer_s"], strict=True):
            times.setdefault(worker, []).append(1e3 * seconds)
    return times


def test_the_summary_holds_each_workers_answers_median_and_p90_time(tmp_path):
    """Sync mode applies every answer, so schedule.jsonl has them all: numpy's median and 90th percentile of
    them are the table's."""
    s = train(make_config("cluster.backend=serial", "cluster.num_workers=3", f"output.dir={tmp_path / 'r'}"),
              console=False).summary
    times = applied_times(tmp_path / "r")
    assert sorted(times) == [0, 1, 2]
    for r, ms in times.items():
        row = s["per_worker"][r]
        assert row["answers"] == len(ms) == 20
        assert row["median_ms"] == pytest.approx(float(np.median(ms)), rel=1e-9)
        assert row["p90_ms"] == pytest.approx(float(np.percentile(ms, 90)), rel=1e-9)
        assert row["dropped_share"] == 0 and row["replacements"] == 0
    table = read_summary(tmp_path / "r")["per_worker"]
    assert set(table) == {"0", "1", "2"}


def test_the_table_counts_each_workers_dropped_answers_in_backup_mode(tmp_path):
    s = train(make_config("cluster.backend=serial", "cluster.num_workers=3", "train.mode=backup",
                          "train.backup_workers=1", f"output.dir={tmp_path / 'r'}"), console=False).summary
    applied = applied_times(tmp_path / "r")
    for r in range(3):
        row = s["per_worker"][r]
        dropped = sum(1 for d in s["dropped"] if d[0] == r)
        assert row["answers"] == len(applied.get(r, [])) + dropped
        assert row["dropped_share"] == pytest.approx(dropped / row["answers"])
    assert sum(row["answers"] for row in s["per_worker"].values()) == 3 * 20


def test_the_console_prints_the_per_worker_table_and_names_the_straggler_with_its_factor(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(dump_config(make_config("cluster.backend=serial", "cluster.num_workers=3",
                                              "data.n_samples=15000", "data.n_features=100", "train.steps=60",
                                              "train.batch_size=4096", "optim.lr=0.01",
                                              "stragglers.slowdown={1: 4.0}")))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    s = read_summary(tmp_path / "r")
    head = out.index("worker  answers  median ms   p90 ms  dropped  replaced")
    rows = out[head + 1:head + 4]
    medians = {r: w["median_ms"] for r, w in s["per_worker"].items()}
    for line, (r, w) in zip(rows, sorted(s["per_worker"].items()), strict=True):
        fields = line.split()
        assert fields[:6] == [r, str(w["answers"]), f"{w['median_ms']:.3f}", f"{w['p90_ms']:.3f}", "0.0%", "0"]
    worst = max(medians, key=medians.get)
    factor = medians[worst] / statistics.median([m for r, m in medians.items() if r != worst])
    assert s["worst_worker_ratio"] == pytest.approx(factor, rel=1e-12)
    assert [x["worker"] for x in s["stragglers"]] == [1]
    assert rows[1].endswith(f"<- straggler, {s['stragglers'][0]['ratio']:.1f}x the others' median")
    assert "straggler" not in rows[0] + rows[2]


def test_loss_png_gains_a_panel_of_each_workers_staleness_and_answer_time(tmp_path):
    from matplotlib.image import imread

    run = train(async_config(tmp_path / "r"), console=False).run_dir
    series = worker_series(run)
    assert sorted(series) == [0, 1, 2]
    counts: dict[int, int] = {}
    for s in series.values():
        for age in s["staleness"]:
            counts[age] = counts.get(age, 0) + 1
    summary = read_summary(run)
    assert {str(a): n for a, n in counts.items()} == summary["staleness"]["counts"]  # the loop's own count
    times = applied_times(run)
    assert {w: s["answer_ms"] for w, s in series.items()} == times
    [path] = plot_run(run)[:1]
    assert_png(path)
    height, width = imread(path).shape[:2]
    assert height == width  # three rows of panels, not two (12 x 8 inches)


def test_results_csv_carries_each_runs_worst_worker_ratio(tmp_path):
    from sgd_dist.study.experiment import load_experiment
    from sgd_dist.study.results import read_results
    from sgd_dist.study.sweep import run_sweep

    experiment = tmp_path / "e.yaml"
    experiment.write_text(json.dumps({
        "base": str(Path(__file__).resolve().parents[1] / "configs" / "default.yaml"),
        "overrides": ["cluster.backend=serial", "data.n_samples=1024", "train.steps=10", "optim.warmup_steps=0"],
        "grid": {"cluster.num_workers": [2, 3]}}))  # JSON is YAML
    result = run_sweep(load_experiment(experiment), tmp_path / "sweep", plots=False)
    rows = read_results(tmp_path / "sweep" / "results.csv")
    assert len(rows) == 2
    for row in rows:
        table = read_summary(tmp_path / "sweep" / "runs" / row["run"])["per_worker"]
        medians = [w["median_ms"] for w in table.values()]
        worst = max(m / statistics.median([o for j, o in enumerate(medians) if j != i]) for i, m in enumerate(medians))
        assert row["worst_worker_ratio"] == pytest.approx(worst, rel=1e-12)
    assert result.failed == 0
