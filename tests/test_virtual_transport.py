"""The virtual transport: its clock follows the time model on hand-computed cases, its numbers are the local
reference's bit for bit, its async schedule replays, and it scales to a thousand workers. No Ray.

The hand-computed cases use dyadic numbers (0.25, 0.125, ...), so every sum is exact and times compare with ==.
"""

from __future__ import annotations

import re
import statistics
import time

import pytest
import torch
from conftest import make_config

from sgd_dist.backends.base import server_args, worker_args
from sgd_dist.config import StragglersConfig
from sgd_dist.core.data import generate
from sgd_dist.core.time_model import TimeProfile
from sgd_dist.engine import worker as worker_module
from sgd_dist.engine.delays import extra_delay_s
from sgd_dist.engine.evaluations import eval_steps
from sgd_dist.engine.loop import Loop
from sgd_dist.engine.messages import EVALUATE, GRADIENT, LOCAL, Command, WorkerLost
from sgd_dist.engine.policies import ReplayPolicy, make_policy
from sgd_dist.engine.recovery import RECOVERY_POLL_S, LoopHooks
from sgd_dist.engine.server import ParameterServer
from sgd_dist.engine.worker import ShardWorker
from sgd_dist.transports.local import LocalServerEnd
from sgd_dist.transports.virtual import VirtualServerEnd

D, BATCH = 4, 16  # make_config: 3 features + bias, batch 16; float32, so a message of d values is 16 bytes
MSG_BYTES = D * 4



def exactly(message: str) -> str:
    """A ``match=`` pattern for exactly ``message``."""
    return "^" + re.escape(message) + "$"


def starting(message: str) -> str:
    """A ``match=`` pattern for a message that starts with ``message``."""
    return "^" + re.escape(message)

def profile(**coefficients) -> TimeProfile:
    """A profile that costs nothing but the given coefficients."""
    zeros = dict.fromkeys(("grad_s", "grad_s_per_elem", "local_s", "local_s_per_elem", "eval_s", "eval_s_per_elem",
                           "apply_s", "apply_s_per_param", "message_s", "message_s_per_byte", "replacement_s",
                           "restart_s"), 0.0)
    return TimeProfile(**{**zeros, **coefficients}, cores=2, source="tests", date="2026-12-01")


def make_workers(config) -> list[ShardWorker]:
    """Real shard workers that never sleep: the virtual transport models stragglers, the network and delays."""
    quiet = {"stragglers": None, "network": None, "delays": None}
    return [ShardWorker(**{**args, **quiet}) for args in worker_args(config)]


def started(num_workers: int, p: TimeProfile, **kwargs) -> VirtualServerEnd:
    """A virtual end over ``num_workers`` tiny workers with version 0 published at t = 0."""
    end = VirtualServerEnd(make_workers(make_config(f"cluster.num_workers={num_workers}")), p, **kwargs)
    end.publish(0, torch.zeros(D))
    return end


def gradient(step: int = 0, version: int = 0) -> Command:
    return Command(GRADIENT, step, version)


def arrivals(end: VirtualServerEnd, n: int) -> list[tuple[int, float]]:
    """(worker, the clock once the server has handled it) of the next ``n`` answers."""
    out = []
    for _ in range(n):
        arrival = end.receive()
        out.append((arrival.worker, end.now()))
    return out


# -- the clock, on hand-computed cases -------------------------------------------------------------------------

def test_one_worker_each_term_of_the_model_adds_up():
    p = profile(grad_s=0.25, grad_s_per_elem=2 ** -10, message_s=2 ** -5, message_s_per_byte=2 ** -8,
                apply_s=2 ** -4, apply_s_per_param=2 ** -6)
    latency, bandwidth = 0.125, 512.0
    end = started(1, p, latency_s=latency, bandwidth_bps=bandwidth)
    wire = MSG_BYTES * 8 / bandwidth  # 0.25 s on the server's link
    compute = 0.25 + 2 ** -10 * BATCH * D
    handle, update = 2 ** -5 + 2 ** -8 * MSG_BYTES, 2 ** -4 + 2 ** -6 * D
    assert end.now() == 0.0  # the first publish is the start, not an update
    end.send(0, gradient())
    first = end.receive()
    arrived = wire + latency + compute + latency + wire
    assert end.now() == arrived + handle
    assert first.seconds == compute  # the worker's own time, as real transports report it
    end.publish(1, torch.ones(D))
    assert end.now() == arrived + handle + update
    end.send(0, gradient(1, 1))
    end.receive()
    assert end.now() == 2 * (arrived + handle) + update


