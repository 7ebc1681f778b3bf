"""Connecting to Ray and placing the run on it: cluster addresses checked before ray.init (reachable, the same
cluster, token auth), a local Ray kept on loopback, the worker placement reserved with a bounded wait, and the
transport the placement allows.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from typing import Any

import grpc
import ray
from ray._private import ray_constants
from ray._private.authentication.authentication_utils import is_token_auth_enabled
from ray._private.gcs_utils import create_gcs_channel
from ray._private.services import canonicalize_bootstrap_address
from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from sgd_dist import signals
from sgd_dist.backends.capacity import check_node_memory
from sgd_dist.backends.ray import simulated
from sgd_dist.config import ClusterConfig, Config
from sgd_dist.errors import ClusterError

CONNECT_TIMEOUT_S = 5.0
AUTH_PROBE_TIMEOUT_S = 5.0


def _resolve(address: str) -> tuple[str, int]:
    """HOST and PORT of a cluster address ('auto', HOST:PORT or ray://HOST:PORT)."""
    target = address.removeprefix("ray://")
    if address == "auto":
        try:
            target = canonicalize_bootstrap_address("auto")
        except Exception as exc:  # Ray's own message says what it looked for
            raise ClusterError(f"cluster.address=auto: {str(exc).splitlines()[0]}") from None
        if target is None:
            raise ClusterError("cluster.address=auto: no running Ray cluster found on this machine")
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ClusterError(f"cluster.address={address!r} must be 'auto', HOST:PORT or ray://HOST:PORT")
    return host.strip("[]"), int(port)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def _same_cluster(address: str, gcs_address: str) -> bool:
    """Whether ``address`` names the cluster whose GCS listens at ``gcs_address`` (host names resolved)."""
    try:
        host, port = _resolve(address)
        gcs_host, gcs_port = _resolve(gcs_address)
        return port == gcs_port and socket.gethostbyname(host) == socket.gethostbyname(gcs_host)
    except (ClusterError, OSError):
        return False


def stay_on_loopback() -> None:
    """Make this process's Ray use 127.0.0.1 as its node address.

    Otherwise Ray binds a local cluster to the external interface, and rewrites a 127.0.0.1 cluster address
    into this machine's external IP (where nothing listens). The variable is read when ray is imported and
    inherited by the processes Ray starts, so set both it and the constant it fed.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect this process to Ray; return True if this call started it (the caller then shuts it down).

    No address: an embedded local Ray on 127.0.0.1 with the dashboard off, unless RAY_ADDRESS names a cluster
    (as inside a Ray job), which is then joined. An address: join that cluster, after checking that something
    listens there (ray.init would retry for many minutes). Already initialised: keep that connection, and
    refuse an address that names another cluster (ray.init would ignore it).
    """
    if ray.is_initialized():
        connected = ray.get_runtime_context().gcs_address
        if address is not None and not _same_cluster(address, connected):
            raise ClusterError(f"cluster.address={address!r}, but this process is already connected to the Ray "
                               f"cluster at {connected}; leave cluster.address null to use it, or call "
                               "ray.shutdown() first")
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        stay_on_loopback()
        # "local": a new instance even when a `ray start` cluster runs on this machine (ray.init() would join it)
        with signals.keep_sigterm_handler():
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
        return True
    host, port = _resolve(address)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ClusterError(f"cannot reach a Ray cluster at {address!r}: {exc.strerror or exc}") from None
    if _is_loopback(host):
        stay_on_loopback()
    if not address.startswith("ray://"):  # Ray Client speaks its own protocol, not the GCS's
        check_token(host, port, address)
    try:
        with signals.keep_sigterm_handler():
            ray.init(address=address, logging_level=logging.WARNING)
    except ConnectionError as exc:
        hint = "" if os.environ.get("RAY_AUTH_MODE") else (
            "; a cluster made with `ray start` uses token authentication (Ray 2.60): export RAY_AUTH_MODE=token "
            "and its token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)")
        raise ClusterError(f"{str(exc).splitlines()[0]}{hint}") from None
    return True


def _ask_gcs(host: str, port: int, timeout: float):
    """Ask a GCS one cheap question (its cluster id) with this process's credentials: None if it answered, else
    the gRPC status code of the failure."""
    channel = create_gcs_channel(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    try:
        gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(gcs_service_pb2.GetClusterIdRequest(),
                                                                            timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code()
    finally:
        channel.close()
    return None


def check_token(host: str, port: int, address: str) -> None:
    """Before ray.init: a token-auth cluster (every `ray start` cluster in Ray 2.60) refuses a client without its
    token at once (UNAUTHENTICATED), where ray.init would log about 20 s of retries before its own error.
    Anything else the question meets is left to ray.init to report."""
    if _ask_gcs(host, port, AUTH_PROBE_TIMEOUT_S) != grpc.StatusCode.UNAUTHENTICATED:
        return
    if is_token_auth_enabled():
        raise ClusterError(f"the Ray cluster at {address!r} refused this client's token (RAY_AUTH_MODE=token): use "
                           "the cluster's own token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)")
    raise ClusterError(f"the Ray cluster at {address!r} uses token authentication and this client sends no token: "
                       "export RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
                       "~/.ray/auth_token)")


def gcs_alive(timeout: float = 1.0) -> bool:
    """Whether the connected cluster's GCS still answers: a signal sent to the whole process group (`timeout`,
    `kill -TERM -PGID`) also stops the embedded Ray's processes, and then every call that needs the GCS
    (removing a placement group) would wait a minute for it, and Ray would abort the process."""
    host, port = _resolve(ray.get_runtime_context().gcs_address)
    return _ask_gcs(host, port, timeout) not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def pick_transport(wanted: str, nodes: set[str]) -> str:
    """The transport for workers placed on ``nodes``: shm needs them all on one node; auto takes it if it can."""
    if wanted == "shm" and len(nodes) > 1:
        raise ClusterError(f"cluster.transport=shm needs every worker on one node; they are on {len(nodes)} "
                           "nodes (use cluster.transport=ray or auto)")
    if wanted == "auto":
        return "shm" if len(nodes) == 1 else "ray"
    return wanted




def start_simulated(cluster: ClusterConfig) -> tuple[Any, list[Any]]:
    """Start a simulated cluster of ``cluster.simulated_nodes`` nodes on this machine and connect to it; return
    the ``Cluster`` and its nodes in index order. Refused while this process is connected to another Ray."""
    if ray.is_initialized():
        raise ClusterError(
            f"cluster.simulated_nodes={cluster.simulated_nodes} starts its own Ray cluster, but this process is "
            f"already connected to Ray at {ray.get_runtime_context().gcs_address}: run it in a fresh process "
            "(or call ray.shutdown() first)")
    stay_on_loopback()
    cpus = simulated.cpus_per_node(cluster.num_workers, cluster.cpus_per_worker, cluster.simulated_nodes)
    with signals.keep_sigterm_handler():
        return simulated.start(cluster.simulated_nodes, cpus, cluster.num_workers)


def check_cluster(config: Config, degraded: bool) -> str:
    """Refuse (ClusterError, one line) a run the connected cluster cannot host; return the workers' device.

    ``degraded``: a simulated cluster that lost a node, whose survivors take its workers over their CPUs.
    """
    cluster = config.cluster
    memory = [node["Resources"].get("memory", 0) for node in ray.nodes() if node["Alive"]]
    if memory:
        check_node_memory(config, max(memory))
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    if cluster.device == "cuda" and gpus == 0:
        raise ClusterError("cluster.device=cuda, but the Ray cluster has no GPU; use cpu or auto")
    device = "cuda" if cluster.device == "cuda" or (cluster.device == "auto" and gpus > 0) else "cpu"
    cpus_needed = cluster.num_workers * cluster.cpus_per_worker
    gpus_needed = cluster.num_workers * cluster.gpus_per_worker if device == "cuda" else 0
    if not degraded and (resources.get("CPU", 0) < cpus_needed or gpus < gpus_needed):
        raise ClusterError(
            f"cluster.num_workers={cluster.num_workers} needs {cpus_needed:g} CPUs"
            + (f" and {gpus_needed:g} GPUs" if gpus_needed else "")
            + f"; the Ray cluster has {resources.get('CPU', 0):g} CPUs and {gpus:g} GPUs"
            " (lower cluster.cpus_per_worker or cluster.num_workers)"
        )
    return device


def spread_over(nodes: list[str], num_workers: int) -> list[Any]:
    """Each worker's strategy pinning it to one of ``nodes``, round-robin (no reservation)."""
    return [NodeAffinitySchedulingStrategy(nodes[r % len(nodes)], soft=False) for r in range(num_workers)]


def reserve(cluster: ClusterConfig, gpus_per_worker: float, pin_simulated: bool) -> tuple[PlacementGroup | None,
                                                                                          list[Any]]:
    """Reserve every worker's CPUs (and GPUs) at once, waiting at most cluster.placement_timeout_s.

    Ray queues an actor that does not fit the free resources and never says so: with enough CPUs in total but
    not free, a run would wait forever. A placement group makes the wait explicit and bounded. Returns the group
    (None when nothing is reserved) and each worker's scheduling strategy (its bundle, or SPREAD for a worker
    that reserves nothing). ``pin_simulated``: worker r's bundle goes on simulated node r mod N.
    """
    bundle = {key: value for key, value in [("CPU", cluster.cpus_per_worker), ("GPU", gpus_per_worker)] if value}
    bundles = [dict(bundle) for _ in range(cluster.num_workers)]
    if pin_simulated:
        for rank, item in enumerate(bundles):
            item[simulated.node_resource(simulated.node_of(rank, cluster.simulated_nodes))] = 1
    if not bundles[0]:  # nothing to reserve (cpus_per_worker=0 on cpu): Ray places such actors at once
        return None, ["SPREAD"] * cluster.num_workers
    group = placement_group(bundles, strategy="SPREAD")
    if not group.wait(timeout_seconds=cluster.placement_timeout_s):
        remove_placement_group(group)  # a pending group would take the CPUs the moment they free up
        raise ClusterError(_unplaced(cluster, gpus_per_worker))
    return group, [PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank)
                   for rank in range(cluster.num_workers)]


def _unplaced(cluster: ClusterConfig, gpus_per_worker: float) -> str:
    """Why the workers' reservation timed out: what they need free against what the cluster has free."""
    cpus_needed, gpus_needed = cluster.num_workers * cluster.cpus_per_worker, cluster.num_workers * gpus_per_worker
    free, total = ray.available_resources(), ray.cluster_resources()
    missing = [f"{cpus_needed:g} free CPUs"] + ([f"{gpus_needed:g} free GPUs"] if gpus_needed else [])
    has = [f"{free.get('CPU', 0):g} of its {total.get('CPU', 0):g} CPUs"] + (
        [f"{free.get('GPU', 0):g} of its {total.get('GPU', 0):g} GPUs"] if gpus_needed else [])
    return (f"cluster.num_workers={cluster.num_workers} needs {' and '.join(missing)}; after "
            f"cluster.placement_timeout_s={cluster.placement_timeout_s:g} s the Ray cluster has "
            f"{' and '.join(has)} free (other actors or jobs hold the rest): free them, raise "
            "cluster.placement_timeout_s or lower cluster.num_workers or cluster.cpus_per_worker")
