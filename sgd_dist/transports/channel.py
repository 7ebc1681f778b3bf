"""The Ray transport: works across nodes, on Ray's shared-memory channels.

Each worker has two channels: ``go`` (written by the server, read by the worker: a command and the weights it
must use) and ``answer`` (written by the worker, read by the server). Ray keeps a channel's value in its
object store (in shared memory on the reader's node, pushed across nodes when the reader is elsewhere), so a
step costs no actor task: the worker's loop blocks on ``go``, the server polls the answer channels of the
workers it is waiting for. Measured on one 2-core machine this was about 4x faster than the server calling
the worker actors per step.

Under ``compression`` an answer travels as the bytes of its compressed payload (``core.compression.encode``, a
uint8 array), which the server decodes; a dense answer is the float array itself.

Two rules of Ray's channels shape the code: a writer waits until every reader has released the previous
value, and a zero-copy numpy array read from a channel holds that value until it is dropped; so both sides
copy what they read (d numbers) before they go on. Ray 2.60 leaves the channels' POSIX semaphores in
/dev/shm after teardown, named after the raylet: once that raylet is gone (an embedded Ray at the end of its
run, a cluster when it stops) they are removed; a live raylet's are never touched. ``ChannelLink`` sets the
transport up between Ray actors.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Collection, Sequence

import numpy as np
import ray
import torch
from ray.exceptions import RayChannelError, RayChannelTimeoutError
from ray.experimental.channel.shared_memory_channel import Channel

from sgd_dist.core.compression import Compressed, decode, encode
from sgd_dist.engine.messages import STOP, STOP_TIMEOUT_S, Arrival, Command, ServerEnd, WorkerLost
from sgd_dist.transports.base import Every, Waiter, alive


def buffer_bytes(dim: int) -> int:
    """A channel buffer for d float64 numbers and the message around them (Ray grows it if ever short)."""
    return 8 * dim + (64 << 10)


def make_channel(reader, reader_node: str, dim: int) -> Channel:
    """A channel written by the calling actor and read by ``reader`` on ``reader_node``."""
    me = ray.get_runtime_context().current_actor
    return Channel(me, [(reader, reader_node)], buffer_bytes(dim))


class ChannelServerEnd(ServerEnd):
    name = "ray"

    def __init__(self, go: Sequence[Channel], answers: Sequence[Channel]) -> None:
        self.go, self.answers = list(go), list(answers)
        self._weights: np.ndarray | None = None
        self._sent: list[Command | None] = [None] * len(go)
        self._next = 0
        self.loops: list[ray.ObjectRef | None] = [None] * len(go)  # each worker's loop: ends when its actor dies
        self._closed: set[int] = set()  # lost workers whose channels are closed, until a replacement connects
        self._liveness = Every()  # across calls: with others answering, every call may be short

    def watch(self, worker: int, loop: ray.ObjectRef) -> None:
        self.loops[worker] = loop

    def replace(self, worker: int, go: Channel, answer: Channel, loop: ray.ObjectRef) -> None:
        """A replacement worker's channels and loop."""
        self.go[worker], self.answers[worker] = go, answer
        self._closed.discard(worker)
        self.watch(worker, loop)

    def forget(self, worker: int) -> None:
        self._sent[worker] = None
        self._closed.add(worker)
        for channel in (self.go[worker], self.answers[worker]):
            try:
                channel.close()
            except Exception:  # its peer is gone
                pass

    def _check_workers(self) -> None:
        """Raise WorkerLost for a worker with a command in flight whose loop has ended (its actor died)."""
        refs = {self.loops[r]: r for r in range(len(self.go)) if self._sent[r] is not None and self.loops[r]}
        if not refs:
            return
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        for ref in ready:
            r = refs[ref]
            try:
                ray.get(ref)
                cause = "its loop ended"
            except Exception as exc:
                cause = f"{type(exc).__name__}"
            raise WorkerLost(f"worker {r} died ({cause})", r)

    def publish(self, version: int, weights: torch.Tensor) -> None:
        self._weights = weights.numpy().copy()  # the server goes on updating its tensor in place

    def send(self, worker: int, command: Command, weights: torch.Tensor | Compressed | None = None) -> None:
        self._sent[worker] = command
        if isinstance(weights, Compressed):  # compression.down: the delta's bytes
            weights = encode(weights)
        array = self._weights if weights is None else weights.numpy()
        self.go[worker].write((command.kind, command.step, command.version, command.local_steps, command.reset, array))

    def receive(self, timeout: float | None = None) -> Arrival | None:
        k = len(self.answers)
        waiter = Waiter(timeout)
        if self._liveness.due():  # also when answers keep coming without a wait
            self._check_workers()
        while True:
            for i in range(k):
                r = (self._next + i) % k
                if self._sent[r] is None:
                    continue
                try:
                    message = self.answers[r].read(timeout=0)
                except RayChannelTimeoutError:
                    continue
                self._next = r + 1
                return self._take(r, message)
            now = waiter.pause()
            if self._liveness.due(now):
                self._check_workers()
            if waiter.expired(now):
                return None

    def _take(self, r: int, message: tuple) -> Arrival:
        command, self._sent[r] = self._sent[r], None
        grad, loss, count, seconds = message
        nbytes = 8 if grad is None else grad.nbytes  # what travelled: the payload's bytes
        if grad is not None:
            grad = torch.from_numpy(np.array(grad))  # a copy: releases the channel's value
            grad = decode(grad) if grad.dtype == torch.uint8 else grad  # a compressed payload's bytes
        return Arrival(r, command.kind, command.step, command.version, grad, loss, count, seconds, nbytes)

    def in_flight(self) -> list[int]:
        return [r for r, command in enumerate(self._sent) if command is not None]

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        # A value pushed to another node's channel after that channel is closed crashes the receiving node's raylet
        # (a RAY_CHECK in HandlePushMutableObject, ray-project/ray#63229): every answer in flight is read first,
        # and each loop's last value is this None, which it reads before it ends.
        self.settle(timeout_s)
        for r, channel in enumerate(self.go):
            if self._sent[r] is None and r not in self._closed:
                try:
                    channel.write(None, timeout=timeout_s)
                except RayChannelError:  # its worker is gone (a timeout is a RayChannelError too)
                    pass

    def close(self) -> None:
        for channel in [*self.go, *self.answers]:
            try:
                channel.close()
            except Exception:  # already closed, or its peer is gone
                pass


