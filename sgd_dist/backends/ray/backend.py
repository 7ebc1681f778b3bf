"""The Ray backend: shard workers and the parameter server as Ray actors.

Without an address (and without RAY_ADDRESS) it starts an embedded local Ray bound to 127.0.0.1 with the
dashboard off; with one it joins that cluster. If Ray is already initialised in this process (a notebook, a
test session) it is used as it is and left running, and an address naming another cluster is refused. With
``cluster.simulated_nodes`` it starts a multi-node cluster on this machine instead (``backends/simulated.py``).
"""

from __future__ import annotations

import copy
import ipaddress
import logging
import math
import os
import signal
import socket
import threading
import time
from collections import deque
from typing import Any, Callable, Collection, Sequence

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from sgd_dist import signals
from sgd_dist.backends.base import (  # noqa: F401 (ClusterError: raised here, imported from here)
    Backend,
    ClusterError,
    Sink,
    one_line,
    server_args,
    worker_args,
    worker_threads,
)
from sgd_dist.backends.capacity import check_node_memory
from sgd_dist.backends.ray import simulated
from sgd_dist.config import Config
from sgd_dist.engine.messages import STOP_TIMEOUT_S, WorkerLost
from sgd_dist.engine.loop import Loop
from sgd_dist.engine.recovery import LoopHooks
from sgd_dist.engine.server import ParameterServer
from sgd_dist.engine.worker import ShardWorker
from sgd_dist.transports import channel
from sgd_dist.transports.channel import ChannelServerEnd
from sgd_dist.transports.shm import SHM_DIR, Layout, ShmServerEnd, ShmWorkerEnd, serve_worker

DRAIN_EVERY_S = 0.2  # how often the driver collects metrics rows while the loop runs


class _Worker(ShardWorker):
    """A shard worker as a Ray actor: the plain worker, plus the shared-memory loop and its node."""

    _shm: ShmWorkerEnd | None = None

    def info(self) -> dict:
        return {**super().info(), "node_id": ray.get_runtime_context().get_node_id()}

    def make_channel(self, reader: Any, reader_node: str, dim: int):
        """This worker's answer channel, read by the server."""
        return channel.make_channel(reader, reader_node, dim)

    def serve_channels(self, go, answer) -> int:
        return channel.serve_worker(self, go, answer)

    def attach(self, name: str, layout: Layout) -> None:
        self._shm = ShmWorkerEnd(name, layout, self.rank)

    def serve_shm(self) -> int:
        assert self._shm is not None
        try:
            return serve_worker(self, self._shm)
        finally:
            self._shm.close()
            self._shm = None


