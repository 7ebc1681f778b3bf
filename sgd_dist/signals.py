"""Stopping a run on SIGINT (Ctrl-C) or SIGTERM (what `timeout` and schedulers send), the same way.

Both raise KeyboardInterrupt where the run is, once: the run then writes its interrupted summary, keeps its rows
and shuts Ray down. A signal that comes while that cleanup runs (a second Ctrl-C) is only noted, or Ray's
shutdown would be cut short and leave its dashboard and runtime-env agents behind. Ray turns a signal that
arrives inside ``ray.get`` into a plain KeyboardInterrupt, so which signal it was is kept here, not in the
exception's type. No Ray import: the CLI installs these before it imports anything heavy.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator

_first: list[int] = []  # the signal that stopped the run, once one did


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be."""


def interrupted_by() -> int | None:
    """The signal that interrupted this process's run (signal.SIGINT or SIGTERM), or None."""
    return _first[0] if _first else None


def describe(exc: BaseException) -> str:
    """How an interrupted run's summary names what stopped it: SIGTERM or KeyboardInterrupt (SIGINT)."""
    if isinstance(exc, Terminated) or interrupted_by() == signal.SIGTERM:
        return "SIGTERM"
    return "KeyboardInterrupt"


def _handler(signum: int, frame) -> None:
    if not _first:
        _first.append(signum)
        raise Terminated("SIGTERM") if signum == signal.SIGTERM else KeyboardInterrupt
    if len(_first) == 1:
        _first.append(signum)
        print("sgd-dist: stopping; shutting Ray down first (a few seconds)", file=sys.stderr, flush=True)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM stop the run (once; later ones are noted) during the block. A signal that was ignored
    when the process started (a background job's SIGINT) stays ignored."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    ours = [sig for sig, was in previous.items() if was in (signal.default_int_handler, signal.SIG_DFL)]
    for sig in ours:
        signal.signal(sig, _handler)
    try:
        yield
    finally:
        for sig in ours:
            signal.signal(sig, previous[sig])


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Ctrl-C or SIGTERM during the block takes effect after it, through the Python handler that was in place
    (a batch of records is then written whole)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous = {sig: handler for sig, handler in previous.items() if callable(handler)}  # not SIG_DFL, SIG_IGN
    for sig in previous:
        signal.signal(sig, lambda signum, frame: caught.append((signum, frame)))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        signum, frame = caught[0]
        previous[signum](signum, frame)  # raises what it would have raised then


@contextlib.contextmanager
def keep_sigterm_handler() -> Iterator[None]:
    """ray.init replaces SIGTERM's handler (with a sys.exit, and its C++ core adds a stack dump): put back the one
    the caller installed (the CLI's). With none installed, Ray's stays."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if previous is not None and previous is not signal.SIG_DFL:
            signal.signal(signal.SIGTERM, previous)
