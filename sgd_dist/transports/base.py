"""What the transports share: the polite poll (``Waiter``), how often a waiting side checks on its peers
(``Every``), whether a process is alive (``alive``), and how a transport sets itself up between Ray actors
(``Link``)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Protocol, Sequence

SPIN_S = 2e-3  # yield-spin this long before sleeping between polls
MAX_SLEEP_S = 1e-3
LIVENESS_EVERY_S = 0.5  # a dead peer is noticed in about this long instead of waited for


class Waiter:
    """Poll politely: yield while the wait is short (a peer computing a step answers within the spin), then sleep
    in growing steps (a long wait costs no core)."""

    def __init__(self, timeout: float | None = None) -> None:
        self.t0 = time.perf_counter()
        self.sleep = 0.0
        self.deadline = None if timeout is None else self.t0 + timeout

    def pause(self) -> float:
        """Wait a little; return the time before the wait."""
        now = time.perf_counter()
        if now - self.t0 < SPIN_S:
            os.sched_yield()
        else:
            self.sleep = min(MAX_SLEEP_S, self.sleep * 2 or 2e-5)
            time.sleep(self.sleep)
        return now

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


class Every:
    """Says True at most once per ``period_s``: when a waiting side checks that its peers are alive."""

    def __init__(self, period_s: float = LIVENESS_EVERY_S) -> None:
        self.period_s = period_s
        self.next = time.perf_counter() + period_s

    def due(self, now: float | None = None) -> bool:
        now = time.perf_counter() if now is None else now
        if now < self.next:
            return False
        self.next = now + self.period_s
        return True


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


class Link(Protocol):
    """A transport between Ray actors, set up by the transport itself; the backend only calls these.

    The actors offer ``call(fn, *args)``, which runs ``fn(actor, *args)`` inside the actor, and each keeps its
    end of the transport in its ``end`` attribute: so a transport's set-up steps live in its own module.
    """

    name: str  # the transport's name (cluster.transport, summary.json)

    def connect(self, server: Any, workers: Sequence[Any], nodes: Sequence[str]) -> None:
        """On the driver, before each run: set up the server actor's end and every worker's (on ``nodes``)."""

    def start(self, end: Any, workers: Sequence[Any]) -> list[Any]:
        """In the server actor: start each worker's loop; return the loops' refs (each ends with its loop)."""

    def replace(self, end: Any, rank: int, worker: Any, node: str) -> Any:
        """In the server actor: put a started replacement (on ``node``) in worker ``rank``'s place, start its loop
        and return that loop's ref."""

    def release(self) -> None:
        """On the driver, once the actors are gone: remove what of this transport lives outside Ray."""

    def shutdown(self) -> None:
        """On the driver, once it has shut down the Ray it started: remove what that Ray left of this transport."""
