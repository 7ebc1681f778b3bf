"""A shard worker: holds rows [start, stop) of the dataset on its device and computes gradients there.

A plain class: the Ray backend wraps it in ``ray.remote`` and the serial backend calls it directly, so
both run the very same code. Each method is a few lines over the pure modules.
"""

from __future__ import annotations

import os
import resource
import socket
import time
from dataclasses import dataclass
from typing import Literal

import torch

from sgd_dist import objectives
from sgd_dist.config import DataConfig
from sgd_dist.data import MiniBatchSampler, generate
from sgd_dist.transports import EVALUATE, GRADIENT, Arrival, Command


@dataclass(frozen=True)
class GradientResult:
    """One worker's mini-batch gradient, its mean loss and how many rows it averaged."""

    grad: torch.Tensor
    loss: float
    count: int
    worker: int
    step: int


class ShardWorker:
    def __init__(
        self,
        data: DataConfig,
        rank: int,
        start: int,
        stop: int,
        batch_size: int | Literal["full"],
        seed: int,
        device: str = "cpu",
        num_threads: int | None = None,
    ) -> None:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self.rank, self.start, self.stop = rank, start, stop
        self.kind = data.kind
        self.device = torch.device(device)
        self.X, self.y = generate(data, start, stop, device=self.device)
        self.sampler = None if batch_size == "full" else MiniBatchSampler(seed, rank, stop - start, batch_size)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of local step ``step``: the whole shard for full batches, else the sampler's draw."""
        if self.sampler is None:
            return self.X, self.y
        idx = self.sampler.indices(step).to(self.device)
        return self.X[idx], self.y[idx]

    def gradient(self, weights: torch.Tensor, step: int) -> GradientResult:
        X, y = self.batch(step)
        loss, grad = objectives.loss_and_grad(self.kind, weights.to(self.device), X, y)
        return GradientResult(grad.cpu(), loss, X.shape[0], self.rank, step)

    def execute(self, command: Command, weights: torch.Tensor) -> Arrival:
        """One pass of the worker's loop, whatever the transport: answer ``command`` on ``weights``."""
        t0 = time.perf_counter()
        if command.kind == GRADIENT:
            result = self.gradient(weights, command.step)
            grad, loss, count = result.grad, result.loss, result.count
        else:
            assert command.kind == EVALUATE, command
            grad, (loss, count) = None, self.evaluate(weights)
        return Arrival(self.rank, command.kind, command.step, command.version, grad, loss, count,
                       time.perf_counter() - t0)

    def evaluate(self, weights: torch.Tensor) -> tuple[float, int]:
        """(sum of the per-row loss over the shard, rows), in float64."""
        return objectives.loss_sum(self.kind, weights, self.X, self.y), self.X.shape[0]

    def linear_stats(self) -> objectives.LinearStats:
        return objectives.linear_stats(self.X, self.y)

    def newton_terms(self, weights: torch.Tensor) -> objectives.NewtonTerms:
        return objectives.logistic_newton_terms(weights, self.X, self.y)

    def info(self) -> dict:
        return {
            "rank": self.rank,
            "rows": [self.start, self.stop],
            "device": str(self.device),
            "data_bytes": self.X.nbytes + self.y.nbytes,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "peak_rss_bytes": peak_rss_bytes(),
        }


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