def serve_worker(worker, go: Channel, answer: Channel) -> int:
    """The worker's loop on this transport: wait for go, compute on the sent weights, answer."""
    served = 0
    while True:
        try:
            message = go.read()
        except RayChannelError:  # the server closed the channel
            return served
        if message is None:
            return served
        kind, step, version, local_steps, reset, weights = message
        weights = torch.from_numpy(np.array(weights))  # a copy: the server's next write waits for this value's release
        weights = decode(weights) if weights.dtype == torch.uint8 else weights  # compressed weights (down)
        del message
        if kind == STOP:
            return served
        arrival = worker.execute(Command(kind, step, version, local_steps, reset), weights)
        grad = arrival.grad
        if grad is not None:
            grad = (encode(grad) if isinstance(grad, Compressed) else grad).numpy()
        answer.write((grad, arrival.loss, arrival.count, arrival.seconds))
        served += 1


SEMAPHORES = Path("/dev/shm")


def semaphores() -> set[str]:
    """The POSIX semaphores in /dev/shm now (Ray names its channels' ``sem.hdr<pid>-*``, ``sem.obj<pid>-*``,
    after the raylet that made them)."""
    return {p.name for p in SEMAPHORES.glob("sem.*")}


def _raylet_pid(name: str) -> int | None:
    head = name.split("-", 1)[0].removeprefix("sem.")
    pid = head.removeprefix("hdr").removeprefix("obj")
    return int(pid) if head.startswith(("hdr", "obj")) and pid.isdigit() and "-" in name else None


