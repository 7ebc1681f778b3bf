"""How a command ends: its exit status and its one line on stderr, the same for ``sgd-dist`` and for the job
side of ``sgd-dist submit``. Light on purpose (no torch, no Ray): every command runs inside ``guarded``."""

from __future__ import annotations

import os
import sys
from typing import Callable

from sgd_dist import signals
from sgd_dist.errors import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE, ConfigError, UsageError


def fail(code: int, message: str) -> int:
    """Print the one-line error and return the exit status."""
    print(f"sgd-dist: error: {message}", file=sys.stderr)
    return code


def interrupted_code(exc: KeyboardInterrupt) -> int:
    return EXIT_TERMINATED if signals.describe(exc) == "SIGTERM" else EXIT_INTERRUPTED


def guarded(command: Callable[[], int]) -> int:
    """Run a command with SIGINT and SIGTERM stopping it; a config or usage error, an interruption without its own
    word on it, or a reader of stdout that went away ends it with its exit status."""
    try:
        with signals.stop_on_signals():
            return command()
    except ConfigError as exc:
        return fail(EXIT_USAGE, str(exc))
    except UsageError as exc:
        return fail(exc.code, str(exc))
    except KeyboardInterrupt as exc:  # a command without its own word on it (or a signal while it started up)
        return fail(interrupted_code(exc), "interrupted")
    except BrokenPipeError:
        # The reader of stdout went away (`sgd-dist train ... | head`): stop silently, as a program stopped by
        # SIGPIPE does. stdout now goes to /dev/null, or the interpreter's last flush would raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
