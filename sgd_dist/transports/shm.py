"""The shared-memory transport: every actor on one node, no actor task and no pickling on the step path.

One segment in /dev/shm holds, for K workers and d parameters:

- ``ctrl``, int64 [K, 12]: per worker, the command (sequence number, kind, step, version, weight slot, local
  steps, reset, its payload's bytes), the sequence number of its latest answer, its row count and payload bytes,
  and the worker's pid;
- ``vals``, float64 [K, 2]: the answer's loss and compute seconds;
- ``weights``, [K + 2, d]: weight slots; a command names the slot of the version it must use, and a slot is
  rewritten only when no command in flight reads it (K in flight + the newest + the one being written);
- ``grads``, [K, d]: one gradient slot per worker; under ``compression`` ``payload``, uint8 [K, B] instead: each
  worker's compressed answer as the bytes of its wire format (``core.compression.encode``), B its exact size;
- with ``compression.down``, ``down``, uint8 [K, B]: each worker's compressed weights delta (a command naming slot
  -1 reads it).

A command is handed over by writing its fields and then bumping the sequence number; an answer by writing
the gradient, loss and count and then bumping the answer number (x86 keeps stores in order). Each side
polls with ``os.sched_yield()`` while the other computes, backing off to short sleeps when the wait is long,
and checks now and then that the other side's process is alive, so a dead peer is noticed in about a second
instead of a hang.

The segment's name carries the creating process's pid; a new segment sweeps away segments whose creator is
dead, so even a killed run leaves nothing behind for long. ``ShmLink`` sets the transport up between Ray actors.
"""

from __future__ import annotations

import mmap
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import ray
import torch

from sgd_dist.core.compression import Compressed, decode, encode
from sgd_dist.engine.messages import GRADIENT, LOCAL, STOP, STOP_TIMEOUT_S, Arrival, Command, ServerEnd, WorkerLost
from sgd_dist.transports.base import Every, Waiter, alive

SHM_DIR = Path("/dev/shm")
PREFIX = "sgd_dist-"

# ctrl columns
_COLUMNS = 12
(_CMD_SEQ, _CMD_KIND, _CMD_STEP, _CMD_VERSION, _CMD_SLOT, _ANS_SEQ, _ANS_COUNT, _PID, _CMD_LOCAL, _CMD_RESET,
 _ANS_BYTES, _CMD_BYTES) = range(_COLUMNS)
_DOWN_SLOT = -1  # a command's weights are in its worker's down region


@dataclass(frozen=True)
class Layout:
    num_workers: int
    dim: int
    dtype: str  # numpy dtype name: float32 / float64
    payload_bytes: int = 0  # a compressed answer's size (core.compression.payload_nbytes); 0: answers are dense
    down: bool = False  # compressed weights too, of the same size

    @property
    def num_slots(self) -> int:
        return self.num_workers + 2

    def sizes(self) -> list[tuple[str, tuple[int, ...], str]]:
        k, d = self.num_workers, self.dim
        answers = ("payload", (k, self.payload_bytes), "uint8") if self.payload_bytes else ("grads", (k, d), self.dtype)
        down = [("down", (k, self.payload_bytes), "uint8")] if self.down else []
        return [("ctrl", (k, _COLUMNS), "int64"), ("vals", (k, 2), "float64"), ("server", (1,), "int64"),
                ("weights", (self.num_slots, d), self.dtype), answers, *down]

    def nbytes(self) -> int:
        return sum(_aligned(int(np.prod(shape)) * np.dtype(dt).itemsize) for _, shape, dt in self.sizes())


def _aligned(n: int) -> int:
    return -(-n // 64) * 64


def sweep_stale_segments() -> list[str]:
    """Remove segments whose creating process is gone; return their names."""
    removed = []
    for path in SHM_DIR.glob(f"{PREFIX}*"):
        try:
            pid = int(path.name[len(PREFIX):].split("-")[0])
        except ValueError:
            continue
        if not alive(pid):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


class _Segment:
    """The mapped segment and its named numpy views."""

    def __init__(self, name: str, layout: Layout, create: bool) -> None:
        self.name, self.layout = name, layout
        self.path = SHM_DIR / name
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, layout.nbytes())
            self._mm = mmap.mmap(fd, layout.nbytes())
        finally:
            os.close(fd)
        offset = 0
        for field, shape, dt in layout.sizes():
            count = int(np.prod(shape))
            setattr(self, field, np.frombuffer(self._mm, dtype=dt, count=count, offset=offset).reshape(shape))
            offset += _aligned(count * np.dtype(dt).itemsize)

    def close(self, unlink: bool) -> None:
        for field, _, _ in self.layout.sizes():
            self.__dict__.pop(field, None)
        if unlink:
            self.path.unlink(missing_ok=True)
        try:
            self._mm.close()
        except BufferError:  # a caller still holds a view; the mapping goes with the process
            pass


