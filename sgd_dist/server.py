"""The parameter server and its loop: arrivals in, the consistency policy decides, updates out.

``ParameterServer`` holds the weights and the optimizer state and applies the seed's in-place update to the
row-weighted mean of the gradients it is given; its whole state is one plain mapping of tensors and numbers
(``state_dict``), so it can be checkpointed and restored without pickling objects.

``serve`` is where a step happens, on every backend and transport: it runs the policy's actions (send a
worker a command, apply arrived gradients), publishes each new version, evaluates on schedule, and hands
the metrics rows to ``emit`` in batches. Nothing in it waits on the driver.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable, Collection, Sequence

import torch

from sgd_dist.config import OptimConfig
from sgd_dist.consistency import Apply, Dispatch
from sgd_dist.objectives import weighted_mean
from sgd_dist.optim import learning_rate, sgd_update_
from sgd_dist.transports import EVALUATE, GRADIENT, Arrival, Command, ServerEnd

EMIT_EVERY_S = 0.2  # hand rows to the driver this often (and at the end)


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
        self.record_seconds = 0.0  # time spent building metrics rows (to show it stays small)
        self._t0 = time.perf_counter()

    def start(self) -> tuple[torch.Tensor, dict]:
        """Start the clock; return the starting weights and the step-0 row."""
        self._t0 = time.perf_counter()
        row = {"step": self.step, "wall_time_s": 0.0, "samples_seen": self.samples_seen, "loss": None,
               "lr": None, "grad_norm": None, "weight_norm": self.weights.norm().item()}
        return self.weights.clone(), row

    def update(self, results: Sequence) -> dict:
        """Average the gradients (weighted by rows, in the given order), update in place; return the row.

        ``results`` have ``grad``, ``loss`` (mean over their rows) and ``count``.
        """
        counts = [r.count for r in results]
        total = sum(counts)
        grad = weighted_mean([r.grad for r in results], counts)
        lr = learning_rate(self.optim, self.step, self.total_steps, self.global_batch_size)
        sgd_update_(
            self.weights, grad, self.optimizer_state, lr=lr, momentum=self.optim.momentum,
            nesterov=self.optim.nesterov, weight_decay=self.optim.weight_decay,
        )
        self.step += 1
        self.samples_seen += total
        t0 = time.perf_counter()
        row = {
            "step": self.step,
            "wall_time_s": t0 - self._t0,
            "samples_seen": self.samples_seen,
            "loss": sum(r.loss * n for r, n in zip(results, counts)) / total,
            "lr": lr,
            "grad_norm": grad.norm().item(),
            "weight_norm": self.weights.norm().item(),
        }
        self.record_seconds += time.perf_counter() - t0
        return row

    def apply(self, *results) -> tuple[torch.Tensor, dict]:
        """``update``, returning a copy of the new weights with the row."""
        row = self.update(results)
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


def serve(
    server: ParameterServer,
    end: ServerEnd,
    policy,
    num_workers: int,
    eval_at: Collection[int],
    emit: Callable[[list[dict]], None],
) -> None:
    """Run ``policy`` to completion on ``end``: the whole training loop, driven by the server.

    Rows reach ``emit`` every EMIT_EVERY_S and at the end, also when the loop fails (every row computed is
    handed over before the error propagates).
    """
    rows: list[dict] = []
    held: dict[tuple[int, int], Arrival] = {}
    busy: set[int] = set()

    def evaluate(row: dict) -> None:
        assert not busy, f"workers {sorted(busy)} are busy at an evaluation"
        for r in range(num_workers):
            end.send(r, Command(EVALUATE, version=server.step))
        parts = sorted((end.receive() for _ in range(num_workers)), key=lambda a: a.worker)
        assert all(a.kind == EVALUATE for a in parts)
        row["eval_loss"] = sum(a.loss for a in parts) / sum(a.count for a in parts)  # worker order: same rounding

    _, row = server.start()
    end.publish(server.step, server.weights)
    if 0 in eval_at:
        evaluate(row)
    rows.append(row)
    last_emit = time.perf_counter()
    actions = deque(policy.start())
    try:
        while True:
            while actions:
                action = actions.popleft()
                if isinstance(action, Dispatch):
                    busy.add(action.worker)
                    end.send(action.worker, Command(GRADIENT, action.step, server.step))
                    continue
                assert isinstance(action, Apply)
                row = server.update([held.pop(key) for key in action.gradients])
                end.publish(server.step, server.weights)
                if server.step in eval_at:
                    evaluate(row)
                rows.append(row)
                now = time.perf_counter()
                if now - last_emit >= EMIT_EVERY_S:
                    batch, rows, last_emit = rows, [], now
                    emit(batch)
            if policy.done:
                break
            arrival = end.receive()
            assert arrival.kind == GRADIENT, arrival
            busy.discard(arrival.worker)
            held[(arrival.worker, arrival.step)] = arrival
            actions.extend(policy.on_gradient(arrival.worker, arrival.step))
    finally:
        batch, rows = rows, []
        emit(batch)
