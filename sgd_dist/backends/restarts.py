"""Going on after a lost parameter server: from the last checkpoint the sink received, or from the start.

Every backend that can lose its server does the same: it rewinds the sink to the checkpoint's step (the rows
after it will come again, once each), starts a fresh copy of the policy it began with, restores the checkpoint
into a new server and records a ``server_lost`` fault. ``ServerRestarts`` holds what that needs; the backend
adds its own times to the record (wall seconds on Ray, virtual seconds on the virtual backend).
"""

from __future__ import annotations

import copy
from typing import Any

from sgd_dist.backends.base import Sink

MAX_SERVER_RESTARTS = 3  # a server that keeps dying (on its own state, say) fails the run instead


class ServerRestarts:
    """The latest checkpoint and a pristine policy, for restarting a lost server; at most ``limit`` times.

    Args:
        policy: the policy the run starts with (copied now: the running one changes state).
        restore: the checkpoint the run itself started from (``--resume``), or None.
        limit: how many restarts a run may take.
    """

    def __init__(self, policy: Any, restore: dict | None, limit: int = MAX_SERVER_RESTARTS) -> None:
        self._initial = copy.deepcopy(policy)
        self.latest = restore
        self.count = 0
        self.limit = limit

    def checkpointed(self, state: dict) -> None:
        """``state`` reached the sink: a later restart goes on from it."""
        self.latest = state

    def restart(self, sink: Sink, lost_step: int, cause: str) -> tuple[Any, dict | None, dict]:
        """The server was lost at update ``lost_step``: rewind ``sink`` to the latest checkpoint.

        Returns:
            the policy to start again with (a fresh copy: the checkpoint loads its state into it), the checkpoint
            to restore (None: start over from step 0) and the ``server_lost`` record, without times.
        Raises:
            RuntimeError: past ``limit`` restarts.
        """
        self.count += 1
        if self.count > self.limit:
            raise RuntimeError(f"the parameter server was lost {self.count} times; giving up")
        step = -1 if self.latest is None else int(self.latest["server"]["step"])
        sink.rewind(step)
        restored = max(step, 0)
        entry = {"fault": "server_lost", "step": lost_step, "cause": cause, "restored_step": restored,
                 "steps_redone": max(0, lost_step - restored)}
        return copy.deepcopy(self._initial), self.latest, entry
