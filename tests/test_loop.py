"""The server's loop and its collaborators, each on the local transport (no Ray): evaluation scheduling, worker
recovery, the checkpoint codec, slot views, the rows' delivery, and the loop's one clock."""

from __future__ import annotations

import io
from dataclasses import replace

import pytest
import torch
from conftest import make_config

import sgd_dist.engine.loop as loop_module
from sgd_dist.backends.base import server_args, worker_args
from sgd_dist.core.data import generate
from sgd_dist.core.time_model import TimeProfile
from sgd_dist.engine.evaluations import Evaluations, eval_steps
from sgd_dist.engine.held import HeldAnswers
from sgd_dist.engine.loop import Loop, RowDelivery
from sgd_dist.engine.messages import EVALUATE, GRADIENT, Arrival, Command, WorkerLost
from sgd_dist.engine.policies import ReplayPolicy, make_policy
from sgd_dist.engine.recovery import MAX_REPLACEMENTS, RECOVERY_POLL_S, LoopHooks, Recoveries
from sgd_dist.engine.server import ParameterServer
from sgd_dist.engine.state import LoopState, Tally, decode, encode
from sgd_dist.engine.worker import ShardWorker
from sgd_dist.transports.local import LocalServerEnd
from sgd_dist.transports.virtual import VirtualServerEnd


def workers_of(config) -> list[ShardWorker]:
    return [ShardWorker(**args) for args in worker_args(config)]


def run_loop(config, end, policy=None, eval_at=None, hooks=None, restore=None):
    """A Loop over ``end`` from a fresh server; returns the rows, the final weights and the loop's statistics."""
    server = ParameterServer(**server_args(config))
    rows: list[dict] = []
    train = config.train
    policy = policy or make_policy(train.mode, config.cluster.num_workers, train.steps)
    eval_at = eval_steps(train.steps, train.eval_every) if eval_at is None else eval_at
    stats = Loop(server, end, policy, config.cluster.num_workers, eval_at, rows.extend, hooks=hooks,
                 restore=restore).run()
    return rows, server.weights, stats


def numbers(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("wall_time_s", "answer_s")} for row in rows]


