"""How commands and gradients travel between the parameter server and the workers.

The server's loop (``loop.Loop``) and the worker's loop (``worker.ShardWorker.execute``) are written once
against two small interfaces: the server's end (``ServerEnd``: publish weights, send a command, receive the
next arrival; ``now`` is the loop's clock) and the worker's end (a transport-specific loop around ``execute``).
Three transports implement them:

- ``local``: everything in one process, the serial reference;
- ``shm``: one node; weights, gradients and the control words live in one shared-memory segment, and each
  process polls a sequence counter: no actor task, no pickling, no copy on the step path;
- ``ray``: across nodes; a pair of Ray shared-memory channels per worker (go, answer), read and written by the
  worker's loop and the server's: no actor task per step either.

Every transport delivers the same values, so the same config gives bit-equal runs on each.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from sgd_dist.core.compression import Compressed

# Command kinds.
STOP, GRADIENT, EVALUATE, LOCAL = 0, 1, 2, 3

STOP_TIMEOUT_S = 5.0  # how long stopping waits for the answers to the commands in flight


@dataclass(frozen=True)
class Command:
    """What the server asks of a worker, on weights version ``version``: the gradient of its local step
    ``step`` (GRADIENT), ``local_steps`` SGD steps on its own copy from local step ``step`` answered with the
    model delta (LOCAL), or the full-shard loss (EVALUATE)."""

    kind: int
    step: int = 0
    version: int = 0
    local_steps: int = 1
    reset: bool = False  # the worker's own state from before is gone (replaced, restored): error feedback restarts


@dataclass(frozen=True)
class Arrival:
    """A worker's answer to a command.

    GRADIENT: ``grad`` is the mean gradient over ``count`` rows and ``loss`` their mean loss. LOCAL: ``grad`` is
    the model delta (weights sent minus weights after the local steps), ``loss`` the mean loss. Under
    ``compression`` either is a ``Compressed`` payload (as it travelled; the loop decompresses it on arrival).
    EVALUATE: ``loss`` is the float64 sum of the per-row loss over the worker's ``count`` rows and ``grad`` is None.
    ``nbytes`` is what the answer's payload took on the wire: the (compressed) vector, or 8 for an evaluation;
    ``sent_nbytes`` what its command carried (the loop fills it in: the weights, or their compressed delta).
    ``seconds`` is the worker's time on the command: its compute time plus any straggler or network delay
    (``cluster.network``: the command's and the answer's time on its link). On the shm transport ``grad`` is a
    view of the worker's slot, valid until that worker is sent its next command (the server clones what it
    keeps longer).
    """

    worker: int
    kind: int
    step: int
    version: int
    grad: torch.Tensor | Compressed | None
    loss: float
    count: int
    seconds: float
    nbytes: int = 0
    sent_nbytes: int = 0


class WorkerLost(RuntimeError):
    """A worker stopped answering: its process died or its actor was killed. ``worker``: its index."""

    def __init__(self, message: str, worker: int | None = None) -> None:
        super().__init__(message)
        self.worker = worker


class ServerEnd(ABC):
    """The server's side of a transport."""

    name: str
    views = False  # whether an arrival's gradient is a view of the worker's slot, valid until its next command

    @abstractmethod
    def publish(self, version: int, weights: torch.Tensor) -> None:
        """Make ``weights`` the newest version; commands sent from now on use it."""

    @abstractmethod
    def send(self, worker: int, command: Command, weights: torch.Tensor | None = None) -> None:
        """Hand ``command`` to ``worker`` (which is idle: it has answered its previous command), on the newest
        published weights, or on ``weights`` when given (an evaluation of an earlier version)."""

    @abstractmethod
    def receive(self, timeout: float | None = None) -> Arrival | None:
        """Block until some worker answers, or ``timeout`` seconds (then None); arrivals of one worker come in the
        order it was sent commands."""

    def now(self) -> float:
        """The loop's clock, in seconds: every time the loop records (rows, recoveries, checkpoints) is read here,
        so a transport that models time (``virtual``) gives its own."""
        return time.perf_counter()

    def forget(self, worker: int) -> None:
        """``worker`` was lost: drop its command in flight (a replacement will be connected and sent it again)."""
        raise WorkerLost(f"worker {worker} was lost and the {self.name} transport cannot replace it", worker)

    def in_flight(self) -> list[int]:
        """The workers that were sent a command and have not answered it yet."""
        return []

    def settle(self, timeout_s: float) -> None:
        """Receive and drop the answers to the commands in flight, for at most ``timeout_s``; a worker found
        lost meanwhile is forgotten."""
        deadline = time.monotonic() + timeout_s
        while self.in_flight() and (left := deadline - time.monotonic()) > 0:
            try:
                self.receive(min(left, 0.05))
            except WorkerLost as lost:
                if lost.worker is None:
                    return
                self.forget(lost.worker)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:  # noqa: B027  (optional: in-process ends have no loop)
        """Tell every worker's loop to end, once its command in flight is answered (``settle``, at most
        ``timeout_s``): nothing is then still being written when the transport closes or the workers go."""

    def close(self) -> None:  # noqa: B027  (optional: an end that holds nothing need not close)
        """Release what the transport holds (idempotent)."""
