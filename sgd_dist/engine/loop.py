"""The server's loop, where a step happens on every backend and transport: answers in, the policy decides, updates out.

``Loop.run`` receives an answer, asks the consistency policy what to do, and does it: dispatch a command, apply
held answers (an update, published at once), or drop them. Its collaborators each keep one concern:
``Evaluations`` (what is evaluated when, by whom), ``Recoveries`` (replacing a lost worker), ``HeldAnswers``
(answers waiting for their update; slot views cloned before they are overwritten), ``state`` (the checkpoint
codec) and ``RowDelivery`` (the rows handed to the driver in batches). Nothing in it waits on the driver.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable, Collection

import torch

from sgd_dist.core.compression import Compressed, decompress
from sgd_dist.engine.downlink import Downlink
from sgd_dist.engine.evaluations import Evaluations
from sgd_dist.engine.held import HeldAnswers
from sgd_dist.engine.messages import EVALUATE, GRADIENT, LOCAL, Arrival, Command, ServerEnd, WorkerLost
from sgd_dist.engine.policies import Apply, Dispatch, Drop
from sgd_dist.engine.recovery import RECOVERY_POLL_S, LoopHooks, Recoveries
from sgd_dist.engine.server import ParameterServer
from sgd_dist.engine.state import LoopState, Tally, decode, encode

# The driver's cadence, not the run's: rows reach the driver (its files, its console) this often, on this
# process's real time whatever the loop's clock, and at the end.
DELIVER_TO_DRIVER_EVERY_S = 0.2
STOP_POLL_S = 0.05  # with a stop hook: how long the loop waits for an answer before it asks again


class LoopStopped(Exception):
    """The loop ended because ``LoopHooks.stop`` asked it to."""


class RowDelivery:
    """The metrics rows not yet handed to the driver's ``emit``. A row waits while an evaluation of its version or
    an earlier one is unfinished (its eval loss goes into it), and so do the rows after it: they go in order."""

    def __init__(self, emit: Callable[[list[dict]], None]) -> None:
        self.emit = emit
        self.rows: list[dict] = []
        self.last = time.perf_counter()
        self.failed = False  # an emit failed part-way: later rows must not follow (a gap)

    def add(self, row: dict) -> None:
        self.rows.append(row)

    def fill(self, step: int, fields: dict) -> None:
        """Add ``fields`` to the waiting row of ``step``."""
        next(r for r in self.rows if r["step"] == step).update(fields)

    def count_bytes(self, step: int, up: int, down: int) -> None:
        """Add an evaluation's bytes to the waiting row of the version it evaluates."""
        row = next(r for r in self.rows if r["step"] == step)
        row["bytes_up"], row["bytes_down"] = row["bytes_up"] + up, row["bytes_down"] + down

    def deliver(self, waiting: int | None, force: bool = False) -> None:
        """Hand the rows before step ``waiting`` (None: all) to ``emit``, if DELIVER_TO_DRIVER_EVERY_S has passed
        since the last time or ``force``."""
        now = time.perf_counter()
        if self.failed or (not force and now - self.last < DELIVER_TO_DRIVER_EVERY_S):
            return
        rows = self.rows
        cut = len(rows) if waiting is None else next((i for i, r in enumerate(rows) if r["step"] >= waiting), len(rows))
        batch, self.rows, self.last = self.rows[:cut], self.rows[cut:], now
        self.failed = True  # until emit returns
        self.emit(batch)
        self.failed = False