def test_an_answer_is_computed_for_real_on_the_weights_it_was_sent_with():
    config = make_config("cluster.num_workers=1")
    end = VirtualServerEnd(make_workers(config), profile(grad_s=1.0))
    weights = torch.tensor([0.5, -0.5, 1.0, 0.25])
    end.publish(0, weights)
    weights.add_(7.0)  # the server updates in place after publishing
    end.send(0, gradient(3))
    reference = make_workers(config)[0].execute(gradient(3), torch.tensor([0.5, -0.5, 1.0, 0.25]))
    arrival = end.receive()
    assert torch.equal(arrival.grad, reference.grad) and arrival.loss == reference.loss
    assert (arrival.step, arrival.count) == (3, BATCH)


def test_two_workers_with_known_compute_times_arrive_in_the_order_of_their_times():
    handle = 0.0625
    end = started(2, profile(grad_s=0.25, message_s=handle), speed_factors=[3.0, 1.0])
    end.send(0, gradient())
    end.send(1, gradient())
    assert arrivals(end, 2) == [(1, 0.25 + handle), (0, 0.75 + handle)]


def test_the_server_handles_answers_one_at_a_time():
    handle = 0.5  # longer than the gap between the two answers: the second waits for the first's handling
    end = started(2, profile(grad_s=0.25, message_s=handle), speed_factors=[1.0, 2.0])
    end.send(0, gradient())
    end.send(1, gradient())
    assert arrivals(end, 2) == [(0, 0.25 + handle), (1, 0.25 + handle + handle)]


def test_messages_queue_on_the_servers_link_in_both_directions():
    # both commands leave at t = 0: the second queues behind the first on the egress. Worker 0 computes twice as
    # long, so both answers reach the ingress at t = 1.0: the second queues behind the first there.
    latency, wire, compute = 0.125, 0.25, 0.25
    end = started(2, profile(grad_s=compute), latency_s=latency, bandwidth_bps=MSG_BYTES * 8 / wire,
                  speed_factors=[2.0, 1.0])
    end.send(0, gradient())
    end.send(1, gradient())
    reach_ingress = wire + latency + 2 * compute + latency
    assert reach_ingress == 2 * wire + latency + compute + latency == 1.0
    assert [t for _, t in arrivals(end, 2)] == [reach_ingress + wire, reach_ingress + 2 * wire]


def test_workers_on_the_servers_node_skip_the_network():
    latency, wire, compute = 0.125, 0.25, 0.25
    end = started(3, profile(grad_s=compute), latency_s=latency, bandwidth_bps=MSG_BYTES * 8 / wire,
                  workers_per_node=2)
    for r in (2, 0, 1):  # worker 2 (node 1) first: its command occupies the link, not the others'
        end.send(r, gradient())
    assert arrivals(end, 3) == [(0, compute), (1, compute), (2, wire + latency + compute + latency + wire)]


def test_three_equal_jobs_on_two_cores_finish_at_one_and_a_half_times_their_work():
    end = started(3, profile(grad_s=0.25), cores=2)
    for r in range(3):
        end.send(r, gradient())
    assert [t for _, t in arrivals(end, 3)] == [pytest.approx(0.375, rel=1e-15)] * 3
    alone = started(3, profile(grad_s=0.25))  # no cores given: a core each
    for r in range(3):
        alone.send(r, gradient())
    assert [t for _, t in arrivals(alone, 3)] == [0.25] * 3


