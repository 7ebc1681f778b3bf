"""The embedded local Ray listens on loopback only, the workers run in their own processes, their CPUs are
reserved with a bounded wait, and a run ends its workers' loops before it closes their transport."""

from __future__ import annotations

import ipaddress
import os
import re
import threading
import time
from pathlib import Path

import pytest
from conftest import make_config

from sgd_dist.backends.base import ClusterError
from sgd_dist.backends.ray.backend import RayBackend


def _process_tree(root: int) -> set[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in tree:
                tree.add(child)
                frontier.append(child)
    return tree


def _socket_inodes(pids: set[int]) -> set[str]:
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    return inodes


def _listening(inodes: set[str]) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    addresses = []
    for table, _width in [("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)]:
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A = LISTEN
                raw = bytes.fromhex(local.split(":")[0])
                # /proc prints each 32-bit word in host (little-endian) order
                ordered = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                address = ipaddress.ip_address(ordered)
                addresses.append(getattr(address, "ipv4_mapped", None) or address)  # ::ffff:127.0.0.1
    return addresses


def test_embedded_ray_listens_on_loopback_only(ray_session):
    node = ray_session.nodes()[0]
    assert node["NodeManagerAddress"] == "127.0.0.1"
    assert ray_session.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    addresses = _listening(_socket_inodes(_process_tree(os.getpid())))
    assert len(addresses) >= 3  # gcs, raylet, object manager at least
    assert all(a.is_loopback for a in addresses), addresses


def test_workers_are_separate_processes_holding_their_own_shards(ray_session):
    backend = RayBackend(make_config("cluster.num_workers=3", "data.n_samples=3001"))
    try:
        pids = {info["pid"] for info in backend.info}
        assert len(pids) == 3 and os.getpid() not in pids
        assert [info["rows"] for info in backend.info] == [[0, 1001], [1001, 2001], [2001, 3001]]
        assert all(info["data_bytes"] == 1000 * 4 * 5 or info["data_bytes"] == 1001 * 4 * 5 for info in backend.info)
    finally:
        backend.close()


def test_a_cluster_too_small_is_a_clear_error(ray_session):
    with pytest.raises(ClusterError, match=r"cluster\.num_workers=2 needs 200 CPUs; the Ray cluster has 8 CPUs"):
        RayBackend(make_config("cluster.cpus_per_worker=100"))


def test_cuda_without_a_gpu_is_a_clear_error(ray_session):
    if ray_session.cluster_resources().get("GPU", 0):
        pytest.skip("this machine has a GPU")
    with pytest.raises(ClusterError, match=r"cluster\.device=cuda, but the Ray cluster has no GPU"):
        RayBackend(make_config("cluster.device=cuda"))


def _hold_cpus(ray, num_cpus: float):
    """An idle actor holding ``num_cpus`` of the session's CPUs (as another job's actors would)."""

    @ray.remote
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.options(num_cpus=num_cpus).remote()
    ray.get(holder.ready.remote())
    return holder


def test_workers_that_cannot_be_placed_fail_after_the_placement_timeout(ray_session):
    # enough CPUs in total (8) but not free: without a timeout the run would wait forever
    total = ray_session.cluster_resources()["CPU"]
    holder = _hold_cpus(ray_session, total - 1)
    try:
        start = time.monotonic()
        with pytest.raises(ClusterError) as info:
            RayBackend(make_config("cluster.placement_timeout_s=1"))
        assert time.monotonic() - start < 15
    finally:
        ray_session.kill(holder)
    message = str(info.value)
    assert "\n" not in message
    assert re.fullmatch(
        r"cluster\.num_workers=2 needs 2 free CPUs; after cluster\.placement_timeout_s=1 s the Ray cluster has "
        rf"1 of its {total:g} CPUs free \(other actors or jobs hold the rest\): free them, raise "
        r"cluster\.placement_timeout_s or lower cluster\.num_workers or cluster\.cpus_per_worker", message), message
    # the refused run reserved nothing: the CPUs are all free again once the holder is gone
    deadline = time.monotonic() + 10
    while ray_session.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray_session.available_resources().get("CPU", 0) == total


def test_workers_wait_for_cpus_freed_within_the_placement_timeout(ray_session):
    """The CPUs are held until the run's reservation is seen waiting for them, then freed: the run goes on with
    the very reservation that waited."""
    from ray.util.placement_group import placement_group_table

    holder = _hold_cpus(ray_session, ray_session.cluster_resources()["CPU"] - 1)
    before = set(placement_group_table())
    waited: list[str] = []

    def free_once_the_run_waits() -> None:
        deadline = time.monotonic() + 60
        try:
            while not waited and time.monotonic() < deadline:
                waited.extend(g for g, info in placement_group_table().items()
                              if g not in before and info["state"] == "PENDING")
                time.sleep(0.05)
        finally:
            ray_session.kill(holder)

    freer = threading.Thread(target=free_once_the_run_waits)
    freer.start()
    try:
        backend = RayBackend(make_config("cluster.placement_timeout_s=60"))
    finally:
        freer.join()
    try:
        assert waited == [backend._group.id.hex()]
        assert len(backend.info) == 2
    finally:
        backend.close()


@pytest.mark.parametrize("ending, transport", [("completed", "ray"), ("the driver failed", "shm"),
                                               ("the driver failed", "ray"), ("the server failed", "ray")])
@pytest.mark.slow
def test_the_workers_loops_have_ended_when_their_transport_closes(ray_session, tmp_path, monkeypatch, ending,
                                                                  transport):
    """However a run ends, no worker's loop still runs when the server closes the transport (the actors are
    killed after that): on Ray's channels, a value pushed to a node whose end of the channel is closed crashes
    that node's raylet (ray-project/ray#63229). The driver's failure comes while the server's loop is still
    going (a diverged loss at step ~4 of 100,000); the server's in async mode, with the other worker's command
    in flight."""
    import json

    from sgd_dist.backends.ray import actors
    from sgd_dist.engine.server import ParameterServer
    from sgd_dist.run.trainer import train

    seen = str(tmp_path / "seen.json")

    class FailingParameterServer(ParameterServer):
        def update(self, results, **kwargs):
            if self.step == 50:
                raise RuntimeError("injected failure at update 51")
            return super().update(results, **kwargs)

    class Server(actors.Server):  # defined here: Ray pickles it by value into the actor
        def __init__(self, server_kwargs, *args):
            super().__init__(server_kwargs, *args)
            if ending == "the server failed":
                self.server = FailingParameterServer(**server_kwargs)

        def close_transport(self):
            loops = getattr(self, "loops", [])
            running = actors.ray.wait(loops, num_returns=len(loops), timeout=0)[1] if loops else []
            Path(seen).write_text(json.dumps({"loops": len(loops), "running": len(running)}))
            super().close_transport()

    monkeypatch.setattr(actors, "ServerActor", ray_session.remote(Server))
    options = {"completed": ["train.steps=50"], "the driver failed": ["train.steps=100000", "optim.lr=1e6"],
               "the server failed": ["train.steps=100000", "train.mode=async"]}[ending]
    config = make_config(*options, f"cluster.transport={transport}", f"output.dir={tmp_path / 'r'}")
    if ending == "completed":
        assert train(config, console=False, progress=False).summary["status"] == "completed"
    else:
        with pytest.raises(Exception, match="diverged" if ending == "the driver failed" else "injected failure"):
            train(config, console=False, progress=False)
    assert json.loads(Path(seen).read_text()) == {"loops": 2, "running": 0}


@pytest.mark.slow
def test_an_address_naming_another_cluster_is_refused_when_ray_is_initialised(ray_session):
    connected = ray_session.get_runtime_context().gcs_address
    with pytest.raises(ClusterError, match=(
            rf"^cluster\.address='127\.0\.0\.1:1', but this process is already connected to the Ray cluster at "
            rf"{re.escape(connected)}; leave cluster\.address null to use it, or call ray\.shutdown\(\) first$")):
        RayBackend(make_config("cluster.address=127.0.0.1:1"))
    port = connected.rpartition(":")[2]
    for same in [connected, f"localhost:{port}"]:
        backend = RayBackend(make_config(f"cluster.address={same}"))
        try:
            assert backend.address == connected
        finally:
            backend.close()
    assert ray_session.is_initialized()  # a cluster this call did not start is left running
