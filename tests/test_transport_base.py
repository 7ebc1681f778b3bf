"""What the transports share (transports/base.py): the polite poll, the liveness cadence, and alive()."""

from __future__ import annotations

import subprocess
import sys
import time

from sgd_dist.transports import base
from sgd_dist.transports.base import Every, Waiter, alive


def test_the_waiter_yields_during_the_spin_then_sleeps_doubling_up_to_its_cap(monkeypatch):
    slept: list[float] = []
    yields: list[None] = []
    monkeypatch.setattr(base.time, "sleep", slept.append)
    monkeypatch.setattr(base.os, "sched_yield", lambda: yields.append(None))
    waiter = Waiter()
    waiter.t0 = time.perf_counter() + 60  # the spin has not run out
    waiter.pause()
    assert len(yields) == 1 and slept == []
    waiter.t0 = time.perf_counter() - 60  # a long wait: sleeps, each twice the last, never over MAX_SLEEP_S
    for _ in range(10):
        waiter.pause()
    assert len(yields) == 1
    assert slept[:3] == [2e-5, 4e-5, 8e-5] and max(slept) == base.MAX_SLEEP_S and slept[-1] == base.MAX_SLEEP_S


def test_the_waiter_expires_at_its_timeout_and_never_without_one():
    waiter = Waiter(0.25)
    assert not waiter.expired(waiter.t0 + 0.2499) and waiter.expired(waiter.t0 + 0.25)
    assert not Waiter().expired(float("inf"))


def test_a_liveness_check_is_due_at_most_once_a_period():
    every = Every(10.0)
    first = every.next
    assert not every.due(first - 1e-3)
    assert every.due(first) and not every.due(first + 9.9)  # once due, not again for a period
    assert every.due(first + 10.0)


def test_alive_is_false_for_an_exited_process_even_before_it_is_reaped():
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert alive(proc.pid)
        proc.stdin.close()
        deadline = time.monotonic() + 30
        while alive(proc.pid) and time.monotonic() < deadline:  # exits, and stays a zombie until waited for
            time.sleep(0.01)
        assert not alive(proc.pid) and proc.poll() is not None  # it was a zombie: only now reaped
    finally:
        proc.kill()
        proc.wait()
    assert not alive(proc.pid)
