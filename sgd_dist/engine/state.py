"""The loop's checkpoint codec: its state as a dict of tensors and plain values, and back.

A checkpoint holds what the loop needs to go on from update v as if it had never stopped: the server's state,
the policy's (as JSON), the commands in flight (re-sent on restore), the answers held for a later Apply, and the
loop's statistics (``Tally``) and replacement counts. Only tensors and plain values: it loads with
``torch.load(weights_only=True)``. Taken only when no evaluation is pending and no dispatch waits for one.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch

from sgd_dist.engine.messages import Arrival, Command


@dataclass
class Tally:
    """The loop's statistics: how stale the applied answers were, the dropped ones, each worker's answer times."""

    staleness: dict[int, int] = field(default_factory=dict)  # age -> applied answers of that age
    dropped: list[list[int]] = field(default_factory=list)  # [worker, step, version, server step when dropped]
    answer_s: dict[int, list[float]] = field(default_factory=dict)  # worker -> seconds of each gradient answer
    resets: list[list[int]] = field(default_factory=list)  # [worker, step]: commands whose error feedback restarted
    dropped_bytes: list[int] = field(default_factory=lambda: [0, 0])  # the dropped answers' bytes up and down

    @classmethod
    def empty(cls, num_workers: int) -> Tally:
        return cls(answer_s={r: [] for r in range(num_workers)})

    def applied(self, ages: Iterable[int]) -> None:
        for age in ages:
            self.staleness[age] = self.staleness.get(age, 0) + 1

    def answer_ms(self) -> dict[int, float]:
        """Each worker's median answer time, in milliseconds (the workers that answered)."""
        return {r: 1e3 * statistics.median(t) for r, t in self.answer_s.items() if t}


@dataclass
class LoopState:
    """A decoded checkpoint."""

    server: dict  # ParameterServer.state_dict()
    elapsed_s: float  # the rows' clock at the checkpoint
    policy: dict  # the policy's state_dict()
    busy: dict[int, Command]  # the commands in flight, by worker
    held: list[Arrival]  # the answers waiting for their Apply, in arrival order
    tally: Tally
    replacements: dict[int, int]


def encode(state: LoopState) -> dict:
    """The checkpoint dict of ``state`` (tensors cloned: the loop goes on changing its own)."""
    return {
        "server": state.server,
        "elapsed_s": state.elapsed_s,
        "policy": json.dumps(state.policy),
        "busy": [[w, c.kind, c.step, c.version, c.local_steps] for w, c in sorted(state.busy.items())],
        "held": [{"worker": a.worker, "kind": a.kind, "step": a.step, "version": a.version, "loss": a.loss,
                  "count": a.count, "seconds": a.seconds, "grad": a.grad.clone(), "nbytes": a.nbytes,
                  "sent_nbytes": a.sent_nbytes} for a in state.held],
        "staleness": [[age, n] for age, n in state.tally.staleness.items()],
        "dropped": [list(d) for d in state.tally.dropped],
        "resets": [list(r) for r in state.tally.resets],
        "dropped_bytes": list(state.tally.dropped_bytes),
        "answer_s": {str(r): torch.tensor(t, dtype=torch.float64) for r, t in state.tally.answer_s.items()},
        "replacements": {str(r): n for r, n in state.replacements.items()},
    }


def decode(checkpoint: Mapping, num_workers: int) -> LoopState:
    """The loop's state in ``checkpoint`` (from ``encode``, possibly through ``torch.save`` and back)."""
    tally = Tally(staleness={int(age): int(n) for age, n in checkpoint["staleness"]},
                  dropped=[list(d) for d in checkpoint["dropped"]],
                  resets=[list(r) for r in checkpoint.get("resets", [])],
                  dropped_bytes=list(checkpoint.get("dropped_bytes", [0, 0])),
                  answer_s={r: checkpoint["answer_s"][str(r)].tolist() for r in range(num_workers)})
    held = [Arrival(a["worker"], a["kind"], a["step"], a["version"], a["grad"], a["loss"], a["count"], a["seconds"],
                    a.get("nbytes", 0), a.get("sent_nbytes", 0)) for a in checkpoint["held"]]
    return LoopState(
        server=checkpoint["server"], elapsed_s=checkpoint["elapsed_s"], policy=json.loads(checkpoint["policy"]),
        busy={w: Command(k, step, version, local_steps) for w, k, step, version, local_steps in checkpoint["busy"]},
        held=held, tally=tally,
        replacements={r: int(checkpoint["replacements"][str(r)]) for r in range(num_workers)},
    )