def through_disk(state: dict) -> dict:
    """``state`` saved and loaded back as a checkpoint file is (tensors and plain values only)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# -- eval_steps and Evaluations ----------------------------------------------------------------------------------

def test_eval_steps_are_the_start_every_n_and_the_last():
    assert eval_steps(23, 5) == {0, 5, 10, 15, 20, 23}
    assert eval_steps(20, 5) == {0, 5, 10, 15, 20}
    assert eval_steps(7, 0) == {0, 7}


def test_an_evaluation_is_the_whole_datasets_loss_on_the_snapshot_taken_when_it_started():
    config = make_config("cluster.num_workers=3", "optim.weight_decay=0.1")
    end = LocalServerEnd(workers_of(config))
    weights = torch.tensor([0.5, -0.25, 1.0, 0.125])
    end.publish(0, weights)
    evaluations = Evaluations(3, weight_decay=0.1)
    evaluations.start(0, weights)
    evaluations.start(1, weights + 1)
    snapshot = weights.clone()
    weights.add_(7.0)  # the server updates in place: the evaluation keeps its own snapshot
    assert evaluations.pending and evaluations.oldest() == 0 and all(evaluations.owes(r) for r in range(3))
    finished = []
    for r in (2, 0, 1):  # out of worker order: the sum is still taken in worker order
        version = evaluations.next_owed(r)
        assert version == 0
        end.send(r, Command(EVALUATE, version=version), evaluations.snapshot(version))
        finished.append(evaluations.record(end.receive()))
    assert finished[:2] == [None, None]
    version, fields = finished[2]
    X, y = generate(config.data)
    x64, y64, w64 = X.double(), y.double(), snapshot.double()
    expected_loss = ((x64 @ w64 - y64) ** 2).mean().item()
    assert version == 0 and fields["eval_loss"] == pytest.approx(expected_loss, rel=1e-12)
    assert fields["eval_penalty"] == pytest.approx(0.05 * (w64 @ w64).item(), rel=1e-12)
    assert evaluations.oldest() == 1 and all(evaluations.next_owed(r) == 1 for r in range(3))
    assert all(evaluations.next_owed(r) is None for r in range(3)) and evaluations.pending  # sent, not yet in


# -- Recoveries ------------------------------------------------------------------------------------------------

class _ClockedEnd(LocalServerEnd):
    """The local transport on a clock the test sets, recording the workers it was told to forget."""

    def __init__(self, workers) -> None:
        super().__init__(workers)
        self.t, self.forgotten = 0.0, []

    def now(self) -> float:
        return self.t

    def forget(self, worker: int) -> None:
        self.forgotten.append(worker)


def test_a_lost_worker_is_noticed_polled_and_sent_its_lost_command_again_on_the_newest_weights():
    end = _ClockedEnd(workers_of(make_config()))
    up, faults = [False], []
    recoveries = Recoveries(LoopHooks(recover=lambda r: lambda: up[0], on_fault=faults.append), end, 2)
    busy = {0: Command(EVALUATE, version=2), 1: Command(GRADIENT, step=4, version=3)}
    end.t = 10.0
    recoveries.notice(WorkerLost("worker 1 died", 1), busy, step=3, answers=7)
    assert recoveries and end.forgotten == [1]
    assert {k: faults[0][k] for k in ("fault", "worker", "step", "cause")} == {
        "fault": "worker_lost", "worker": 1, "step": 3, "cause": "worker 1 died"}
    sent = []
    recoveries.resume(5, 9, lambda r, command: sent.append((r, command)))
    assert sent == [] and recoveries  # not up yet: polled again later
    up[0], end.t = True, 12.5
    recoveries.resume(5, 9, lambda r, command: sent.append((r, command)))
    assert sent == [(1, Command(GRADIENT, step=4, version=5))] and not recoveries
    assert faults[1] == {"fault": "worker_replaced", "worker": 1, "step": 5, "lost_step": 3, "recovery_s": 2.5,
                         "answers_meanwhile": 2, "redone": {"kind": GRADIENT, "step": 4, "version": 3}}
    recoveries.notice(WorkerLost("worker 0 died", 0), busy, step=5, answers=9)
    recoveries.resume(6, 9, lambda r, command: sent.append((r, command)))
    assert sent[-1] == (0, Command(EVALUATE, version=2))  # an evaluation is redone on its own version
    assert recoveries.summary() == {0: 1, 1: 1}


def test_a_loss_the_loop_cannot_recover_from_is_raised():
    end = _ClockedEnd(workers_of(make_config()))
    lost = WorkerLost("worker 1 died", 1)
    busy = {1: Command(GRADIENT)}
    with pytest.raises(WorkerLost) as raised:  # no recover hook
        Recoveries(LoopHooks(), end, 2).notice(lost, busy, 0, 0)
    assert raised.value is lost
    recoveries = Recoveries(LoopHooks(recover=lambda r: lambda: True), end, 2)
    with pytest.raises(WorkerLost) as raised:  # no command in flight: nothing to redo
        recoveries.notice(lost, {}, 0, 0)
    assert raised.value is lost
    for _ in range(MAX_REPLACEMENTS):
        recoveries.notice(lost, busy, 0, 0)
    with pytest.raises(WorkerLost, match=r"^worker 1 died: lost 4 times, replaced 3 times \(the limit\)"):
        recoveries.notice(lost, busy, 0, 0)
    assert end.forgotten == [1] * MAX_REPLACEMENTS


# -- the checkpoint codec --------------------------------------------------------------------------------------

def test_the_loop_state_survives_a_checkpoint_file_whole():
    server = ParameterServer(**server_args(make_config("optim.momentum=0.9")))
    server.update([Arrival(0, GRADIENT, 0, 0, torch.tensor([1.0, 2, 3, 4]), 0.5, 16, 0.01)])
    grad = torch.tensor([0.25, -1.0, 0.0, 2.0])
    held = Arrival(1, GRADIENT, 3, 1, grad, 0.75, 16, 0.02)
    state = LoopState(
        server=server.state_dict(), elapsed_s=4.5, policy={"version": 1, "arrived": [[1, 3]]},
        busy={1: Command(GRADIENT, 4, 1), 0: Command(EVALUATE, 0, 1)}, held=[held],
        tally=Tally(staleness={0: 3, 2: 1}, dropped=[[0, 2, 0, 1]], answer_s={0: [0.01, 0.03], 1: [0.02]}),
        replacements={0: 0, 1: 2})
    checkpoint = encode(state)
    grad.add_(1.0)  # the loop goes on with its own tensors: the checkpoint has copies
    back = decode(through_disk(checkpoint), num_workers=2)
    assert torch.equal(back.held[0].grad, torch.tensor([0.25, -1.0, 0.0, 2.0]))
    assert replace(back.held[0], grad=None) == replace(held, grad=None)
    assert back.busy == {0: Command(EVALUATE, 0, 1), 1: Command(GRADIENT, 4, 1)}
    assert (back.elapsed_s, back.policy, back.tally, back.replacements) == (
        4.5, state.policy, state.tally, state.replacements)
    assert torch.equal(back.server["weights"], server.weights) and back.server["step"] == 1
    assert torch.equal(back.server["optimizer"]["momentum_buffer"], server.optimizer_state["momentum_buffer"])


def test_a_loop_restored_from_its_checkpoint_goes_on_as_if_it_had_never_stopped():
    config = make_config("optim.momentum=0.9", "train.steps=30", "train.eval_every=5", "train.checkpoint_every=10")
    checkpoints: list[dict] = []
    hooks = LoopHooks(checkpoint_every=10, on_checkpoint=lambda state: checkpoints.append(through_disk(state)))
    rows, weights, stats = run_loop(config, LocalServerEnd(workers_of(config)), hooks=hooks)
    assert [c["server"]["step"] for c in checkpoints] == [10, 20, 30]
    again, again_w, again_stats = run_loop(config, LocalServerEnd(workers_of(config)), restore=checkpoints[0])
    assert numbers(again) == numbers(rows[11:]) and torch.equal(again_w, weights)
    assert again_stats["staleness"] == stats["staleness"] == {0: 60}


# -- slot views ------------------------------------------------------------------------------------------------

class _SlotEnd(LocalServerEnd):
    """The local transport handing out gradients the way shm does: each one a view of its worker's one slot,
    which the worker's next command overwrites."""

    views = True

    def __init__(self, workers) -> None:
        super().__init__(workers)
        self.slots: dict[int, torch.Tensor] = {}

    def send(self, worker, command, weights=None):
        super().send(worker, command, weights)
        answer = self._answers[-1]
        if answer.grad is not None:
            slot = self.slots.setdefault(worker, torch.empty_like(answer.grad))
            slot.copy_(answer.grad)  # the worker writes its answer into its slot
            self._answers[-1] = replace(answer, grad=slot.view_as(slot))