def test_processor_sharing_with_unequal_jobs_and_the_working_server():
    # one core. t = 0..0.5: both workers at half speed, worker 0's 0.25 s of work done at 0.5. Then the server
    # handles it (0.25 s of work) beside worker 1, both at half speed: done at 1.0, when worker 1 has 0.5 s of
    # its 1.0 s done; alone, it ends at 1.5, and the server handles its answer alone by 1.75.
    end = started(2, profile(grad_s=0.25, message_s=0.25), cores=1, speed_factors=[1.0, 4.0])
    end.send(0, gradient())
    end.send(1, gradient())
    first, second = end.receive(), end.receive()
    assert (first.worker, second.worker) == (0, 1) and end.now() == pytest.approx(1.75, rel=1e-15)
    assert first.seconds == pytest.approx(0.5, rel=1e-15) and second.seconds == pytest.approx(1.5, rel=1e-15)


def test_a_stragglers_wait_holds_no_core_and_scales_with_its_contended_compute_time():
    # one core. Both compute at half speed until worker 0's 0.25 s of work is done at 0.5 (an elapsed 0.5 s), then
    # worker 0 waits its slowdown's 3 x 0.5 s without a core while worker 1 finishes its 1.0 s alone, at 1.25.
    cfg = StragglersConfig(slowdown={0: 4.0})
    end = started(2, profile(grad_s=0.25), cores=1, speed_factors=[1.0, 4.0], stragglers=cfg)
    end.send(0, gradient())
    end.send(1, gradient())
    assert [(w, pytest.approx(t, rel=1e-15)) for w, t in arrivals(end, 2)] == [(1, 1.25), (0, 2.0)]


def test_an_injected_delay_shifts_that_one_answer_once():
    end = started(2, profile(grad_s=0.25), delays={1: {2: 0.5}})
    got = []
    for step in range(4):
        sent = end.now()
        end.send(0, gradient(step))
        end.send(1, gradient(step))
        got.append([(r, t - sent) for r, t in arrivals(end, 2)])
    assert got == [[(0, 0.25), (1, 0.25)]] * 2 + [[(0, 0.25), (1, 0.75)]] + [[(0, 0.25), (1, 0.25)]]


def test_a_straggler_and_a_keyed_delay_shift_exactly_that_workers_arrivals():
    p, compute = profile(grad_s=0.25), 0.25
    cfg = StragglersConfig(slowdown={1: 4.0}, delay="exponential", delay_ms=100.0, delay_workers=(1,), seed=3)
    plain, slow = started(2, p), started(2, p, stragglers=cfg)

    for step in range(4):
        got = {}
        for name, end in (("plain", plain), ("slow", slow)):
            sent, got[name] = end.now(), {}
            end.send(0, gradient(step))
            end.send(1, gradient(step))
            for _ in range(2):
                a = end.receive()
                got[name][a.worker] = (end.now() - sent, a.seconds)
        extra = extra_delay_s(cfg, 1, step, compute)  # the real workers' sleep, from the modelled compute time
        assert extra > 3 * compute  # the slowdown's 3 x compute plus a positive delay
        assert got["slow"][0] == got["plain"][0] == (compute, compute)  # worker 0 is untouched
        assert got["slow"][1][0] == pytest.approx(compute + extra, rel=1e-12)
        assert got["slow"][1][1] == pytest.approx(compute + extra, rel=1e-12)
        assert got["plain"][1] == (compute, compute)
    assert len({extra_delay_s(cfg, 1, s, compute) for s in range(4)}) == 4  # keyed by step: four different delays


def test_an_evaluation_costs_its_own_time_and_its_answer_is_8_bytes():
    latency, bandwidth = 0.0, 128.0  # 16 bytes take 1 s, 8 bytes 0.5 s
    end = started(1, profile(eval_s=0.25, eval_s_per_elem=2 ** -11), latency_s=latency, bandwidth_bps=bandwidth)
    end.send(0, Command(EVALUATE, version=0), torch.zeros(D))
    arrival = end.receive()
    assert arrival.count == 512 and end.now() == 1.0 + 0.25 + 2 ** -11 * 512 * D + 0.5


