"""The local transport: the server and the workers are plain objects in one process (the serial reference).

A command is executed the moment it is sent, on the newest published weights, and its answer queued; the
server receives answers in the order the commands were sent.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

import torch

from sgd_dist.engine.messages import Arrival, Command, ServerEnd


class LocalServerEnd(ServerEnd):
    name = "local"

    def __init__(self, workers: Sequence) -> None:
        self.workers = workers
        self.weights: torch.Tensor | None = None
        self.version = 0
        self._answers: deque[Arrival] = deque()

    def publish(self, version: int, weights: torch.Tensor) -> None:
        # a copy: the server updates its weights in place, and a command uses the version it was sent with
        self.version, self.weights = version, weights.clone()

    def send(self, worker: int, command: Command, weights: torch.Tensor | None = None) -> None:
        assert weights is not None or command.version == self.version, (command, self.version)
        self._answers.append(self.workers[worker].execute(command, self.weights if weights is None else weights))

    def receive(self, timeout: float | None = None) -> Arrival | None:
        if not self._answers and timeout is not None:  # every command in flight was lost (a test's fault)
            return None
        return self._answers.popleft()


def connect(workers: Sequence) -> LocalServerEnd:
    """This transport set up: the server calls the workers, its own objects, directly."""
    return LocalServerEnd(workers)
