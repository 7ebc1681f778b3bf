"""The worker and server actors of the Ray backend.

The server actor runs the loop on its transport and the workers' loops; it injects the configured kills,
replaces a lost worker (its shard regenerated from the seed) and keeps every record in an outbox until the
driver confirms it delivered it. A transport sets itself up in the actors through ``call`` (``transports.base.Link``).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import deque
from typing import Any, Callable, Collection, Sequence

import ray
import torch

from sgd_dist.backends.ray import simulated
from sgd_dist.engine.loop import Loop
from sgd_dist.engine.messages import STOP_TIMEOUT_S, ServerEnd, WorkerLost
from sgd_dist.engine.recovery import LoopHooks
from sgd_dist.engine.server import ParameterServer
from sgd_dist.engine.worker import ShardWorker
from sgd_dist.transports.base import Link

REPLACE_TIMEOUT_S = 30.0  # a replacement worker must be up (its shard generated) within this


class Worker(ShardWorker):
    """A shard worker as a Ray actor: the plain worker, plus its node and the steps its transport runs in it."""

    end: Any = None  # this worker's end of its transport, from attaching until its loop ends (transports.base.Link)

    def info(self) -> dict:
        return {**super().info(), "node_id": ray.get_runtime_context().get_node_id()}

    def call(self, fn: Callable, *args: Any) -> Any:
        """Run ``fn(self, *args)`` in this actor: a transport's set-up step or its worker loop."""
        return fn(self, *args)


class Server:
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
        self.end: ServerEnd | None = None  # set up by the transport's link (transports.base.Link)
        self.link: Link | None = None
        self.outbox: deque[tuple[int, str, Any]] = deque()  # (sequence number, kind, payload), oldest first
        self._posted = 0  # the sequence number of the newest record
        self._acked = 0  # the newest one the driver has delivered
        self._lock = threading.Lock()  # the loop posts while the driver's drain reads
        self.workers: list[Any] = []
        self.pids: list[int] = []
        self.loops: list[ray.ObjectRef] = []  # each worker's loop on the transport
        self.killed_at: dict[int, float] = {}  # worker -> when an injected kill hit it
        self._stopping = threading.Event()  # the driver gave the run up: end the loops

    def node_id(self) -> str:
        """The node this server runs on."""
        return ray.get_runtime_context().get_node_id()

    def call(self, fn: Callable, *args: Any) -> Any:
        """Run ``fn(self, *args)`` in this actor: a transport's set-up step."""
        return fn(self, *args)

    def run(self, policy, eval_at: Collection[int], link: Link, workers: Sequence[Any], pids: Sequence[int],
            restore: dict | None = None, elapsed_s: float = 0.0) -> dict:
        """Run the loop on the transport ``link`` connected (the driver drains the records meanwhile)."""
        assert self.end is not None
        self.link, self.workers, self.pids = link, list(workers), list(pids)
        self.loops = link.start(self.end, self.workers)
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
            worker = WorkerActor.options(**opts).remote(**kwargs)
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
        self.loops[r] = self.link.replace(self.end, r, worker, info["node_id"])

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


WorkerActor = ray.remote(Worker)
ServerActor = ray.remote(Server)
