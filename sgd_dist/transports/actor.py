"""The Ray transport: works across nodes with Ray's own machinery.

The server sends a command by calling the worker actor's ``execute`` with the command and an ObjectRef of
the newest weights (``ray.put`` once per version, however many workers read it), and receives by waiting on
the calls in flight with ``ray.wait``, so answers are taken in the order they finish.
"""

from __future__ import annotations

from typing import Sequence

import ray
import torch
from ray.exceptions import RayActorError

from sgd_dist.transports import Arrival, Command, ServerEnd, WorkerLost


class RayServerEnd(ServerEnd):
    name = "ray"

    def __init__(self, workers: Sequence) -> None:
        self.workers = list(workers)
        self._weights: ray.ObjectRef | None = None
        self._pending: dict[ray.ObjectRef, int] = {}

    def publish(self, version: int, weights: torch.Tensor) -> None:
        self._weights = ray.put(weights)  # a copy: the server goes on updating its tensor in place

    def send(self, worker: int, command: Command) -> None:
        self._pending[self.workers[worker].execute.remote(command, self._weights)] = worker

    def receive(self) -> Arrival:
        [ref], _ = ray.wait(list(self._pending), num_returns=1)
        worker = self._pending.pop(ref)
        try:
            return ray.get(ref)
        except RayActorError as exc:
            raise WorkerLost(f"worker {worker} died: {str(exc).splitlines()[0]}") from None
