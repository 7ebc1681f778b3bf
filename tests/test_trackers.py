"""The TensorBoard and MLflow trackers, read back with each sink's own reader (TensorBoard's loaders, MLflow's
client) and compared with the run directory's files: a real serial run's metrics.jsonl and summary.json, fed to
the trackers the way the Recorder hands them over (batches of rows), plus fault records written by hand in the
shape the Recorder writes them (a serial run has none)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import make_config
from deploy_support import free_port, require

from sgd_dist.config import ConfigError, load_config
from sgd_dist.run.rundir import read_metrics, read_summary
from sgd_dist.run.trackers import MissingExtra, MlflowTracker, TensorBoardTracker, export_run
from sgd_dist.run.trainer import train

BIN = Path(sys.executable).parent

# the names the trackers give metrics.jsonl's keys (samples/s is derived)
NAMES = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "weight_norm": "train/weight_norm",
         "staleness": "train/staleness", "eval_loss": "eval/loss", "optimality_gap": "eval/optimality_gap",
         "bytes_up": "comm/bytes_up", "bytes_down": "comm/bytes_down"}
FAULTS = [
    {"fault": "worker_lost", "worker": 1, "step": 12, "noticed_unix": 1.7e9, "cause": "ActorDiedError: it died"},
    {"fault": "worker_replaced", "worker": 1, "step": 14, "lost_step": 12, "recovery_s": 1.25, "answers_meanwhile": 3,
     "redone": {"kind": "gradient", "step": 6, "version": 12}},
]
STEPS = 30


def needs(module: str) -> None:
    """Skip when an optional package is missing here; fail under CI=true, where .ci/run installs the extras."""
    require(importlib.util.find_spec(module) is not None,
            f"{module} is not installed: pip install -e '.[tensorboard,mlflow]'")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    """A real serial run: 3 asynchronous workers (gradients 0 to 2 updates stale), worker 2 three times slower."""
    out = tmp_path_factory.mktemp("recorded") / "run"
    train(make_config("cluster.backend=serial", "cluster.num_workers=3", "train.mode=async", f"train.steps={STEPS}",
                      f"output.dir={out}", stragglers={"slowdown": {"2": 3.0}}), console=False)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(STEPS + 1))
    assert len(read_summary(out)["staleness"]["counts"]) > 1  # a histogram with something to show
    return out


@pytest.fixture
def run_dir(recorded, tmp_path) -> Path:
    """A copy of the run for one test to write into (the trackers add tensorboard/ and mlflow.json)."""
    return Path(shutil.copytree(recorded, tmp_path / recorded.name))


def expected(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Each name's (step, value) series from metrics.jsonl: every non-null value, and samples/s between
    consecutive rows."""
    series = {name: [(r["step"], r[key]) for r in rows if r.get(key) is not None] for key, name in NAMES.items()}
    series["train/samples_per_s"] = [
        (b["step"], (b["samples_seen"] - a["samples_seen"]) / (b["wall_time_s"] - a["wall_time_s"]))
        for a, b in zip(rows, rows[1:], strict=False)]
    return series


def feed(tracker, rows: list[dict], batch: int = 7) -> None:
    for i in range(0, len(rows), batch):
        tracker.rows(rows[i:i + batch])


def stale(rows: list[dict]) -> list[dict]:
    """Rows as a first attempt computed them before being rewound: other values at the same steps."""
    return [{**r, "loss": r["loss"] + 1.0, "weight_norm": r["weight_norm"] + 1.0} for r in rows]


def write_faults(run_dir: Path, faults: list[dict]) -> None:
    (run_dir / "faults.jsonl").write_text("".join(json.dumps(f) + "\n" for f in faults))


# TensorBoard

