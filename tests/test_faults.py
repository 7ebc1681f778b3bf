"""Fault tolerance, with the real faults: a worker process killed from outside or by ray.kill, the server's
process killed, the driver killed and the run resumed; the synchronous result unchanged bit for bit, the other
modes still replayable, no row lost or duplicated."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_config

from sgd_dist.backends.base import server_args, worker_args
from sgd_dist.cli import main
from sgd_dist.config import ConfigError, load_config
from sgd_dist.engine.evaluations import eval_steps
from sgd_dist.engine.loop import Loop
from sgd_dist.engine.messages import EVALUATE, GRADIENT, LOCAL, Command, WorkerLost
from sgd_dist.engine.policies import make_policy
from sgd_dist.engine.recovery import LoopHooks
from sgd_dist.engine.server import ParameterServer
from sgd_dist.engine.worker import ShardWorker
from sgd_dist.run.checkpoint import CHECKPOINT_DIR, MANIFEST, load_checkpoint
from sgd_dist.run.recorder import Recorder
from sgd_dist.run.replay import replay
from sgd_dist.run.rundir import last_recorded_step, read_metrics, read_summary
from sgd_dist.run.trainer import train
from sgd_dist.transports.local import LocalServerEnd

STEPS = 60
# 10 ms of injected delay per answer on average: long enough to kill things mid-run; a straggler delay changes
# wall time only, so the reference below (without it) computes the very same numbers
BASE = (f"train.steps={STEPS}", "train.eval_every=10", "train.checkpoint_every=10")
SLOW = ("stragglers.delay=uniform", "stragglers.delay_ms=10")
SGD_DIST = str(Path(sys.executable).with_name("sgd-dist"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The undisturbed run, on the serial backend."""
    out = tmp_path_factory.mktemp("reference") / "serial"
    return train(make_config(*BASE, "cluster.backend=serial", f"output.dir={out}"), console=False, progress=False)


def assert_same_run(run_dir: Path, reference, steps: int = STEPS) -> None:
    """Every step recorded once, each loss and evaluation and the final weights bit-equal to the reference."""
    rows, expected = read_metrics(run_dir), read_metrics(reference.run_dir)
    assert [r["step"] for r in rows] == list(range(steps + 1))
    assert [r["loss"] for r in rows] == [r["loss"] for r in expected]
    assert [r.get("eval_loss") for r in rows] == [r.get("eval_loss") for r in expected]
    assert read_summary(run_dir)["weights"] == reference.summary["weights"]


def assert_rewound_rows_kept(run_dir: Path, steps: range, everyone: bool = False) -> None:
    """The rows recorded after the restored checkpoint were moved to metrics.rewound.jsonl, not lost; in sync
    mode the redone steps computed the same losses."""
    path = run_dir / "metrics.rewound.jsonl"  # absent if no row after the checkpoint had reached the driver
    rewound = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    assert {r["step"] for r in rewound} <= set(steps)
    if everyone:
        assert [r["step"] for r in rewound] == list(steps)
    final = {r["step"]: r for r in read_metrics(run_dir)}
    assert all(r["loss"] == final[r["step"]]["loss"] for r in rewound)


def faults_of(summary: dict, kind: str) -> list[dict]:
    return [f for f in summary["faults"] if f["fault"] == kind]


# -- worker loss ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("transport", ["shm", "ray"])
@pytest.mark.slow
def test_a_worker_killed_from_outside_is_replaced_and_sync_ends_bit_equal(ray_session, tmp_path, monkeypatch,
                                                                          reference, transport):
    """SIGKILL to a worker's process from outside: noticed within 2 s, replaced (its shard regenerated), its
    step redone; every loss and the final weights equal the undisturbed run's."""
    import sgd_dist.backends.ray.backend as ray_backend

    killed: dict = {}
    original_run, original_rows = ray_backend.RayBackend.run, Recorder.rows

    def run(self, *args, **kwargs):
        killed["pid"] = self.info[1]["pid"]
        return original_run(self, *args, **kwargs)

    def rows(self, batch):
        original_rows(self, batch)
        if batch and batch[-1]["step"] >= 5 and "at" not in killed:
            killed["at"] = time.time()
            os.kill(killed["pid"], signal.SIGKILL)

    monkeypatch.setattr(ray_backend.RayBackend, "run", run)
    monkeypatch.setattr(Recorder, "rows", rows)
    result = train(make_config(*BASE, *SLOW, f"cluster.transport={transport}", f"output.dir={tmp_path / 'k'}"),
                   console=False, progress=False)
    assert_same_run(result.run_dir, reference)
    (lost,) = faults_of(result.summary, "worker_lost")
    assert lost["worker"] == 1 and lost["noticed_unix"] - killed["at"] < 2.0
    assert result.summary["status"] == "completed" and result.summary["replacements"] == {1: 1}
    assert result.summary["transport"] == transport


@pytest.mark.parametrize("transport", ["shm", "ray"])
@pytest.mark.slow
def test_a_worker_removed_by_ray_kill_is_replaced_and_sync_ends_bit_equal(ray_session, tmp_path, reference,
                                                                          transport):
    config = make_config(*BASE, *SLOW, f"cluster.transport={transport}", f"output.dir={tmp_path / 'k'}",
                         "faults=[{kind: kill_worker, worker: 0, step: 12, how: ray_kill}]")
    result = train(config, console=False, progress=False)
    assert_same_run(result.run_dir, reference)
    (injected,) = faults_of(result.summary, "kill_worker")
    (lost,) = faults_of(result.summary, "worker_lost")
    (replaced,) = faults_of(result.summary, "worker_replaced")
    assert injected["how"] == "ray_kill" and lost["worker"] == 0 and lost["noticed_s"] < 2.0
    assert replaced["worker"] == 0 and replaced["recovery_s"] > 0 and replaced["redone"]["kind"] == GRADIENT