def test_a_local_command_costs_its_steps():
    config = make_config("cluster.num_workers=1", "train.mode=local_sgd", "train.local_steps=3")
    end = VirtualServerEnd(make_workers(config), profile(local_s=0.25, local_s_per_elem=2 ** -8))
    end.publish(0, torch.zeros(D))
    end.send(0, Command(LOCAL, 0, 0, local_steps=3))
    assert end.receive().count == 3 * BATCH and end.now() == 3 * (0.25 + 2 ** -8 * BATCH * D)


def test_a_lost_worker_is_noticed_when_it_dies_and_replaced_after_the_replacement_time():
    end = started(2, profile(grad_s=0.25, replacement_s=0.5), speed_factors=[1.0, 2.0])
    end.send(0, gradient())
    end.send(1, gradient())
    end.lose(1, at_s=0.125)
    with pytest.raises(WorkerLost) as lost:
        end.receive()
    assert lost.value.worker == 1 and end.now() == 0.125
    end.forget(1)
    ready = end.start_replacement(1)
    assert not ready()
    assert end.receive().worker == 0 and end.now() == 0.25  # the others go on
    polls = []
    while not ready():
        assert end.receive(timeout=0.125) is None  # worker 1's lost command never answers
        polls.append(end.now())
    assert polls == [0.375, 0.5, 0.625] and 0.625 == 0.125 + 0.5
    end.send(1, gradient())
    assert arrivals(end, 1) == [(1, 0.625 + 2 * 0.25)]


def test_a_lost_worker_stops_computing_when_it_dies():
    # one core, two jobs of 1.0 s: at half speed each until worker 1 dies at 0.5; then worker 0 has the core alone
    end = started(2, profile(grad_s=0.25), cores=1, speed_factors=[4.0, 4.0])
    end.send(0, gradient())
    end.send(1, gradient())
    end.lose(1, at_s=0.5)
    with pytest.raises(WorkerLost):
        end.receive()
    assert arrivals(end, 1) == [(0, pytest.approx(1.25, rel=1e-15))]  # not forgotten yet, still never answers
    assert end.receive(timeout=10.0) is None


def test_a_worker_lost_while_idle_is_noticed_when_it_is_next_sent_a_command():
    end = started(2, profile(grad_s=0.25, replacement_s=1.0))
    end.send(0, gradient())
    end.lose(1)  # idle: the server waits for nothing of it, so nothing shows the loss yet
    assert end.receive().worker == 0 and end.now() == 0.25
    end.send(1, gradient(1))
    with pytest.raises(WorkerLost) as lost:
        end.receive()
    assert lost.value.worker == 1 and end.now() == 0.25


def test_a_command_sent_to_a_dead_worker_is_lost_until_its_replacement_is_up():
    end = started(2, profile(grad_s=0.25, replacement_s=1.0))
    end.send(1, gradient())
    end.lose(1)
    with pytest.raises(WorkerLost):
        end.receive()
    end.forget(1)
    end.send(1, gradient())
    assert end.receive(timeout=10.0) is None and end.now() == 10.0
    ready = end.start_replacement(1)
    assert end.receive(timeout=1.0) is None and ready()
    end.send(1, gradient())
    assert arrivals(end, 1) == [(1, 11.25)]


def test_receive_with_nothing_in_flight_refuses_to_wait_forever():
    end = started(1, profile(grad_s=0.25))
    assert end.receive(timeout=0.5) is None and end.now() == 0.5
    with pytest.raises(RuntimeError, match="no command in flight"):
        end.receive()


