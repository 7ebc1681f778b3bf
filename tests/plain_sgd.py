"""An independent reference for whole runs: synchronous SGD on least squares in plain PyTorch, float64.

Written from the definitions, not with sgd_dist's objectives, optimiser or server: the mean squared error and
its closed-form gradient 2 X^T (X w - y) / m, the workers' gradients averaged weighted by their rows, the
learning-rate schedule (warm-up, cosine, step, linear scaling), and w <- w - lr g. Only the inputs are shared
with the code under test: the data (``sgd_dist.data.generate``) and the mini-batch order (the sampler), both
tested against their own definitions in test_data.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sgd_dist.config import Config, OptimConfig
from sgd_dist.data import MiniBatchSampler, generate


def expected_lr(optim: OptimConfig, t: int, total_steps: int, global_batch: int) -> float:
    """The learning rate of update t (0-based): linear scaling, linear warm-up, then the schedule; the cosine
    runs from the base rate at the first update after warm-up to min_lr one update after the last."""
    lr = optim.lr * global_batch / optim.base_batch_size if optim.lr_scaling == "linear" else optim.lr
    if t < optim.warmup_steps:
        return lr * (t + 1) / optim.warmup_steps
    after = t - optim.warmup_steps
    if optim.schedule == "cosine":
        return optim.min_lr + (lr - optim.min_lr) * (1 + math.cos(math.pi * after / (total_steps - optim.warmup_steps))) / 2
    if optim.schedule == "step":
        return lr * optim.gamma ** (after // optim.step_size)
    return lr


@dataclass
class PlainRun:
    losses: list[float]  # the mini-batch loss of updates 1..T, averaged over all the step's rows
    lrs: list[float]  # the learning rate of updates 1..T
    weights: list[torch.Tensor]  # w after 0..T updates, float64
    X: torch.Tensor  # the whole dataset, float64
    y: torch.Tensor

    def full_loss(self, w: torch.Tensor) -> float:
        residual = self.X @ w.double() - self.y
        return float(residual @ residual) / len(self.y)

    def least_squares(self) -> torch.Tensor:
        return torch.linalg.lstsq(self.X, self.y.unsqueeze(1)).solution.squeeze(1)


def plain_sgd(config: Config) -> PlainRun:
    assert config.data.kind == "linear" and config.optim.momentum == 0 and config.optim.weight_decay == 0
    num_workers, n = config.cluster.num_workers, config.data.n_samples
    size, extra = divmod(n, num_workers)  # the first n % K shards one row longer
    starts = [r * size + min(r, extra) for r in range(num_workers + 1)]
    shards = [generate(config.data, starts[r], starts[r + 1]) for r in range(num_workers)]
    full = config.train.batch_size == "full"
    samplers = [None if full else MiniBatchSampler(config.train.seed, r, starts[r + 1] - starts[r],
                                                   config.train.batch_size) for r in range(num_workers)]
    global_batch = n if full else config.train.batch_size * num_workers
    init = config.model.init
    w = torch.zeros(config.data.dim, dtype=torch.float64) if init == "zeros" else torch.tensor(init, dtype=torch.float64)
    losses, lrs, weights = [], [], [w]
    for t in range(config.train.steps):
        grad_sum, loss_sum, rows = torch.zeros_like(w), 0.0, 0
        for (X, y), sampler in zip(shards, samplers):
            if sampler is not None:
                idx = sampler.indices(t)
                X, y = X[idx], y[idx]
            X, y = X.double(), y.double()
            residual = X @ w - y
            grad_sum += 2 * X.T @ residual  # m_r times worker r's mean gradient
            loss_sum += float(residual @ residual)
            rows += len(y)
        lr = expected_lr(config.optim, t, config.train.steps, global_batch)
        w = w - lr * grad_sum / rows
        losses.append(loss_sum / rows)
        lrs.append(lr)
        weights.append(w)
    X = torch.cat([s[0] for s in shards]).double()
    y = torch.cat([s[1] for s in shards]).double()
    return PlainRun(losses, lrs, weights, X, y)