@pytest.mark.parametrize("transport", ["shm", "ray"])
@pytest.mark.slow
def test_a_worker_lost_while_it_evaluates_is_replaced_and_its_evaluation_redone(ray_session, tmp_path, reference,
                                                                                transport):
    """The kill lands right after update 20, which is evaluated: the worker dies holding its evaluation
    command, which its replacement computes on the same snapshot; the evaluation row is still exact."""
    config = make_config(*BASE, *SLOW, f"cluster.transport={transport}", f"output.dir={tmp_path / 'e'}",
                         "faults=[{kind: kill_worker, worker: 1, step: 20}]")
    result = train(config, console=False, progress=False)
    assert_same_run(result.run_dir, reference)
    (lost,) = faults_of(result.summary, "worker_lost")
    (replaced,) = faults_of(result.summary, "worker_replaced")
    assert lost["worker"] == 1 and lost["noticed_s"] < 2.0
    assert replaced["redone"] == {"kind": EVALUATE, "step": 0, "version": 20}


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.slow
def test_every_worker_lost_at_once_is_replaced_side_by_side(ray_session, tmp_path, reference, mode):
    """Both workers killed at the same update: both replacements start together and the run goes on; sync is
    still bit-equal, async still replays."""
    config = make_config(*BASE, *SLOW, f"train.mode={mode}", f"output.dir={tmp_path / mode}",
                         "faults=[{kind: kill_worker, worker: 0, step: 12}, {kind: kill_worker, worker: 1, step: 12}]")
    result = train(config, console=False, progress=False)
    lost = faults_of(result.summary, "worker_lost")
    assert sorted(f["worker"] for f in lost) == [0, 1] and all(f["noticed_s"] < 2.0 for f in lost)
    assert result.summary["replacements"] == {0: 1, 1: 1}
    assert sorted(f["worker"] for f in faults_of(result.summary, "worker_replaced")) == [0, 1]
    if mode == "sync":
        assert_same_run(result.run_dir, reference)
    else:
        assert [r["step"] for r in read_metrics(result.run_dir)] == list(range(STEPS + 1))
        assert replay(result.run_dir, tmp_path / "replayed").exact


@pytest.mark.parametrize("mode, transport", [("async", "shm"), ("ssp", "ray"), ("backup", "shm")])
@pytest.mark.slow
def test_the_other_modes_go_on_through_a_worker_loss_and_still_replay_exactly(ray_session, tmp_path, mode, transport):
    # a staleness bound of 100: SSP's fast worker may run 100 local steps ahead while the other is replaced
    extra = {"ssp": ["train.staleness_bound=100"], "backup": ["cluster.num_workers=3", "train.backup_workers=1"]}
    config = make_config("train.steps=200", "train.eval_every=50", f"train.mode={mode}", *extra.get(mode, []), *SLOW,
                         f"cluster.transport={transport}", f"output.dir={tmp_path / mode}",
                         "faults=[{kind: kill_worker, worker: 1, step: 15}]")
    result = train(config, console=False, progress=False)
    (lost,) = faults_of(result.summary, "worker_lost")
    (replaced,) = faults_of(result.summary, "worker_replaced")
    assert lost["worker"] == replaced["worker"] == 1 and lost["noticed_s"] < 2.0
    assert replaced["lost_step"] == lost["step"]
    rows = read_metrics(result.run_dir)
    assert [r["step"] for r in rows] == list(range(201))
    # the others went on while worker 1 came back (a loop that waited for the replacement would count 0 here)
    assert replaced["answers_meanwhile"] >= 5
    if mode != "ssp":  # SSP's updates need every worker's gradient: the fast one runs ahead, up to the bound
        assert replaced["step"] - replaced["lost_step"] >= 5
    report = replay(result.run_dir, tmp_path / f"{mode}-replay")
    assert report.exact, report


# -- server loss ---------------------------------------------------------------------------------------------