def test_bad_arguments_and_sleeping_workers_are_refused():
    workers = make_workers(make_config())
    with pytest.raises(ValueError, match=starting("cores must be >= 1")):
        VirtualServerEnd(workers, profile(), cores=0)
    with pytest.raises(ValueError, match=exactly("speed_factors needs one factor per worker (2), got 1")):
        VirtualServerEnd(workers, profile(), speed_factors=[1.0])
    with pytest.raises(ValueError, match=exactly("speed_factors must each be > 0 (got 0.0)")):
        VirtualServerEnd(workers, profile(), speed_factors=[1.0, 0.0])
    with pytest.raises(ValueError, match=starting("bandwidth_bps must be > 0")):
        VirtualServerEnd(workers, profile(), bandwidth_bps=0.0)
    sleeping = [ShardWorker(**worker_args(make_config("stragglers.slowdown={1: 2.0}"))[1])]
    with pytest.raises(ValueError, match=starting("worker 1 was built with stragglers, a network or delays")):
        VirtualServerEnd(sleeping, profile())


# -- the numbers, through the real loop ------------------------------------------------------------------------

def run_loop(config, end, policy=None, hooks=None, eval_at=None):
    """The Loop over ``end``; returns the rows, the final weights and the loop's statistics."""
    server = ParameterServer(**server_args(config))
    rows: list[dict] = []
    train = config.train
    policy = policy or make_policy(train.mode, config.cluster.num_workers, train.steps, local_steps=train.local_steps)
    eval_at = eval_steps(train.steps, train.eval_every) if eval_at is None else eval_at
    stats = Loop(server, end, policy, config.cluster.num_workers, eval_at, rows.extend, hooks=hooks).run()
    return rows, server.weights, stats


def numbers(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("wall_time_s", "answer_s")} for row in rows]


def uneven(workers, **kwargs) -> VirtualServerEnd:
    """A virtual cluster where arrivals come out of order: mixed speeds, a network, shared cores."""
    p = profile(grad_s=1e-3, grad_s_per_elem=1e-6, local_s=1e-3, eval_s=2e-3, apply_s=1e-4, message_s=1e-5)
    return VirtualServerEnd(workers, p, latency_s=1e-3, bandwidth_bps=1e6, workers_per_node=1, cores=2,
                            speed_factors=[2.5, 1.0, 4.0][:len(workers)], **kwargs)


@pytest.mark.parametrize("overrides", [("train.mode=sync",), ("train.mode=local_sgd", "train.local_steps=3"),
                                       ("train.mode=sync", "optim.momentum=0.9", "data.dtype=float64")])
def test_synchronous_runs_equal_the_local_reference_bit_for_bit(overrides):
    config = make_config("cluster.num_workers=3", *overrides)
    local_rows, local_w, _ = run_loop(config, LocalServerEnd(make_workers(config)))
    end = uneven(make_workers(config))
    rows, weights, _ = run_loop(config, end)
    assert numbers(rows) == numbers(local_rows) and torch.equal(weights, local_w)
    assert sum(r.get("eval_loss") is not None for r in rows) == 5
    assert end.now() > 0


def test_async_staleness_follows_the_modelled_timing():
    # worker 0 computes 1 s, worker 1 3 s, the server takes 0.25 s an answer. By hand (t: arrival -> handled):
    # w0 1 -> 1.25 (v0, update 1), w0 2.25 -> 2.5 (v1), w1 3 -> 3.25 (v0: staleness 2), w0 3.5 -> 3.75 (v2: 1),
    # w0 4.75 -> 5 (v4: 0), w0 6 -> 6.25 (v5: 0), w1 6.25 -> 6.5 (v3: 3), w0 7.25 -> 7.5 (v6: 1),
    # w0 8.5 -> 8.75 (v8: 0), w1 9.5 -> 9.75 (v7: 2), w0 9.75 -> 10 (v9: 1), w1 12.75 -> 13 (v10: 1).
    config = make_config("train.mode=async", "train.steps=12")
    end = VirtualServerEnd(make_workers(config), profile(grad_s=1.0, message_s=0.25), speed_factors=[1.0, 3.0])
    rows, _, stats = run_loop(config, end, eval_at=frozenset())
    got = [(r["applied"][0][0], r["staleness"]) for r in rows[1:]]
    assert got == [(0, 0), (0, 0), (1, 2), (0, 1), (0, 0), (0, 0), (1, 3), (0, 1), (0, 0), (1, 2), (0, 1), (1, 1)]
    assert end.now() == 13.0
    assert stats["staleness"] == {0: 5, 1: 4, 2: 2, 3: 1}


