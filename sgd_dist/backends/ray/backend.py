"""The Ray backend: builds the shard workers and the parameter server as Ray actors (``actors``) on the
cluster ``cluster`` connects to, runs the loop on the transport the placement allows while the driver drains the
server's records, rebuilds a lost server from the latest checkpoint (by the restart protocol every backend shares:
``backends/restarts.py``), and releases everything it made.

Without an address (and without RAY_ADDRESS) it starts an embedded local Ray bound to 127.0.0.1 with the
dashboard off; with one it joins that cluster. If Ray is already initialised in this process (a notebook, a
test session) it is used as it is and left running, and an address naming another cluster is refused. With
``cluster.simulated_nodes`` it starts a multi-node cluster on this machine instead (``simulated.py``).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Collection, Sequence

import ray
import torch
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from sgd_dist import signals
from sgd_dist.backends.base import Backend, Sink, answer_payload_bytes, server_args, worker_args, worker_threads
from sgd_dist.backends.ray import actors, simulated
from sgd_dist.backends.ray.cluster import (
    check_cluster,
    gcs_alive,
    init_ray,
    pick_transport,
    reserve,
    spread_over,
    start_simulated,
)
from sgd_dist.backends.restarts import ServerRestarts
from sgd_dist.config import Config
from sgd_dist.engine.messages import STOP_TIMEOUT_S
from sgd_dist.errors import ClusterError, one_line
from sgd_dist.transports.base import Link
from sgd_dist.transports.channel import ChannelLink
from sgd_dist.transports.shm import ShmLink

DRAIN_EVERY_S = 0.2  # how often the driver collects metrics rows while the loop runs


class _ServerLost(Exception):
    """The server actor died (its process was killed, or its node was removed)."""


class RayBackend(Backend):
    name = "ray"

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._group = None  # the workers' placement group
        self._specs: list[tuple[dict, dict]] = []
        self._restarts: ServerRestarts | None = None  # the latest checkpoint and the policy to restart with
        self._last_step = 0  # the last step whose row the driver has
        self._server_killed: tuple[int, float] | None = None  # an injected server kill: (step, when)
        self._node_removed_at: float | None = None  # when the driver last removed a simulated node
        self._faults = list(config.faults)  # those not injected yet
        self._run: ray.ObjectRef | None = None  # the server's loop, while it may still run
        cluster, data = config.cluster, config.data
        # each transport pick_transport may choose; it sets itself up between the actors (transports.base.Link)
        self._links: dict[str, Link] = {link.name: link(cluster.num_workers, data.dim, data.dtype,
                                                        answer_payload_bytes(config), config.compression.down)
                                        for link in (ShmLink, ChannelLink)}
        self.simulated = None  # cluster.simulated_nodes: the ray.cluster_utils.Cluster this run started
        self._simulated_nodes: list[Any] = []  # its nodes in index order (the head first); None once removed
        if cluster.simulated_nodes:
            self.simulated, self._simulated_nodes = start_simulated(cluster)
            self._started = True
        else:
            # The embedded Ray is a simulation: give it enough logical CPUs for every actor even on 2 cores.
            cpus_needed = cluster.num_workers * cluster.cpus_per_worker
            self._started = init_ray(cluster.address, num_cpus=max(os.cpu_count() or 1, math.ceil(cpus_needed)))
        try:
            self._create_actors(config)
        except BaseException:
            self.close()
            raise

    def _create_actors(self, config: Config) -> None:
        cluster = config.cluster
        live = [node for node in self.simulated_node_ids if node is not None]
        degraded = self.simulated is not None and len(live) < cluster.simulated_nodes
        self.device = check_cluster(config, degraded)
        gpus_per_worker = cluster.gpus_per_worker if self.device == "cuda" else 0
        if degraded:
            # rebuilt after a node was removed: the survivors take its workers, over their CPUs (as they would on
            # a cluster that lost a machine), round-robin
            strategies, cpus = spread_over(live, cluster.num_workers), 0
        else:
            self._group, strategies = reserve(cluster, gpus_per_worker, pin_simulated=self.simulated is not None)
            cpus = cluster.cpus_per_worker
        threads = worker_threads(config)
        # each worker's constructor arguments and actor options: the server builds a replacement from them
        self._specs = [({**args, "device": self.device, "num_threads": threads},
                        dict(num_cpus=cpus, num_gpus=gpus_per_worker, scheduling_strategy=strategy))
                       for args, strategy in zip(worker_args(config), strategies)]
        self.workers = [actors.WorkerActor.options(**options).remote(**kwargs) for kwargs, options in self._specs]
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
        self.server = actors.ServerActor.options(num_cpus=0, max_concurrency=2, scheduling_strategy=placement).remote(
            server_args(config), config.cluster.num_workers, config.optim.staleness_lr, self._specs,
            config.train.checkpoint_every, self._faults)

    def _call(self, target: Any, method: str, *args: Any) -> Any:
        return getattr(target, method).remote(*args)

    def _get(self, handles: Sequence[Any]) -> list[Any]:
        return ray.get(list(handles))

    def run(self, policy, eval_at: Collection[int], sink: Sink, restore: dict | None = None) -> None:
        """Train; a lost server is replaced, restored from the latest checkpoint (or restarted from step 0 without
        one) and the steps since are redone (``sink.rewind`` drops their rows first)."""
        restarts = self._restarts = ServerRestarts(policy, restore)
        t_run = time.perf_counter() - (0.0 if restore is None else restore["elapsed_s"])
        clock = None  # a rebuilt server's clock: the time since the loop first started, recovery included
        while True:
            try:
                self._run_once(policy, eval_at, sink, restore, clock)
                for fault in [f for f in self._faults if f.kind == "remove_node"]:  # the driver saw it too late
                    sink.fault({"fault": "remove_node", "node": fault.node, "step": fault.step,
                                "skipped": "the run ended before the driver saw this step"})
                return
            except _ServerLost as lost:
                noticed, t0 = time.time(), time.perf_counter()
                at = self._last_step if self._server_killed is None else self._server_killed[0]
                policy, restore, entry = restarts.restart(sink, at, str(lost))
                self._release_actors()
                self._create_actors(self.config)
                clock = time.perf_counter() - t_run
                entry.update(noticed_unix=noticed, recovery_s=time.perf_counter() - t0)
                if self._server_killed is not None:
                    entry["noticed_s"] = noticed - self._server_killed[1]
                    self._server_killed = None
                sink.fault(entry)

    def _run_once(self, policy, eval_at: Collection[int], sink: Sink, restore: dict | None,
                  clock: float | None) -> None:
        self._acked = 0  # a new server numbers its records from 1
        link = self._links[self.transport]
        link.connect(self.server, self.workers, [info["node_id"] for info in self.info])
        # the server runs the workers' loops, notices a lost worker and replaces it
        if clock is not None:  # rebuilt: its rows' wall times go on from the lost server's, recovery included
            restore = {**restore, "elapsed_s": clock} if restore is not None else None
        run = self._run = self.server.run.remote(policy, frozenset(eval_at), link, self.workers,
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
            self._restarts.checkpointed(payload)
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
        """Stop the loops, then kill the server and the workers, remove what the transport keeps outside Ray (a
        segment) and the placement group (Ray stays up)."""
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
        for link in self._links.values():  # what the server may have died holding (a segment)
            link.release()

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
                for link in self._links.values():  # what our Ray left of each transport
                    link.shutdown()
        self._stop_simulated()  # Ray may have gone down under the run

    def _stop_simulated(self) -> None:
        if self.simulated is not None:
            if ray.is_initialized():
                ray.shutdown()
            simulated.stop(self.simulated)
            self.simulated, self._simulated_nodes = None, []