def rewound(run_dir: Path, name: str) -> list[dict]:
    """The rows a rewind moved out of ``name``.jsonl (metrics or schedule): the file must exist."""
    return [json.loads(line) for line in (run_dir / f"{name}.rewound.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("transport", ["shm", "ray"])
@pytest.mark.slow
def test_a_killed_server_is_restored_from_its_checkpoint_and_sync_ends_bit_equal(ray_session, tmp_path, reference,
                                                                                  transport):
    """The server dies right after update 25; the checkpoint of update 20 is restored. Worker 0's gradient for
    update 23 is 0.5 s late, so the server has handed rows 21-23 out (it does every 0.2 s) before it dies: the
    driver moves them aside, and the redone steps compute the very same losses."""
    config = make_config(*BASE, f"cluster.transport={transport}", f"output.dir={tmp_path / 's'}",
                         "faults=[{kind: delay, worker: 0, step: 22, seconds: 0.5}, {kind: kill_server, step: 25}]")
    result = train(config, console=False, progress=False)
    assert_same_run(result.run_dir, reference)
    (lost,) = faults_of(result.summary, "server_lost")
    assert lost["step"] == 25 and lost["restored_step"] == 20 and lost["steps_redone"] == 5
    assert lost["noticed_s"] < 2.0 and lost["recovery_s"] > 0
    times = [r["wall_time_s"] for r in read_metrics(result.run_dir)]
    assert times == sorted(times)  # the rebuilt server's clock goes on with the run's: recovery counts
    steps = [r["step"] for r in rewound(result.run_dir, "metrics")]
    assert steps[:3] == [21, 22, 23] and steps == list(range(21, 21 + len(steps))) and steps[-1] <= 25, steps
    assert [r["update"] for r in rewound(result.run_dir, "schedule")] == steps
    assert_rewound_rows_kept(result.run_dir, range(21, 26))
    assert result.summary["checkpoints"] >= STEPS // 10
    state, manifest = load_checkpoint(result.run_dir, config)  # loads with weights_only=True
    assert manifest["step"] == STEPS and state["server"]["weights"].tolist() == reference.summary["weights"]


@pytest.mark.slow
def test_a_server_killed_before_any_checkpoint_starts_over_and_sync_ends_bit_equal(ray_session, tmp_path, reference):
    config = make_config(*[o for o in BASE if not o.startswith("train.checkpoint_every=")], "train.checkpoint_every=0",
                         f"output.dir={tmp_path / 's'}",
                         "faults=[{kind: kill_server, step: 7}]")
    result = train(config, console=False, progress=False)
    assert_same_run(result.run_dir, reference)
    (lost,) = faults_of(result.summary, "server_lost")
    assert lost["restored_step"] == 0 and result.summary["checkpoints"] == 0
    assert read_metrics(result.run_dir)[0]["wall_time_s"] >= lost["recovery_s"]  # time lost to the fault counts
    assert not (result.run_dir / CHECKPOINT_DIR).exists()


# -- driver loss ---------------------------------------------------------------------------------------------

def _wait_for_checkpoint(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    manifest = run / CHECKPOINT_DIR / MANIFEST
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        try:
            if json.loads(manifest.read_text())["step"] >= step:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint at step {step} within {timeout} s")


def _jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file (none if it is absent), less a last line a kill cut in half."""
    lines = path.read_text().splitlines() if path.exists() else []
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            assert i == len(lines) - 1, f"{path}: line {i + 1} of {len(lines)} is not JSON"
    return rows


# sync on ray and local SGD on shm: each mode and transport once (async on ray has a test of its own below), ~40 s each
@pytest.mark.parametrize("mode, transport", [("sync", "ray"), ("local_sgd", "shm")])
@pytest.mark.slow
def test_a_killed_driver_resumes_from_its_checkpoint_with_no_row_lost_or_repeated(ray_session, tmp_path, mode,
                                                                                  transport):
    """SIGKILL to `sgd-dist train` (its embedded Ray goes with it) with rows on disk past the latest checkpoint,
    then `sgd-dist train --resume RUN_DIR`: those rows are moved to the .rewound files, every step is recorded
    once, and the result is the uninterrupted run's (sync and local SGD: bit-equal to the serial run of the same
    config; async, whose schedule depends on timing: its replay is bit-equal)."""
    steps = 600
    args = [f"train.steps={steps}", "train.eval_every=100", "train.checkpoint_every=100", "train.log_every=0",
            f"cluster.transport={transport}", f"train.mode={mode}",
            *(["train.local_steps=3"] if mode == "local_sgd" else [])]
    config_file = tmp_path / "c.yaml"
    config_file.write_text("data: {n_samples: 512, n_features: 3, seed: 7}\ncluster: {num_workers: 2}\n"
                           "train: {batch_size: 16}\noutput: {plots: false}\n")
    run = tmp_path / "killed"
    proc = subprocess.Popen([SGD_DIST, "train", "--config", str(config_file), "--out", str(run), *args,
                             "stragglers.delay=uniform", "stragglers.delay_ms=2", "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_checkpoint(run, 100, proc)
        deadline = time.monotonic() + 60
        manifest = run / CHECKPOINT_DIR / MANIFEST
        # rows past the latest checkpoint on disk: resuming must move them aside, not lose them
        while (last_recorded_step(run / "metrics.jsonl") <= json.loads(manifest.read_text())["step"] + 5
               and time.monotonic() < deadline):
            time.sleep(0.005)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        proc.kill()
    recorded = _jsonl(run / "metrics.jsonl")
    scheduled = [line["update"] for line in _jsonl(run / "schedule.jsonl")]
    checkpoint_step = json.loads(manifest.read_text())["step"]
    assert not (run / "summary.json").exists() and 100 <= checkpoint_step < recorded[-1]["step"] < steps
    resumed = subprocess.run([SGD_DIST, "train", "--resume", str(run), "--no-progress"], capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"fault: resumed from the checkpoint at step {checkpoint_step}" in resumed.stdout
    summary = read_summary(run)
    assert summary["status"] == "completed" and summary["resumed_from"] == checkpoint_step
    assert summary["mode"] == mode and summary["transport"] == transport
    assert faults_of(summary, "resumed")[0]["step"] == checkpoint_step
    # every step once; what the killed run had recorded after the checkpoint kept aside, in order
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(steps + 1))
    assert [line["update"] for line in _jsonl(run / "schedule.jsonl")] == list(range(1, steps + 1))
    rewound = _jsonl(run / "metrics.rewound.jsonl")
    assert [r["step"] for r in rewound] == list(range(checkpoint_step + 1, recorded[-1]["step"] + 1))
    assert rewound == [r for r in recorded if r["step"] > checkpoint_step]
    assert [line["update"] for line in _jsonl(run / "schedule.rewound.jsonl")] == [
        u for u in scheduled if u > checkpoint_step]
    assert rows[: checkpoint_step + 1] == recorded[: checkpoint_step + 1]  # the rows up to it untouched
    if mode == "async":
        replayed = subprocess.run([SGD_DIST, "replay", str(run), "--out", str(tmp_path / "replayed")],
                                  capture_output=True, text=True, timeout=300)
        assert replayed.returncode == 0 and replayed.stdout.splitlines()[-1] == "replay: bit-equal", replayed.stdout
    else:
        reference = train(load_config(config_file, [*args, "cluster.backend=serial", f"output.dir={tmp_path / 'ref'}"]),
                          console=False, progress=False)
        assert_same_run(run, reference, steps)
        # the redone steps computed what the killed run had computed for them
        assert all(r["loss"] == rows[r["step"]]["loss"] for r in rewound)


@pytest.fixture
def checkpointed(tmp_path) -> Path:
    run = tmp_path / "run"
    train(make_config("cluster.backend=serial", "train.checkpoint_every=10", f"output.dir={run}"), console=False,
          progress=False)
    (run / "summary.json").unlink()  # as a driver killed after its last checkpoint leaves it (a completed run is
    return run                       # not resumed at all)


def _snapshot(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("damage, message", [
    ("flip", r"checkpoints/step-00000020\.pt: corrupt or truncated"),
    ("truncate", r"checkpoints/step-00000020\.pt: corrupt or truncated"),
    ("config", r"checkpoints/latest\.json: the checkpoint belongs to another config"),
    ("format", r"checkpoints/latest\.json: checkpoint format 99, this sgd_dist reads format 1"),
    ("version", r"checkpoints/latest\.json: written by sgd_dist 0\.0\.1, this is sgd_dist \S+: resume with the "
                r"version that wrote it"),
    ("manifest", r"checkpoints/latest\.json: not a checkpoint manifest"),
    ("missing", r"checkpoints/latest\.json: no checkpoint"),
])
def test_a_bad_checkpoint_is_a_one_line_error_naming_the_file_and_nothing_is_overwritten(checkpointed, capsys, damage,
                                                                                         message):
    import re

    folder = checkpointed / CHECKPOINT_DIR
    path = folder / "step-00000020.pt"
    manifest = json.loads((folder / MANIFEST).read_text())
    if damage == "flip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "config":
        text = (checkpointed / "config.yaml").read_text()
        (checkpointed / "config.yaml").write_text(text.replace("lr: 0.1", "lr: 0.2"))
    elif damage == "format":
        (folder / MANIFEST).write_text(json.dumps({**manifest, "format": 99}))
    elif damage == "version":
        (folder / MANIFEST).write_text(json.dumps({**manifest, "sgd_dist": "0.0.1"}))
    elif damage == "manifest":
        (folder / MANIFEST).write_text("{not json")
    else:
        (folder / MANIFEST).unlink()
    before = _snapshot(checkpointed)
    assert main(["train", "--resume", str(checkpointed)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err
    assert err.startswith("sgd-dist: error: cannot resume: ")
    assert _snapshot(checkpointed) == before


def test_resume_takes_the_runs_own_config_only(checkpointed, capsys):
    assert main(["train", "--resume", str(checkpointed), "train.steps=50"]) == 2
    assert "drop --config" in capsys.readouterr().err
    assert main(["train", "--resume", str(checkpointed.parent / "nowhere")]) == 1
    assert "config.yaml: not found" in capsys.readouterr().err


# -- records in transit ---------------------------------------------------------------------------------------

def test_rows_in_a_drain_reply_lost_to_ctrl_c_are_sent_again(ray_session, tmp_path, monkeypatch):
    """Ctrl-C while the driver waits for a drain: the server had already handed those rows out. They stay in its
    outbox until a later drain confirms them, so the final drain brings them again: no gap, no row twice."""
    import sgd_dist.backends.ray.backend as ray_backend

    original = ray_backend.RayBackend._drain
    lost: dict = {}

    def drain_then_ctrl_c(self):
        items = original(self)  # the server has handed these out; the driver never sees them
        rows = [row for _, kind, payload in items if kind == "rows" for row in payload]
        if rows and rows[-1]["step"] >= 20 and not lost:
            lost["steps"] = [rows[0]["step"], rows[-1]["step"]]
            raise KeyboardInterrupt
        return items

    monkeypatch.setattr(ray_backend.RayBackend, "_drain", drain_then_ctrl_c)
    config = make_config("train.steps=1000000", "train.eval_every=0", *SLOW, f"output.dir={tmp_path / 'r'}")
    with pytest.raises(KeyboardInterrupt):
        train(config, console=False, progress=False)
    steps = [row["step"] for row in read_metrics(tmp_path / "r")]
    assert steps == list(range(len(steps))) and steps[-1] >= lost["steps"][1], (lost, steps[-3:])
    summary = read_summary(tmp_path / "r")
    assert summary["status"] == "interrupted" and summary["steps_recorded"] == steps[-1]
    assert len((tmp_path / "r" / "schedule.jsonl").read_text().splitlines()) == steps[-1]


# -- the recovery logic without Ray ------------------------------------------------------------------------

class _LosingEnd(LocalServerEnd):
    """The local transport, but worker 1's first gradient command from update ``lose_at`` on is lost: the loss is
    reported where its answer would have come."""

    def __init__(self, workers, lose_at: int) -> None:
        super().__init__(workers)
        self.lose_at: int | None = lose_at

    def send(self, worker, command, weights=None):
        if worker == 1 and self.lose_at is not None and command.kind == GRADIENT and command.version >= self.lose_at:
            self.lose_at = None
            self._answers.append(WorkerLost("worker 1 died", 1))
            return
        super().send(worker, command, weights)

    def receive(self, timeout=None):
        item = super().receive(timeout)
        if isinstance(item, WorkerLost):
            raise item
        return item

    def forget(self, worker):
        pass


def _serve_losing_worker_1(config, lose_at: int, polls: int, faults: list, on_update=None):
    """The Loop with worker 1 lost at update ``lose_at``, its replacement up after ``polls`` polls; the fault
    records go to ``faults`` as they happen. Returns the rows and the final weights."""
    workers = [ShardWorker(**args) for args in worker_args(config)]
    server = ParameterServer(**server_args(config))
    rows: list[dict] = []

    def recover(r):
        asked = iter(range(polls, -1, -1))
        return lambda: next(asked) == 0

    hooks = LoopHooks(recover=recover, on_fault=faults.append, on_update=on_update)
    policy = make_policy(config.train.mode, config.cluster.num_workers, config.train.steps)
    Loop(server, _LosingEnd(workers, lose_at), policy, config.cluster.num_workers,
         eval_steps(config.train.steps, config.train.eval_every), rows.extend, hooks=hooks).run()
    return rows, server.weights


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_the_loop_serves_the_others_while_a_replacement_starts(mode):
    config = make_config(f"train.mode={mode}", "train.steps=40", "train.eval_every=10")
    faults: list[dict] = []
    rows, weights = _serve_losing_worker_1(config, lose_at=12, polls=6, faults=faults)
    assert [f["fault"] for f in faults] == ["worker_lost", "worker_replaced"]
    lost, replaced = faults
    assert lost["worker"] == replaced["worker"] == 1 and replaced["lost_step"] == lost["step"]
    assert [r["step"] for r in rows] == list(range(41))
    if mode == "sync":  # nothing moves without worker 1, and its redone gradient is the very same
        assert replaced["answers_meanwhile"] == 0 and replaced["step"] == lost["step"] == 12
        plain, plain_weights = _serve_losing_worker_1(config, lose_at=10 ** 9, polls=0, faults=[])
        assert [r["loss"] for r in rows] == [r["loss"] for r in plain] and torch.equal(weights, plain_weights)
    else:  # worker 0 answered while the replacement was polled, one answer (and update) each time
        assert replaced["answers_meanwhile"] >= 5 and replaced["step"] - replaced["lost_step"] >= 5


def test_a_lost_worker_is_recorded_at_the_notice_even_if_the_server_dies_before_its_replacement():
    class ServerDied(Exception):
        pass

    def die_at_20(version):
        if version == 20:
            raise ServerDied

    faults: list[dict] = []
    with pytest.raises(ServerDied):
        _serve_losing_worker_1(make_config("train.mode=async", "train.steps=40"), lose_at=12, polls=10 ** 6,
                               faults=faults, on_update=die_at_20)
    assert [f["fault"] for f in faults] == ["worker_lost"] and faults[0]["worker"] == 1


# -- the restore logic without Ray: every mode -------------------------------------------------------------

class _DriverKilled(BaseException):
    """Stands for the driver dying right after a checkpoint reached the disk."""


@pytest.mark.parametrize("mode", ["sync", "async", "ssp", "backup", "local_sgd"])
def test_every_mode_resumes_from_a_checkpoint_on_the_serial_backend(tmp_path, monkeypatch, mode):
    """A run stopped just after its step-30 checkpoint and resumed: sync and local SGD end bit-equal to the
    undisturbed run; every mode's resumed run replays exactly and records each step once."""
    extra = {"ssp": ["train.staleness_bound=2"], "backup": ["cluster.num_workers=3", "train.backup_workers=1"],
             "local_sgd": ["train.local_steps=3"]}.get(mode, [])
    options = ["cluster.backend=serial", f"train.mode={mode}", "train.checkpoint_every=10", "train.steps=50", *extra]
    whole = train(make_config(*options, f"output.dir={tmp_path / 'whole'}"), console=False, progress=False)
    original = Recorder.checkpoint

    def checkpoint_then_die(self, state):
        original(self, state)
        if state["server"]["step"] >= 30:
            raise _DriverKilled

    monkeypatch.setattr(Recorder, "checkpoint", checkpoint_then_die)
    config = make_config(*options, f"output.dir={tmp_path / 'cut'}")
    with pytest.raises(_DriverKilled):
        train(config, console=False, progress=False)
    monkeypatch.setattr(Recorder, "checkpoint", original)
    resumed = train(config, console=False, progress=False, resume=tmp_path / "cut")
    rows = read_metrics(resumed.run_dir)
    assert [r["step"] for r in rows] == list(range(51))
    assert resumed.summary["resumed_from"] >= 30
    if mode in ("sync", "local_sgd"):
        assert [r["loss"] for r in rows] == [r["loss"] for r in read_metrics(whole.run_dir)]
        assert resumed.summary["weights"] == whole.summary["weights"]
    assert replay(resumed.run_dir, tmp_path / "replay").exact


@pytest.mark.parametrize("mode", ["sync", "async", "ssp", "backup", "local_sgd"])
def test_a_policy_state_survives_json(mode):
    """Mid-run, a policy's state through JSON into a fresh policy: both then act alike."""
    kwargs = {"ssp": {"staleness_bound": 2}, "backup": {"backup_workers": 1}, "local_sgd": {"local_steps": 2}}
    policy = make_policy(mode, 3, 20, **kwargs.get(mode, {}))
    pending = [a for a in policy.start() if type(a).__name__ == "Dispatch"]
    for action in pending[:2]:
        policy.on_gradient(action.worker, action.step)
    state = json.loads(json.dumps(policy.state_dict()))
    twin = make_policy(mode, 3, 20, **kwargs.get(mode, {}))
    twin.load_state_dict(state)
    assert twin.state_dict() == policy.state_dict()
    last = pending[2]
    assert twin.on_gradient(last.worker, last.step) == policy.on_gradient(last.worker, last.step)
    with pytest.raises(ValueError, match="cannot restore"):
        make_policy("sync" if mode != "sync" else "async", 3, 20).load_state_dict(state)


# -- injection -------------------------------------------------------------------------------------------

def test_a_delay_fault_makes_one_answer_late_once_and_changes_no_number():
    config = make_config("faults=[{kind: delay, worker: 1, step: 3, seconds: 0.05}]")
    args = worker_args(config)[1]
    assert args["delays"] == {3: 0.05}
    worker = ShardWorker(**args)
    weights = torch.zeros(config.data.dim)
    late = worker.execute(Command(GRADIENT, step=3), weights)
    again = worker.execute(Command(GRADIENT, step=3), weights)
    assert late.seconds >= 0.05 and worker.delays == {}
    assert torch.equal(late.grad, again.grad) and late.loss == again.loss


@pytest.mark.parametrize("fault, message", [
    ("{kind: kill_worker, step: 3}", "a kill_worker fault needs its worker"),
    ("{kind: kill_worker, worker: 2, step: 3}", r"faults\[0\] \(kill_worker\): worker 2; workers are 0..1"),
    ("{kind: kill_server, step: 30}", r"step 30 is after the last step \(train.steps=20\)"),
    ("{kind: delay, worker: 0, step: 3}", "a delay fault needs seconds > 0"),
    ("{kind: remove_node, node: 1, step: 3}", r"faults\[0\] \(remove_node\): needs a simulated cluster with a node to "
                                              r"remove: cluster\.simulated_nodes of 2 or more \(it is null"),
    ("{kind: explode, step: 3}", "kind"),
])
def test_bad_faults_are_one_line_config_errors(fault, message):
    with pytest.raises(ConfigError, match=message):
        make_config(f"faults=[{fault}]")


def test_kills_need_the_ray_backend():
    with pytest.raises(ConfigError, match="kills need cluster.backend=ray"):
        make_config("cluster.backend=serial", "faults=[{kind: kill_server, step: 3}]")


# -- local SGD, async on the ray transport, and the limits -----------------------------------------------------

LOCAL_SGD = ("train.mode=local_sgd", "train.local_steps=3")


@pytest.mark.parametrize("transport", ["shm", "ray"])
@pytest.mark.slow
def test_a_worker_lost_in_local_sgd_is_replaced_and_the_run_ends_bit_equal(ray_session, tmp_path, transport):
    """Local SGD waits for every worker's model delta: the lost worker's replacement redoes its 3 local steps from
    the very weights of that round, so every loss and the final weights equal the undisturbed serial run's."""
    undisturbed = train(make_config(*BASE, *LOCAL_SGD, "cluster.backend=serial", f"output.dir={tmp_path / 'ref'}"),
                        console=False, progress=False)
    config = make_config(*BASE, *LOCAL_SGD, *SLOW, f"cluster.transport={transport}", f"output.dir={tmp_path / 'k'}",
                         "faults=[{kind: kill_worker, worker: 1, step: 12}]")
    result = train(config, console=False, progress=False)
    assert_same_run(result.run_dir, undisturbed)
    (lost,) = faults_of(result.summary, "worker_lost")
    (replaced,) = faults_of(result.summary, "worker_replaced")
    assert lost["worker"] == replaced["worker"] == 1 and lost["step"] == 12 and lost["noticed_s"] < 2.0
    assert replaced["redone"] == {"kind": LOCAL, "step": 36, "version": 12}  # round 12: local steps 36-38
    assert replaced["step"] == 12 and replaced["answers_meanwhile"] <= 1  # nothing moves without worker 1
    assert result.summary["mode"] == "local_sgd" and result.summary["replacements"] == {1: 1}


@pytest.mark.slow
def test_a_killed_server_in_async_mode_on_the_ray_transport_is_restored_and_the_run_replays(ray_session, tmp_path):
    """Async on Ray's channels: the server dies right after update 27 and the checkpoint of update 20 comes back.
    Each worker's 13th gradient (local step 12) is 1 s late, so update 25 comes at least ~0.8 s after update
    24 and the rows up to 25 have been handed out before the server dies: the driver moves them and their
    schedule aside, and the whole run, with the updates redone on the restored server, still replays exactly."""
    config = make_config("train.steps=60", "train.eval_every=0", "train.checkpoint_every=10", "train.mode=async",
                         "cluster.transport=ray", f"output.dir={tmp_path / 's'}",
                         "faults=[{kind: delay, worker: 0, step: 12, seconds: 1.0}, "
                         "{kind: delay, worker: 1, step: 12, seconds: 1.0}, {kind: kill_server, step: 27}]")
    result = train(config, console=False, progress=False)
    summary = result.summary
    assert summary["status"] == "completed" and summary["transport"] == "ray" and summary["mode"] == "async"
    (lost,) = faults_of(summary, "server_lost")
    assert lost["step"] == 27 and lost["restored_step"] == 20 and lost["steps_redone"] == 7
    assert [r["step"] for r in read_metrics(result.run_dir)] == list(range(61))
    steps = [r["step"] for r in rewound(result.run_dir, "metrics")]
    assert steps == list(range(21, 21 + len(steps))) and 25 <= steps[-1] <= 27, steps
    assert [r["update"] for r in rewound(result.run_dir, "schedule")] == steps
    assert len((result.run_dir / "schedule.jsonl").read_text().splitlines()) == 60
    report = replay(result.run_dir, tmp_path / "replayed")
    assert report.exact, report


def _kill_driver_once_rows_pass_a_checkpoint(config_file: Path, run: Path, args: list[str]) -> list[dict]:
    """`sgd-dist train` SIGKILLed once metrics.jsonl holds rows past its latest checkpoint; the rows it left."""
    proc = subprocess.Popen([SGD_DIST, "train", "--config", str(config_file), "--out", str(run), *args,
                             "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_checkpoint(run, 1, proc)
        deadline = time.monotonic() + 60
        manifest = run / CHECKPOINT_DIR / MANIFEST
        while (last_recorded_step(run / "metrics.jsonl") <= json.loads(manifest.read_text())["step"] + 5
               and time.monotonic() < deadline):
            time.sleep(0.005)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        proc.kill()
    return read_metrics(run)


@pytest.mark.slow
def test_a_driver_killed_in_async_mode_on_the_ray_transport_resumes_and_replays(ray_session, tmp_path):
    """SIGKILL to an async `sgd-dist train` on Ray's channels, then --resume: every step recorded once, the rows
    and the schedule recorded past the checkpoint moved aside, and the resumed run replays exactly."""
    steps = 400
    args = [f"train.steps={steps}", "train.eval_every=100", "train.checkpoint_every=50", "train.log_every=0",
            "train.mode=async", "cluster.transport=ray", "stragglers.delay=uniform", "stragglers.delay_ms=2"]
    config_file = tmp_path / "c.yaml"
    config_file.write_text("data: {n_samples: 512, n_features: 3, seed: 7}\ncluster: {num_workers: 2}\n"
                           "train: {batch_size: 16}\noutput: {plots: false}\n")
    run = tmp_path / "killed"
    recorded = _kill_driver_once_rows_pass_a_checkpoint(config_file, run, args)
    assert not (run / "summary.json").exists() and recorded[-1]["step"] < steps
    resumed = subprocess.run([SGD_DIST, "train", "--resume", str(run), "--no-progress"], capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    summary = read_summary(run)
    assert summary["status"] == "completed" and summary["mode"] == "async" and summary["transport"] == "ray"
    start = summary["resumed_from"]
    assert 50 <= start < recorded[-1]["step"]
    assert [r["step"] for r in read_metrics(run)] == list(range(steps + 1))
    assert [r["step"] for r in rewound(run, "metrics")] == list(range(start + 1, recorded[-1]["step"] + 1))
    # an update's schedule line is written just before its metrics row: a kill between the two leaves that one more
    last = recorded[-1]["step"]
    moved = [r["update"] for r in rewound(run, "schedule")]
    assert moved in (list(range(start + 1, last + 1)), list(range(start + 1, last + 2))), (start, last, moved)
    assert len((run / "schedule.jsonl").read_text().splitlines()) == steps
    report = replay(run, tmp_path / "replayed")
    assert report.exact, report


@pytest.mark.slow
def test_a_worker_lost_a_fourth_time_fails_the_run_in_one_line(ray_session, tmp_path, capsys):
    """Worker 1 killed at updates 2, 4, 6 and 8: replaced three times (the limit), the fourth loss fails the run:
    exit 1, one line naming the worker and the limit, status failed, the faults until then recorded."""
    run = tmp_path / "f"
    config = tmp_path / "c.yaml"
    config.write_text("data: {n_samples: 512, n_features: 3, seed: 7}\ncluster: {num_workers: 2}\n"
                      "train: {batch_size: 16, steps: 20, log_every: 0}\noutput: {plots: false}\n")
    kills = ", ".join(f"{{kind: kill_worker, worker: 1, step: {s}}}" for s in (2, 4, 6, 8))
    assert main(["train", "--config", str(config), "--out", str(run), "--no-progress", f"faults=[{kills}]"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert re.match(r"sgd-dist: error: run failed: WorkerLost: worker 1 \(pid \d+\) died: lost 4 times, "
                    r"replaced 3 times \(the limit\): giving up", err), err
    summary = read_summary(run)
    assert summary["status"] == "failed" and summary["error"].startswith("WorkerLost: worker 1")
    assert [f["step"] for f in faults_of(summary, "kill_worker")] == [2, 4, 6, 8]
    assert len(faults_of(summary, "worker_replaced")) == 3 and len(faults_of(summary, "worker_lost")) == 3
    assert summary["steps_recorded"] == 8


class _LosingAgainEnd(LocalServerEnd):
    """The local transport, but worker 1's first command of ``kind`` from each of ``versions`` on is lost, one
    loss per listed version."""

    def __init__(self, workers, versions: list[int], kind: int = GRADIENT) -> None:
        super().__init__(workers)
        self.versions, self.kind = list(versions), kind

    def send(self, worker, command, weights=None):
        if worker == 1 and self.versions and command.kind == self.kind and command.version >= self.versions[0]:
            self.versions.pop(0)
            self._answers.append(WorkerLost("worker 1 died", 1))
            return
        super().send(worker, command, weights)

    def receive(self, timeout=None):
        item = super().receive(timeout)
        if isinstance(item, WorkerLost):
            raise item
        return item

    def forget(self, worker):
        pass


def _serve(config, end_of, polls: int, faults: list | None = None, checkpoints: list | None = None):
    """The Loop on the local transport built by ``end_of(workers)``; a lost worker's replacement is up after
    ``polls`` polls; checkpoints go to ``checkpoints`` with the rows emitted by then."""
    workers = [ShardWorker(**args) for args in worker_args(config)]
    rows: list[dict] = []

    def recover(r):
        asked = iter(range(polls, -1, -1))
        return lambda: next(asked) == 0

    def on_checkpoint(state):
        checkpoints.append((state["server"]["step"], [dict(r) for r in rows]))

    hooks = LoopHooks(recover=recover, on_fault=(faults if faults is not None else []).append,
                      checkpoint_every=config.train.checkpoint_every,
                      on_checkpoint=on_checkpoint if checkpoints is not None else None)
    policy = make_policy(config.train.mode, config.cluster.num_workers, config.train.steps)
    stats = Loop(ParameterServer(**server_args(config)), end_of(workers), policy, config.cluster.num_workers,
                 eval_steps(config.train.steps, config.train.eval_every), rows.extend, hooks=hooks).run()
    return rows, stats


def test_a_worker_is_replaced_three_times_and_its_fourth_loss_fails_the_loop():
    config = make_config("train.steps=30", "train.eval_every=10")
    rows, stats = _serve(config, lambda workers: _LosingAgainEnd(workers, [5, 5, 20]), polls=2)
    assert stats["replacements"] == {1: 3} and [r["step"] for r in rows] == list(range(31))
    with pytest.raises(WorkerLost, match=r"^worker 1 died: lost 4 times, replaced 3 times \(the limit\): giving up$"):
        _serve(config, lambda workers: _LosingAgainEnd(workers, [5, 5, 20, 25]), polls=2)


def test_no_checkpoint_is_taken_while_a_lost_worker_owes_an_evaluation():
    """Async, a checkpoint every 10 updates: worker 1 dies holding its evaluation of version 20, and worker 0 goes
    on while the replacement starts. The checkpoint due at 20 waits until that evaluation is in: it comes later,
    after the row of update 20 with its evaluation went out."""
    config = make_config("train.mode=async", "train.steps=60", "train.eval_every=10", "train.checkpoint_every=10")
    faults: list[dict] = []
    checkpoints: list[tuple[int, list[dict]]] = []
    _serve(config, lambda workers: _LosingAgainEnd(workers, [20], kind=EVALUATE), polls=8, faults=faults,
           checkpoints=checkpoints)
    lost, replaced = faults
    assert lost["fault"] == "worker_lost" and replaced["redone"] == {"kind": EVALUATE, "step": 0, "version": 20}
    assert replaced["step"] - replaced["lost_step"] >= 5  # worker 0 went on meanwhile
    steps = [step for step, _ in checkpoints]
    assert 10 <= steps[0] < 20 and replaced["step"] > 20, (steps, replaced)
    assert steps[1] >= replaced["step"], (steps, replaced)  # none from update 20 until the evaluation was in
    for step, emitted in checkpoints:  # every row up to a checkpoint went out before it, evaluated ones complete
        assert [r["step"] for r in emitted][: step + 1] == list(range(step + 1))
        assert all("eval_loss" in r for r in emitted[: step + 1] if r["step"] % 10 == 0)


@pytest.mark.slow
def test_a_server_lost_a_fourth_time_fails_the_run_in_one_line(ray_session, tmp_path, capsys):
    """The server killed at updates 2, 4, 6 and 8 (no checkpoints: each rebuilt server starts over): restarted
    three times (the limit), the fourth loss fails the run in one line, status failed."""
    run = tmp_path / "f"
    config = tmp_path / "c.yaml"
    config.write_text("data: {n_samples: 512, n_features: 3, seed: 7}\ncluster: {num_workers: 2}\n"
                      "train: {batch_size: 16, steps: 20, log_every: 0}\noutput: {plots: false}\n")
    kills = ", ".join(f"{{kind: kill_server, step: {s}}}" for s in (2, 4, 6, 8))
    assert main(["train", "--config", str(config), "--out", str(run), "--no-progress", f"faults=[{kills}]"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("sgd-dist: error: run failed: RuntimeError: the parameter server was lost 4 times; giving up")
    summary = read_summary(run)
    assert summary["status"] == "failed" and summary["error"].startswith("RuntimeError: the parameter server was lost")
    assert [f["step"] for f in faults_of(summary, "kill_server")] == [2, 4, 6, 8]
    assert [f["restored_step"] for f in faults_of(summary, "server_lost")] == [0, 0, 0]