def board(log_dir: Path) -> dict[str, list[tuple[int, object]]]:
    """Each scalar and text tag's (step, value) as TensorBoard's own loader serves them (restarts honoured)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    return {tag: [(e.step, _value(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
            for tag in acc.Tags()["tensors"] if acc.SummaryMetadata(tag).plugin_data.plugin_name in ("scalars", "text")}


def _value(array: np.ndarray):
    value = array.item()
    return value.decode() if isinstance(value, bytes) else value


def histograms(log_dir: Path) -> dict:
    """Each histogram tag's events with their min, max, count and sum (TensorBoard's event reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"histograms": 0})
    acc.Reload()
    return {tag: acc.Histograms(tag) for tag in acc.Tags()["histograms"]}


def assert_scalars(got: dict, rows: list[dict]) -> None:
    for name, series in expected(rows).items():
        assert [step for step, _ in got[name]] == [step for step, _ in series], name
        assert [np.float32(v) for _, v in got[name]] == [np.float32(v) for _, v in series], name  # TB keeps float32


def test_tensorboard_has_every_scalar_of_every_step_as_metrics_jsonl_has_it(run_dir):
    needs("tensorboard")
    rows = read_metrics(run_dir)
    given = copy.deepcopy(rows)
    tracker = TensorBoardTracker()
    tracker.start(load_config(run_dir / "config.yaml"), run_dir, resumed=False)
    feed(tracker, rows)
    tracker.finish(read_summary(run_dir), "completed")
    assert tracker.error is None and rows == given  # the Recorder's rows are not changed
    assert_scalars(board(run_dir / "tensorboard"), rows)


def test_tensorboard_shows_the_config_the_faults_at_their_steps_and_the_workers_histograms(run_dir):
    needs("tensorboard")
    write_faults(run_dir, FAULTS)
    assert export_run(run_dir, TensorBoardTracker()) is None
    got, summary = board(run_dir / "tensorboard"), read_summary(run_dir)

    [(step, config)] = got["config/text_summary"]
    assert step == 0 and textwrap.dedent(config) == (run_dir / "config.yaml").read_text().rstrip("\n")
    faults = got["faults/text_summary"]
    assert [step for step, _ in faults] == [f["step"] for f in FAULTS]
    for (_, text), entry in zip(faults, FAULTS, strict=True):
        headline, body = text.split("\n\n", 1)
        assert entry["fault"] in headline and json.loads(textwrap.dedent(body)) == entry
    assert got["status/text_summary"] == [(STEPS, "completed")]

    hists = histograms(run_dir / "tensorboard")
    [staleness] = hists["histograms/staleness"]
    counts = {int(age): n for age, n in summary["staleness"]["counts"].items()}
    h = staleness.histogram_value
    assert staleness.step == STEPS and h.num == sum(counts.values()) and (h.min, h.max) == (min(counts), max(counts))
    assert h.sum == sum(age * n for age, n in counts.items())
    buckets = {age + 0.5: counts.get(age, 0) for age in range(max(counts) + 1)}  # one per age, at its upper edge
    assert dict(zip(h.bucket_limit, h.bucket, strict=True)) == buckets
    [answers] = hists["histograms/answer_ms"]
    ms = {int(r): v for r, v in summary["answer_ms"].items()}
    h = answers.histogram_value
    assert h.num == len(ms) == 3 and h.sum == pytest.approx(sum(ms.values()), rel=1e-12)
    assert (h.min, h.max) == pytest.approx((min(ms.values()), max(ms.values())), rel=1e-12)
    for r, v in ms.items():
        series = got[f"workers/answer_ms/worker_{r}"]
        assert [(step, np.float32(value)) for step, value in series] == [(STEPS, np.float32(v))]


