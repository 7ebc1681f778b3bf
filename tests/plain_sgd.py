"""An independent reference for whole runs: SGD on least squares in plain PyTorch, float64.

Written from the definitions, not with sgd_dist's objectives, optimiser or server: the mean squared error and
its closed-form gradient 2 X^T (X w - y) / m, the learning-rate schedule (warm-up, cosine, step, linear
scaling), weight decay as w <- w - lr (g + wd w), and three ways of combining the workers:

- synchronous (``plain_sgd``): every update averages all workers' gradients of one step, weighted by rows;
- local SGD (``plain_sgd`` with train.mode=local_sgd): in round t each worker takes H steps of its own (local
  steps tH .. tH + H - 1, each with its own mini-batch and the schedule's rate over T H local steps) from the
  server's weights, and the server moves to the row-weighted mean of the workers' models;
- a recorded schedule (``plain_schedule``): update u averages the listed (worker, step, version) gradients,
  each computed on the weights after update ``version`` and, with the staleness-aware rate, divided by its
  staleness max(1, u - 1 - version).

Only the inputs are shared with the code under test: the data (``sgd_dist.core.data.generate``) and the mini-batch
order (the train.sampling sampler's indices), both tested against their own definitions in test_data.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sgd_dist.config import Config, OptimConfig
from sgd_dist.core.data import generate, make_sampler


def expected_lr(optim: OptimConfig, t: int, total_steps: int, global_batch: int) -> float:
    """The learning rate of update t (0-based): linear scaling, linear warm-up, then the schedule; the cosine
    runs from the base rate at the first update after warm-up to min_lr one update after the last."""
    lr = optim.lr * global_batch / optim.base_batch_size if optim.lr_scaling == "linear" else optim.lr
    if t < optim.warmup_steps:
        return lr * (t + 1) / optim.warmup_steps
    after = t - optim.warmup_steps
    if optim.schedule == "cosine":
        cosine = math.cos(math.pi * after / (total_steps - optim.warmup_steps))
        return optim.min_lr + (lr - optim.min_lr) * (1 + cosine) / 2
    if optim.schedule == "step":
        return lr * optim.gamma ** (after // optim.step_size)
    return lr


@dataclass
class PlainRun:
    losses: list[float]  # the mini-batch loss of updates 1..T, averaged over all the update's rows
    lrs: list[float]  # the learning rate of updates 1..T (local SGD: of each round's first local step)
    weights: list[torch.Tensor]  # w after 0..T updates, float64
    X: torch.Tensor  # the whole dataset, float64
    y: torch.Tensor

    def full_loss(self, w: torch.Tensor) -> float:
        residual = self.X @ w.double() - self.y
        return float(residual @ residual) / len(self.y)

    def least_squares(self) -> torch.Tensor:
        return torch.linalg.lstsq(self.X, self.y.unsqueeze(1)).solution.squeeze(1)


class _Shards:
    """Each worker's rows (the first n % K shards one row longer) and its mini-batch of each local step."""

    def __init__(self, config: Config) -> None:
        k, n = config.cluster.num_workers, config.data.n_samples
        size, extra = divmod(n, k)
        starts = [r * size + min(r, extra) for r in range(k + 1)]
        self.data = [generate(config.data, starts[r], starts[r + 1]) for r in range(k)]
        batch = config.train.batch_size
        sizes = [batch] * k if isinstance(batch, (int, str)) else list(batch)
        self.samplers = [None if size == "full" else
                         make_sampler(config.train.sampling, config.train.seed, r, starts[r + 1] - starts[r], size)
                         for r, size in enumerate(sizes)]
        self.rows = [len(self.data[r][1]) if size == "full" else size for r, size in enumerate(sizes)]

    def batch(self, worker: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        X, y = self.data[worker]
        sampler = self.samplers[worker]
        if sampler is not None:
            idx = sampler.indices(step)
            X, y = X[idx], y[idx]
        return X.double(), y.double()

    def gradient(self, worker: int, step: int, w: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        """(mean gradient, mean loss, rows) of the worker's batch at local step ``step`` on w."""
        X, y = self.batch(worker, step)
        residual = X @ w - y
        return 2 * X.T @ residual / len(y), float(residual @ residual) / len(y), len(y)

    def whole(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([X for X, _ in self.data]).double(), torch.cat([y for _, y in self.data]).double()


def plain_data(config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole dataset, float64."""
    return _Shards(config).whole()


def _init(config: Config) -> torch.Tensor:
    init = config.model.init
    return (torch.zeros(config.data.dim, dtype=torch.float64) if init == "zeros"
            else torch.tensor(init, dtype=torch.float64))


def plain_sgd(config: Config) -> PlainRun:
    """Synchronous SGD, or local SGD with train.local_steps = H steps per round."""
    assert config.data.kind == "linear" and config.optim.momentum == 0
    assert config.train.mode in ("sync", "local_sgd"), config.train.mode
    local = config.train.local_steps if config.train.mode == "local_sgd" else 1
    shards, k, wd = _Shards(config), config.cluster.num_workers, config.optim.weight_decay
    global_batch, steps = sum(shards.rows), config.train.steps
    w = _init(config)
    losses, lrs, weights = [], [], [w]
    for t in range(steps):
        models, loss_sum, rows = [], 0.0, 0
        for r in range(k):
            v = w
            for s in range(t * local, (t + 1) * local):
                grad, loss, m = shards.gradient(r, s, v)
                v = v - expected_lr(config.optim, s, steps * local, global_batch) * (grad + wd * v)
                loss_sum, rows = loss_sum + loss * m, rows + m
            models.append(v)
        # the row-weighted mean of the workers' models (in sync, that is the step along the mean gradient)
        w = sum(shards.rows[r] / global_batch * models[r] for r in range(k))
        losses.append(loss_sum / rows)
        lrs.append(expected_lr(config.optim, t * local, steps * local, global_batch))
        weights.append(w)
    return PlainRun(losses, lrs, weights, *shards.whole())


def plain_schedule(config: Config, schedule: list[list[list[int]]], staleness_lr: bool) -> PlainRun:
    """The updates of a recorded schedule (``schedule[u - 1]``: the [worker, step, version] answers update u
    averaged), each gradient recomputed on the weights of its version."""
    assert config.data.kind == "linear" and config.optim.momentum == 0
    shards, wd, steps = _Shards(config), config.optim.weight_decay, config.train.steps
    global_batch = sum(shards.rows)
    weights = [_init(config)]
    losses, lrs = [], []
    for u, applied in enumerate(schedule, 1):
        parts = [(shards.gradient(r, s, weights[v]), u - 1 - v) for r, s, v in applied]
        rows = sum(m for (_, _, m), _ in parts)
        scale = (lambda age: 1 / max(1, age)) if staleness_lr else (lambda age: 1.0)
        grad = sum(m / rows * scale(age) * g for (g, _, m), age in parts)
        lr = expected_lr(config.optim, u - 1, steps, global_batch)
        w = weights[-1]
        weights.append(w - lr * (grad + wd * w))
        losses.append(sum(loss * m for (_, loss, m), _ in parts) / rows)
        lrs.append(lr)
    return PlainRun(losses, lrs, weights, *shards.whole())
