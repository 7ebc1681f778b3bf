"""A shard worker: holds rows [start, stop) of the dataset on its device and computes gradients there.

A plain class: the Ray backend wraps it in ``ray.remote`` and the serial backend calls it directly, so
both run the very same code. Each method is a few lines over the pure modules. A step allocates no batch:
its rows are a view or are gathered into buffers the worker keeps, and the gradient is the objective's
written-out formula (bit-equal to autograd's).
"""

from __future__ import annotations

import os
import resource
import socket
import time
from dataclasses import dataclass
from typing import Literal

import torch

from sgd_dist.config import CompressionConfig, DataConfig, NetworkConfig, OptimConfig, StragglersConfig
from sgd_dist.core import noise_scale, objectives
from sgd_dist.core.compression import Compressed, Key, build_compressor, compress_with_feedback
from sgd_dist.core.data import Batches, generate, make_sampler
from sgd_dist.core.optim import learning_rate, sgd_update_
from sgd_dist.engine.delays import EVALUATE_ANSWER_BYTES, extra_delay_s, message_delay_s
from sgd_dist.engine.downlink import HeldWeights
from sgd_dist.engine.messages import EVALUATE, GRADIENT, LOCAL, Arrival, Command


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
        optim: OptimConfig | None = None,
        total_steps: int = 1,
        global_batch_size: int = 1,
        stragglers: StragglersConfig | None = None,
        network: NetworkConfig | None = None,
        delays: dict[int, float] | None = None,
        sampling: str = "shuffle",
        shard: tuple[torch.Tensor, torch.Tensor] | None = None,
        compression: CompressionConfig | None = None,
    ) -> None:
        """``shard``: rows [start, stop) as (X, y) on ``device``, already generated (a slice of the whole dataset,
        the same values); None generates them here. ``compression``: how answers are compressed (None: not)."""
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        # local SGD's own steps follow the run's learning-rate schedule over every local step
        self.optim, self.total_steps, self.global_batch_size = optim, total_steps, global_batch_size
        self.stragglers = stragglers
        self.network = network if network is not None and network.enabled else None
        self.delays = dict(delays or {})  # injected one-off delays: local step -> seconds
        self.rank, self.start, self.stop = rank, start, stop
        self.kind = data.kind
        self.device = torch.device(device)
        self.X, self.y = generate(data, start, stop, device=self.device) if shard is None else shard
        self.sampler = None if batch_size == "full" else make_sampler(sampling, seed, rank, stop - start, batch_size)
        self.batch = Batches(self.X, self.y, self.sampler)  # batch(step): that local step's rows
        self.chunks = objectives.Float64Chunks()  # evaluation's and the moments' float64 copies
        self.seed = seed
        self.compression = compression if compression is not None and compression.enabled else None
        self.compressor = None if self.compression is None else build_compressor(
            self.compression.kind, ratio=self.compression.ratio, error_feedback=self.compression.error_feedback,
            bucket=self.compression.bucket)
        self.residual: torch.Tensor | None = None  # error feedback: what compression has left out so far
        self.held = HeldWeights()  # compression.down: the weights the compressed deltas have built up

    def gradient(self, weights: torch.Tensor, step: int) -> GradientResult:
        X, y = self.batch(step)
        loss, grad = objectives.fast_loss_and_grad(self.kind, weights.to(self.device), X, y)
        return GradientResult(grad.cpu(), loss, X.shape[0], self.rank, step)

    def execute(self, command: Command, weights: torch.Tensor | Compressed) -> Arrival:
        """One pass of the worker's loop, whatever the transport: answer ``command`` on ``weights`` (under
        ``compression.down``, a compressed delta to the weights this worker holds)."""
        t0 = time.perf_counter()
        sent_bytes = weights.nbytes
        if isinstance(weights, Compressed):
            weights = self.held.receive(command, weights)
        if command.kind == GRADIENT:
            result = self.gradient(weights, command.step)
            grad, loss, count = result.grad, result.loss, result.count
        elif command.kind == LOCAL:
            grad, loss, count = self.local_steps(weights, command.step, command.local_steps)
        else:
            assert command.kind == EVALUATE, command
            grad, (loss, count) = None, self.evaluate(weights)
        if grad is not None and self.compressor is not None:
            grad = self.compress(grad, command)
        nbytes = answer_nbytes(grad)
        # stragglers and the network cost wall time only: the numbers stay the same
        delay = 0.0
        if self.stragglers is not None and command.kind != EVALUATE:
            delay += extra_delay_s(self.stragglers, self.rank, command.step, time.perf_counter() - t0)
        if self.network is not None:  # the command's and the answer's time on this worker's link
            delay += message_delay_s(self.network, sent_bytes) + message_delay_s(self.network, nbytes)
        if command.kind != EVALUATE and command.step in self.delays:  # a fault: once
            delay += self.delays.pop(command.step)
        if delay > 0:
            time.sleep(delay)
        return Arrival(self.rank, command.kind, command.step, command.version, grad, loss, count,
                       time.perf_counter() - t0, nbytes)

    def compress(self, x: torch.Tensor, command: Command) -> Compressed:
        """The payload for answer x to ``command``, its draws keyed by (seed, worker, local step); under error
        feedback the residual is added first and the new one kept (``command.reset``: the residual starts over)."""
        key = Key(self.seed, self.rank, command.step)
        if not self.compression.error_feedback:
            return self.compressor.compress(x, key)
        if command.reset:
            self.residual = None
        payload, self.residual = compress_with_feedback(self.compressor, x, self.residual, key)
        return payload

    def local_steps(self, weights: torch.Tensor, step: int, num_steps: int) -> tuple[torch.Tensor, float, int]:
        """Local SGD: ``num_steps`` plain SGD steps on a copy of ``weights`` from local step ``step``; returns the
        model delta (weights - own copy), the mean loss and the rows used."""
        assert self.optim is not None, "local SGD needs the optimiser's config"
        w = weights.to(self.device).detach().clone()
        loss_sum, rows = 0.0, 0
        for t in range(step, step + num_steps):
            X, y = self.batch(t)
            loss, grad = objectives.fast_loss_and_grad(self.kind, w, X, y)
            lr = learning_rate(self.optim, t, self.total_steps, self.global_batch_size)
            sgd_update_(w, grad, {}, lr=lr, weight_decay=self.optim.weight_decay)
            loss_sum, rows = loss_sum + loss * X.shape[0], rows + X.shape[0]
        return (weights.to(self.device) - w).cpu(), loss_sum / rows, rows

    def evaluate(self, weights: torch.Tensor) -> tuple[float, int]:
        """(sum of the per-row loss over the shard, rows), in float64."""
        return objectives.loss_sum(self.kind, weights, self.X, self.y, chunks=self.chunks), self.X.shape[0]

    def linear_stats(self) -> objectives.LinearStats:
        return objectives.linear_stats(self.X, self.y, chunks=self.chunks)

    def newton_terms(self, weights: torch.Tensor) -> objectives.NewtonTerms:
        return objectives.logistic_newton_terms(weights, self.X, self.y, chunks=self.chunks)

    def gradient_moments(self, weights: torch.Tensor) -> noise_scale.GradientMoments:
        """The shard's per-example gradient moments at ``weights`` (for the gradient noise scale)."""
        return noise_scale.gradient_moments(self.kind, weights, self.X, self.y, chunks=self.chunks)

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


def answer_nbytes(grad: torch.Tensor | Compressed | None) -> int:
    """The bytes an answer's payload takes on the wire: a compressed one's, a dense vector's, an evaluation's."""
    if grad is None:
        return EVALUATE_ANSWER_BYTES
    return grad.nbytes if isinstance(grad, Compressed) else grad.numel() * grad.element_size()


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
