"""The in-place SGD update and the learning-rate schedules, as pure functions. No Ray.

``sgd_update_`` is torch.optim.SGD's rule (weight decay, momentum with dampening 0, Nesterov) written
with the seed's in-place ``w.sub_(lr * g)`` under ``torch.no_grad()``; its optimizer state is a plain dict
of tensors so a server can save and restore it.
"""

from __future__ import annotations

import math

import torch

from sgd_dist.config import OptimConfig


def base_lr(cfg: OptimConfig, global_batch_size: int) -> float:
    """optim.lr, times global batch / base batch under the linear scaling rule."""
    if cfg.lr_scaling == "linear":
        return cfg.lr * global_batch_size / cfg.base_batch_size
    return cfg.lr


def learning_rate(cfg: OptimConfig, step: int, total_steps: int, global_batch_size: int) -> float:
    """Learning rate of update ``step`` (0-based) out of ``total_steps``.

    Linear warm-up over the first warmup_steps updates, then the schedule over the rest:
    constant; step (times gamma every step_size updates); cosine from the base rate down towards min_lr,
    which it would reach one update after the last (torch's CosineAnnealingLR, T_max = updates after warm-up).
    """
    lr = base_lr(cfg, global_batch_size)
    if step < cfg.warmup_steps:
        return lr * (step + 1) / cfg.warmup_steps
    t = step - cfg.warmup_steps
    if cfg.schedule == "step":
        return lr * cfg.gamma ** (t // cfg.step_size)
    if cfg.schedule == "cosine":
        span = total_steps - cfg.warmup_steps
        return cfg.min_lr + (lr - cfg.min_lr) * (1 + math.cos(math.pi * t / span)) / 2
    return lr


@torch.no_grad()
def sgd_update_(
    w: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, torch.Tensor],
    *,
    lr: float,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> None:
    """One SGD step on w in place; ``state`` holds the momentum buffer between calls."""
    d = grad
    if weight_decay:
        d = d.add(w, alpha=weight_decay)
    if momentum:
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = d.clone()
        else:
            buf.mul_(momentum).add_(d)
        d = d.add(buf, alpha=momentum) if nesterov else buf
    w.sub_(lr * d)
