"""The error types a user can meet, the one-line form every error is shown in, and the CLI's exit codes.

Each error's message is one line naming what to change; the CLI prints it after ``sgd-dist: error:``.
"""

from __future__ import annotations

import re

# sgd-dist's exit codes: 141 is what a program stopped by SIGPIPE reports (the reader of stdout went away),
# 130 and 143 what one stopped by SIGINT and SIGTERM reports
EXIT_OK, EXIT_RUN_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE, EXIT_TERMINATED = 0, 1, 2, 130, 141, 143


class ConfigError(ValueError):
    """A config that cannot be run: the one-line message names the dotted field and what it allows."""


class UsageError(ValueError):
    """A command used wrongly where no config field is at fault (an empty --out, a directory that is not a run
    or a sweep, a flag out of range). ``code``: the exit status it ends the command with."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


class ClusterError(RuntimeError):
    """The Ray cluster cannot be reached or cannot host the run (its message is the whole story: one line)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, truncated, or of another run or version."""


class DivergenceError(RuntimeError):
    """The loss stopped being a finite number."""


class SubmitError(RuntimeError):
    """The cluster cannot be reached, refused the request, or the job did not complete; one line."""


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # Ray colours actor names in its errors' text


def one_line(exc: BaseException) -> str:
    """The exception's type and the first line of its message (Ray's errors carry whole remote tracebacks), without
    terminal colour codes."""
    cause = getattr(exc, "cause", None)  # a Ray task's error: its first line is Ray's header, the cause says why
    if isinstance(cause, BaseException):
        exc = cause
    text = _ANSI.sub("", str(exc)).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
