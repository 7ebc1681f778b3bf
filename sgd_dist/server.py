"""The parameter server: averages the workers' gradients and applies the in-place update.

A plain class (the Ray backend wraps it in ``ray.remote``). Its whole state is one plain mapping of
tensors and numbers (``state_dict``), so it can be checkpointed and restored without pickling objects.
"""

from __future__ import annotations

import time

import torch

from sgd_dist.config import OptimConfig
from sgd_dist.objectives import weighted_mean
from sgd_dist.optim import learning_rate, sgd_update_
from sgd_dist.worker import GradientResult


class ParameterServer:
    def __init__(
        self, init_weights: torch.Tensor, optim: OptimConfig, total_steps: int, global_batch_size: int
    ) -> None:
        self.optim = optim
        self.total_steps = total_steps
        self.global_batch_size = global_batch_size
        self.weights = init_weights.detach().clone()
        self.optimizer_state: dict[str, torch.Tensor] = {}
        self.step = 0
        self.samples_seen = 0
        self._t0 = time.perf_counter()

    def start(self) -> tuple[torch.Tensor, dict]:
        """Start the clock; return the starting weights and the step-0 row."""
        self._t0 = time.perf_counter()
        row = {"step": self.step, "wall_time_s": 0.0, "samples_seen": self.samples_seen, "loss": None,
               "lr": None, "grad_norm": None, "weight_norm": self.weights.norm().item()}
        return self.weights.clone(), row

    def apply(self, *results: GradientResult) -> tuple[torch.Tensor, dict]:
        """Average the gradients (weighted by rows), update in place, and return (new weights, metrics row)."""
        counts = [r.count for r in results]
        total = sum(counts)
        grad = weighted_mean([r.grad for r in results], counts)
        loss = sum(r.loss * n for r, n in zip(results, counts)) / total
        lr = learning_rate(self.optim, self.step, self.total_steps, self.global_batch_size)
        sgd_update_(
            self.weights, grad, self.optimizer_state, lr=lr, momentum=self.optim.momentum,
            nesterov=self.optim.nesterov, weight_decay=self.optim.weight_decay,
        )
        self.step += 1
        self.samples_seen += total
        row = {
            "step": self.step,
            "wall_time_s": time.perf_counter() - self._t0,
            "samples_seen": self.samples_seen,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad.norm().item(),
            "weight_norm": self.weights.norm().item(),
        }
        return self.weights.clone(), row

    def state_dict(self) -> dict:
        """Everything needed to resume: weights, optimizer buffers, step and samples seen."""
        return {
            "weights": self.weights.clone(),
            "optimizer": {k: v.clone() for k, v in self.optimizer_state.items()},
            "step": self.step,
            "samples_seen": self.samples_seen,
        }

    def load_state_dict(self, state: dict) -> None:
        self.weights = state["weights"].clone()
        self.optimizer_state = {k: v.clone() for k, v in state["optimizer"].items()}
        self.step = int(state["step"])
        self.samples_seen = int(state["samples_seen"])