def rewound_and_resumed(run_dir: Path) -> None:
    """TensorBoard's records of the run rewound to step 10 (a fault at step 12 before it), then interrupted at 25
    (a fault at 22) and resumed from the step-20 checkpoint; the steps computed before the rewinds had other
    values."""
    rows, config = read_metrics(run_dir), load_config(run_dir / "config.yaml")
    late = {**FAULTS[0], "worker": 0, "step": 22}
    first = TensorBoardTracker()
    first.start(config, run_dir, resumed=False)
    feed(first, rows[:11] + stale(rows[11:17]))
    first.fault(FAULTS[0])
    first.rewind(10)
    feed(first, rows[11:21] + stale(rows[21:26]))
    first.fault(late)  # after the checkpoint the resumed run goes back to
    first.finish(None, "interrupted")
    write_faults(run_dir, [FAULTS[0], late])  # the Recorder's faults.jsonl so far

    resumed = TensorBoardTracker()
    resumed.start(config, run_dir, resumed=True)
    resumed.rewind(20)
    resumed.fault({"fault": "resumed", "step": 20, "at_unix": time.time()})
    feed(resumed, rows[21:])
    resumed.finish(read_summary(run_dir), "completed")
    assert first.error is None and resumed.error is None


def test_tensorboard_keeps_each_step_once_with_its_last_values_after_a_rewind_and_a_resume(run_dir):
    """Each step once, with the values computed last (metrics.jsonl's), every fault kept (those past the step
    gone back to included), the interrupted status superseded."""
    needs("tensorboard")
    rewound_and_resumed(run_dir)
    got = board(run_dir / "tensorboard")
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert_scalars(got, read_metrics(run_dir))
    assert sorted(step for step, _ in got["faults/text_summary"]) == [12, 20, 22]
    assert [step for step, _ in got["config/text_summary"]] == [0]
    assert got["status/text_summary"] == [(STEPS, "completed")]


def test_a_tensorboard_directory_named_by_the_user_holds_one_run_per_run_directory(run_dir, tmp_path):
    """`tensorboard --logdir ROOT` sees each run as its own; a run exported again replaces its earlier events."""
    needs("tensorboard")
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    other = Path(shutil.copytree(run_dir, tmp_path / "other"))
    root = tmp_path / "board"
    for d in (run_dir, other, run_dir):
        assert export_run(d, TensorBoardTracker(root)) is None
    assert not (run_dir / "tensorboard").exists()
    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(root))
    assert sorted(mux.Runs()) == sorted([run_dir.name, other.name])
    for name in mux.Runs():
        assert_scalars(board(root / name), read_metrics(run_dir))


def test_a_missing_package_is_one_line_naming_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(MissingExtra, match=r"^output\.tensorboard needs the tensorboard package: "
                                           r"pip install 'sgd_dist\[tensorboard\]'$"):
        TensorBoardTracker()
    with pytest.raises(MissingExtra, match=r"^output\.mlflow needs the mlflow package: "
                                           r"pip install 'sgd_dist\[mlflow\]'$"):
        MlflowTracker("http://127.0.0.1:5000")
    assert issubclass(MissingExtra, ConfigError)  # the CLI's one-line error, exit 2


# MLflow

