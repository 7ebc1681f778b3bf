"""The parameter server and its loop: arrivals in, the consistency policy decides, updates out.

``ParameterServer`` holds the weights and the optimizer state and applies the seed's in-place update to the
row-weighted mean of the gradients it is given; its whole state is one plain mapping of tensors and numbers
(``state_dict``), so it can be checkpointed and restored without pickling objects.

``serve`` is where a step happens, on every backend and transport: it runs the policy's actions (send a
worker a command, apply arrived gradients), publishes each new version, evaluates on schedule, and hands
the metrics rows to ``emit`` in batches. Nothing in it waits on the driver.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable, Collection, Sequence

import torch

from sgd_dist.config import OptimConfig
from sgd_dist.core.objectives import penalty, weighted_mean
from sgd_dist.core.optim import learning_rate, sgd_update_
from sgd_dist.engine.messages import EVALUATE, GRADIENT, LOCAL, Arrival, Command, ServerEnd, WorkerLost
from sgd_dist.engine.policies import Apply, Dispatch, Drop

EMIT_EVERY_S = 0.2  # hand rows to the driver this often (and at the end)


class ParameterServer:
    def __init__(
        self, init_weights: torch.Tensor, optim: OptimConfig, total_steps: int, global_batch_size: int
    ) -> None:
        self.optim = optim
        self.total_steps = total_steps
        self.global_batch_size = global_batch_size
        self.weights = init_weights.detach().clone()
        self.optimizer_state: dict[str, torch.Tensor] = {}
        self.step = 0
        self.samples_seen = 0
        self.record_seconds = 0.0  # time spent building metrics rows (to show it stays small)
        self._t0 = time.perf_counter()

    def start(self, elapsed: float = 0.0) -> tuple[torch.Tensor, dict]:
        """Start the clock (``elapsed`` seconds in: a restored run goes on from its checkpoint's time); return the
        weights and the current step's row."""
        self._t0 = time.perf_counter() - elapsed
        row = {"step": self.step, "wall_time_s": elapsed, "samples_seen": self.samples_seen, "loss": None,
               "lr": None, "grad_norm": None, "weight_norm": self.weights.norm().item()}
        return self.weights.clone(), row

    def update(self, results: Sequence, *, deltas: bool = False, scales: Sequence[float] | None = None) -> dict:
        """Average the answers (weighted by rows, in the given order), update in place; return the row.

        ``results`` have ``grad``, ``loss`` (mean over their rows) and ``count``. Gradients go through the
        optimiser's rule at this update's learning rate; model deltas (local SGD: each worker's own steps
        already applied its learning rate) are subtracted as they are. ``scales`` multiply each gradient
        (the staleness-aware learning rate).
        """
        counts = [r.count for r in results]
        total = sum(counts)
        grads = [r.grad for r in results] if scales is None else [r.grad * c for r, c in zip(results, scales)]
        grad = weighted_mean(grads, counts)
        lr = learning_rate(self.optim, self.step, self.total_steps, self.global_batch_size)
        if deltas:
            with torch.no_grad():
                self.weights.sub_(grad)
        else:
            sgd_update_(
                self.weights, grad, self.optimizer_state, lr=lr, momentum=self.optim.momentum,
                nesterov=self.optim.nesterov, weight_decay=self.optim.weight_decay,
            )
        self.step += 1
        self.samples_seen += total
        t0 = time.perf_counter()
        row = {
            "step": self.step,
            "wall_time_s": t0 - self._t0,
            "samples_seen": self.samples_seen,
            "loss": sum(r.loss * n for r, n in zip(results, counts)) / total,
            "lr": lr,
            "grad_norm": grad.norm().item(),
            "weight_norm": self.weights.norm().item(),
        }
        self.record_seconds += time.perf_counter() - t0
        return row

    def apply(self, *results) -> tuple[torch.Tensor, dict]:
        """``update``, returning a copy of the new weights with the row."""
        row = self.update(results)
        return self.weights.clone(), row

    def state_dict(self) -> dict:
        """Everything needed to resume: weights, optimizer buffers, step and samples seen."""
        return {
            "weights": self.weights.clone(),
            "optimizer": {k: v.clone() for k, v in self.optimizer_state.items()},
            "step": self.step,
            "samples_seen": self.samples_seen,
        }

    def load_state_dict(self, state: dict) -> None:
        self.weights = state["weights"].clone()
        self.optimizer_state = {k: v.clone() for k, v in state["optimizer"].items()}
        self.step = int(state["step"])
        self.samples_seen = int(state["samples_seen"])


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


class LoopStopped(Exception):
    """The loop ended because ``LoopHooks.stop`` asked it to."""


@dataclass
class _Recovery:
    """A lost worker whose replacement is starting: poll ``ready``, then re-send ``command``."""

    ready: Callable[[], bool]
    command: Command
    t0: float  # perf_counter at the notice
    lost_step: int  # the server's step then
    answers: int  # the loop's arrivals then


MAX_REPLACEMENTS = 3  # per worker: a worker that keeps dying (on its own data, say) fails the run instead
RECOVERY_POLL_S = 0.005  # while a replacement starts: how often the loop asks whether it is up
STOP_POLL_S = 0.05  # with a stop hook: how long the loop waits for an answer before it asks again


def serve(
    server: ParameterServer,
    end: ServerEnd,
    policy,
    num_workers: int,
    eval_at: Collection[int],
    emit: Callable[[list[dict]], None],
    *,
    staleness_lr: bool = False,
    hooks: LoopHooks | None = None,
    restore: dict | None = None,
    elapsed_s: float = 0.0,
) -> dict:
    """Run ``policy`` to completion on ``end``: the whole training loop, driven by the server.

    Every command is computed on the weights current when the policy issued it, and each applied answer's
    (worker, local step, weights version) goes into its update's row (``applied``): the schedule that
    ``sgd-dist replay`` re-executes. An evaluation at version v runs on a snapshot of v, on each worker as soon
    as it is idle (at once in sync mode; between two of its gradients otherwise), and v's row waits for it.
    Rows reach ``emit`` every EMIT_EVERY_S and at the end, also when the loop fails (every finished row is handed
    over before the error propagates). Returns the loop's statistics: staleness counts, dropped answers, the
    policy's own summary.

    Faults (``hooks``): a lost worker's command is re-sent to its replacement. A gradient command goes out again
    on the newest weights (in sync mode these are the very weights it was first sent on, as the step cannot
    have moved without it; in the other modes the schedule records the version actually used, so the run still
    replays exactly). A checkpoint is taken at the first moment after each ``checkpoint_every``-th update when
    no evaluation is pending; ``restore`` (such a checkpoint) goes on from it: its pending answers are put back
    and its commands in flight are sent again, on the restored weights. ``elapsed_s``: where the rows' clock
    starts without a checkpoint (a server started over after a loss goes on with the run's time).
    """
    hooks = hooks or LoopHooks()
    rows: list[dict] = []
    held: dict[tuple[int, int], Arrival] = {}  # answers waiting for their Apply (or Drop)
    in_slot: set[tuple[int, int]] = set()  # held answers whose gradient is still a view of the worker's slot
    busy: dict[int, Command] = {}  # each worker's command in flight
    owed: dict[int, deque[int]] = {r: deque() for r in range(num_workers)}  # evaluations each worker owes
    deferred: dict[int, tuple[Command, torch.Tensor | None]] = {}  # a dispatch waiting for the worker's evaluation
    snapshots: dict[int, torch.Tensor] = {}  # weights of versions still to be evaluated
    evals: dict[int, list[Arrival]] = {}
    staleness: dict[int, int] = {}
    dropped: list[list[int]] = []
    answer_s: dict[int, list[float]] = {r: [] for r in range(num_workers)}  # each worker's answer times
    replacements: dict[int, int] = {r: 0 for r in range(num_workers)}
    # lost workers whose replacement is starting; they stay in `busy` (owing the lost command) so that nothing
    # else is sent to them meanwhile
    recovering: dict[int, _Recovery] = {}
    answers = 0  # arrivals so far: how many came from the others while a worker was replaced
    kind = LOCAL if policy.model_deltas else GRADIENT
    every = hooks.checkpoint_every if hooks.on_checkpoint is not None else 0

    def send(worker: int, command: Command, weights: torch.Tensor | None = None) -> None:
        for key in [key for key in in_slot if key[0] == worker]:  # its next answer overwrites its slot
            held[key] = replace(held[key], grad=held[key].grad.clone())
            in_slot.discard(key)
        busy[worker] = command
        end.send(worker, command, weights)

    def next_for(worker: int) -> None:
        """Give an idle worker what it owes: an evaluation first, then a dispatch that waited for it."""
        if owed[worker]:
            v = owed[worker].popleft()
            send(worker, Command(EVALUATE, version=v), None if v == server.step else snapshots[v])
        elif worker in deferred:
            command, weights = deferred.pop(worker)
            send(worker, command, weights if command.version != server.step else None)

    def start_evaluation(version: int) -> None:
        snapshots[version], evals[version] = server.weights.clone(), []
        for r in range(num_workers):
            owed[r].append(version)
            if r not in busy:
                next_for(r)

    def flush(force: bool = False) -> None:
        nonlocal rows, last_emit, emit_failed
        now = time.perf_counter()
        if not force and now - last_emit < EMIT_EVERY_S:
            return
        waiting = min(evals, default=None)  # rows from the oldest unfinished evaluation on wait for it
        cut = len(rows) if waiting is None else next((i for i, r in enumerate(rows) if r["step"] >= waiting), len(rows))
        batch, rows, last_emit = rows[:cut], rows[cut:], now
        emit_failed = True  # until emit returns: if it fails part-way, later rows must not follow (a gap)
        emit(batch)
        emit_failed = False

    def checkpoint() -> dict:
        assert not deferred and not evals, (deferred, evals)
        return {
            "server": server.state_dict(),
            "elapsed_s": time.perf_counter() - server._t0,
            "policy": json.dumps(policy.state_dict()),
            "busy": [[w, c.kind, c.step, c.version, c.local_steps] for w, c in sorted(busy.items())],
            "held": [{"worker": a.worker, "kind": a.kind, "step": a.step, "version": a.version, "loss": a.loss,
                      "count": a.count, "seconds": a.seconds, "grad": a.grad.clone()} for a in held.values()],
            "staleness": [[age, n] for age, n in staleness.items()],
            "dropped": [list(d) for d in dropped],
            "answer_s": {str(r): torch.tensor(t, dtype=torch.float64) for r, t in answer_s.items()},
            "replacements": {str(r): n for r, n in replacements.items()},
        }

    def recover(lost: WorkerLost) -> None:
        """Start replacing the lost worker; the loop goes on with the others until it is up."""
        r = lost.worker
        noticed = time.time()
        if hooks.recover is None or r is None or r not in busy:
            raise lost
        if replacements[r] >= MAX_REPLACEMENTS:
            raise WorkerLost(f"{lost}: lost {replacements[r] + 1} times, replaced {MAX_REPLACEMENTS} times (the "
                             "limit): giving up", r) from None
        replacements[r] += 1
        t0 = time.perf_counter()
        end.forget(r)
        if hooks.on_fault is not None:  # recorded now: should the server die before the replacement is up
            hooks.on_fault({"fault": "worker_lost", "worker": r, "step": server.step, "noticed_unix": noticed,
                            "cause": str(lost)})
        recovering[r] = _Recovery(hooks.recover(r), busy[r], t0, server.step, answers)

    def resume_recovered() -> None:
        """Send each replacement that is up its predecessor's lost command."""
        for r, lost in list(recovering.items()):
            if not lost.ready():
                continue
            del recovering[r]
            command = lost.command
            redo = command if command.kind == EVALUATE else replace(command, version=server.step)
            send(r, redo, None if redo.version == server.step else snapshots[redo.version])
            if hooks.on_fault is not None:
                hooks.on_fault({"fault": "worker_replaced", "worker": r, "step": server.step,
                                "lost_step": lost.lost_step, "recovery_s": time.perf_counter() - lost.t0,
                                "answers_meanwhile": answers - lost.answers,
                                "redone": {"kind": command.kind, "step": command.step, "version": command.version}})

    if restore is None:
        _, row = server.start(elapsed_s)
        end.publish(server.step, server.weights)
        rows.append(row)
        actions = deque(policy.start())
    else:
        server.load_state_dict(restore["server"])
        policy.load_state_dict(json.loads(restore["policy"]))
        staleness = {int(age): int(n) for age, n in restore["staleness"]}
        dropped = [list(d) for d in restore["dropped"]]
        answer_s = {r: restore["answer_s"][str(r)].tolist() for r in range(num_workers)}
        replacements = {r: int(restore["replacements"][str(r)]) for r in range(num_workers)}
        for a in restore["held"]:
            held[(a["worker"], a["step"])] = Arrival(a["worker"], a["kind"], a["step"], a["version"], a["grad"],
                                                     a["loss"], a["count"], a["seconds"])
        server.start(restore["elapsed_s"])
        end.publish(server.step, server.weights)
        for w, k, step, _, local_steps in restore["busy"]:
            send(w, Command(k, step, server.step, local_steps))
        actions = deque()
    last_emit, emit_failed = time.perf_counter(), False
    next_checkpoint = (server.step // every + 1) * every if every else None
    if restore is None and 0 in eval_at:
        start_evaluation(0)
    try:
        while True:
            while actions:
                action = actions.popleft()
                if isinstance(action, Dispatch):
                    command = Command(kind, action.step, server.step, action.local_steps)
                    if action.worker in busy or owed[action.worker]:  # evaluating: dispatch after
                        deferred[action.worker] = (command, server.weights.clone())
                        if action.worker not in busy:
                            next_for(action.worker)
                    else:
                        send(action.worker, command)
                elif isinstance(action, Apply):
                    arrivals = [held.pop(key) for key in action.gradients]
                    in_slot.difference_update(action.gradients)
                    ages = [server.step - a.version for a in arrivals]
                    for age in ages:
                        staleness[age] = staleness.get(age, 0) + 1
                    scales = [1 / max(1, age) for age in ages] if staleness_lr else None
                    row = server.update(arrivals, deltas=policy.model_deltas, scales=scales)
                    row["applied"] = [[a.worker, a.step, a.version] for a in arrivals]
                    row["answer_s"] = [a.seconds for a in arrivals]  # the per-worker views over time
                    row["staleness"] = max(ages)
                    end.publish(server.step, server.weights)
                    rows.append(row)
                    if server.step in eval_at:
                        start_evaluation(server.step)
                    if hooks.on_update is not None:
                        hooks.on_update(server.step)
                    flush()
                else:
                    assert isinstance(action, Drop)
                    for key in action.gradients:
                        arrival = held.pop(key)
                        in_slot.discard(key)
                        dropped.append([arrival.worker, arrival.step, arrival.version, server.step])
            if next_checkpoint is not None and server.step >= next_checkpoint and not evals:
                flush(force=True)  # every row up to the checkpoint reaches the driver before it
                hooks.on_checkpoint(checkpoint())
                next_checkpoint = (server.step // every + 1) * every
            if recovering:
                resume_recovered()
            if policy.done and not busy:
                break
            if hooks.stop is not None and hooks.stop():
                raise LoopStopped(f"the loop was stopped at update {server.step}")
            try:
                arrival = end.receive(RECOVERY_POLL_S if recovering else STOP_POLL_S if hooks.stop else None)
            except WorkerLost as lost:
                recover(lost)
                continue
            if arrival is None:  # no answer yet: ask again whether a replacement is up, or the run given up
                continue
            busy.pop(arrival.worker)
            answers += 1
            if arrival.kind == EVALUATE:
                parts = evals[arrival.version]
                parts.append(arrival)
                if len(parts) == num_workers:  # worker order: the same rounding on every transport
                    parts.sort(key=lambda a: a.worker)
                    loss = sum(a.loss for a in parts) / sum(a.count for a in parts)
                    row = next(r for r in rows if r["step"] == arrival.version)
                    row["eval_loss"] = loss
                    row["eval_penalty"] = penalty(snapshots[arrival.version], server.optim.weight_decay)
                    del evals[arrival.version], snapshots[arrival.version]
            else:
                answer_s[arrival.worker].append(arrival.seconds)
                held[(arrival.worker, arrival.step)] = arrival
                if end.views:
                    in_slot.add((arrival.worker, arrival.step))
                actions.extend(policy.on_gradient(arrival.worker, arrival.step))
            next_for(arrival.worker)
    finally:
        if not emit_failed:
            flush(force=True)
    assert not held and not deferred, (held, deferred)
    return {"record_seconds": server.record_seconds, "staleness": staleness, "dropped": dropped,
            "policy": policy.summary(), "replacements": {r: n for r, n in replacements.items() if n},
            "answer_ms": {r: 1e3 * statistics.median(t) for r, t in answer_s.items() if t}, "answer_s": answer_s}
