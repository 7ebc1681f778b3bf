"""The parameter server: the weights, the optimizer state, and the update.

``ParameterServer`` applies the seed's in-place update to the row-weighted mean of the gradients it is given
and returns the update's metrics row; its whole state is one plain mapping of tensors and numbers
(``state_dict``), so it can be checkpointed and restored without pickling objects. The loop that feeds it
answers is ``engine.loop.Loop``.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from sgd_dist.config import CompressionConfig, OptimConfig, OuterConfig
from sgd_dist.core.objectives import weighted_mean
from sgd_dist.core.optim import learning_rate, sgd_update_
from sgd_dist.core.outer import outer_update_


class ParameterServer:
    def __init__(
        self, init_weights: torch.Tensor, optim: OptimConfig, total_steps: int, global_batch_size: int,
        outer: OuterConfig | None = None, compression: CompressionConfig | None = None, seed: int = 0,
    ) -> None:
        """``outer``: how averaged model deltas are applied (local SGD; None: plain averaging). ``compression``: what
        the answers (and with ``down`` the weights sent) are compressed to, read by the loop; ``seed`` keys the
        weights' compression."""
        self.optim, self.seed = optim, seed
        self.outer = outer if outer is not None else OuterConfig()
        self.compression = compression if compression is not None else CompressionConfig()
        self.outer_state: dict[str, torch.Tensor] = {}  # the outer optimizer's (nesterov: a momentum buffer)
        self.total_steps = total_steps
        self.global_batch_size = global_batch_size
        self.weights = init_weights.detach().clone()
        self.optimizer_state: dict[str, torch.Tensor] = {}
        self.step = 0
        self.samples_seen = 0
        # this process's time spent building metrics rows (to show it stays small): real seconds on any clock
        self.record_seconds = 0.0
        self.clock: Callable[[], float] = time.perf_counter
        self._t0 = self.clock()

    def start(self, elapsed: float = 0.0, clock: Callable[[], float] = time.perf_counter) -> tuple[torch.Tensor, dict]:
        """Start the rows' clock (``clock``: the loop's, its transport's ``now``) ``elapsed`` seconds in (a restored
        run goes on from its checkpoint's time); return the weights and the current step's row."""
        self.clock = clock
        self._t0 = clock() - elapsed
        row = {"step": self.step, "wall_time_s": elapsed, "samples_seen": self.samples_seen, "loss": None,
               "lr": None, "grad_norm": None, "weight_norm": self.weights.norm().item()}
        return self.weights.clone(), row

    def update(self, results: Sequence, *, deltas: bool = False, scales: Sequence[float] | None = None) -> dict:
        """Average the answers (weighted by rows, in the given order), update in place; return the row.

        ``results`` have ``grad``, ``loss`` (mean over their rows) and ``count``. Gradients go through the
        optimiser's rule at this update's learning rate; model deltas (local SGD: each worker's own steps
        already applied its learning rate) are a pseudo-gradient for the outer optimizer (``train.outer``; at its
        default, sgd at lr 1, they are subtracted as they are). ``scales`` multiply each gradient (the
        staleness-aware learning rate).
        """
        counts = [r.count for r in results]
        total = sum(counts)
        grads = [r.grad for r in results] if scales is None else [r.grad * c for r, c in zip(results, scales)]
        grad = weighted_mean(grads, counts)
        lr = learning_rate(self.optim, self.step, self.total_steps, self.global_batch_size)
        if deltas:
            outer = self.outer
            outer_update_(self.weights, grad, self.outer_state, optimizer=outer.optimizer, lr=outer.lr,
                          momentum=outer.momentum)
        else:
            sgd_update_(
                self.weights, grad, self.optimizer_state, lr=lr, momentum=self.optim.momentum,
                nesterov=self.optim.nesterov, weight_decay=self.optim.weight_decay,
            )
        self.step += 1
        self.samples_seen += total
        t0 = time.perf_counter()
        row = {
            "step": self.step,
            "wall_time_s": self.elapsed(),
            "samples_seen": self.samples_seen,
            "loss": sum(r.loss * n for r, n in zip(results, counts)) / total,
            "lr": lr,
            "grad_norm": grad.norm().item(),
            "weight_norm": self.weights.norm().item(),
        }
        self.record_seconds += time.perf_counter() - t0
        return row

    def elapsed(self) -> float:
        """Seconds on the rows' clock since the start (with the ``elapsed`` it started at)."""
        return self.clock() - self._t0

    def state_dict(self) -> dict:
        """Everything needed to resume: weights, optimizer buffers (the outer optimizer's too), step, samples seen."""
        state = {
            "weights": self.weights.clone(),
            "optimizer": {k: v.clone() for k, v in self.optimizer_state.items()},
            "step": self.step,
            "samples_seen": self.samples_seen,
        }
        if self.outer_state:  # the outer optimizer's buffers (nesterov, after a round)
            state["outer"] = {k: v.clone() for k, v in self.outer_state.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.weights = state["weights"].clone()
        self.optimizer_state = {k: v.clone() for k, v in state["optimizer"].items()}
        self.outer_state = {k: v.clone() for k, v in state.get("outer", {}).items()}  # none without its buffers
        self.step = int(state["step"])
        self.samples_seen = int(state["samples_seen"])