@pytest.fixture
def file_store(tmp_path, monkeypatch) -> str:
    needs("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store for those who opt in
    return f"file:{tmp_path / 'mlruns'}"


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def params_of(config_yaml: Path) -> dict[str, str]:
    """config.yaml's keys, dotted (a list of mappings by index), each value as text (JSON but for strings)."""
    out = {}

    def walk(value, key):
        if isinstance(value, dict) or (isinstance(value, list) and value and all(isinstance(v, dict) for v in value)):
            for k, v in (value.items() if isinstance(value, dict) else enumerate(value)):
                walk(v, f"{key}.{k}" if key else str(k))
        else:
            out[key] = value if isinstance(value, str) else json.dumps(value)

    walk(yaml.safe_load(config_yaml.read_text()), "")
    return out


def assert_mlflow_run(uri: str, run_id: str, run_dir: Path, status: str) -> None:
    """The run's status, its params (config.yaml), each metric's history (metrics.jsonl, each step once), the
    summary's figures and the run directory among its artifacts."""
    c = client(uri)
    run = c.get_run(run_id)
    assert run.info.status == status
    assert run.data.params == params_of(run_dir / "config.yaml")
    for name, series in expected(read_metrics(run_dir)).items():
        history = sorted(c.get_metric_history(run_id, name), key=lambda m: (m.step, m.timestamp))
        assert [(m.step, m.value) for m in history] == series, name
    summary, metrics = read_summary(run_dir), run.data.metrics
    for key in ("optimality_gap", "samples_per_s", "median_step_ms", "final_loss", "train_time_s"):
        assert metrics[f"summary/{key}"] == summary[key], key
    for r, ms in summary["answer_ms"].items():
        assert metrics[f"summary/answer_ms.{r}"] == ms
    assert metrics["summary/faults"] == len(summary["faults"])
    assert {a.path for a in c.list_artifacts(run_id)} >= {"config.yaml", "metrics.jsonl", "summary.json", "mlflow.json"}
    sent = Path(c.download_artifacts(run_id, "metrics.jsonl", str(run_dir.parent / f"download-{run_id}")))
    assert sent.read_bytes() == (run_dir / "metrics.jsonl").read_bytes()
    saved = json.loads((run_dir / "mlflow.json").read_text())
    assert (saved["run_id"], saved["tracking_uri"], saved["last_step"]) == (run_id, uri, STEPS)


def test_mlflow_records_params_every_steps_metrics_the_summary_artifacts_and_status(run_dir, file_store):
    rows = read_metrics(run_dir)
    tracker = MlflowTracker(file_store, experiment="trackers")
    tracker.start(load_config(run_dir / "config.yaml"), run_dir, resumed=False)
    feed(tracker, rows)
    tracker.fault(FAULTS[0])
    tracker.finish(read_summary(run_dir), "completed")
    assert tracker.error is None
    assert client(file_store).get_run(tracker.run_id).info.run_name == run_dir.name
    assert_mlflow_run(file_store, tracker.run_id, run_dir, "FINISHED")


def resume_twice(uri: str, run_dir: Path) -> tuple[str, str]:
    """Rewound to step 10 in the run and interrupted at 25 (MLflow: KILLED), then resumed from step 20: returns
    both trackers' MLflow run ids."""
    rows, config = read_metrics(run_dir), load_config(run_dir / "config.yaml")
    first = MlflowTracker(uri)
    first.start(config, run_dir, resumed=False)
    feed(first, rows[:17])
    first.rewind(10)
    feed(first, rows[11:26])
    first.finish(None, "interrupted")
    assert client(uri).get_run(first.run_id).info.status == "KILLED"
    resumed = MlflowTracker(uri)
    resumed.start(config, run_dir, resumed=True)
    resumed.rewind(20)
    resumed.fault({"fault": "resumed", "step": 20, "at_unix": time.time()})
    feed(resumed, rows[21:])
    resumed.finish(read_summary(run_dir), "completed")
    assert first.error is None and resumed.error is None
    return first.run_id, resumed.run_id


def test_a_resumed_run_goes_on_in_the_same_mlflow_run_with_each_step_once(run_dir, file_store):
    first, resumed = resume_twice(file_store, run_dir)
    assert resumed == first
    assert_mlflow_run(file_store, resumed, run_dir, "FINISHED")


def test_a_failed_run_is_failed_in_mlflow_with_its_error(run_dir, file_store):
    rows = read_metrics(run_dir)[:8]
    summary = {"status": "failed", "error": "RuntimeError: the server is gone", "steps_recorded": 7, "steps": STEPS,
               "faults": []}
    tracker = MlflowTracker(file_store)
    tracker.start(load_config(run_dir / "config.yaml"), run_dir, resumed=False)
    feed(tracker, rows)
    tracker.finish(summary, "failed")
    run = client(file_store).get_run(tracker.run_id)
    assert run.info.status == "FAILED" and run.data.tags["sgd_dist.error"] == summary["error"]
    assert [m.step for m in client(file_store).get_metric_history(tracker.run_id, "summary/steps_recorded")] == [7]


def test_an_unreachable_tracking_server_is_one_warning_and_export_run_sends_the_run_later(run_dir, file_store, capsys):
    rows, config, summary = read_metrics(run_dir), load_config(run_dir / "config.yaml"), read_summary(run_dir)
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    files = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    tracker = MlflowTracker(uri)
    tracker.start(config, run_dir, resumed=False)
    feed(tracker, rows)
    tracker.fault(FAULTS[0])
    tracker.finish(summary, "completed")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"sgd-dist: warning: MLflow at {uri} failed: ConnectionRefusedError")
    assert str(run_dir) in err[0]
    assert tracker.error is not None and tracker.run_id is None
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == files  # the records untouched

    exporter = MlflowTracker(file_store)
    assert export_run(run_dir, exporter) is None
    assert_mlflow_run(file_store, exporter.run_id, run_dir, "FINISHED")