class _Server:
    """The parameter server as a Ray actor: runs the ``Loop`` on its transport and the workers' loops, replaces
    a lost worker, injects the configured faults; the driver drains its records concurrently (the actor has two
    threads: the loop and the drain). Every record keeps its place in the outbox until the driver confirms it has
    delivered it, so a drain whose reply never arrived (the driver interrupted while waiting) loses nothing: the
    next drain sends those records again."""

    def __init__(self, server_kwargs: dict, num_workers: int, staleness_lr: bool, specs: list[tuple[dict, dict]],
                 checkpoint_every: int, faults: Sequence) -> None:
        self.server = ParameterServer(**server_kwargs)
        self.num_workers, self.staleness_lr = num_workers, staleness_lr
        self.specs = specs  # each worker's constructor arguments and actor options: to build a replacement
        self.checkpoint_every = checkpoint_every
        self.faults = [f for f in faults if f.kind in ("kill_worker", "kill_server")]
        self.end: ShmServerEnd | ChannelServerEnd | None = None
        self.outbox: deque[tuple[int, str, Any]] = deque()  # (sequence number, kind, payload), oldest first
        self._posted = 0  # the sequence number of the newest record
        self._acked = 0  # the newest one the driver has delivered
        self._lock = threading.Lock()  # the loop posts while the driver's drain reads
        self.workers: list[Any] = []
        self.pids: list[int] = []
        self.killed_at: dict[int, float] = {}  # worker -> when an injected kill hit it
        self._shm: tuple[str, Layout] | None = None
        self._stopping = threading.Event()  # the driver gave the run up: end the loops

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def setup_shm(self, layout: Layout) -> str:
        """Create the shared-memory segment; return its name for the workers."""
        self.end = ShmServerEnd(layout)
        self._shm = (self.end.segment.name, layout)
        return self.end.segment.name

    def make_channels(self, workers: Sequence[Any], nodes: Sequence[str], dim: int) -> list:
        """The workers' go channels, written by this actor."""
        return [channel.make_channel(w, node, dim) for w, node in zip(workers, nodes)]

    def setup_channels(self, go: Sequence, answers: Sequence) -> None:
        self.end = ChannelServerEnd(go, answers)

    def run(self, policy, eval_at: Collection[int], workers: Sequence[Any], pids: Sequence[int],
            restore: dict | None = None, elapsed_s: float = 0.0) -> dict:
        assert self.end is not None
        self.workers, self.pids = list(workers), list(pids)
        if isinstance(self.end, ShmServerEnd):
            loops = [w.serve_shm.remote() for w in self.workers]
            self.end.wait_attached()
        else:
            loops = [w.serve_channels.remote(g, a) for w, g, a in zip(self.workers, self.end.go, self.end.answers)]
            for r, loop in enumerate(loops):
                self.end.watch(r, loop)
        self.loops = loops
        hooks = LoopHooks(recover=self._replace, checkpoint_every=self.checkpoint_every,
                          on_checkpoint=lambda state: self._post("checkpoint", state),
                          on_update=self._inject if self.faults else None, on_fault=self._fault,
                          stop=self._stopping.is_set)
        try:
            stats = Loop(self.server, self.end, policy, self.num_workers, eval_at,
                         lambda rows: self._post("rows", rows), staleness_lr=self.staleness_lr,
                         hooks=hooks, restore=restore, elapsed_s=elapsed_s).run()
        finally:
            # also when the loop failed or was stopped: the workers' loops end before anything closes their
            # transport or kills them
            self.end.stop(STOP_TIMEOUT_S)
            ray.wait(self.loops, num_returns=len(self.loops), timeout=STOP_TIMEOUT_S)
        return {**stats, "workers": self.workers}

    def stop(self) -> None:
        """End the loop at its next turn, and the workers' loops after it (the driver gave the run up)."""
        self._stopping.set()

    def _fault(self, entry: dict) -> None:
        killed = self.killed_at.pop(entry.get("worker"), None)
        if entry["fault"] == "worker_lost" and killed is not None:
            entry["noticed_s"] = entry["noticed_unix"] - killed
        self._post("fault", entry)

    def _post(self, kind: str, payload: Any) -> int:
        with self._lock:
            self._posted += 1
            self.outbox.append((self._posted, kind, payload))
            return self._posted

    def _inject(self, version: int) -> None:
        """The configured kills due at this update."""
        due = [f for f in self.faults if f.step == version]
        for fault in due:
            self.faults.remove(fault)
            if fault.kind == "kill_worker":
                r = fault.worker
                self.killed_at[r] = time.time()
                self._post("fault", {"fault": "kill_worker", "worker": r, "how": fault.how, "step": version,
                                     "at_unix": self.killed_at[r]})
                if fault.how == "ray_kill":
                    ray.kill(self.workers[r], no_restart=True)
                else:
                    os.kill(self.pids[r], signal.SIGKILL)
            else:
                posted = self._post("fault", {"fault": "kill_server", "step": version, "at_unix": time.time()})
                # the driver learns of it before it happens: wait until it has delivered that record
                deadline = time.monotonic() + 2.0
                while self._acked < posted and time.monotonic() < deadline:
                    time.sleep(0.005)
                os.kill(os.getpid(), signal.SIGKILL)

    def _replace(self, r: int) -> Callable[[], bool]:
        """Start a new worker r (its shard regenerated from the seed); return a poll that connects it to the
        transport once it is up and then says True. The loop serves the other workers meanwhile."""
        kwargs, options = self.specs[r]
        try:
            ray.kill(self.workers[r], no_restart=True)
        except Exception:
            pass
        anywhere = {"num_cpus": 0, "num_gpus": options.get("num_gpus", 0)}  # any live node's CPU

        def launch(opts: dict) -> tuple[Any, ray.ObjectRef, float]:
            worker = _WorkerActor.options(**opts).remote(**kwargs)
            return worker, worker.info.remote(), time.monotonic() + REPLACE_TIMEOUT_S

        # its reserved place went with a node: straight to any live node
        fallback = simulated.pinned_node_lost(options.get("scheduling_strategy"))
        pending = launch(anywhere if fallback else options)

        def ready() -> bool:
            nonlocal pending, fallback
            worker, info_ref, deadline = pending
            if not ray.wait([info_ref], timeout=0)[0]:
                if time.monotonic() < deadline:
                    return False
                ray.kill(worker)
                if fallback:
                    raise WorkerLost(f"worker {r}'s replacement did not start within {REPLACE_TIMEOUT_S:g} s", r)
                fallback, pending = True, launch(anywhere)  # its reserved place may be gone: try any node
                return False
            self._connect(r, worker, ray.get(info_ref))
            return True

        return ready

    def _connect(self, r: int, worker: Any, info: dict) -> None:
        """Put a started replacement in worker r's place on the transport and start its loop."""
        self.workers[r], self.pids[r] = worker, info["pid"]
        if isinstance(self.end, ShmServerEnd):
            name, layout = self._shm
            ray.get(worker.attach.remote(name, layout))
            self.loops[r] = worker.serve_shm.remote()
        else:
            dim = self.server.weights.numel()
            go = channel.make_channel(worker, info["node_id"], dim)
            me = ray.get_runtime_context().current_actor
            answer = ray.get(worker.make_channel.remote(me, self.node_id(), dim))
            self.loops[r] = worker.serve_channels.remote(go, answer)
            self.end.connect(r, go, answer, self.loops[r])

    def drain(self, acked: int) -> list[tuple[int, str, Any]]:
        """The records after ``acked`` (the newest the driver has delivered); those up to it are let go."""
        with self._lock:
            self._acked = max(self._acked, acked)
            while self.outbox and self.outbox[0][0] <= acked:
                self.outbox.popleft()
            return list(self.outbox)

    def weights(self) -> torch.Tensor:
        return self.server.weights.clone()

    def close_transport(self) -> None:
        if self.end is not None:
            self.end.close()
            self.end = None


