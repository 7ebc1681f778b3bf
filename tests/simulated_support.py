"""Scenarios on a simulated cluster, run in a fresh process by tests/test_simulated.py.

A simulated cluster cannot start inside a process already connected to Ray, and the test session shares one
embedded Ray; so each scenario runs here, as ``python tests/simulated_support.py SCENARIO OUT.json``, and
writes what it saw to OUT.json for the test to check.
"""

from __future__ import annotations

import json
import os
import sys
import time

import ray
from conftest import make_config
from ray.exceptions import ActorDiedError, RayActorError
from test_ray_local import _listening, _process_tree, _socket_inodes

from sgd_dist.backends.ray.backend import RayBackend


def _error(call) -> str | None:
    try:
        call()
    except Exception as exc:  # the scenario reports it; the test checks it
        return f"{type(exc).__name__}: {exc}"
    return None


def remove_node(out: str) -> None:
    """3 workers on 2 simulated nodes (node 0 holds workers 0 and 2): remove node 1, see worker 1 die."""
    t0 = time.perf_counter()
    backend = RayBackend(make_config("cluster.num_workers=3", "cluster.simulated_nodes=2"))
    report: dict = {"start_s": time.perf_counter() - t0}
    try:
        nodes = backend.simulated.list_all_nodes()
        report.update(
            node_ids=backend.simulated_node_ids,
            worker_nodes=[info["node_id"] for info in backend.info],
            worker_pids=[info["pid"] for info in backend.info],
            server_node=ray.get(backend.server.node_id.remote()),
            transport=backend.transport,
            session=backend.simulated.head_node.session_name,
            cluster_pids=sorted(p.process.pid for node in nodes for procs in node.all_processes.values()
                                for p in procs),
            raylet_pids=[node.all_processes["raylet"][0].process.pid for node in nodes],
            listening=[str(a) for a in _listening(_socket_inodes(_process_tree(os.getpid())))],
            node_addresses=[node["NodeManagerAddress"] for node in ray.nodes()],
            remove_head=_error(lambda: backend.remove_node(0)),
            remove_unknown=_error(lambda: backend.remove_node(2)),
        )
        t1 = time.perf_counter()
        backend.remove_node(1)
        report["remove_s"] = time.perf_counter() - t1
        try:
            ray.get(backend.workers[1].info.remote(), timeout=30)
            report["removed_worker"] = "answered"
        except (ActorDiedError, RayActorError) as exc:
            report["removed_worker"] = type(exc).__name__
        report["died_after_s"] = time.perf_counter() - t1
        report["others"] = [ray.get(backend.workers[r].info.remote(), timeout=30)["rank"] for r in (0, 2)]
        report["server_after"] = ray.get(backend.server.node_id.remote(), timeout=30)
        report["remove_again"] = _error(lambda: backend.remove_node(1))
        report["node_ids_after"] = backend.simulated_node_ids
    finally:
        t2 = time.perf_counter()
        backend.close()
        report["close_s"] = time.perf_counter() - t2
    report["ray_initialized_after"] = ray.is_initialized()
    report["simulated_after"] = backend.simulated is not None
    with open(out, "w") as f:
        json.dump(report, f)


def failed_run(out: str) -> None:
    """A training on 2 simulated nodes that fails: its loss diverges at about step 4, found by the driver while the
    server's loop of 100,000 steps still runs. What the cluster was, and what it left."""
    from pathlib import Path

    from ray._common.utils import get_ray_address_file

    import sgd_dist.backends.ray.backend as ray_backend
    from sgd_dist.run.trainer import train

    report: dict = {}
    original = ray_backend.RayBackend.run

    def run(self, *args, **kwargs):
        report.update(session=self.simulated.head_node.session_name, transport=self.transport,
                      server_pid=ray.get(self.server.__ray_call__.remote(lambda actor: os.getpid())),
                      worker_nodes=len({info["node_id"] for info in self.info}),
                      worker_pids=[info["pid"] for info in self.info],
                      cluster_pids=sorted(p.process.pid for node in self.simulated.list_all_nodes()
                                          for procs in node.all_processes.values() for p in procs))
        return original(self, *args, **kwargs)

    ray_backend.RayBackend.run = run
    address_file = Path(get_ray_address_file(None))
    report["address_file_before"] = address_file.read_text() if address_file.exists() else None
    config = make_config("cluster.simulated_nodes=2", "train.steps=100000", "optim.lr=1e6",
                         f"output.dir={Path(out).with_name('run')}")
    report["error"] = _error(lambda: train(config, console=False, progress=False))
    report["address_file_after"] = address_file.read_text() if address_file.exists() else None
    report["ray_initialized_after"] = ray.is_initialized()
    with open(out, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    {"remove_node": remove_node, "failed_run": failed_run}[sys.argv[1]](sys.argv[2])
