"""The answers the loop holds until the policy applies or drops them, and the one place slot views are cloned.

On a transport whose answers are views of the worker's slot (``ServerEnd.views``: shm), a held answer is valid
only until its worker is sent its next command, which overwrites the slot. ``before_send`` clones that worker's
held answers just then, and only then: an answer applied before its worker's next command is never copied.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Iterable

from sgd_dist.engine.messages import Arrival

Key = tuple[int, int]  # (worker, local step)


class HeldAnswers:
    """Answers by (worker, local step), in arrival order."""

    def __init__(self, views: bool) -> None:
        self.views = views
        self._held: dict[Key, Arrival] = {}
        self._in_slot: set[Key] = set()  # held answers whose gradient is still a view of their worker's slot

    def __bool__(self) -> bool:
        return bool(self._held)

    def __repr__(self) -> str:
        return f"HeldAnswers({sorted(self._held)})"

    def hold(self, arrival: Arrival) -> None:
        key = (arrival.worker, arrival.step)
        self._held[key] = arrival
        if self.views:
            self._in_slot.add(key)

    def put_back(self, arrivals: Iterable[Arrival]) -> None:
        """Hold answers restored from a checkpoint (tensors of their own, no views)."""
        for arrival in arrivals:
            self._held[(arrival.worker, arrival.step)] = arrival

    def take(self, keys: Iterable[Key]) -> list[Arrival]:
        """Remove and return the answers of ``keys``, in that order."""
        keys = list(keys)
        self._in_slot.difference_update(keys)
        return [self._held.pop(key) for key in keys]

    def before_send(self, worker: int) -> None:
        """``worker`` is about to be sent a command, whose answer overwrites its slot: clone its held answers."""
        for key in [key for key in self._in_slot if key[0] == worker]:
            self._held[key] = replace(self._held[key], grad=self._held[key].grad.clone())
            self._in_slot.discard(key)

    def values(self) -> list[Arrival]:
        return list(self._held.values())
