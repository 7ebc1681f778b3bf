"""The transports: shared memory equals the local reference without Ray, cleans up after itself, and a dead
worker is noticed instead of waited for (test_faults: and replaced)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import inject_server_failure, make_config, shm_entries_of

from sgd_dist.backends.base import ClusterError, server_args, worker_args
from sgd_dist.backends.ray.backend import RayBackend
from sgd_dist.backends.ray.cluster import pick_transport
from sgd_dist.engine.evaluations import eval_steps
from sgd_dist.engine.loop import Loop
from sgd_dist.engine.policies import make_policy
from sgd_dist.engine.server import ParameterServer
from sgd_dist.engine.worker import ShardWorker
from sgd_dist.run.rundir import last_recorded_step, read_metrics
from sgd_dist.run.trainer import train
from sgd_dist.transports.channel import semaphores, sweep_stale_semaphores
from sgd_dist.transports.local import LocalServerEnd
from sgd_dist.transports.shm import (
    PREFIX,
    SHM_DIR,
    Layout,
    ShmServerEnd,
    ShmWorkerEnd,
    serve_worker,
    sweep_stale_segments,
)

ROOT = Path(__file__).resolve().parent.parent


def segments() -> set[str]:
    return {p.name for p in SHM_DIR.glob(f"{PREFIX}*")}


def run_loop(config, end_factory):
    """The Loop over a transport end; returns the rows and the final weights."""
    workers = [ShardWorker(**args) for args in worker_args(config)]
    server = ParameterServer(**server_args(config))
    rows: list[dict] = []
    policy = make_policy(config.train.mode, config.cluster.num_workers, config.train.steps)
    end, finish = end_factory(workers)
    try:
        Loop(server, end, policy, config.cluster.num_workers, eval_steps(config.train.steps, 5), rows.extend).run()
        end.stop()
    finally:
        finish()
    return rows, server.weights


def local_end(workers):
    return LocalServerEnd(workers), lambda: None


def shm_end(workers, made: list[str] | None = None):
    """The shm transport with each worker's loop in a thread of this process (no Ray); ``made`` collects the
    segment's name."""
    k = len(workers)
    end = ShmServerEnd(Layout(k, workers[0].X.shape[1], str(workers[0].X.dtype).removeprefix("torch.")))
    if made is not None:
        made.append(end.segment.name)
    ends = [ShmWorkerEnd(end.segment.name, end.layout, r) for r in range(k)]
    threads = [threading.Thread(target=serve_worker, args=(w, e), daemon=True) for w, e in zip(workers, ends)]
    for t in threads:
        t.start()

    def finish():
        for t in threads:
            t.join(timeout=10)
        for e in ends:
            e.close()
        end.close()

    return end, finish


@pytest.mark.parametrize("overrides", [(), ("optim.momentum=0.9", "data.dtype=float64", "cluster.num_workers=3")])
def test_shm_loop_equals_the_local_loop_without_ray(overrides):
    config = make_config(*overrides)
    made: list[str] = []
    local_rows, local_w = run_loop(config, local_end)
    shm_rows, shm_w = run_loop(config, lambda workers: shm_end(workers, made))

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in ("wall_time_s", "answer_s")} for r in rows]

    assert len(shm_rows) == config.train.steps + 1
    assert strip(shm_rows) == strip(local_rows) and torch.equal(shm_w, local_w)
    assert len(made) == 1 and made[0] not in segments()  # the segment is gone


def test_stale_segments_of_dead_processes_are_swept():
    dead = SHM_DIR / f"{PREFIX}999999999-test"
    mine = SHM_DIR / f"{PREFIX}{os.getpid()}-test"
    dead.write_bytes(b"x")
    mine.write_bytes(b"x")
    try:
        assert f"{PREFIX}999999999-test" in sweep_stale_segments()
        assert not dead.exists() and mine.exists()
    finally:
        dead.unlink(missing_ok=True)
        mine.unlink(missing_ok=True)


def test_transport_choice():
    assert pick_transport("auto", {"a"}) == "shm" and pick_transport("auto", {"a", "b"}) == "ray"
    assert pick_transport("ray", {"a"}) == "ray" and pick_transport("shm", {"a"}) == "shm"
    with pytest.raises(ClusterError, match=r"cluster\.transport=shm needs every worker on one node; they are on 2"):
        pick_transport("shm", {"a", "b"})


@pytest.fixture
def made_segments(monkeypatch) -> list[str]:
    """The names of the segments the Ray backend's runs use, read off the backend as it lets its actors go
    (the segment is made by the server actor, in another process)."""
    made: list[str] = []
    release = RayBackend._release_actors

    def noting_the_segment(self):
        if self._links["shm"].segment is not None:
            made.append(self._links["shm"].segment)
        release(self)

    monkeypatch.setattr(RayBackend, "_release_actors", noting_the_segment)
    return made


@pytest.mark.parametrize("transport", ["shm", "ray"])
def test_a_failed_run_leaves_no_segment_and_keeps_its_rows(ray_session, tmp_path, monkeypatch, made_segments,
                                                           transport):
    inject_server_failure(ray_session, monkeypatch, 12)
    with pytest.raises(Exception, match="injected failure"):
        train(make_config(f"cluster.transport={transport}", f"output.dir={tmp_path / 'f'}"), console=False)
    assert [r["step"] for r in read_metrics(tmp_path / "f")] == list(range(13))
    assert len(made_segments) == (transport == "shm")  # the ray transport makes none
    assert not set(made_segments) & segments()


@pytest.mark.slow
def test_an_embedded_ray_run_on_the_ray_transport_leaves_no_channel_semaphores(tmp_path):
    """Ray 2.60 leaves its channels' semaphores in /dev/shm, named after the raylet: an embedded Ray's go with it."""
    run = tmp_path / "r"
    proc = subprocess.Popen([str(Path(sys.executable).with_name("sgd-dist")), "train", "--config",
                             str(ROOT / "configs" / "lesson2.yaml"), "--out", str(run), "train.steps=3000",
                             "train.log_every=0", "cluster.transport=ray", "output.plots=false", "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and last_recorded_step(run / "metrics.jsonl") < 20:
            time.sleep(0.02)
        made = shm_entries_of(proc.pid)  # the run's channels exist once its rows come
        _, stderr = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert json.loads((run / "summary.json").read_text())["transport"] == "ray"
    assert made and all(name.startswith("sem.") for name in made), made
    assert not made & semaphores()


def test_semaphores_of_dead_raylets_are_swept():
    stale, live = SHM_DIR / "sem.hdr999999999-123", SHM_DIR / f"sem.obj{os.getpid()}-123"
    stale.write_bytes(b"x")
    live.write_bytes(b"x")
    try:
        assert stale.name in sweep_stale_semaphores() and not stale.exists() and live.exists()
    finally:
        stale.unlink(missing_ok=True)
        live.unlink(missing_ok=True)
