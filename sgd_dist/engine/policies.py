"""Consistency policies: plain state machines that decide what happens next. No Ray.

A policy sees two kinds of event and answers with actions:

- ``start()`` -> the first actions;
- ``on_gradient(worker, step)`` (worker's answer for its dispatched local step ``step`` has arrived) -> actions.

Actions are ``Dispatch(worker, step, local_steps)`` (the worker computes the gradient of its mini-batch number
``step`` on the newest weights, or, for local SGD, runs ``local_steps`` steps on its own copy and answers with
its model delta), ``Apply(gradients)`` (the server averages these arrived answers into one update, and publishes
the new version) and ``Drop(gradients)`` (these arrived answers are discarded and counted).
The server loop executes the actions in order and feeds arrivals back; it never decides itself.

Rules every policy keeps, so that the server can stay simple:

- each worker has one command slot: a worker is never dispatched while its previous answer is still due;
- within one list of actions, the ``Apply`` producing the weights a ``Dispatch`` must use comes before it;
- ``done`` only once ``version == num_steps`` and nothing is in flight (the server then stops the workers and
  evaluates with all of them idle);
- arrivals are named by (worker, step): a worker may answer step c + 1 before step c is applied (ssp, async),
  so the server holds several answers per worker.

Staleness (updates applied between a gradient's dispatch and its apply) is measured by the server from weight
versions; a policy only reports, in ``summary()``, what it alone knows (e.g. whose gradients it dropped).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Dispatch:
    worker: int
    step: int
    local_steps: int = 1
    """Local SGD only: SGD steps the worker takes on its own copy from its local step ``step``."""
    reset: bool = False
    """Replay only: the worker's error-feedback residual starts over at this command, as the recorded run's did."""


@dataclass(frozen=True)
class Apply:
    gradients: tuple[tuple[int, int], ...]
    """(worker, step) of each gradient averaged into this update, in averaging order."""


@dataclass(frozen=True)
class Drop:
    gradients: tuple[tuple[int, int], ...]
    """(worker, step) of each arrived gradient the server discards (a backup worker's late answer)."""


Action = Dispatch | Apply | Drop


def _encode(value):
    """A policy attribute as plain JSON: sets, tuples and int-keyed dicts tagged so they come back as they were."""
    if isinstance(value, _InFlight):
        return {"__inflight__": _encode(value.steps)}
    if isinstance(value, (set, frozenset)):
        return {"__set__": [_encode(v) for v in sorted(value)]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, dict):
        return {"__dict__": [[_encode(k), _encode(v)] for k, v in value.items()]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    assert value is None or isinstance(value, (bool, int, float, str)), type(value)
    return value


def _decode(value):
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        (tag, inner), = value.items()
        if tag == "__inflight__":
            in_flight = _InFlight()
            in_flight.steps = _decode(inner)
            return in_flight
        if tag == "__set__":
            return {_decode(v) for v in inner}
        if tag == "__tuple__":
            return tuple(_decode(v) for v in inner)
        assert tag == "__dict__", tag
        return {_decode(k): _decode(v) for k, v in inner}
    return value


class _Stateful:
    """A policy's whole state as plain JSON data (a checkpoint holds it; loading needs no unpickling)."""

    def state_dict(self) -> dict:
        return {"mode": self.mode, "attributes": {k: _encode(v) for k, v in vars(self).items()}}

    def load_state_dict(self, state: dict) -> None:
        if state["mode"] != self.mode:
            raise ValueError(f"a checkpoint of a {state['mode']!r} policy cannot restore a {self.mode!r} policy")
        mine = set(vars(self))
        if set(state["attributes"]) != mine:
            raise ValueError(f"the checkpoint's {self.mode} policy has attributes {sorted(state['attributes'])}, "
                             f"this one {sorted(mine)}")
        for key, value in state["attributes"].items():
            setattr(self, key, _decode(value))

class SyncPolicy(_Stateful):
    """Synchronous SGD: each step waits for all K gradients of that step, averages them, updates once."""

    mode = "sync"
    model_deltas = False
    """True where answers are model deltas (local SGD), not gradients."""

    def __init__(self, num_workers: int, num_steps: int) -> None:
        self.num_workers = num_workers
        self.num_steps = num_steps
        self.version = 0  # updates applied so far
        self._arrived: set[int] = set()

    @property
    def done(self) -> bool:
        return self.version == self.num_steps

    def start(self) -> list[Action]:
        return [Dispatch(r, 0) for r in range(self.num_workers)]

    def on_gradient(self, worker: int, step: int) -> list[Action]:
        assert step == self.version, f"gradient of step {step} arrived during step {self.version}"
        assert worker not in self._arrived, f"worker {worker} sent step {step} twice"
        self._arrived.add(worker)
        if len(self._arrived) < self.num_workers:
            return []
        self._arrived.clear()
        self.version += 1
        actions: list[Action] = [Apply(tuple((r, step) for r in range(self.num_workers)))]
        if not self.done:
            actions += [Dispatch(r, step + 1) for r in range(self.num_workers)]
        return actions

    def summary(self) -> dict:
        return {"mode": self.mode}


class _InFlight:
    """The one-command-slot bookkeeping shared by the policies that let workers drift apart.

    Asserting here (an internal invariant, not a user error) catches a policy bug at the action that causes
    it instead of as a hung or corrupted run.
    """

    def __init__(self) -> None:
        self.steps: dict[int, int] = {}  # worker -> step of its command in flight

    def dispatch(self, worker: int, step: int, local_steps: int = 1) -> Dispatch:
        assert worker not in self.steps, (f"worker {worker} sent step {step} "
                                          f"while step {self.steps[worker]} is in flight")
        self.steps[worker] = step
        return Dispatch(worker, step, local_steps)

    def arrive(self, worker: int, step: int) -> None:
        in_flight = self.steps.get(worker)
        assert in_flight == step, f"worker {worker} answered step {step}, in flight: {in_flight}"
        del self.steps[worker]

    def idle(self, num_workers: int) -> list[int]:
        return [r for r in range(num_workers) if r not in self.steps]


class AsyncPolicy(_Stateful):
    """Asynchronous SGD (Downpour / Hogwild style): no worker ever waits for another.

    Each answer is applied alone the moment it arrives and its worker goes on from the newest weights, so a
    slow worker's gradients are stale (computed on old weights) rather than holding the others up. Exactly
    ``num_steps`` gradients are dispatched in all (worker r computes its local steps 0, 1, ...), so the run
    applies exactly ``num_steps`` updates and ends with every answer in.
    """

    mode = "async"
    model_deltas = False

    def __init__(self, num_workers: int, num_steps: int) -> None:
        self.num_workers = num_workers
        self.num_steps = num_steps
        self.version = 0
        self.num_dispatched = 0
        self.applied: dict[int, int] = {r: 0 for r in range(num_workers)}
        """Gradients applied per worker: how much each worker's speed weighed in the result."""
        self._in_flight = _InFlight()

    @property
    def done(self) -> bool:
        return self.version == self.num_steps and not self._in_flight.steps

    def _dispatch(self, worker: int, step: int) -> list[Action]:
        if self.num_dispatched == self.num_steps:
            return []
        self.num_dispatched += 1
        return [self._in_flight.dispatch(worker, step)]

    def start(self) -> list[Action]:
        # With fewer steps than workers, only the first num_steps workers ever get a command.
        return [a for r in range(self.num_workers) for a in self._dispatch(r, 0)]

    def on_gradient(self, worker: int, step: int) -> list[Action]:
        self._in_flight.arrive(worker, step)
        self.version += 1
        self.applied[worker] += 1
        return [Apply(((worker, step),)), *self._dispatch(worker, step + 1)]

    def summary(self) -> dict:
        return {"mode": self.mode, "applied_per_worker": dict(self.applied)}


class SSPPolicy(_Stateful):
    """Stale synchronous parallel (bounded staleness): sync's averages, but fast workers may run ahead.

    Update t averages the K gradients of local step t in worker order, exactly like sync, so the result only
    differs from sync in which weights each gradient saw. A worker that answered step c is sent step c + 1 at
    once if c + 1 <= version + s (version = updates applied = steps every worker has finished), i.e. it is at
    most s steps ahead of the slowest; otherwise it waits until enough updates are applied. s = 0 is sync
    action for action.
    """

    mode = "ssp"
    model_deltas = False

    def __init__(self, num_workers: int, num_steps: int, staleness_bound: int) -> None:
        self.num_workers = num_workers
        self.num_steps = num_steps
        self.staleness_bound = staleness_bound
        self.version = 0
        self.waits: dict[int, int] = {r: 0 for r in range(num_workers)}
        """Times each worker was held back by the bound: who the slow one made wait."""
        self._next_step = [0] * num_workers  # the next local step each worker will compute
        self._arrived: dict[int, set[int]] = {}  # step -> workers whose gradient of that step is in
        self._in_flight = _InFlight()

    @property
    def done(self) -> bool:
        return self.version == self.num_steps and not self._in_flight.steps

    def _dispatch_idle(self) -> list[Action]:
        actions: list[Action] = []
        for r in self._in_flight.idle(self.num_workers):
            step = self._next_step[r]
            if step < self.num_steps and step <= self.version + self.staleness_bound:
                self._next_step[r] += 1
                actions.append(self._in_flight.dispatch(r, step))
        return actions

    def start(self) -> list[Action]:
        return self._dispatch_idle()

    def on_gradient(self, worker: int, step: int) -> list[Action]:
        self._in_flight.arrive(worker, step)
        self._arrived.setdefault(step, set()).add(worker)
        actions: list[Action] = []
        # A worker answers its steps in order, so update t is always complete before update t + 1.
        if len(self._arrived.get(self.version, ())) == self.num_workers:
            del self._arrived[self.version]
            actions.append(Apply(tuple((r, self.version) for r in range(self.num_workers))))
            self.version += 1
        actions += self._dispatch_idle()
        if worker not in self._in_flight.steps and self._next_step[worker] < self.num_steps:
            self.waits[worker] += 1
        return actions

    def summary(self) -> dict:
        return {"mode": self.mode, "staleness_bound": self.staleness_bound, "waits_per_worker": dict(self.waits)}


class BackupPolicy(_Stateful):
    """Synchronous SGD with b backup workers (Chen et al. 2016): each step ignores its b slowest workers.

    Update t averages the first K - b gradients of step t to arrive, sorted by worker (so the rounding does
    not depend on who was first among them; b = 0 is sync action for action). A gradient of step t arriving
    after update t is dropped and its worker sent the current step, so a straggler costs one wasted gradient,
    never a wait. At the end the stragglers' answers are awaited and dropped, so nothing is in flight.
    """

    mode = "backup"
    model_deltas = False

    def __init__(self, num_workers: int, num_steps: int, backup_workers: int) -> None:
        self.num_workers = num_workers
        self.num_steps = num_steps
        self.backup_workers = backup_workers
        self.version = 0  # updates applied == the step being collected
        self.dropped: dict[int, int] = {r: 0 for r in range(num_workers)}
        """Gradients dropped per worker: which workers were the stragglers."""
        self._arrived: list[int] = []  # workers whose gradient of step `version` is in
        self._in_flight = _InFlight()

    @property
    def done(self) -> bool:
        return self.version == self.num_steps and not self._in_flight.steps

    def _dispatch(self, workers: Iterable[int]) -> list[Action]:
        if self.version == self.num_steps:
            return []
        return [self._in_flight.dispatch(r, self.version) for r in workers]

    def start(self) -> list[Action]:
        return self._dispatch(range(self.num_workers))

    def on_gradient(self, worker: int, step: int) -> list[Action]:
        self._in_flight.arrive(worker, step)
        assert step <= self.version, f"worker {worker} answered step {step} before step {self.version} was applied"
        if step < self.version:
            self.dropped[worker] += 1
            return [Drop(((worker, step),)), *self._dispatch([worker])]
        self._arrived.append(worker)
        if len(self._arrived) < self.num_workers - self.backup_workers:
            return []
        apply = Apply(tuple((r, step) for r in sorted(self._arrived)))
        self._arrived = []
        self.version += 1
        return [apply, *self._dispatch(self._in_flight.idle(self.num_workers))]

    def summary(self) -> dict:
        return {
            "mode": self.mode,
            "backup_workers": self.backup_workers,
            "num_dropped": sum(self.dropped.values()),
            "dropped_per_worker": dict(self.dropped),
        }


class LocalSGDPolicy(_Stateful):
    """Local SGD (model averaging): each worker takes H SGD steps on its own copy, then the models are averaged.

    Round t sends every worker ``Dispatch(r, t * H, local_steps=H)``; the answers are model deltas, averaged in
    worker order into update t. Communication drops H-fold; with H = 1 the actions are sync's.
    """

    mode = "local_sgd"
    model_deltas = True

    def __init__(self, num_workers: int, num_steps: int, local_steps: int) -> None:
        self.num_workers = num_workers
        self.num_steps = num_steps
        self.local_steps = local_steps
        self.version = 0  # rounds done
        self._arrived: set[int] = set()

    @property
    def done(self) -> bool:
        return self.version == self.num_steps

    def _round(self) -> list[Action]:
        return [Dispatch(r, self.version * self.local_steps, self.local_steps) for r in range(self.num_workers)]

    def start(self) -> list[Action]:
        return self._round()

    def on_gradient(self, worker: int, step: int) -> list[Action]:
        first = self.version * self.local_steps
        assert step == first, f"delta from local step {step} arrived during the round from {first}"
        assert worker not in self._arrived, f"worker {worker} sent round {self.version} twice"
        self._arrived.add(worker)
        if len(self._arrived) < self.num_workers:
            return []
        self._arrived.clear()
        self.version += 1
        actions: list[Action] = [Apply(tuple((r, first) for r in range(self.num_workers)))]
        if not self.done:
            actions += self._round()
        return actions

    def summary(self) -> dict:
        """The communication rounds (one averaging each, the run's updates) and each worker's local steps."""
        return {"mode": self.mode, "local_steps": self.local_steps, "rounds": self.version,
                "local_steps_per_worker": self.version * self.local_steps}


class ReplayPolicy(_Stateful):
    """Re-issues a recorded schedule so that a serial run recomputes the original bit for bit.

    ``schedule[u]`` lists update u's gradients as (worker, step, version_used) in averaging order;
    ``dropped`` lists the dropped ones as (worker, step, version_used[, after_update]) (after_update is not
    needed: a dropped gradient is dropped when it arrives). On a transport that runs each command the
    moment it is sent (the serial one), a gradient computed right after version v is published uses version
    v, so: each gradient is dispatched as soon as its version is current and its worker is idle, and update
    u is applied once its gradients are in AND every gradient recorded on a version <= u has been dispatched
    (otherwise applying would move the weights under a gradient still owed to the old version). Since the
    original kept one command per worker, each worker's gradients, in local-step order, use non-decreasing
    versions, so this never waits forever, on any arrival order.
    """

    mode = "replay"

    def __init__(
        self,
        schedule: Sequence[Sequence[Sequence[int]]],
        num_workers: int,
        dropped: Iterable[Sequence[int]] = (),
        local_steps: int = 1,
        model_deltas: bool = False,
        resets: Iterable[Sequence[int]] = (),
    ) -> None:
        self.num_workers = num_workers
        self.num_steps = len(schedule)
        self._resets = {(int(w), int(s)) for w, s in resets}  # where a worker's error feedback restarted
        self.local_steps = local_steps
        self.model_deltas = model_deltas
        self.version = 0
        self._updates = [tuple((int(w), int(s)) for w, s, _ in update) for update in schedule]
        entries = [tuple(map(int, g[:3])) for update in schedule for g in update]
        self._to_drop = {(int(g[0]), int(g[1])) for g in dropped}
        entries += [tuple(map(int, g[:3])) for g in dropped]
        # worker -> its (step, version_used), in the order the worker computed them (its local-step order)
        self._queues: dict[int, list[tuple[int, int]]] = {r: [] for r in range(num_workers)}
        for w, s, v in entries:
            if w not in self._queues:
                raise ValueError(f"worker {w} is not one of the run's {num_workers} workers")
            self._queues[w].append((s, v))
        for r, queue in self._queues.items():
            queue.sort()
            if len({s for s, _ in queue}) != len(queue):
                raise ValueError(f"worker {r} computed a step twice in the schedule")
            versions = [v for _, v in queue]
            if versions != sorted(versions):
                raise ValueError(f"worker {r}'s versions {versions} break its one command slot")
            queue.reverse()  # pop() takes the next one
        for u, update in enumerate(schedule):
            if any(v > u for _, _, v in update):
                raise ValueError(f"update {u + 1} uses a version from its future")
        # Dispatches go out in version order, so the sent ones are always the first _num_sent of these.
        self._versions = sorted(v for w, s, v in entries)
        self._num_sent = 0
        self._arrived: set[tuple[int, int]] = set()
        self._in_flight = _InFlight()
        self.num_dropped = 0

    @property
    def done(self) -> bool:
        return self.version == self.num_steps and not self._in_flight.steps and self._num_sent == len(self._versions)

    def _dispatch(self, workers: Iterable[int]) -> list[Action]:
        actions: list[Action] = []
        for r in workers:
            queue = self._queues[r]
            if r in self._in_flight.steps or not queue:
                continue
            step, version = queue[-1]
            assert version >= self.version, f"worker {r} step {step} needed version {version}, now {self.version}"
            if version == self.version:
                queue.pop()
                self._num_sent += 1
                dispatch = self._in_flight.dispatch(r, step, self.local_steps)
                actions.append(replace(dispatch, reset=True) if (r, step) in self._resets else dispatch)
        return actions

    def _can_apply(self) -> bool:
        if self.version == self.num_steps or not all(g in self._arrived for g in self._updates[self.version]):
            return False
        # every gradient recorded on a version <= the current one must have been sent
        return self._num_sent == len(self._versions) or self._versions[self._num_sent] > self.version

    def start(self) -> list[Action]:
        actions = self._dispatch(range(self.num_workers))
        return actions + self._apply_ready()

    def _apply_ready(self) -> list[Action]:
        actions: list[Action] = []
        while self._can_apply():
            gradients = self._updates[self.version]
            self._arrived.difference_update(gradients)
            self.version += 1
            actions.append(Apply(gradients))
            actions += self._dispatch(range(self.num_workers))
        return actions

    def on_gradient(self, worker: int, step: int) -> list[Action]:
        self._in_flight.arrive(worker, step)
        actions: list[Action] = []
        if (worker, step) in self._to_drop:
            self.num_dropped += 1
            actions.append(Drop(((worker, step),)))
        else:
            self._arrived.add((worker, step))
        actions += self._dispatch([worker])
        return actions + self._apply_ready()

    def summary(self) -> dict:
        return {"mode": self.mode, "num_dropped": self.num_dropped}


Policy = SyncPolicy | AsyncPolicy | SSPPolicy | BackupPolicy | LocalSGDPolicy | ReplayPolicy


def make_policy(
    mode: str,
    num_workers: int,
    num_steps: int,
    *,
    staleness_bound: int = 0,
    backup_workers: int = 0,
    local_steps: int = 1,
) -> Policy:
    """Build the policy of ``train.mode`` from a validated config's values (config.py checks their ranges)."""
    if mode == "ssp":
        return SSPPolicy(num_workers, num_steps, staleness_bound)
    if mode == "backup":
        return BackupPolicy(num_workers, num_steps, backup_workers)
    if mode == "local_sgd":
        return LocalSGDPolicy(num_workers, num_steps, local_steps)
    return {"sync": SyncPolicy, "async": AsyncPolicy}[mode](num_workers, num_steps)