_WorkerActor = ray.remote(_Worker)
_ServerActor = ray.remote(_Server)

CONNECT_TIMEOUT_S = 5.0
AUTH_PROBE_TIMEOUT_S = 5.0
REPLACE_TIMEOUT_S = 30.0  # a replacement worker must be up (its shard generated) within this
MAX_SERVER_RESTARTS = 3


class _ServerLost(Exception):
    """The server actor died (its process was killed, or its node was removed)."""


def _resolve(address: str) -> tuple[str, int]:
    """HOST and PORT of a cluster address ('auto', HOST:PORT or ray://HOST:PORT)."""
    target = address.removeprefix("ray://")
    if address == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address

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


def _stay_on_loopback() -> None:
    """Make this process's Ray use 127.0.0.1 as its node address.

    Otherwise Ray binds a local cluster to the external interface, and rewrites a 127.0.0.1 cluster address
    into this machine's external IP (where nothing listens). The variable is read when ray is imported and
    inherited by the processes Ray starts, so set both it and the constant it fed.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

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
        _stay_on_loopback()
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
        _stay_on_loopback()
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
    import grpc
    from ray._private.gcs_utils import create_gcs_channel
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

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
    import grpc
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

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
    import grpc

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


class RayBackend(Backend):
    name = "ray"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._group = None  # the workers' placement group
        self._specs: list[tuple[dict, dict]] = []
        self._latest: dict | None = None  # the latest checkpoint
        self._last_step = 0  # the last step whose row the driver has
        self._server_killed: tuple[int, float] | None = None  # an injected server kill: (step, when)
        self._node_removed_at: float | None = None  # when the driver last removed a simulated node
        self._faults = list(config.faults)  # those not injected yet
        self._run: ray.ObjectRef | None = None  # the server's loop, while it may still run
        cluster = config.cluster
        cpus_needed = cluster.num_workers * cluster.cpus_per_worker
        self._segment: str | None = None
        self._semaphores: set[str] | None = None  # /dev/shm semaphores before this run made its channels
        self.simulated = None  # cluster.simulated_nodes: the ray.cluster_utils.Cluster this run started
        self._simulated_nodes: list[Any] = []  # its nodes in index order (the head first); None once removed
        if cluster.simulated_nodes:
            self._started = self._start_simulated()
        else:
            # The embedded Ray is a simulation: give it enough logical CPUs for every actor even on 2 cores.
            self._started = init_ray(cluster.address, num_cpus=max(os.cpu_count() or 1, math.ceil(cpus_needed)))
        try:
            self._create_actors(config, cpus_needed)
        except BaseException:
            self.close()
            raise

    def _create_actors(self, config: Config, cpus_needed: float) -> None:
        cluster = config.cluster
        memory = [node["Resources"].get("memory", 0) for node in ray.nodes() if node["Alive"]]
        if memory:
            check_node_memory(config, max(memory))
        resources = ray.cluster_resources()
        gpus = resources.get("GPU", 0)
        if cluster.device == "cuda" and gpus == 0:
            raise ClusterError("cluster.device=cuda, but the Ray cluster has no GPU; use cpu or auto")
        self.device = "cuda" if cluster.device == "cuda" or (cluster.device == "auto" and gpus > 0) else "cpu"
        gpus_needed = cluster.num_workers * cluster.gpus_per_worker if self.device == "cuda" else 0
        live = [node for node in self.simulated_node_ids if node is not None]
        degraded = self.simulated is not None and len(live) < cluster.simulated_nodes
        if not degraded and (resources.get("CPU", 0) < cpus_needed or gpus < gpus_needed):
            raise ClusterError(
                f"cluster.num_workers={cluster.num_workers} needs {cpus_needed:g} CPUs"
                + (f" and {gpus_needed:g} GPUs" if gpus_needed else "")
                + f"; the Ray cluster has {resources.get('CPU', 0):g} CPUs and {gpus:g} GPUs"
                " (lower cluster.cpus_per_worker or cluster.num_workers)"
            )
        gpus_per_worker = cluster.gpus_per_worker if self.device == "cuda" else 0
        if degraded:
            # rebuilt after a node was removed: the survivors take its workers, over their CPUs (as they would on
            # a cluster that lost a machine), round-robin
            strategies = [NodeAffinitySchedulingStrategy(live[r % len(live)], soft=False)
                          for r in range(cluster.num_workers)]
            cpus = 0
        else:
            strategies = self._reserve(cluster, gpus_per_worker, cpus_needed, gpus_needed)
            cpus = cluster.cpus_per_worker
        threads = worker_threads(config)
        # each worker's constructor arguments and actor options: the server builds a replacement from them
        self._specs = [({**args, "device": self.device, "num_threads": threads},
                        dict(num_cpus=cpus, num_gpus=gpus_per_worker, scheduling_strategy=strategy))
                       for args, strategy in zip(worker_args(config), strategies)]
        self.workers = [_WorkerActor.options(**options).remote(**kwargs) for kwargs, options in self._specs]
        nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
        if self.simulated is not None:  # the server goes on the head, which is never removed
            self._start_server(self.simulated_node_ids[0])
        elif len(nodes) == 1:  # every actor shares the one node: start the server while the shards generate
            self._start_server(nodes[0])
        self.info = self.worker_info()  # waits until every shard is generated; raises if a worker died
        self.transport = pick_transport(cluster.transport, {info["node_id"] for info in self.info})
        if self.server is None:  # on shm the server shares the workers' node; on ray it may go anywhere
            self._start_server(self.info[0]["node_id"] if self.transport == "shm" else None)
        self.address = ray.get_runtime_context().gcs_address

    def _start_simulated(self) -> bool:
        cluster = self.config.cluster
        if ray.is_initialized():
            raise ClusterError(
                f"cluster.simulated_nodes={cluster.simulated_nodes} starts its own Ray cluster, but this process is "
                f"already connected to Ray at {ray.get_runtime_context().gcs_address}: run it in a fresh process "
                "(or call ray.shutdown() first)")
        _stay_on_loopback()
        cpus = simulated.cpus_per_node(cluster.num_workers, cluster.cpus_per_worker, cluster.simulated_nodes)
        with signals.keep_sigterm_handler():
            self.simulated, self._simulated_nodes = simulated.start(cluster.simulated_nodes, cpus, cluster.num_workers)
        return True

    @property
    def simulated_node_ids(self) -> list[str | None]:
        """The simulated nodes' Ray node ids in index order (None for a removed node); empty when not simulated."""
        return [None if node is None else node.node_id for node in self._simulated_nodes]

    def remove_node(self, index: int) -> None:
        """Remove simulated node ``index`` (1..N-1) as a machine failure would: its raylet and every process on it
        are killed, and so are the workers Ray placed there. The head (0) holds the driver's connection and
        the server, so it cannot be removed."""
        if self.simulated is None:
            raise ClusterError("remove_node needs a simulated cluster (cluster.simulated_nodes)")
        count = len(self._simulated_nodes)
        if not 1 <= index < count or self._simulated_nodes[index] is None:
            removed = [i for i, node in enumerate(self._simulated_nodes) if node is None]
            raise ValueError(f"simulated node {index} cannot be removed: nodes 1..{count - 1} can"
                             + (f", and {removed} already were" if removed else "")
                             + " (node 0, the head, holds the server and the driver's connection)")
        node, self._simulated_nodes[index] = self._simulated_nodes[index], None
        self.simulated.remove_node(node)

    def _start_server(self, node: str | None) -> None:
        config = self.config
        placement = NodeAffinitySchedulingStrategy(node, soft=False) if node else "DEFAULT"
        self.server = _ServerActor.options(num_cpus=0, max_concurrency=2, scheduling_strategy=placement).remote(
            server_args(config), config.cluster.num_workers, config.optim.staleness_lr, self._specs,
            config.train.checkpoint_every, self._faults)

    def _reserve(self, cluster, gpus_per_worker: float, cpus_needed: float, gpus_needed: float) -> list[Any]:
        """Reserve every worker's CPUs (and GPUs) at once, waiting at most cluster.placement_timeout_s.

        Ray queues an actor that does not fit the free resources and never says so: with enough CPUs in
        total but not free, a run would wait forever. A placement group makes the wait explicit and bounded.
        Returns each worker's scheduling strategy (its bundle, or SPREAD for a worker that reserves nothing).
        """
        bundle = {key: value for key, value in [("CPU", cluster.cpus_per_worker), ("GPU", gpus_per_worker)] if value}
        bundles = [dict(bundle) for _ in range(cluster.num_workers)]
        if self.simulated is not None:  # pin worker r to simulated node r mod N
            for rank, item in enumerate(bundles):
                item[simulated.node_resource(simulated.node_of(rank, cluster.simulated_nodes))] = 1
        if not bundles[0]:  # nothing to reserve (cpus_per_worker=0 on cpu): Ray places such actors at once
            return ["SPREAD"] * cluster.num_workers
        self._group = placement_group(bundles, strategy="SPREAD")
        if not self._group.wait(timeout_seconds=cluster.placement_timeout_s):
            free, total = ray.available_resources(), ray.cluster_resources()
            missing = [f"{cpus_needed:g} free CPUs"] + ([f"{gpus_needed:g} free GPUs"] if gpus_needed else [])
            has = [f"{free.get('CPU', 0):g} of its {total.get('CPU', 0):g} CPUs"] + (
                [f"{free.get('GPU', 0):g} of its {total.get('GPU', 0):g} GPUs"] if gpus_needed else [])
            raise ClusterError(
                f"cluster.num_workers={cluster.num_workers} needs {' and '.join(missing)}; after "
                f"cluster.placement_timeout_s={cluster.placement_timeout_s:g} s the Ray cluster has "
                f"{' and '.join(has)} free (other actors or jobs hold the rest): free them, raise "
                "cluster.placement_timeout_s or lower cluster.num_workers or cluster.cpus_per_worker"
            )
        return [PlacementGroupSchedulingStrategy(self._group, placement_group_bundle_index=rank)
                for rank in range(cluster.num_workers)]

    def _call(self, target: Any, method: str, *args: Any) -> Any:
        return getattr(target, method).remote(*args)

    def _get(self, handles: Sequence[Any]) -> list[Any]:
        return ray.get(list(handles))

    def run(self, policy, eval_at: Collection[int], sink: Sink, restore: dict | None = None) -> None:
        """Train; a lost server is replaced, restored from the latest checkpoint (or restarted from step 0 without
        one) and the steps since are redone (``sink.rewind`` drops their rows first)."""
        initial = copy.deepcopy(policy)  # a restored server's policy: this one, loaded with the checkpoint's state
        self._latest = restore
        restarts = 0
        t_run = time.perf_counter() - (0.0 if restore is None else restore["elapsed_s"])
        clock = None  # a rebuilt server's clock: the time since the loop first started, recovery included
        while True:
            try:
                self._run_once(policy, eval_at, sink, self._latest, clock)
                for fault in [f for f in self._faults if f.kind == "remove_node"]:  # the driver saw it too late
                    sink.fault({"fault": "remove_node", "node": fault.node, "step": fault.step,
                                "skipped": "the run ended before the driver saw this step"})
                return
            except _ServerLost as lost:
                noticed, t0 = time.time(), time.perf_counter()
                restarts += 1
                if restarts > MAX_SERVER_RESTARTS:
                    raise RuntimeError(f"the parameter server was lost {restarts} times; giving up") from None
                step = -1 if self._latest is None else int(self._latest["server"]["step"])
                sink.rewind(step)
                self._release_actors()
                self._create_actors(self.config, self.config.cluster.num_workers * self.config.cluster.cpus_per_worker)
                policy = copy.deepcopy(initial)
                clock = time.perf_counter() - t_run
                at = self._last_step if self._server_killed is None else self._server_killed[0]
                entry = {"fault": "server_lost", "step": at, "noticed_unix": noticed, "cause": str(lost),
                         "restored_step": max(step, 0), "steps_redone": max(0, at - max(step, 0)),
                         "recovery_s": time.perf_counter() - t0}
                if self._server_killed is not None:
                    entry["noticed_s"] = noticed - self._server_killed[1]
                    self._server_killed = None
                sink.fault(entry)

    def _run_once(self, policy, eval_at: Collection[int], sink: Sink, restore: dict | None,
                  clock: float | None) -> None:
        config = self.config
        self._acked = 0  # a new server numbers its records from 1
        if self.transport == "shm":
            layout = Layout(config.cluster.num_workers, config.data.dim, config.data.dtype)
            self._segment = ray.get(self.server.setup_shm.remote(layout))
            ray.get([w.attach.remote(self._segment, layout) for w in self.workers])
        else:
            dim = config.data.dim
            if self._semaphores is None:
                self._semaphores = channel.semaphores()
            go = ray.get(self.server.make_channels.remote(self.workers, [i["node_id"] for i in self.info], dim))
            server_node = ray.get(self.server.node_id.remote())
            answers = ray.get([w.make_channel.remote(self.server, server_node, dim) for w in self.workers])
            ray.get(self.server.setup_channels.remote(go, answers))
        # the server runs the workers' loops, notices a lost worker and replaces it
        if clock is not None:  # rebuilt: its rows' wall times go on from the lost server's, recovery included
            restore = {**restore, "elapsed_s": clock} if restore is not None else None
        run = self._run = self.server.run.remote(policy, frozenset(eval_at), self.workers,
                                                 [i["pid"] for i in self.info], restore, clock or 0.0)
        try:
            while True:
                ready, _ = ray.wait([run], timeout=DRAIN_EVERY_S)
                self._deliver(sink, self._drain())
                if not ready:  # a removal seen only once the run is over would only break the final calls
                    self._remove_nodes(sink)
                if ready:
                    try:
                        stats = ray.get(run)
                    except ray.exceptions.RayActorError as exc:
                        raise _ServerLost(one_line(exc)) from None
                    self.workers = stats.pop("workers")
                    self.loop_stats = stats
                    return
        except _ServerLost:
            raise
        except BaseException:
            self._stop_loop()
            try:  # every row the server computed before the failure (or before it stopped)
                self._deliver(sink, ray.get(self.server.drain.remote(self._acked), timeout=10))
            except Exception:
                pass
            raise

    def _stop_loop(self) -> None:
        """Have the server end its loop and then its workers' loops, and wait for that (bounded): the run was given
        up, and nothing may still be written on a channel when it closes or by an actor when it is killed."""
        run, self._run = self._run, None
        if run is None or self.server is None:
            return
        try:
            if not ray.wait([run], timeout=0)[0]:
                self.server.stop.remote()
                ray.wait([run], timeout=3 * STOP_TIMEOUT_S)
        except Exception:  # the server is gone: so are its loop and its channels' writes
            pass

    def _drain(self) -> list:
        try:
            return ray.get(self.server.drain.remote(self._acked))
        except ray.exceptions.RayActorError as exc:
            raise _ServerLost(one_line(exc)) from None

    def _deliver(self, sink: Sink, items: list) -> None:
        """Hand the server's records to the sink, once each: a record sent again (the reply that first carried it
        was lost) is skipped, and the server lets go of each once a later drain confirms it. Ctrl-C waits until
        the records are written, so that no batch is cut in two."""
        with signals.deferred():
            for seq, kind, payload in items:
                if seq > self._acked:
                    self._acked = seq  # first: a record whose delivery fails (a diverged row) is not tried again
                    self._deliver_one(sink, kind, payload)

    def _deliver_one(self, sink: Sink, kind: str, payload: Any) -> None:
        if kind == "rows":
            if payload:
                self._last_step = payload[-1]["step"]
            sink.rows(payload)
        elif kind == "checkpoint":
            self._latest = payload
            sink.checkpoint(payload)
        else:
            if payload["fault"] in ("kill_worker", "kill_server"):  # injected: never again, not after a restore
                self._faults = [f for f in self._faults if not (f.kind == payload["fault"] and f.step == payload["step"]
                                                                and f.worker == payload.get("worker"))]
                if payload["fault"] == "kill_server":
                    self._server_killed = (payload["step"], payload["at_unix"])
            elif payload["fault"] == "worker_lost" and "noticed_s" not in payload and self._node_removed_at:
                payload["noticed_s"] = payload["noticed_unix"] - self._node_removed_at  # lost with its node
            sink.fault(payload)

    def _remove_nodes(self, sink: Sink) -> None:
        """The configured node removals due by the last step the driver has seen."""
        for fault in [f for f in self._faults if f.kind == "remove_node" and f.step <= self._last_step]:
            self._faults.remove(fault)
            at = self._node_removed_at = time.time()
            self.remove_node(fault.node)
            sink.fault({"fault": "remove_node", "node": fault.node, "step": self._last_step, "at_unix": at})

    def final_weights(self) -> torch.Tensor:
        return ray.get(self.server.weights.remote())

    def _release_actors(self) -> None:
        """Stop the loops, then kill the server and the workers, remove the segment and the placement group (Ray
        stays up)."""
        self._stop_loop()
        if self.server is not None:
            try:
                ray.get(self.server.close_transport.remote(), timeout=10)
            except Exception:
                pass
        for actor in [*self.workers, self.server]:
            if actor is not None:
                ray.kill(actor)
        self._release_local()
        if self._group is not None:  # a pending group would take the CPUs the moment they free up
            remove_placement_group(self._group)
            self._group = None

    def _release_local(self) -> None:
        self.workers, self.server = [], None
        if self._segment is not None:  # the server may have died holding it (same node only: shm)
            (SHM_DIR / self._segment).unlink(missing_ok=True)
            self._segment = None

    def close(self) -> None:
        if ray.is_initialized():
            if not self._started or gcs_alive():
                self._release_actors()
            else:  # our Ray is going down under us: only what lives outside it (the segment) needs us
                self._release_local()
            if self._started:  # only a Ray this run started: a joined cluster's /dev/shm is not ours to tidy
                ray.shutdown()
                self._started = False
                self._stop_simulated()
                if self._semaphores is not None:  # the ones this run's channels made go with its raylet
                    channel.sweep_stale_semaphores(channel.semaphores() - self._semaphores, wait_s=3.0)
                channel.sweep_stale_semaphores()
        self._stop_simulated()  # Ray may have gone down under the run
        self._semaphores = None

    def _stop_simulated(self) -> None:
        if self.simulated is not None:
            if ray.is_initialized():
                ray.shutdown()
            simulated.stop(self.simulated)
            self.simulated, self._simulated_nodes = None, []
