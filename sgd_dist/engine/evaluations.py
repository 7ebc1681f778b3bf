"""Evaluation scheduling: which weights versions are evaluated, which worker still owes each one, and the losses.

An evaluation of version v runs on a snapshot of v's weights, on every worker (its own shard), each as soon as it
is idle; v's eval loss is the sum of the workers' loss sums over the sum of their rows, added in worker order so
that it rounds the same on every transport.
"""

from __future__ import annotations

from collections import deque

import torch

from sgd_dist.core.objectives import penalty
from sgd_dist.engine.messages import Arrival


def eval_steps(num_steps: int, every: int) -> frozenset[int]:
    """Step 0 (the start, as in the seed), every ``every`` steps, and the last step."""
    steps = {0, num_steps}
    if every:
        steps.update(range(every, num_steps, every))
    return frozenset(steps)


class Evaluations:
    """The evaluations under way: each version's weights snapshot, the workers that owe it, the parts that came."""

    def __init__(self, num_workers: int, weight_decay: float) -> None:
        self.num_workers, self.weight_decay = num_workers, weight_decay
        self.owed: dict[int, deque[int]] = {r: deque() for r in range(num_workers)}  # versions, oldest first
        self.snapshots: dict[int, torch.Tensor] = {}  # weights of the versions still to be evaluated
        self.parts: dict[int, list[Arrival]] = {}  # the answers in so far, per version

    def start(self, version: int, weights: torch.Tensor) -> None:
        """Every worker owes an evaluation of ``version``, on a snapshot of ``weights`` taken now."""
        self.snapshots[version], self.parts[version] = weights.clone(), []
        for owed in self.owed.values():
            owed.append(version)

    def owes(self, worker: int) -> bool:
        return bool(self.owed[worker])

    def next_owed(self, worker: int) -> int | None:
        """The oldest version ``worker`` still owes an evaluation of (now handed to it), or None."""
        return self.owed[worker].popleft() if self.owed[worker] else None

    def snapshot(self, version: int) -> torch.Tensor:
        return self.snapshots[version]

    @property
    def pending(self) -> bool:
        """Whether some evaluation is not finished yet (a checkpoint then waits)."""
        return bool(self.parts)

    def oldest(self) -> int | None:
        """The oldest unfinished version: its row and every later one wait for it."""
        return min(self.parts, default=None)

    def record(self, arrival: Arrival) -> tuple[int, dict] | None:
        """Take one worker's evaluation answer; once every worker's is in, return (version, the row's eval fields)
        and forget the version."""
        parts = self.parts[arrival.version]
        parts.append(arrival)
        if len(parts) < self.num_workers:
            return None
        parts.sort(key=lambda a: a.worker)  # worker order: the same rounding on every transport
        version = arrival.version
        fields = {"eval_loss": sum(a.loss for a in parts) / sum(a.count for a in parts),
                  "eval_penalty": penalty(self.snapshots[version], self.weight_decay)}
        del self.parts[version], self.snapshots[version]
        return version, fields
