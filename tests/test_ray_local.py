"""The embedded local Ray listens on loopback only, and the workers run in their own processes."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from sgd_dist.backends.ray_backend import ClusterError, RayBackend

from conftest import make_config


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
    for table, width in [("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)]:
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