def test_a_held_slot_view_is_cloned_before_its_workers_next_command_and_only_then():
    end = _SlotEnd(workers_of(make_config()))
    end.publish(0, torch.tensor([0.5, -0.5, 1.0, 0.0]))
    held = HeldAnswers(end.views)
    end.send(0, Command(GRADIENT, 0, 0))
    first = end.receive()
    expected = first.grad.clone()
    held.hold(first)
    held.before_send(0)
    end.send(0, Command(GRADIENT, 1, 0))
    second = end.receive()
    assert not torch.equal(end.slots[0], expected)  # the slot was overwritten...
    assert torch.equal(held.take([(0, 0)])[0].grad, expected)  # ...but not the held answer
    held.hold(second)
    held.before_send(1)  # another worker's command leaves this one's slot alone
    assert held.take([(0, 1)])[0].grad.data_ptr() == end.slots[0].data_ptr()  # applied in place: never copied


def test_a_replay_that_holds_answers_across_commands_is_the_same_on_slot_views():
    # worker 1's step 0 waits for update 2 while worker 1 computes step 1 on version 1: its slot is overwritten
    schedule = [[[0, 0, 0]], [[1, 1, 1], [1, 0, 0]], [[0, 1, 1]]]
    config = make_config("train.steps=3")
    rows_of = {}
    for name, end in (("local", LocalServerEnd(workers_of(config))), ("slots", _SlotEnd(workers_of(config)))):
        rows_of[name] = run_loop(config, end, policy=ReplayPolicy(schedule, 2), eval_at=frozenset())
    (local_rows, local_w, _), (slot_rows, slot_w, _) = rows_of["local"], rows_of["slots"]
    assert [r["applied"] for r in slot_rows[1:]] == schedule
    assert numbers(slot_rows) == numbers(local_rows) and torch.equal(slot_w, local_w)