class ShmServerEnd(ServerEnd):
    name = "shm"
    views = True

    def __init__(self, layout: Layout) -> None:
        sweep_stale_segments()
        self.layout = layout
        self.segment = _Segment(f"{PREFIX}{os.getpid()}-{secrets.token_hex(6)}", layout, create=True)
        self.segment.server[0] = os.getpid()
        k = layout.num_workers
        self._weights = [torch.from_numpy(self.segment.weights[s]) for s in range(layout.num_slots)]
        answers = self.segment.payload if layout.payload_bytes else self.segment.grads
        self._grads = [torch.from_numpy(answers[r]) for r in range(k)]
        self._refs = [0] * layout.num_slots  # commands in flight reading each slot
        self._current = -1
        self._sent: list[Command | None] = [None] * k
        self._slot_of = [0] * k
        self._seq = [0] * k
        self._next = 0
        self._liveness = Every()  # across calls: with others answering, every call may be short

    def _free_slot(self) -> int:
        return next(s for s in range(self.layout.num_slots) if s != self._current and self._refs[s] == 0)

    def publish(self, version: int, weights: torch.Tensor) -> None:
        slot = self._free_slot()
        self._weights[slot].copy_(weights)
        self._current = slot

    def send(self, worker: int, command: Command, weights: torch.Tensor | Compressed | None = None) -> None:
        ctrl = self.segment.ctrl[worker]
        slot = self._current
        if isinstance(weights, Compressed):  # its own region: no slot is read
            slot, ctrl[_CMD_BYTES] = _DOWN_SLOT, weights.nbytes
            torch.from_numpy(self.segment.down[worker])[: weights.nbytes].copy_(encode(weights))
        elif weights is not None:  # K in flight at most, the newest, and this one: K + 2 slots are enough
            slot = self._free_slot()
            self._weights[slot].copy_(weights)
        if slot != _DOWN_SLOT:
            self._refs[slot] += 1
        self._slot_of[worker], self._sent[worker] = slot, command
        ctrl[_CMD_KIND], ctrl[_CMD_STEP], ctrl[_CMD_VERSION], ctrl[_CMD_SLOT], ctrl[_CMD_LOCAL], ctrl[_CMD_RESET] = (
            command.kind, command.step, command.version, slot, command.local_steps, command.reset)
        self._seq[worker] += 1
        ctrl[_CMD_SEQ] = self._seq[worker]  # last: the worker starts when it sees this

    def receive(self, timeout: float | None = None) -> Arrival | None:
        ctrl, k = self.segment.ctrl, self.layout.num_workers
        answers = ctrl[:, _ANS_SEQ]
        if self._liveness.due():  # also when answers keep coming without a wait
            self._check_workers()
        waiter = Waiter(timeout)
        while True:
            for i in range(k):
                r = (self._next + i) % k
                if self._sent[r] is not None and answers[r] == self._seq[r]:
                    self._next = r + 1
                    return self._take(r)
            now = waiter.pause()
            if self._liveness.due(now):
                self._check_workers()
            if waiter.expired(now):
                return None

    def _release(self, r: int) -> None:
        if self._slot_of[r] != _DOWN_SLOT:
            self._refs[self._slot_of[r]] -= 1

    def _take(self, r: int) -> Arrival:
        command, self._sent[r] = self._sent[r], None
        self._release(r)
        loss, seconds = self.segment.vals[r]
        nbytes = int(self.segment.ctrl[r, _ANS_BYTES])
        grad = None
        if command.kind in (GRADIENT, LOCAL):  # a view of the slot; a compressed payload is decoded into copies
            grad = decode(self._grads[r][:nbytes]) if self.layout.payload_bytes else self._grads[r]
        return Arrival(r, command.kind, command.step, command.version, grad, float(loss),
                       int(self.segment.ctrl[r, _ANS_COUNT]), float(seconds), nbytes)

    def _check_workers(self) -> None:
        for r in range(self.layout.num_workers):
            pid = int(self.segment.ctrl[r, _PID])
            if self._sent[r] is not None and pid and not alive(pid):
                raise WorkerLost(f"worker {r} (pid {pid}) died", r)

    def forget(self, worker: int) -> None:
        if self._sent[worker] is not None:
            self._release(worker)
            self._sent[worker] = None
        self.segment.ctrl[worker, _PID] = 0  # until its replacement attaches

    def wait_attached(self, timeout_s: float = 60.0) -> None:
        """Until every worker has attached and written its pid."""
        deadline = time.monotonic() + timeout_s
        while not all(self.segment.ctrl[:, _PID]):
            if time.monotonic() > deadline:
                raise WorkerLost("workers did not attach to the shared-memory segment")
            time.sleep(1e-3)

    def in_flight(self) -> list[int]:
        return [r for r, command in enumerate(self._sent) if command is not None]

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        self.settle(timeout_s)
        for r in range(self.layout.num_workers):
            if self._sent[r] is None:
                self.send(r, Command(STOP))

    def close(self) -> None:
        self._weights, self._grads = [], []
        self.segment.close(unlink=True)


