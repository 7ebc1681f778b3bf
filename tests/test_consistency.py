"""The consistency policies as plain state machines, driven by a simulated server over scripted transports. No Ray.

``run`` plays the server's part (it executes the actions in order, counts versions, holds arrivals by (worker,
step)) and checks the rules every policy owes the server; the transports script the arrival order: in order,
reversed, random, in random waves, or by a simulated clock where each worker has its own duration.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import Counter, deque
from dataclasses import dataclass, field

import pytest
from conftest import make_config

from sgd_dist.config import ConfigError
from sgd_dist.engine.policies import (
    Apply,
    AsyncPolicy,
    BackupPolicy,
    Dispatch,
    Drop,
    LocalSGDPolicy,
    ReplayPolicy,
    SSPPolicy,
    SyncPolicy,
    make_policy,
)


def drive(policy, order):
    """Run a policy to completion, delivering each wave of arrivals in the order ``order`` picks."""
    log = []
    pending = [a for a in policy.start()]
    while pending:
        dispatched = [a for a in pending if isinstance(a, Dispatch)]
        log += [a for a in pending if isinstance(a, Apply)]
        pending = []
        for a in order(dispatched):
            pending += policy.on_gradient(a.worker, a.step)
    return log


def test_sync_applies_all_k_gradients_once_per_step():
    policy = SyncPolicy(num_workers=3, num_steps=4)
    assert policy.start() == [Dispatch(0, 0), Dispatch(1, 0), Dispatch(2, 0)]
    assert policy.on_gradient(1, 0) == [] and policy.on_gradient(0, 0) == []
    assert policy.on_gradient(2, 0) == [Apply(((0, 0), (1, 0), (2, 0))), Dispatch(0, 1), Dispatch(1, 1), Dispatch(2, 1)]
    assert policy.version == 1 and not policy.done


@pytest.mark.parametrize("seed", range(5))
def test_sync_schedule_does_not_depend_on_arrival_order(seed):
    rng = random.Random(seed)
    shuffled = drive(SyncPolicy(4, 6), lambda xs: rng.sample(xs, len(xs)))
    in_order = drive(SyncPolicy(4, 6), lambda xs: xs)
    assert shuffled == in_order and len(in_order) == 6
    assert in_order[-1] == Apply(tuple((r, 5) for r in range(4)))  # averaged in worker order: same rounding


def test_sync_stops_after_the_last_step():
    policy = SyncPolicy(2, 1)
    policy.start()
    policy.on_gradient(0, 0)
    assert policy.on_gradient(1, 0) == [Apply(((0, 0), (1, 0)))] and policy.done


def test_a_duplicate_or_stale_gradient_is_an_internal_error():
    policy = SyncPolicy(2, 3)
    policy.start()
    policy.on_gradient(0, 0)
    with pytest.raises(AssertionError):
        policy.on_gradient(0, 0)
    with pytest.raises(AssertionError):
        policy.on_gradient(1, 1)


def test_unknown_mode():
    # make_policy trusts a validated config: the config is where an unknown mode is refused, naming the modes
    with pytest.raises(ConfigError, match=r"^train\.mode: Input should be 'sync', 'async', 'ssp', 'backup' or "
                                          r"'local_sgd' \(got 'hogwild'\)$"):
        make_config("train.mode=hogwild")
    assert isinstance(make_policy("sync", 2, 3), SyncPolicy)


def test_all_arrival_orders_of_one_step():
    for perm in itertools.permutations(range(3)):
        policy = SyncPolicy(3, 2)
        policy.start()
        out = [policy.on_gradient(r, 0) for r in perm]
        assert out[:2] == [[], []] and out[2][0] == Apply(((0, 0), (1, 0), (2, 0)))


# --- scripted transports: send(worker, step) when a command goes out, receive() -> the next answer -------------


class InOrder:
    """The serial transport: each command runs the moment it is sent, answers come back in the order sent."""

    def __init__(self):
        self.queue = deque()

    def send(self, worker, step):
        self.queue.append((worker, step))

    def receive(self):
        return self.queue.popleft()


class Reversed(InOrder):
    """The most recently sent command answers first."""

    def receive(self):
        return self.queue.pop()


class Shuffled(InOrder):
    """Any command in flight may answer next."""

    def __init__(self, seed):
        super().__init__()
        self.rng = random.Random(seed)

    def receive(self):
        self.queue.rotate(-self.rng.randrange(len(self.queue)))
        return self.queue.popleft()


class Waves:
    """Every command in flight answers, in a random order, before any command sent meanwhile."""

    def __init__(self, seed):
        self.rng = random.Random(seed)
        self.current, self.next = [], []

    def send(self, worker, step):
        self.next.append((worker, step))

    def receive(self):
        if not self.current:
            self.current, self.next = self.rng.sample(self.next, len(self.next)), []
        return self.current.pop()


class Clock:
    """A known delay pattern: a command sent at time t answers at t + durations[worker]; ties in sending order."""

    def __init__(self, durations):
        self.durations = durations
        self.now = 0
        self.heap = []
        self.sent = itertools.count()

    def send(self, worker, step):
        heapq.heappush(self.heap, (self.now + self.durations[worker], next(self.sent), worker, step))

    def receive(self):
        self.now, _, worker, step = heapq.heappop(self.heap)
        return worker, step


TRANSPORTS = {
    "in_order": InOrder,
    "reversed": Reversed,
    **{f"shuffled{seed}": (lambda seed=seed: Shuffled(seed)) for seed in range(3)},
    **{f"waves{seed}": (lambda seed=seed: Waves(seed)) for seed in range(2)},
    "worker1_slow": lambda: Clock([1, 3, 1, 1]),
    "worker0_slow": lambda: Clock([5, 1, 2, 1]),
}


# --- the simulated server ---------------------------------------------------------------------------------------


@dataclass
class Trace:
    actions: list = field(default_factory=list)
    applies: list = field(default_factory=list)
    schedule: list = field(default_factory=list)  # per update: [(worker, step, version_used)], averaging order
    dropped: list = field(default_factory=list)  # (worker, step, version_used, after_update)
    version_used: dict = field(default_factory=dict)  # (worker, step) -> version current when dispatched
    staleness: list = field(default_factory=list)  # per applied gradient: version at apply - version_used


def run(policy, transport):
    """Execute ``policy`` to ``done`` as the server does, asserting the rules the server relies on."""
    trace = Trace()
    busy, held = {}, set()
    version = 0

    def execute(actions):
        nonlocal version
        for a in actions:
            trace.actions.append(a)
            if isinstance(a, Dispatch):
                assert a.worker not in busy, f"{a} while worker {a.worker} runs step {busy[a.worker]}"
                assert (a.worker, a.step) not in trace.version_used, f"{a} dispatched twice"
                busy[a.worker] = a.step
                trace.version_used[(a.worker, a.step)] = version
                transport.send(a.worker, a.step)
            elif isinstance(a, Apply):
                assert a.gradients and all(g in held for g in a.gradients), f"{a}: not all arrived"
                held.difference_update(a.gradients)
                trace.applies.append(a)
                trace.schedule.append([(w, s, trace.version_used[(w, s)]) for w, s in a.gradients])
                trace.staleness += [version - trace.version_used[g] for g in a.gradients]
                version += 1
            else:
                assert isinstance(a, Drop) and all(g in held for g in a.gradients), a
                held.difference_update(a.gradients)
                trace.dropped += [(w, s, trace.version_used[(w, s)], version) for w, s in a.gradients]
        assert policy.version == version

    execute(policy.start())
    while not policy.done:
        assert busy, "the policy waits with nothing in flight"
        worker, step = transport.receive()
        assert busy.pop(worker) == step
        held.add((worker, step))
        execute(policy.on_gradient(worker, step))
    assert version == policy.num_steps, f"done after {version} of {policy.num_steps} updates"
    assert not busy, f"done with workers {sorted(busy)} busy"
    assert not held, f"done with arrivals {sorted(held)} neither applied nor dropped"
    return trace


def order_independent(make) -> bool:
    """Whether a policy acts the same under every scripted arrival order: what lets a backend chain a stretch of
    steps ahead of the actual arrivals. ``make`` builds a fresh policy for each order."""
    return len({tuple(run(make(), transport()).actions) for transport in TRANSPORTS.values()}) == 1


POLICIES = {
    "sync": lambda k, n: SyncPolicy(k, n),
    "async": lambda k, n: AsyncPolicy(k, n),
    "ssp0": lambda k, n: SSPPolicy(k, n, 0),
    "ssp2": lambda k, n: SSPPolicy(k, n, 2),
    "backup0": lambda k, n: BackupPolicy(k, n, 0),
    "backup1": lambda k, n: BackupPolicy(k, n, min(1, k - 1)),
    "backup_all_but_one": lambda k, n: BackupPolicy(k, n, k - 1),
    "local_sgd1": lambda k, n: LocalSGDPolicy(k, n, 1),
    "local_sgd3": lambda k, n: LocalSGDPolicy(k, n, 3),
}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("num_workers, num_steps", [(1, 3), (2, 5), (4, 7), (4, 2)])
def test_every_policy_keeps_the_server_rules(policy, transport, num_workers, num_steps):
    """One slot per worker, each answer applied or dropped once, done exactly at num_steps updates, none in flight."""
    trace = run(POLICIES[policy](num_workers, num_steps), TRANSPORTS[transport]())
    assert len(trace.applies) == num_steps


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_ssp0_backup0_and_local_sgd1_are_sync_action_for_action(transport):
    sync = run(SyncPolicy(4, 6), TRANSPORTS[transport]()).actions
    assert run(SSPPolicy(4, 6, 0), TRANSPORTS[transport]()).actions == sync
    assert run(BackupPolicy(4, 6, 0), TRANSPORTS[transport]()).actions == sync
    assert run(LocalSGDPolicy(4, 6, 1), TRANSPORTS[transport]()).actions == sync  # local_steps=1 is the default
    assert run(make_policy("ssp", 4, 6), TRANSPORTS[transport]()).actions == sync


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("bound", [1, 2, 3])
def test_ssp_never_runs_more_than_s_ahead_and_averages_like_sync(bound, transport):
    num_workers, num_steps = 4, 9
    trace = run(SSPPolicy(num_workers, num_steps, bound), TRANSPORTS[transport]())
    # version_used = updates applied = steps the slowest worker has finished when the step was sent
    leads = [step - version for (_, step), version in trace.version_used.items()]
    assert max(leads) <= bound
    assert trace.applies == [Apply(tuple((r, t) for r in range(num_workers))) for t in range(num_steps)]
    assert all(step < num_steps for _, step in trace.version_used)


def test_ssp_lets_fast_workers_use_the_whole_bound_and_no_more():
    """Worker 1 takes 3 time units, the others 1: they run exactly s steps ahead of it, then wait for it."""
    policy = SSPPolicy(4, 9, 2)
    trace = run(policy, Clock([1, 3, 1, 1]))
    assert max(step - version for (_, step), version in trace.version_used.items()) == 2
    assert max(trace.staleness) == 2 and policy.waits[1] == 0 and policy.waits[0] > 0
    assert not order_independent(lambda: SSPPolicy(4, 9, 2)) and order_independent(lambda: SSPPolicy(4, 9, 0))


@pytest.mark.parametrize("transport", ["in_order", "waves0", "waves1"])
@pytest.mark.parametrize("num_workers, backups", [(2, 1), (4, 1), (4, 2), (4, 3)])
def test_backup_drops_exactly_b_per_step_when_every_worker_answers_every_step(num_workers, backups, transport):
    num_steps = 6
    policy = BackupPolicy(num_workers, num_steps, backups)
    trace = run(policy, TRANSPORTS[transport]())
    assert Counter(step for _, step, _, _ in trace.dropped) == {t: backups for t in range(num_steps)}
    for t, apply in enumerate(trace.applies):
        workers = [w for w, _ in apply.gradients]
        assert workers == sorted(workers) and len(workers) == num_workers - backups
        assert {s for _, s in apply.gradients} == {t}
    assert policy.dropped == {r: sum(w == r for w, *_ in trace.dropped) for r in range(num_workers)}
    assert policy.summary()["num_dropped"] == backups * num_steps


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_backup_averages_the_first_k_minus_b_of_the_current_step(transport):
    policy = BackupPolicy(4, 8, 2)
    trace = run(policy, TRANSPORTS[transport]())
    for t, apply in enumerate(trace.applies):
        assert len(apply.gradients) == 2 and {s for _, s in apply.gradients} == {t}
        assert list(apply.gradients) == sorted(apply.gradients)
    assert all(after > step for _, step, _, after in trace.dropped)  # dropped only once its step was applied
    assert policy.dropped == {r: sum(w == r for w, *_ in trace.dropped) for r in range(4)}


def test_backup_drops_the_slow_workers_gradients():
    """Worker 1 takes 3 time units, the others 1: with one backup, worker 1 is never waited for nor averaged."""
    policy = BackupPolicy(4, 9, 1)
    trace = run(policy, Clock([1, 3, 1, 1]))
    assert all(w != 1 for apply in trace.applies for w, _ in apply.gradients)
    assert {w for w, *_ in trace.dropped} == {1}
    # worker 1 is re-sent the current step whenever its stale answer comes in: at times 3, 6, 9 (steps 0, 2, 5, 8)
    assert [step for _, step, _, _ in trace.dropped] == [0, 2, 5, 8]
    assert policy.dropped == {0: 0, 1: 4, 2: 0, 3: 0}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("num_workers, num_steps", [(1, 4), (3, 10), (4, 2)])
def test_async_applies_each_gradient_alone_exactly_num_steps_times(num_workers, num_steps, transport):
    policy = AsyncPolicy(num_workers, num_steps)
    trace = run(policy, TRANSPORTS[transport]())
    assert all(len(apply.gradients) == 1 for apply in trace.applies)
    assert len(trace.version_used) == num_steps  # nothing computed in vain
    for r in range(num_workers):  # each worker goes through its own local steps 0, 1, 2, ...
        steps = [s for w, s in trace.version_used if w == r]
        assert steps == list(range(len(steps)))
    assert sum(policy.applied.values()) == num_steps


def test_async_staleness_under_a_known_delay_pattern():
    """2 workers taking 1 and 3 time units, 6 steps, derived by hand (ties go in sending order):

    t=0 send w0 s0 (v0), w1 s0 (v0)
    t=1 w0 s0 in: staleness 0 -> v1, send w0 s1 (v1)
    t=2 w0 s1 in: 0 -> v2, send w0 s2 (v2)
    t=3 w1 s0 in (sent first): 2 - 0 = 2 -> v3, send w1 s1 (v3); w0 s2 in: 3 - 2 = 1 -> v4, send w0 s3 (v4):
        that is the 6th gradient sent, the last
    t=4 w0 s3 in: 0 -> v5
    t=6 w1 s1 in: 5 - 3 = 2 -> v6, done
    """
    policy = AsyncPolicy(2, 6)
    trace = run(policy, Clock([1, 3]))
    assert [apply.gradients for apply in trace.applies] == [
        ((0, 0),), ((0, 1),), ((1, 0),), ((0, 2),), ((0, 3),), ((1, 1),)
    ]
    assert trace.staleness == [0, 0, 2, 1, 0, 2]
    assert policy.applied == {0: 4, 1: 2} and not order_independent(lambda: AsyncPolicy(2, 6))


def test_local_sgd_sends_rounds_of_h_steps_and_averages_deltas_in_worker_order():
    policy = LocalSGDPolicy(3, 4, 5)
    trace = run(policy, Shuffled(0))
    dispatches = [a for a in trace.actions if isinstance(a, Dispatch)]
    assert dispatches == [Dispatch(r, 5 * t, local_steps=5) for t in range(4) for r in range(3)]
    assert trace.applies == [Apply(tuple((r, 5 * t) for r in range(3))) for t in range(4)]
    assert policy.model_deltas and order_independent(lambda: LocalSGDPolicy(3, 4, 5)) and not SyncPolicy.model_deltas


RECORDED = {
    "async": lambda k: AsyncPolicy(k, 12),
    "ssp": lambda k: SSPPolicy(k, 12, 2),
    "backup": lambda k: BackupPolicy(k, 12, 1),
    "sync": lambda k: SyncPolicy(k, 12),
}


@pytest.mark.parametrize("replay_transport", ["in_order", "shuffled0", "reversed"])
@pytest.mark.parametrize("durations", [[1, 3], [3, 1], [1, 3, 1, 2], [2, 2, 7, 1]])
@pytest.mark.parametrize("mode", RECORDED)
def test_replay_reproduces_the_recorded_schedule(mode, durations, replay_transport):
    """Recorded under a delay pattern, replayed serially: same averages, each gradient on its recorded version."""
    original = run(RECORDED[mode](len(durations)), Clock(durations))
    replay = ReplayPolicy(original.schedule, len(durations), dropped=original.dropped)
    again = run(replay, TRANSPORTS[replay_transport]())
    assert again.applies == original.applies
    assert again.version_used == original.version_used  # dropped gradients included
    assert sorted(d[:3] for d in again.dropped) == sorted(d[:3] for d in original.dropped)


def test_replay_refuses_a_schedule_no_run_could_have_written():
    # worker 0's step 1 used an older version than its step 0: it would have had two commands out at once
    with pytest.raises(ValueError, match="one command slot"):
        ReplayPolicy([[(0, 0, 0)], [(0, 1, 0)], [(0, 2, 2)], [(0, 3, 1)]], 1)
    with pytest.raises(ValueError, match="^update 1 uses a version from its future$"):
        ReplayPolicy([[(0, 0, 1)]], 1)
    with pytest.raises(ValueError, match="computed a step twice"):
        ReplayPolicy([[(0, 0, 0)], [(0, 0, 1)]], 1)
    with pytest.raises(ValueError, match="^worker 2 is not one of the run's 2 workers$"):
        ReplayPolicy([[(2, 0, 0)]], 2)


@pytest.mark.parametrize(
    "mode, kwargs, message",
    [
        ("backup", {"num_workers": 2, "backup_workers": 2},
         "train.backup_workers=2 must be less than cluster.num_workers=2"),
        ("backup", {"backup_workers": -1}, "train.backup_workers: Input should be greater than or equal to 0"),
        ("ssp", {"staleness_bound": -1}, "train.staleness_bound: Input should be greater than or equal to 0"),
        ("local_sgd", {"local_steps": 0}, "train.local_steps: Input should be greater than or equal to 1"),
        ("async", {"num_steps": 0}, "train.steps: Input should be greater than or equal to 1"),
        ("sync", {"num_workers": 0}, "cluster.num_workers: Input should be greater than or equal to 1"),
        ("sync", {"staleness_bound": 1}, "train.staleness_bound=1 only applies to train.mode='ssp'"),
        ("async", {"backup_workers": 1}, "train.backup_workers=1 only applies to train.mode='backup'"),
        ("ssp", {"local_steps": 4}, "train.local_steps=4 only applies to train.mode='local_sgd'"),
        ("downpour", {}, "train.mode: Input should be 'sync', 'async', 'ssp', 'backup' or 'local_sgd'"),
    ],
)
def test_the_config_refuses_what_no_policy_can_run_naming_the_key(mode, kwargs, message):
    """make_policy trusts the validated config, so the config names the key of every mode parameter out of range."""
    args = {"num_workers": 3, "num_steps": 5, **kwargs}
    keys = {"num_workers": "cluster.num_workers", "num_steps": "train.steps"}
    overrides = [f"train.mode={mode}", *(f"{keys.get(key, 'train.' + key)}={value}" for key, value in args.items())]
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_config(*overrides)


def test_make_policy_builds_each_mode():
    built = {
        "sync": make_policy("sync", 3, 5),
        "async": make_policy("async", 3, 5),
        "ssp": make_policy("ssp", 3, 5, staleness_bound=2),
        "backup": make_policy("backup", 3, 5, backup_workers=1),
        "local_sgd": make_policy("local_sgd", 3, 5, local_steps=4),
    }
    assert [type(p) for p in built.values()] == [SyncPolicy, AsyncPolicy, SSPPolicy, BackupPolicy, LocalSGDPolicy]
    parameters = {"ssp": {"staleness_bound": 2}, "backup": {"backup_workers": 1}, "local_sgd": {"local_steps": 4}}
    assert {m: order_independent(lambda m=m: make_policy(m, 3, 5, **parameters.get(m, {}))) for m in built} == {
        "sync": True, "async": False, "ssp": False, "backup": False, "local_sgd": True
    }
    assert built["ssp"].staleness_bound == 2 and built["backup"].backup_workers == 1
    assert built["local_sgd"].local_steps == 4
    assert all(p.summary()["mode"] == m for m, p in built.items())