# -- the rows' delivery to the driver ------------------------------------------------------------------------

def test_rows_go_to_the_driver_in_order_each_after_its_evaluation(monkeypatch):
    monkeypatch.setattr(loop_module, "DELIVER_TO_DRIVER_EVERY_S", 1e9)  # only forced deliveries
    batches: list[list[int]] = []
    delivery = RowDelivery(lambda rows: batches.append([r["step"] for r in rows]))
    for step in range(6):
        delivery.add({"step": step})
    delivery.deliver(waiting=None)
    assert batches == []  # not due yet
    delivery.deliver(waiting=3, force=True)
    delivery.fill(3, {"eval_loss": 0.5})
    delivery.deliver(waiting=None, force=True)
    assert batches == [[0, 1, 2], [3, 4, 5]] and delivery.rows == []


def test_after_a_failed_delivery_no_later_row_follows():
    calls = []

    def emit(rows):
        calls.append([r["step"] for r in rows])
        raise OSError("disk full")

    delivery = RowDelivery(emit)
    delivery.add({"step": 0})
    with pytest.raises(OSError):
        delivery.deliver(None, force=True)
    delivery.add({"step": 1})
    delivery.deliver(None, force=True)  # the loop's last delivery, on its way out
    assert calls == [[0]]


# -- the clock ---------------------------------------------------------------------------------------------------

def _profile(**coefficients) -> TimeProfile:
    zeros = dict.fromkeys(("grad_s", "grad_s_per_elem", "local_s", "local_s_per_elem", "eval_s", "eval_s_per_elem",
                           "apply_s", "apply_s_per_param", "message_s", "message_s_per_byte", "replacement_s",
                           "restart_s"), 0.0)
    return TimeProfile(**{**zeros, **coefficients}, cores=2, source="tests", date="2026-12-01")


def test_every_time_the_loop_records_is_read_from_its_transports_clock():
    """A virtual cluster where each sync step takes 0.25 s and a replacement 2 s: the rows, the checkpoints and
    the recovery carry those virtual seconds, not this machine's."""
    config = make_config("train.steps=12")
    quiet = {"stragglers": None, "network": None, "delays": None}
    end = VirtualServerEnd([ShardWorker(**{**a, **quiet}) for a in worker_args(config)],
                           _profile(grad_s=0.25, replacement_s=2.0))
    checkpoints, faults = [], []
    hooks = LoopHooks(recover=end.start_replacement, on_fault=faults.append, checkpoint_every=4,
                      on_checkpoint=checkpoints.append, on_update=lambda v: end.lose(1) if v == 9 else None)
    rows, _, _ = run_loop(config, end, eval_at=frozenset(), hooks=hooks)
    replaced = faults[1]
    assert replaced["fault"] == "worker_replaced"
    assert 2.0 <= replaced["recovery_s"] <= 2.0 + RECOVERY_POLL_S * 1.001
    late = replaced["recovery_s"]  # steps 10 on waited for the replacement
    assert [r["wall_time_s"] for r in rows] == pytest.approx(
        [0.25 * s for s in range(10)] + [0.25 * s + late for s in range(10, 13)], abs=1e-12)
    assert [c["server"]["step"] for c in checkpoints] == [4, 8, 12]
    assert [c["elapsed_s"] for c in checkpoints] == pytest.approx([1.0, 2.0, 3.0 + late], abs=1e-12)
