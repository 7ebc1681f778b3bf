"""What the transports share: the polite poll (``Waiter``), how often a waiting side checks on its peers
(``Every``), and whether a process is alive (``alive``)."""

from __future__ import annotations

import os
import time
from pathlib import Path

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
