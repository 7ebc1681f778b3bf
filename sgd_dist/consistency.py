"""Consistency policies: plain state machines that decide what happens next. No Ray.

A policy sees two kinds of event and answers with actions:

- ``start()`` -> the first actions;
- ``on_gradient(worker, step)`` (worker's gradient for its local step ``step`` has arrived) -> actions.

Actions are ``Dispatch(worker, step)`` (the worker computes the gradient of its mini-batch number ``step`` on
the newest weights) and ``Apply(gradients)`` (the server averages these arrived gradients into one update).
The trainer loop executes the actions on a backend and feeds arrivals back; it never decides itself.

A policy whose actions do not depend on the order in which gradients arrive (``order_independent``) can be
run ahead of the actual arrivals: the Ray backend then chains a whole stretch of steps without waiting, and
the serial backend replays the same schedule in one process.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Dispatch:
    worker: int
    step: int


@dataclass(frozen=True)
class Apply:
    gradients: tuple[tuple[int, int], ...]
    """(worker, step) of each gradient averaged into this update, in averaging order."""


Action = Dispatch | Apply


class SyncPolicy:
    """Synchronous SGD: each step waits for all K gradients of that step, averages them, updates once."""

    order_independent = True

    def __init__(self, num_workers: int, num_steps: int) -> None:
        self.num_workers = num_workers
        self.num_steps = num_steps
        self.version = 0  # updates applied so far
        self._arrived: set[int] = set()

    @property
    def done(self) -> bool:
        return self.version == self.num_steps

    def start(self) -> list[Action]:
        return [Dispatch(r, 0) for r in range(self.num_workers)]

    def on_gradient(self, worker: int, step: int) -> list[Action]:
        assert step == self.version, f"gradient of step {step} arrived during step {self.version}"
        assert worker not in self._arrived, f"worker {worker} sent step {step} twice"
        self._arrived.add(worker)
        if len(self._arrived) < self.num_workers:
            return []
        self._arrived.clear()
        self.version += 1
        actions: list[Action] = [Apply(tuple((r, step) for r in range(self.num_workers)))]
        if not self.done:
            actions += [Dispatch(r, step + 1) for r in range(self.num_workers)]
        return actions


def make_policy(mode: str, num_workers: int, num_steps: int) -> SyncPolicy:
    if mode == "sync":
        return SyncPolicy(num_workers, num_steps)
    raise ValueError(f"train.mode={mode!r} is not implemented; allowed: 'sync'")
