"""The sync policy as a plain state machine, and the schedule loop on the serial backend. No Ray."""

from __future__ import annotations

import itertools
import random

import pytest

from sgd_dist.consistency import Apply, Dispatch, SyncPolicy, make_policy


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
    with pytest.raises(ValueError, match="allowed: 'sync'"):
        make_policy("hogwild", 2, 3)
    assert isinstance(make_policy("sync", 2, 3), SyncPolicy)


def test_all_arrival_orders_of_one_step():
    for perm in itertools.permutations(range(3)):
        policy = SyncPolicy(3, 2)
        policy.start()
        out = [policy.on_gradient(r, 0) for r in perm]
        assert out[:2] == [[], []] and out[2][0] == Apply(((0, 0), (1, 0), (2, 0)))