def test_an_async_virtual_run_replays_bit_for_bit_on_the_local_transport():
    config = make_config("cluster.num_workers=3", "train.mode=async", "train.steps=40")
    cfg = StragglersConfig(slowdown={2: 3.0}, delay="exponential", delay_ms=2.0, seed=5)
    rows, weights, stats = run_loop(config, uneven(make_workers(config), stragglers=cfg))
    schedule = [row["applied"] for row in rows[1:]]
    plain_rows, _, _ = run_loop(config, LocalServerEnd(make_workers(config)))
    assert schedule != [row["applied"] for row in plain_rows[1:]]  # the model's timing changed the order
    assert max(stats["staleness"]) >= 3
    replay = ReplayPolicy(schedule, 3, dropped=stats["dropped"])
    again_rows, again_w, _ = run_loop(config, LocalServerEnd(make_workers(config)), policy=replay)
    assert numbers(again_rows) == numbers(rows) and torch.equal(again_w, weights)


def test_the_loop_replaces_a_lost_worker_after_the_replacement_time():
    config = make_config("train.mode=sync", "train.steps=12")
    p = profile(grad_s=0.25, replacement_s=2.0)
    plain = VirtualServerEnd(make_workers(config), p)
    plain_rows, plain_w, _ = run_loop(config, plain, eval_at=frozenset())
    end = VirtualServerEnd(make_workers(config), p)
    faults: list[dict] = []
    hooks = LoopHooks(recover=end.start_replacement, on_fault=faults.append,
                      on_update=lambda version: end.lose(1) if version == 5 else None)
    rows, weights, _ = run_loop(config, end, hooks=hooks, eval_at=frozenset())
    assert [f["fault"] for f in faults] == ["worker_lost", "worker_replaced"] and faults[0]["step"] == 5
    assert numbers(rows) == numbers(plain_rows) and torch.equal(weights, plain_w)
    # the step the worker was lost in took the replacement's time on top, to the loop's next poll
    assert plain.now() == 12 * 0.25
    assert 2.0 <= end.now() - plain.now() <= 2.0 + RECOVERY_POLL_S * 1.001


def test_a_thousand_workers_run_async_with_staleness_about_k_minus_1(monkeypatch):
    k, steps = 1024, 2000
    config = make_config(f"cluster.num_workers={k}", "data.n_samples=2048", "data.n_features=2",
                         "train.batch_size=2", "train.mode=async", f"train.steps={steps}", "train.eval_every=0")
    # every shard would draw a whole generation block of its own (seconds for 1,024 workers): draw the dataset once
    # and hand out slices, which are the shards bit for bit
    X, y = generate(config.data)
    monkeypatch.setattr(worker_module, "generate", lambda data, start, stop, device: (X[start:stop], y[start:stop]))
    p = profile(grad_s=1e-3, grad_s_per_elem=1e-8, eval_s=1e-3, apply_s=2e-6, message_s=1e-6)
    cfg = StragglersConfig(delay="exponential", delay_ms=0.5, seed=1)
    t0 = time.perf_counter()
    end = VirtualServerEnd(make_workers(config), p, stragglers=cfg)
    rows, _, stats = run_loop(config, end)
    ages = [r["staleness"] for r in rows[1:]]
    print(f"\nK={k}, {steps} async updates: {time.perf_counter() - t0:.2f} s here, {end.now():.4f} s virtual; "
          f"median staleness {statistics.median(ages)} overall, {statistics.median(ages[k:])} after the first "
          f"{k} updates (K - 1 = {k - 1})")
    assert len(rows) == steps + 1 and sum(stats["staleness"].values()) == steps
    assert abs(statistics.median(ages[k:]) - (k - 1)) <= 0.05 * k