class ShmWorkerEnd:
    """A worker's side: wait for a command, hand back its answer."""

    def __init__(self, name: str, layout: Layout, rank: int) -> None:
        self.segment = _Segment(name, layout, create=False)
        self.rank = rank
        self._weights = [torch.from_numpy(self.segment.weights[s]) for s in range(layout.num_slots)]
        answers = self.segment.payload if layout.payload_bytes else self.segment.grads
        self._grad = torch.from_numpy(answers[rank])
        self._down = torch.from_numpy(self.segment.down[rank]) if layout.down else None
        self._seen = int(self.segment.ctrl[rank, _CMD_SEQ])
        self.segment.ctrl[rank, _PID] = os.getpid()

    def wait(self) -> tuple[Command, torch.Tensor | Compressed]:
        ctrl = self.segment.ctrl[self.rank]
        server_pid = int(self.segment.server[0])
        waiter, liveness = Waiter(), Every()
        while ctrl[_CMD_SEQ] == self._seen:
            now = waiter.pause()
            if liveness.due(now) and not alive(server_pid):
                return Command(STOP), self._weights[0]
        self._seen = int(ctrl[_CMD_SEQ])
        command = Command(int(ctrl[_CMD_KIND]), int(ctrl[_CMD_STEP]), int(ctrl[_CMD_VERSION]), int(ctrl[_CMD_LOCAL]),
                          bool(ctrl[_CMD_RESET]))
        slot = int(ctrl[_CMD_SLOT])
        return command, decode(self._down[: int(ctrl[_CMD_BYTES])]) if slot == _DOWN_SLOT else self._weights[slot]

    def answer(self, arrival: Arrival) -> None:
        if isinstance(arrival.grad, Compressed):
            self._grad[: arrival.nbytes].copy_(encode(arrival.grad))
        elif arrival.grad is not None:
            self._grad.copy_(arrival.grad)
        self.segment.vals[self.rank] = (arrival.loss, arrival.seconds)
        ctrl = self.segment.ctrl[self.rank]
        ctrl[_ANS_COUNT], ctrl[_ANS_BYTES] = arrival.count, arrival.nbytes
        ctrl[_ANS_SEQ] = self._seen  # last: the server takes the answer when it sees this

    def close(self) -> None:
        self._weights, self._grad, self._down = [], None, None
        self.segment.close(unlink=False)


def serve_worker(worker, end: ShmWorkerEnd) -> int:
    """The worker's loop on this transport: wait for go, compute on the named weights, answer. Returns the
    number of commands served."""
    served = 0
    while True:
        command, weights = end.wait()
        if command.kind == STOP:
            return served
        end.answer(worker.execute(command, weights))
        served += 1


class ShmLink:
    """This transport between Ray actors on one node (``transports.base.Link``).

    The driver connects it before each run: the server actor creates the segment and every worker attaches. The
    server actor starts the workers' loops and attaches a replacement; the driver removes the segment should its
    server die holding it (a killed server cannot).
    """

    name = "shm"

    def __init__(self, num_workers: int, dim: int, dtype: str, payload_bytes: int = 0, down: bool = False) -> None:
        self.layout = Layout(num_workers, dim, dtype, payload_bytes, down)
        self.segment: str | None = None

    def connect(self, server: Any, workers: Sequence[Any], nodes: Sequence[str]) -> None:
        self.segment = ray.get(server.call.remote(_create, self.layout))
        ray.get([w.call.remote(_attach, self.segment, self.layout) for w in workers])

    def start(self, end: ShmServerEnd, workers: Sequence[Any]) -> list[ray.ObjectRef]:
        loops = [w.call.remote(_serve) for w in workers]
        end.wait_attached()
        return loops

    def replace(self, end: ShmServerEnd, rank: int, worker: Any, node: str) -> ray.ObjectRef:
        ray.get(worker.call.remote(_attach, self.segment, self.layout))
        return worker.call.remote(_serve)

    def release(self) -> None:
        if self.segment is not None:  # the server may have died holding it (same node only: shm)
            (SHM_DIR / self.segment).unlink(missing_ok=True)
            self.segment = None

    def shutdown(self) -> None:
        """Nothing of this transport outlives Ray but the segment, which ``release`` removes."""


def _create(server: Any, layout: Layout) -> str:
    """In the server actor: its end, with a new segment; returns the segment's name for the workers."""
    server.end = ShmServerEnd(layout)
    return server.end.segment.name


def _attach(worker: Any, name: str, layout: Layout) -> None:
    worker.end = ShmWorkerEnd(name, layout, worker.rank)


def _serve(worker: Any) -> int:
    try:
        return serve_worker(worker, worker.end)
    finally:
        worker.end.close()
        worker.end = None