# a real tracking server on 127.0.0.1

@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """`mlflow server` on a free loopback port (its own file store and artifact root), stopped at the end."""
    needs("mlflow")
    root = tmp_path_factory.mktemp("mlflow-server")
    uri = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true"}
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", uri.rsplit(":", 1)[1], "--workers", "1",
           "--backend-store-uri", f"file:{root / 'store'}", "--artifacts-destination", str(root / "artifacts")]
    log = root / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not start: {log.read_text()[-3000:]}")
                time.sleep(0.25)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.mark.deploy
def test_a_real_tracking_server_records_the_run_and_a_resumed_run_goes_on_in_it(run_dir, tracking_server):
    first, resumed = resume_twice(tracking_server, run_dir)
    assert resumed == first
    assert_mlflow_run(tracking_server, resumed, run_dir, "FINISHED")


@pytest.mark.deploy
def test_export_run_sends_a_finished_run_to_a_real_tracking_server(run_dir, tracking_server):
    write_faults(run_dir, FAULTS)
    exporter = MlflowTracker(tracking_server, experiment="exported")
    assert export_run(run_dir, exporter) is None
    assert client(tracking_server).get_experiment_by_name("exported").experiment_id == \
        client(tracking_server).get_run(exporter.run_id).info.experiment_id
    assert_mlflow_run(tracking_server, exporter.run_id, run_dir, "FINISHED")


def test_tensorboard_itself_serves_each_step_once_after_a_rewind_and_a_resume(run_dir):
    """`tensorboard --logdir` with its fast loader (the Rust data server the tensorboard package ships, which
    reads restarts its own way) serves what the Python loader above does."""
    needs("tensorboard")
    rewound_and_resumed(run_dir)
    base = f"http://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(run_dir), "--host", "127.0.0.1",
           "--port", base.rsplit(":", 1)[1], "--load_fast=true"]
    log = run_dir.parent / "tensorboard.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def get(path: str, **query):
        url = f"{base}/data/plugin/{path}?" + urllib.parse.urlencode({"run": "tensorboard", **query})
        return json.load(urllib.request.urlopen(url, timeout=10))

    want = expected(read_metrics(run_dir))
    try:
        deadline = time.monotonic() + 120
        while True:  # the data server loads in the background: wait for the last record, the final status
            try:
                if STEPS in [t["step"] for t in get("text/text", tag="status/text_summary")]:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"tensorboard did not serve the run: {log.read_text()[-3000:]}")
            time.sleep(0.5)
        for name, series in want.items():
            got = [(step, np.float32(value)) for _, step, value in get("scalars/scalars", tag=name)]
            assert got == [(step, np.float32(v)) for step, v in series], name
        assert sorted(t["step"] for t in get("text/text", tag="faults/text_summary")) == [12, 20, 22]
        assert [t["step"] for t in get("text/text", tag="config/text_summary")] == [0]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