def sweep_stale_semaphores(names: Collection[str] | None = None, wait_s: float = 0.0) -> list[str]:
    """Remove Ray channel semaphores whose raylet is gone (of ``names``, or all); return their names.

    Only a dead raylet's are touched: a live raylet may open its semaphores again by name. ``wait_s`` gives
    raylets that are shutting down that long to exit.
    """
    candidates = [n for n in (semaphores() if names is None else names) if _raylet_pid(n) is not None]
    deadline = time.monotonic() + wait_s
    while any(alive(_raylet_pid(n)) for n in candidates) and time.monotonic() < deadline:
        time.sleep(0.05)
    stale = [n for n in candidates if not alive(_raylet_pid(n))]
    for name in stale:
        (SEMAPHORES / name).unlink(missing_ok=True)
    return stale


class ChannelLink:
    """This transport between Ray actors anywhere (``transports.base.Link``).

    The driver connects it before each run: the server actor makes each worker's go channel, each worker its
    answer channel, and the server its end over them. The server actor starts the workers' loops and connects a
    replacement. Once the driver has shut its own Ray down, the semaphores its channels left are removed.
    """

    name = "ray"

    def __init__(self, num_workers: int, dim: int, dtype: str, payload_bytes: int = 0, down: bool = False) -> None:
        self.dim = max(dim, -(-payload_bytes // 8))  # what the buffers hold: d float64s, or a larger payload
        self._before: set[str] | None = None  # /dev/shm semaphores before this run made its channels

    def connect(self, server, workers: Sequence, nodes: Sequence[str]) -> None:
        if self._before is None:
            self._before = semaphores()
        go = ray.get(server.call.remote(_make_go, workers, nodes, self.dim))
        server_node = ray.get(server.call.remote(_node_id))
        answers = ray.get([w.call.remote(_make_answer, server, server_node, self.dim) for w in workers])
        ray.get(server.call.remote(_open, go, answers))

    def start(self, end: ChannelServerEnd, workers: Sequence) -> list[ray.ObjectRef]:
        loops = [w.call.remote(_serve, g, a) for w, g, a in zip(workers, end.go, end.answers)]
        for r, loop in enumerate(loops):
            end.watch(r, loop)
        return loops

    def replace(self, end: ChannelServerEnd, rank: int, worker, node: str) -> ray.ObjectRef:
        go = make_channel(worker, node, self.dim)
        context = ray.get_runtime_context()
        answer = ray.get(worker.call.remote(_make_answer, context.current_actor, context.get_node_id(), self.dim))
        loop = worker.call.remote(_serve, go, answer)
        end.replace(rank, go, answer, loop)
        return loop

    def release(self) -> None:
        """Nothing outside Ray: the channels go with their actors."""

    def shutdown(self) -> None:
        if self._before is not None:  # the ones this run's channels made go with its raylet
            sweep_stale_semaphores(semaphores() - self._before, wait_s=3.0)
            self._before = None
        sweep_stale_semaphores()  # and any other dead raylet's (a killed run's)


def _make_go(server, workers: Sequence, nodes: Sequence[str], dim: int) -> list[Channel]:
    """In the server actor: the workers' go channels, written by it."""
    return [make_channel(w, node, dim) for w, node in zip(workers, nodes)]


def _node_id(actor) -> str:
    return ray.get_runtime_context().get_node_id()


def _make_answer(worker, reader, reader_node: str, dim: int) -> Channel:
    """In a worker actor: its answer channel, read by the server."""
    return make_channel(reader, reader_node, dim)


def _open(server, go: Sequence[Channel], answers: Sequence[Channel]) -> None:
    server.end = ChannelServerEnd(go, answers)


def _serve(worker, go: Channel, answer: Channel) -> int:
    return serve_worker(worker, go, answer)
