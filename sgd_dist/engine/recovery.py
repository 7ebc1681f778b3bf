"""Replacing a lost worker while the loop goes on: the notice, the polls until the replacement is up, the resend.

A batch is a pure function of (seed, worker, step), so a replacement regenerates its shard from the seed and its
predecessor's lost command gives the very answer it would have given. The loop serves the other workers while
the replacement starts; a worker lost more than MAX_REPLACEMENTS times fails the run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable, Mapping

from sgd_dist.engine.messages import EVALUATE, Command, ServerEnd, WorkerLost

MAX_REPLACEMENTS = 3  # per worker: a worker that keeps dying (on its own data, say) fails the run instead
RECOVERY_POLL_S = 0.005  # while a replacement starts: how often the loop asks whether it is up


@dataclass
class LoopHooks:
    """What the loop calls beyond its transport, for fault tolerance; every field is optional.

    ``recover(worker)`` starts replacing a lost worker (its shard is regenerated from the seed: a batch is a pure
    function of seed, worker and step) and returns at once a ``ready()`` to poll: True once the transport reaches
    the new worker. The loop goes on with the other workers meanwhile, polls, and then re-sends the lost command.
    ``on_checkpoint(state)`` receives a checkpoint every ``checkpoint_every`` updates, after every row up to it
    went to ``emit``. ``on_update(version)`` runs after each update is published (fault injection).
    ``on_fault(entry)`` receives a record of each fault the loop survives, when it happens: a lost worker's
    ``worker_lost`` at the notice, its ``worker_replaced`` once the lost command went out again.
    ``stop()`` says whether the run has been given up (the driver failed or was interrupted): the loop then ends
    at its next turn by raising LoopStopped, at most STOP_POLL_S later, with its rows handed to ``emit``.
    """

    recover: Callable[[int], Callable[[], bool]] | None = None
    checkpoint_every: int = 0
    on_checkpoint: Callable[[dict], None] | None = None
    on_update: Callable[[int], None] | None = None
    on_fault: Callable[[dict], None] | None = None
    stop: Callable[[], bool] | None = None


@dataclass
class _Recovery:
    """A lost worker whose replacement is starting: poll ``ready``, then re-send ``command``."""

    ready: Callable[[], bool]
    command: Command
    t0: float  # the loop's clock at the notice
    lost_step: int  # the server's step then
    answers: int  # the loop's arrivals then


class Recoveries:
    """The lost workers whose replacements are starting, and how often each worker was replaced.

    A worker being replaced stays busy in the loop (it owes its lost command), so nothing else is sent to it until
    ``resume`` re-sends that command.
    """

    def __init__(self, hooks: LoopHooks, end: ServerEnd, num_workers: int,
                 replacements: Mapping[int, int] | None = None, error_feedback: bool = False) -> None:
        """``error_feedback``: the workers keep residuals, which a replacement starts without (its record says so)."""
        self.hooks, self.end, self.error_feedback = hooks, end, error_feedback
        self.replacements = {r: 0 for r in range(num_workers)} if replacements is None else dict(replacements)
        self.starting: dict[int, _Recovery] = {}

    def __bool__(self) -> bool:
        return bool(self.starting)

    def notice(self, lost: WorkerLost, busy: Mapping[int, Command], step: int, answers: int) -> None:
        """Start replacing the lost worker (its command in flight: ``busy``), or re-raise: no ``recover`` hook, no
        worker named, or the limit reached."""
        r = lost.worker
        noticed = time.time()  # unix time: the Ray backend sets it against the kill's own unix time
        if self.hooks.recover is None or r is None or r not in busy:
            raise lost
        if self.replacements[r] >= MAX_REPLACEMENTS:
            raise WorkerLost(f"{lost}: lost {self.replacements[r] + 1} times, replaced {MAX_REPLACEMENTS} times "
                             "(the limit): giving up", r) from None
        self.replacements[r] += 1
        t0 = self.end.now()
        self.end.forget(r)
        if self.hooks.on_fault is not None:  # recorded now: should the server die before the replacement is up
            self.hooks.on_fault({"fault": "worker_lost", "worker": r, "step": step, "noticed_unix": noticed,
                                 "cause": str(lost)})
        self.starting[r] = _Recovery(self.hooks.recover(r), busy[r], t0, step, answers)

    def resume(self, step: int, answers: int, send: Callable[[int, Command], None]) -> None:
        """``send`` each replacement that is up its predecessor's lost command: an evaluation as it was, a gradient
        on the newest weights (version ``step``)."""
        for r, lost in list(self.starting.items()):
            if not lost.ready():
                continue
            del self.starting[r]
            command = lost.command
            send(r, command if command.kind == EVALUATE else replace(command, version=step))
            if self.hooks.on_fault is not None:
                entry = {"fault": "worker_replaced", "worker": r, "step": step, "lost_step": lost.lost_step,
                         "recovery_s": self.end.now() - lost.t0, "answers_meanwhile": answers - lost.answers,
                         "redone": {"kind": command.kind, "step": command.step, "version": command.version}}
                if self.error_feedback:  # where it restarted: summary.json's residual_resets, which replay follows
                    entry["residual"] = "reset: the error-feedback residual died with the worker"
                self.hooks.on_fault(entry)

    def summary(self) -> dict[int, int]:
        """The workers replaced at least once: how often."""
        return {r: n for r, n in self.replacements.items() if n}
