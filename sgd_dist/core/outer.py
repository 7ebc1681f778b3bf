"""DiLoCo's outer optimizer for local SGD, as one in-place function. No Ray, no I/O.

In local SGD each worker starts from the global weights, takes its local steps, and answers with its model
delta: the weights it was sent minus its weights after those steps. The averaged delta is a pseudo-gradient,
and the outer optimizer applies it to the global weights: ``sgd`` (w -= lr * delta; at lr 1 that is plain
averaging, bit for bit ``w.sub_(delta)``) or ``nesterov`` (DiLoCo's choice: lr 0.7, momentum 0.9 in the
paper). Both are torch.optim.SGD's rules with dampening 0, and the state is a plain dict of tensors (a
``momentum_buffer``) that a server saves and restores with its other optimizer state.
"""

from __future__ import annotations

import torch

from sgd_dist.config import OUTER_OPTIMIZERS  # sgd, nesterov: the config owns the list


def check_outer(optimizer: str, lr: float, momentum: float) -> None:
    """A ValueError naming the ``train.outer`` field if the settings are not ones the outer step can run."""
    if optimizer not in OUTER_OPTIMIZERS:
        raise ValueError(f"train.outer.optimizer must be one of {', '.join(OUTER_OPTIMIZERS)}, got {optimizer!r}")
    if not lr > 0:
        raise ValueError(f"train.outer.lr must be > 0, got {lr!r}")
    if optimizer == "nesterov" and not 0 < momentum < 1:
        raise ValueError(f"train.outer.momentum must be in (0, 1) for optimizer nesterov, got {momentum!r}")


@torch.no_grad()
def outer_update_(
    w: torch.Tensor,
    delta: torch.Tensor,
    state: dict[str, torch.Tensor],
    *,
    optimizer: str = "sgd",
    lr: float = 1.0,
    momentum: float = 0.0,
) -> None:
    """Apply the averaged model delta to the global weights w in place, as torch.optim.SGD would.

    Args:
        w: the global weights, updated in place.
        delta: the pseudo-gradient (weights sent minus weights after the local steps, averaged over workers).
        state: the outer optimizer's state, updated in place (``nesterov`` keeps ``momentum_buffer``).
        optimizer, lr, momentum: ``train.outer``'s settings; ``sgd`` ignores momentum.

    Raises:
        ValueError: a setting outside what ``check_outer`` allows, naming the field.
    """
    check_outer(optimizer, lr, momentum)
    step = delta
    if optimizer == "nesterov":
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = delta.clone()
        else:
            buf.mul_(momentum).add_(delta)
        step = delta.add(buf, alpha=momentum)
    # torch.optim.SGD's own form, so its iterates match bit for bit; at lr 1 it rounds exactly as w.sub_(step)
    w.add_(step, alpha=-lr)
