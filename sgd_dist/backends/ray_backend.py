"""The Ray backend: shard workers and the parameter server as Ray actors.

Without an address (and without RAY_ADDRESS) it starts an embedded local Ray bound to 127.0.0.1 with the
dashboard off; with one it joins that cluster. If Ray is already initialised in this process (a notebook, a
test session) it is used as it is and left running.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import socket
from typing import Any, Sequence

import ray

from sgd_dist.backends.base import Backend, server_args, worker_args, worker_threads
from sgd_dist.config import Config
from sgd_dist.server import ParameterServer
from sgd_dist.worker import ShardWorker

_WorkerActor = ray.remote(ShardWorker)
_ServerActor = ray.remote(ParameterServer)

CONNECT_TIMEOUT_S = 5.0


class ClusterError(RuntimeError):
    """The Ray cluster cannot be reached or cannot host the run."""


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
    listens there (ray.init would retry for many minutes).
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        _stay_on_loopback()
        # "local": a new instance even when a `ray start` cluster runs on this machine (ray.init() would join it)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
        return True
    host, port = _resolve(address)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ClusterError(f"cannot reach a Ray cluster at {address!r}: {exc.strerror or exc}") from None
    if _is_loopback(host):
        _stay_on_loopback()
    try:
        ray.init(address=address, logging_level=logging.WARNING)
    except ConnectionError as exc:
        hint = "" if os.environ.get("RAY_AUTH_MODE") else (
            "; a cluster made with `ray start` uses token authentication (Ray 2.60): export RAY_AUTH_MODE=token "
            "and its token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)")
        raise ClusterError(f"{str(exc).splitlines()[0]}{hint}") from None
    return True


class RayBackend(Backend):
    name = "ray"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        cluster = config.cluster
        cpus_needed = cluster.num_workers * cluster.cpus_per_worker
        # The embedded Ray is a simulation: give it enough logical CPUs for every actor even on 2 cores.
        self._started = init_ray(cluster.address, num_cpus=max(os.cpu_count() or 1, math.ceil(cpus_needed)))
        try:
            self._create_actors(config, cpus_needed)
        except BaseException:
            self.close()
            raise

    def _create_actors(self, config: Config, cpus_needed: float) -> None:
        cluster = config.cluster
        resources = ray.cluster_resources()
        gpus = resources.get("GPU", 0)
        if cluster.device == "cuda" and gpus == 0:
            raise ClusterError("cluster.device=cuda, but the Ray cluster has no GPU; use cpu or auto")
        self.device = "cuda" if cluster.device == "cuda" or (cluster.device == "auto" and gpus > 0) else "cpu"
        gpus_needed = cluster.num_workers * cluster.gpus_per_worker if self.device == "cuda" else 0
        if resources.get("CPU", 0) < cpus_needed or gpus < gpus_needed:
            raise ClusterError(
                f"cluster.num_workers={cluster.num_workers} needs {cpus_needed:g} CPUs"
                + (f" and {gpus_needed:g} GPUs" if gpus_needed else "")
                + f"; the Ray cluster has {resources.get('CPU', 0):g} CPUs and {gpus:g} GPUs"
                " (lower cluster.cpus_per_worker or cluster.num_workers)"
            )
        threads = worker_threads(config)
        self.workers = [
            _WorkerActor.options(
                num_cpus=cluster.cpus_per_worker,
                num_gpus=cluster.gpus_per_worker if self.device == "cuda" else 0,
                scheduling_strategy="SPREAD",
            ).remote(**args, device=self.device, num_threads=threads)
            for args in worker_args(config)
        ]
        self.server = _ServerActor.options(num_cpus=0).remote(**server_args(config))
        self.info = self.worker_info()  # waits until every shard is generated; raises if a worker died
        self.address = ray.get_runtime_context().gcs_address

    def _call(self, target: Any, method: str, *args: Any, num_returns: int = 1) -> Any:
        fn = getattr(target, method)
        if num_returns == 1:
            return fn.remote(*args)
        return tuple(fn.options(num_returns=num_returns).remote(*args))

    def _get(self, handles: Sequence[Any]) -> list[Any]:
        return ray.get(list(handles))

    def close(self) -> None:
        if ray.is_initialized():
            for actor in [*self.workers, self.server]:
                if actor is not None:
                    ray.kill(actor)
            self.workers, self.server = [], None
            if self._started:
                ray.shutdown()
                self._started = False
