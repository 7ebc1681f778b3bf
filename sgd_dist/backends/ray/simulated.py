"""Simulated clusters (``cluster.simulated_nodes``): a multi-node Ray cluster on this one machine.

Ray's own test harness, ``ray.cluster_utils.Cluster``, starts a head node (GCS and raylet) and N - 1 worker
nodes (a raylet and an object store each) as processes of this one, all on 127.0.0.1. To Ray they are
separate nodes: each has its own object store, so the workers' transport is the cross-node one (Ray's
channels, with values pushed from node to node), and a node can be removed, killing the actors on it, as a
machine failure would.

Each node i carries a custom resource ``sgd_dist_node_<i>``; worker r's placement-group bundle asks for one
unit of node r mod N's, which pins it there: round-robin, whatever Ray's SPREAD would have chosen. Each node
has the logical CPUs its workers reserve. The server reserves nothing and goes on the head, beside the
driver's connection, so removing any other node never takes the server with it.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any, Iterator

import ray
from ray._common.utils import get_ray_address_file
from ray.cluster_utils import Cluster

NODE_RESOURCE = "sgd_dist_node_{}"
HOST = "127.0.0.1"
# Ray's Cluster gives each node 150 MiB of object store; the exact reference's d x d sums (512 MB at d = 8192)
# travel through it. The store takes memory only as objects fill it.
OBJECT_STORE_BYTES = 1 << 30


def node_resource(index: int) -> str:
    """The custom resource that only simulated node ``index`` has."""
    return NODE_RESOURCE.format(index)


def node_of(rank: int, num_nodes: int) -> int:
    """The simulated node of worker ``rank``: round-robin."""
    return rank % num_nodes


def pinned_node_lost(strategy: Any) -> bool:
    """Whether a worker's placement (its bundle's strategy) pins it to a simulated node that is gone: Ray can
    place that bundle nowhere else, so a replacement must not wait for it."""
    group = getattr(strategy, "placement_group", None)
    index = getattr(strategy, "placement_group_bundle_index", -1)
    if group is None or index < 0:
        return False
    pins = [key for key in group.bundle_specs[index] if key.startswith(NODE_RESOURCE.format(""))]
    return bool(pins) and pins[0] not in ray.cluster_resources()


def cpus_per_node(num_workers: int, cpus_per_worker: float, num_nodes: int) -> int:
    """Logical CPUs for each node: enough for the most workers a node gets (node 0's), at least 1."""
    return max(1, math.ceil(math.ceil(num_workers / num_nodes) * cpus_per_worker))


def start(num_nodes: int, num_cpus: int, num_workers: int) -> tuple[Any, list[Any]]:
    """Start the cluster (the head first, then the other nodes side by side) and connect this process to it.

    Returns the ``Cluster`` and its nodes in index order (``Cluster.worker_nodes`` is a set). On failure,
    what was started is stopped. The caller has made Ray bind to loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0).
    """
    def args(index: int) -> dict:
        return dict(node_ip_address=HOST, num_cpus=num_cpus, object_store_memory=OBJECT_STORE_BYTES,
                    resources={node_resource(index): num_workers})

    cluster = Cluster()
    try:
        with _keep_address_file():  # Cluster writes its address where a bare ray.init() would find it
            nodes = [cluster.add_node(**args(0), include_dashboard=False)]
        nodes += [cluster.add_node(**args(i), wait=False) for i in range(1, num_nodes)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level=logging.WARNING)
    except BaseException:
        stop(cluster)
        raise
    return cluster, nodes


def stop(cluster: Any) -> None:
    """Stop every node of the cluster (after ``ray.shutdown()``: the head holds this process's connection)."""
    with _keep_address_file():
        cluster.shutdown()


@contextlib.contextmanager
def _keep_address_file() -> Iterator[None]:
    """Leave Ray's "current cluster" file (/tmp/ray/ray_current_cluster) as it was.

    ``Cluster`` writes its address there when the head starts and deletes the file when it shuts down,
    whosever address it held: another cluster on this shared machine may rely on it.
    """
    path = Path(get_ray_address_file(None))
    try:
        before: str | None = path.read_text()
    except OSError:
        before = None
    try:
        yield
    finally:
        try:
            if before is None:
                path.unlink(missing_ok=True)
            elif not path.exists() or path.read_text() != before:
                path.write_text(before)
        except OSError:
            pass