class Loop:
    """Run ``policy`` to completion on ``end``: the whole training loop, driven by the server.

    Every command is computed on the weights current when the policy issued it, and each applied answer's
    (worker, local step, weights version) goes into its update's row (``applied``): the schedule that
    ``sgd-dist replay`` re-executes. An evaluation at a version in ``eval_at`` runs on a snapshot of it, on each
    worker as soon as it is idle (at once in sync mode; between two of its gradients otherwise), and that
    version's row waits for it. Rows reach ``emit`` in batches and at the end, also when the loop fails (every
    finished row is handed over before the error propagates). ``staleness_lr``: each gradient is divided by its
    staleness (at least 1). Every time recorded comes from ``end.now()``.

    Faults (``hooks``): a lost worker's command is re-sent to its replacement. A gradient command goes out again
    on the newest weights (in sync mode these are the very weights it was first sent on, as the step cannot
    have moved without it; in the other modes the schedule records the version actually used, so the run still
    replays exactly). A checkpoint is taken at the first moment after each ``checkpoint_every``-th update when
    no evaluation is pending; ``restore`` (such a checkpoint) goes on from it: its held answers are put back
    and its commands in flight are sent again, on the restored weights. ``elapsed_s``: where the rows' clock
    starts without a checkpoint (a server started over after a loss goes on with the run's time).
    """

    def __init__(self, server: ParameterServer, end: ServerEnd, policy, num_workers: int, eval_at: Collection[int],
                 emit: Callable[[list[dict]], None], *, staleness_lr: bool = False, hooks: LoopHooks | None = None,
                 restore: dict | None = None, elapsed_s: float = 0.0) -> None:
        self.server, self.end, self.policy, self.eval_at = server, end, policy, eval_at
        self.staleness_lr, self.hooks = staleness_lr, hooks or LoopHooks()
        self.restored = None if restore is None else decode(restore, num_workers)
        self.elapsed_s = elapsed_s
        self.kind = LOCAL if policy.model_deltas else GRADIENT
        self.rows = RowDelivery(emit)
        self.held = HeldAnswers(end.views)
        self.busy: dict[int, Command] = {}  # each worker's command in flight
        self.deferred: dict[int, tuple[Command, torch.Tensor]] = {}  # a dispatch waiting for the worker's evaluation
        self.evaluations = Evaluations(num_workers, server.optim.weight_decay)
        self.recoveries = Recoveries(self.hooks, end, num_workers,
                                     None if self.restored is None else self.restored.replacements,
                                     server.compression.stateful)
        self.tally = Tally.empty(num_workers) if self.restored is None else self.restored.tally
        self.answers = 0  # arrivals so far: how many came from the others while a worker was replaced
        self.every = self.hooks.checkpoint_every if self.hooks.on_checkpoint is not None else 0
        self.next_checkpoint: int | None = None  # the update from which the next checkpoint is due
        # workers whose own state (an error-feedback residual, the weights compression.down built up) is gone: a new
        # process, a restored run, or this loop's start (a server started over keeps no worker's state): their next
        # gradient command says so (Command.reset)
        self.fresh: set[int] = set(range(num_workers))
        self.stateful = server.compression.stateful  # error feedback, or weights sent as deltas (compression.down)
        self.downlink = Downlink(server.compression, server.seed) if server.compression.down else None
        self.sent_bytes: dict[int, int] = {}  # each command in flight's bytes

    def run(self) -> dict:
        """The loop; returns its statistics: staleness counts, dropped answers, the policy's own summary."""
        actions = self._start()
        try:
            while True:
                for action in actions:
                    if isinstance(action, Dispatch):
                        self._dispatch(action)
                    elif isinstance(action, Apply):
                        self._apply(action)
                    else:
                        assert isinstance(action, Drop)
                        self._drop(action)
                self._checkpoint_if_due()
                self.recoveries.resume(self.server.step, self.answers, self._send_on)
                if self.policy.done and not self.busy:
                    break
                if self.hooks.stop is not None and self.hooks.stop():
                    raise LoopStopped(f"the loop was stopped at update {self.server.step}")
                arrival = self._receive()
                actions = [] if arrival is None else self._answered(arrival)
        finally:
            self.rows.deliver(self.evaluations.oldest(), force=True)
        assert not self.held and not self.deferred, (self.held, self.deferred)
        return {"record_seconds": self.server.record_seconds, "staleness": self.tally.staleness,
                "dropped": self.tally.dropped, "dropped_bytes": self.tally.dropped_bytes,
                "residual_resets": self.tally.resets, "policy": self.policy.summary(),
                "replacements": self.recoveries.summary(), "answer_ms": self.tally.answer_ms(),
                "answer_s": self.tally.answer_s}

    # -- the steps of run -------------------------------------------------------------------------------------
    def _start(self) -> list:
        """Publish the first weights and send the first commands: the policy's start, or a checkpoint's."""
        restored, server = self.restored, self.server
        if restored is None:
            _, row = server.start(self.elapsed_s, clock=self.end.now)
            self.end.publish(server.step, server.weights)
            self.rows.add({**row, "bytes_up": 0, "bytes_down": 0})
            actions = list(self.policy.start())
        else:
            server.load_state_dict(restored.server)
            self.policy.load_state_dict(restored.policy)
            self.held.put_back(restored.held)
            server.start(restored.elapsed_s, clock=self.end.now)
            self.end.publish(server.step, server.weights)
            if self.stateful and self.hooks.on_fault is not None:
                self.hooks.on_fault({"fault": "residual_reset", "step": server.step, "workers": sorted(self.fresh),
                                     "cause": "restored from a checkpoint: the workers' compression state is not in "
                                     "it"})
            for worker, command in restored.busy.items():  # again, on the restored weights
                self._send(worker, Command(command.kind, command.step, server.step, command.local_steps))
            actions = []
        self.next_checkpoint = (server.step // self.every + 1) * self.every if self.every else None
        if restored is None and 0 in self.eval_at:
            self._start_evaluation(0)
        return actions

    def _receive(self) -> Arrival | None:
        """The next answer; None when none came in time (a replacement to poll, a stop hook to ask) or a lost
        worker was noticed instead."""
        timeout = RECOVERY_POLL_S if self.recoveries else STOP_POLL_S if self.hooks.stop else None
        try:
            return self.end.receive(timeout)
        except WorkerLost as lost:
            self.recoveries.notice(lost, self.busy, self.server.step, self.answers)
            self.fresh.add(lost.worker)  # its replacement starts without its state
            return None

    def _answered(self, arrival: Arrival) -> list:
        """Take an answer in; return the policy's actions on it (none for an evaluation)."""
        self.busy.pop(arrival.worker)
        self.answers += 1
        # the payload as it travelled becomes the server's dense copy; the answer keeps what its command carried
        a = arrival  # built directly: replace() costs microseconds an answer, which thousands of workers feel
        grad = decompress(a.grad) if isinstance(a.grad, Compressed) else a.grad
        arrival = Arrival(a.worker, a.kind, a.step, a.version, grad, a.loss, a.count, a.seconds, a.nbytes,
                          self.sent_bytes.pop(a.worker))
        actions = []
        if arrival.kind == EVALUATE:
            self.rows.count_bytes(arrival.version, arrival.nbytes, arrival.sent_nbytes)  # that row waits for it
            finished = self.evaluations.record(arrival)
            if finished is not None:
                self.rows.fill(*finished)
        else:
            self.tally.answer_s[arrival.worker].append(arrival.seconds)
            self.held.hold(arrival)
            actions = list(self.policy.on_gradient(arrival.worker, arrival.step))
        self._next_for(arrival.worker)
        return actions

    def _dispatch(self, action: Dispatch) -> None:
        command = Command(self.kind, action.step, self.server.step, action.local_steps, action.reset)
        worker = action.worker
        if worker in self.busy or self.evaluations.owes(worker):  # evaluating: dispatch after
            self.deferred[worker] = (command, self.server.weights.clone())
            if worker not in self.busy:
                self._next_for(worker)
        else:
            self._send(worker, command)

    def _apply(self, action: Apply) -> None:
        """One update: the held answers averaged (in the action's order), published, recorded."""
        server = self.server
        arrivals = self.held.take(action.gradients)
        ages = [server.step - a.version for a in arrivals]
        self.tally.applied(ages)
        scales = [1 / max(1, age) for age in ages] if self.staleness_lr else None
        row = server.update(arrivals, deltas=self.policy.model_deltas, scales=scales)
        row["applied"] = [[a.worker, a.step, a.version] for a in arrivals]
        row["answer_s"] = [a.seconds for a in arrivals]  # the per-worker views over time
        row["staleness"] = max(ages)
        # what its answers and their commands moved: the rows' bytes are a function of the schedule, as their numbers
        row["bytes_up"] = sum(a.nbytes for a in arrivals)
        row["bytes_down"] = sum(a.sent_nbytes for a in arrivals)
        self.end.publish(server.step, server.weights)
        self.rows.add(row)
        if server.step in self.eval_at:
            self._start_evaluation(server.step)
        if self.hooks.on_update is not None:
            self.hooks.on_update(server.step)
        self.rows.deliver(self.evaluations.oldest())

    def _drop(self, action: Drop) -> None:
        for arrival in self.held.take(action.gradients):
            self.tally.dropped.append([arrival.worker, arrival.step, arrival.version, self.server.step])
            self.tally.dropped_bytes[0] += arrival.nbytes
            self.tally.dropped_bytes[1] += arrival.sent_nbytes

    def _checkpoint_if_due(self) -> None:
        """A checkpoint once ``checkpoint_every`` updates have passed and no evaluation is pending; every row up to
        it reaches the driver before it."""
        if self.next_checkpoint is None or self.server.step < self.next_checkpoint or self.evaluations.pending:
            return
        assert not self.deferred, self.deferred
        self.rows.deliver(self.evaluations.oldest(), force=True)
        self.hooks.on_checkpoint(encode(LoopState(
            server=self.server.state_dict(), elapsed_s=self.server.elapsed(), policy=self.policy.state_dict(),
            busy=self.busy, held=self.held.values(), tally=self.tally, replacements=self.recoveries.replacements)))
        self.next_checkpoint = (self.server.step // self.every + 1) * self.every

    # -- sending ----------------------------------------------------------------------------------------------
    def _send(self, worker: int, command: Command, weights: torch.Tensor | None = None) -> None:
        if command.kind != EVALUATE and worker in self.fresh:
            self.fresh.discard(worker)
            command = replace(command, reset=True)
        if command.reset and self.stateful and command.step > 0:  # a reset at a worker's step 0 changes nothing
            self.tally.resets.append([worker, command.step])
        if self.downlink is not None and command.kind != EVALUATE:
            weights = self.downlink.encode(worker, command, self.server.weights if weights is None else weights)
        self.sent_bytes[worker] = (weights if weights is not None else self.server.weights).nbytes
        self.held.before_send(worker)  # its answer will overwrite its slot
        self.busy[worker] = command
        self.end.send(worker, command, weights)

    def _send_on(self, worker: int, command: Command) -> None:
        """Send ``command`` on the weights of its version: the newest, or an evaluation's snapshot."""
        version = command.version
        self._send(worker, command, None if version == self.server.step else self.evaluations.snapshot(version))

    def _next_for(self, worker: int) -> None:
        """Give an idle worker what it owes: an evaluation first, then a dispatch that waited for it."""
        version = self.evaluations.next_owed(worker)
        if version is not None:
            self._send_on(worker, Command(EVALUATE, version=version))
        elif worker in self.deferred:
            command, weights = self.deferred.pop(worker)
            self._send(worker, command, weights if command.version != self.server.step else None)

    def _start_evaluation(self, version: int) -> None:
        self.evaluations.start(version, self.server.weights)
        for worker in range(self.evaluations.num_workers):
            if worker not in self.busy:
                self._next_for(worker)
