"""Compression and DiLoCo's outer step in whole runs: equal to plain-PyTorch references, bit-equal across backends and
transports, the bytes each row records are the bytes that travelled, and error feedback stays exact under faults.

The references here are written from the definitions (``plain_sgd``'s shards and mini-batch order are the only
inputs shared with the code under test; the compressors are ``test_compression``'s own references, and the outer
step is ``torch.optim.SGD``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import make_config
from plain_sgd import _init, _Shards, expected_lr
from test_compression import keyed, ref_int8, reference

from sgd_dist.backends.base import answer_payload_bytes, worker_args
from sgd_dist.config import COMPRESSION_KINDS, OUTER_OPTIMIZERS, ConfigError, build_config, dump_config
from sgd_dist.core import outer
from sgd_dist.core.compression import DOWN, KINDS, Compressed, decompress, payload_nbytes
from sgd_dist.core.outer import OUTER_OPTIMIZERS as CORE_OUTER_OPTIMIZERS
from sgd_dist.engine import worker as worker_module
from sgd_dist.engine.delays import round_trip_delay_s
from sgd_dist.engine.messages import EVALUATE, GRADIENT, Command
from sgd_dist.engine.server import ParameterServer
from sgd_dist.engine.worker import ShardWorker
from sgd_dist.run.replay import replay
from sgd_dist.run.rundir import read_metrics
from sgd_dist.run.trainer import train
from sgd_dist.transports.shm import Layout, ShmServerEnd, ShmWorkerEnd

WIDE = ("data.n_features=19",)  # d = 20: a top-k of 10 % keeps 2 coordinates
KIND_CASES = {  # id -> overrides: each kind once, the sparse ones under error feedback
    "fp16": ("compression.kind=fp16",),
    "bf16": ("compression.kind=bf16",),
    "int8": ("compression.kind=int8", "compression.bucket=8"),
    "topk-ef": ("compression.kind=topk", "compression.ratio=0.1", "compression.error_feedback=true"),
    "randk-ef": ("compression.kind=randk", "compression.ratio=0.25", "compression.error_feedback=true"),
    "randk": ("compression.kind=randk", "compression.ratio=0.25"),
    "topk-ef-down": ("compression.kind=topk", "compression.ratio=0.25", "compression.error_feedback=true",
                     "compression.down=true"),
    "int8-down": ("compression.kind=int8", "compression.bucket=8", "compression.down=true"),
    "randk-down": ("compression.kind=randk", "compression.ratio=0.5", "compression.down=true"),
}
TOPK_EF = KIND_CASES["topk-ef"]


def run(tmp_path, name: str, *overrides: str):
    return train(make_config(*overrides, f"output.dir={tmp_path / name}"), console=False, progress=False)


def numbers(run_dir) -> list[dict]:
    """Every recorded row but its time."""
    return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in read_metrics(run_dir)]


# -- the settings ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (("compression.kind=topk",), r"^compression\.kind=topk needs compression\.ratio"),
    (("compression.kind=randk", "compression.ratio=0"), r"^compression\.ratio must be in \(0, 1\]"),
    (("compression.kind=topk", "compression.ratio=1.5"), r"^compression\.ratio must be in \(0, 1\]"),
    (("compression.kind=int8", "compression.ratio=0.1"), r"^compression\.ratio applies to compression\.kind=topk or"),
    (("compression.kind=fp16", "compression.bucket=64"), r"^compression\.bucket applies to compression\.kind=int8"),
    (("compression.error_feedback=true",), r"^compression\.error_feedback needs a compression\.kind other than"),
    (("compression.kind=zip",), r"^compression\.kind: Input should be 'none', 'fp16'"),
    (("train.outer.optimizer=nesterov", "train.outer.momentum=0.9"), r"^train\.outer applies to train\.mode=local_sgd"),
    (("train.mode=local_sgd", "train.local_steps=2", "train.outer.optimizer=nesterov"),
     r"^train\.outer\.optimizer=nesterov needs train\.outer\.momentum in \(0, 1\)"),
    (("train.mode=local_sgd", "train.local_steps=2", "train.outer.momentum=0.5"),
     r"^train\.outer\.momentum=0\.5 applies to train\.outer\.optimizer=nesterov"),
    (("train.mode=local_sgd", "train.local_steps=2", "train.outer.lr=0"), r"^train\.outer\.lr: Input should be"),
])
def test_bad_compression_and_outer_settings_are_one_line_errors_naming_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        make_config(*overrides)
    assert "\n" not in str(error.value)


def test_the_kinds_and_outer_optimizers_have_one_home_in_the_config():
    assert KINDS is COMPRESSION_KINDS and CORE_OUTER_OPTIMIZERS is OUTER_OPTIMIZERS


def test_switching_the_kind_drops_the_old_kinds_keys_and_the_dump_reloads():
    raw = {"compression": {"kind": "topk", "ratio": 0.01}}
    assert build_config(raw, ["compression.kind=int8"]).compression.ratio is None
    for overrides in (["compression.kind=topk", "compression.ratio=0.01"], ["compression.kind=int8"], []):
        config = build_config({}, overrides)
        assert build_config(yaml.safe_load(dump_config(config))) == config


# -- equal to a plain-PyTorch reference -----------------------------------------------------------------------------

def plain_compressed(config, kind_key) -> tuple[list[float], torch.Tensor]:
    """Sync SGD or local SGD (with the outer step as torch.optim.SGD), each worker's answer compressed by the
    reference compressor, with a residual per worker under error feedback. float64."""
    c, train_cfg = config.compression, config.train
    local = train_cfg.local_steps if train_cfg.mode == "local_sgd" else 1
    shards, k, steps = _Shards(config), config.cluster.num_workers, train_cfg.steps
    total = sum(shards.rows)
    param = torch.nn.Parameter(_init(config))
    o = train_cfg.outer
    opt = torch.optim.SGD([param], lr=o.lr, momentum=o.momentum, nesterov=o.optimizer == "nesterov")
    residuals = [torch.zeros_like(param.data) for _ in range(k)]
    held = [torch.zeros_like(param.data) for _ in range(k)]  # compression.down: the weights each worker holds
    losses = []
    for t in range(steps):
        w = param.data.clone()
        answers, loss_sum, rows = [], 0.0, 0
        for r in range(k):
            if c.down:  # the delta to what it holds, compressed (a contraction: randk unscaled), added on both ends
                held[r] = held[r] + compress(kind_key, w - held[r], (train_cfg.seed, r, t * local, DOWN), c, True)
            v = start = held[r] if c.down else w
            for s in range(t * local, (t + 1) * local):
                grad, loss, m = shards.gradient(r, s, v)
                loss_sum, rows = loss_sum + loss * m, rows + m
                if local > 1:
                    v = v - expected_lr(config.optim, s, steps * local, total) * grad
            answer = start - v if local > 1 else grad
            if c.kind != "none":
                p = answer + residuals[r] if c.error_feedback else answer
                answer = compress(kind_key, p, (train_cfg.seed, r, t * local), c, c.error_feedback)
                residuals[r] = p - answer
            answers.append(answer)
        mean = sum(shards.rows[r] / total * answers[r] for r in range(k))
        if local > 1:
            param.grad = mean
            opt.step()
        else:
            param.data -= expected_lr(config.optim, t, steps, total) * mean
        losses.append(loss_sum / rows)
    return losses, param.data


def compress(kind_key: str, x: torch.Tensor, key: tuple, c, ef: bool) -> torch.Tensor:
    """What the reference compressor delivers for x (int8 with the runs' bucket of 8)."""
    if kind_key.startswith("int8"):
        return ref_int8(x, keyed(*key), bucket=8)
    return reference(c.kind, x, key, ratio=c.ratio or 0.1, ef=ef)


@pytest.mark.parametrize("kind", list(KIND_CASES))
def test_a_compressed_sync_run_equals_the_plain_reference(tmp_path, kind):
    """float64 data; the tolerance covers only the order of the gradient's sums (1e-15 relative, compounded)."""
    config = make_config(*WIDE, *KIND_CASES[kind], "data.dtype=float64", "cluster.backend=serial",
                         f"output.dir={tmp_path / 'run'}")
    result = train(config, console=False, progress=False)
    losses, weights = plain_compressed(config, kind)
    rows = [r for r in read_metrics(result.run_dir) if r["step"] > 0]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in rows]), torch.tensor(losses), rtol=1e-9, atol=0)
    torch.testing.assert_close(torch.tensor(result.summary["weights"], dtype=torch.float64), weights,
                               rtol=1e-9, atol=1e-12)
    uncompressed, _ = plain_compressed(make_config(*WIDE, "data.dtype=float64"), "none")
    assert losses != uncompressed  # the compression changed the run: the comparison above saw it


@pytest.mark.parametrize("case", ["none", "topk-ef", "int8-down"])
def test_diloco_equals_local_sgd_with_torch_sgds_nesterov_outer_step(tmp_path, case):
    diloco = ("train.mode=local_sgd", "train.local_steps=4", "train.outer.optimizer=nesterov",
              "train.outer.momentum=0.9", "train.outer.lr=0.7")
    config = make_config(*WIDE, *diloco, *KIND_CASES.get(case, ()), "data.dtype=float64", "cluster.backend=serial",
                         f"output.dir={tmp_path / 'run'}")
    result = train(config, console=False, progress=False)
    losses, weights = plain_compressed(config, case)
    rows = [r for r in read_metrics(result.run_dir) if r["step"] > 0]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in rows]), torch.tensor(losses), rtol=1e-9, atol=0)
    torch.testing.assert_close(torch.tensor(result.summary["weights"], dtype=torch.float64), weights,
                               rtol=1e-9, atol=1e-12)
    assert result.summary["outer"] == {"optimizer": "nesterov", "lr": 0.7, "momentum": 0.9}


def test_the_default_outer_step_is_plain_averaging_bit_for_bit(tmp_path, monkeypatch):
    """Outer sgd at lr 1 against the server's rule before it had an outer optimizer, w.sub_(mean delta)."""
    common = ("train.mode=local_sgd", "train.local_steps=3", "cluster.backend=serial", "cluster.num_workers=3")
    with_outer = run(tmp_path, "outer", *common)

    def averaging(w, delta, state, **settings):
        assert settings == {"optimizer": "sgd", "lr": 1.0, "momentum": 0.0}, settings
        w.sub_(delta)

    from sgd_dist.engine import server

    monkeypatch.setattr(server, "outer_update_", averaging)
    averaged = run(tmp_path, "averaged", *common)
    assert numbers(with_outer.run_dir) == numbers(averaged.run_dir)
    assert with_outer.summary["weights"] == averaged.summary["weights"]


def test_the_servers_outer_step_is_torch_sgds_and_its_state_is_checkpointed():
    from sgd_dist.config import OptimConfig, OuterConfig

    w0 = torch.tensor([1.0, -2.0, 0.5])
    nesterov = OuterConfig(optimizer="nesterov", lr=0.7, momentum=0.9)
    server = ParameterServer(w0, OptimConfig(), 10, 4, outer=nesterov)
    param = torch.nn.Parameter(w0.clone())
    opt = torch.optim.SGD([param], lr=0.7, momentum=0.9, nesterov=True)
    for i in range(3):
        delta = torch.tensor([0.1, 0.2, -0.3]) * (i + 1)
        answer = type("A", (), {"grad": delta, "loss": 0.0, "count": 2})()
        server.update([answer, answer], deltas=True)
        param.grad = delta.clone()
        opt.step()
        assert torch.equal(server.weights, param.data), i
    state = server.state_dict()
    assert torch.equal(state["outer"]["momentum_buffer"], opt.state[param]["momentum_buffer"])
    restored = ParameterServer(w0, OptimConfig(), 10, 4, outer=nesterov)
    restored.load_state_dict(state)
    assert torch.equal(restored.outer_state["momentum_buffer"], server.outer_state["momentum_buffer"])
    outer.check_outer("nesterov", 0.7, 0.9)


# -- every backend and transport equals the serial reference --------------------------------------------------------

@pytest.mark.parametrize("transport, kind", [("shm", "bf16"), ("shm", "topk-ef"), ("shm", "int8-down"),
                                             ("ray", "int8"), ("ray", "randk-ef"), ("ray", "topk-ef-down")])
def test_a_compressed_ray_run_equals_the_serial_one_bit_for_bit(ray_session, tmp_path, transport, kind):
    common = (*WIDE, *KIND_CASES[kind], "train.steps=12")
    serial = run(tmp_path, "serial", *common, "cluster.backend=serial")
    distributed = run(tmp_path, "ray", *common, f"cluster.transport={transport}")
    assert distributed.summary["transport"] == transport
    assert numbers(distributed.run_dir) == numbers(serial.run_dir)  # losses, evaluations and the bytes of each row
    assert distributed.summary["weights"] == serial.summary["weights"]


@pytest.mark.parametrize("transport", ["ray"])
def test_compressed_diloco_on_ray_equals_the_serial_one_bit_for_bit(ray_session, tmp_path, transport):
    common = (*WIDE, *TOPK_EF, "train.mode=local_sgd", "train.local_steps=3", "train.outer.optimizer=nesterov",
              "train.outer.momentum=0.9", "train.outer.lr=0.7", "train.steps=8", "train.eval_every=2")
    serial = run(tmp_path, "serial", *common, "cluster.backend=serial")
    distributed = run(tmp_path, "ray", *common, f"cluster.transport={transport}")
    assert numbers(distributed.run_dir) == numbers(serial.run_dir)
    assert distributed.summary["weights"] == serial.summary["weights"]


@pytest.mark.parametrize("mode", [("train.mode=sync",), ("train.mode=local_sgd", "train.local_steps=3")])
@pytest.mark.parametrize("kind", ["int8", "topk-ef", "topk-ef-down"])
def test_a_compressed_virtual_run_equals_the_serial_one_bit_for_bit(tmp_path, kind, mode):
    common = (*WIDE, *KIND_CASES[kind], *mode, "cluster.num_workers=3")
    serial = run(tmp_path, "serial", *common, "cluster.backend=serial")
    virtual = run(tmp_path, "virtual", *common, "cluster.backend=virtual", "cluster.virtual.speed={0: 3.0}",
                  "cluster.network.bandwidth_gbps=1e-6")
    assert numbers(virtual.run_dir) == numbers(serial.run_dir)
    assert virtual.summary["weights"] == serial.summary["weights"]


@pytest.mark.parametrize("kind", ["topk-ef", "topk-ef-down"])
@pytest.mark.parametrize("mode", [("train.mode=async",), ("train.mode=ssp", "train.staleness_bound=2"),
                                  ("train.mode=backup", "train.backup_workers=1")], ids=["async", "ssp", "backup"])
def test_error_feedback_in_the_asynchronous_modes_replays_bit_for_bit(tmp_path, mode, kind):
    """On the virtual clock with uneven speeds the arrival order differs from the serial one; replay is exact."""
    common = (*WIDE, *KIND_CASES[kind], *mode, "cluster.num_workers=3", "train.steps=30")
    result = run(tmp_path, "run", *common, "cluster.backend=virtual", "cluster.virtual.speed={0: 2.5, 2: 1.5}")
    serial = run(tmp_path, "serial", *common, "cluster.backend=serial")
    schedule = (result.run_dir / "schedule.jsonl").read_text()
    assert schedule != (serial.run_dir / "schedule.jsonl").read_text()  # another order: what replay must follow
    report = replay(result.run_dir, tmp_path / "again")
    assert report.exact and report.losses_compared > 30


def test_error_feedback_in_async_mode_on_shm_replays_bit_for_bit(ray_session, tmp_path):
    result = run(tmp_path, "run", *WIDE, *TOPK_EF, "train.mode=async", "cluster.num_workers=3", "train.steps=30",
                 "cluster.transport=shm", "stragglers.slowdown={1: 3.0}")
    assert replay(result.run_dir, tmp_path / "again").exact


# -- the bytes are the bytes that travelled -------------------------------------------------------------------------

def test_each_row_records_the_compressed_bytes_and_the_summary_their_totals(tmp_path):
    """On the serial backend; the transports' rows equal these (the equality tests above compare them)."""
    config = make_config(*WIDE, *TOPK_EF)
    result = run(tmp_path, "run", *WIDE, *TOPK_EF, "cluster.backend=serial")
    rows = read_metrics(result.run_dir)
    k, d, steps = 2, 20, config.train.steps
    payload = answer_payload_bytes(config)
    assert payload == 16 + 2 * 4 + 2 * 4 == payload_nbytes("topk", d, 4, ratio=0.1)  # header, 2 values, 2 indices
    evals = sum(1 for r in rows if "eval_loss" in r)
    assert (rows[0]["bytes_up"], rows[0]["bytes_down"]) == (k * 8, k * d * 4)  # the evaluation of the start
    assert result.summary["bytes_up"] == sum(r["bytes_up"] for r in rows) == k * (steps * payload + evals * 8)
    assert result.summary["bytes_down"] == sum(r["bytes_down"] for r in rows) == k * (steps + evals) * d * 4
    for row in rows[1:]:  # an update's answers and commands, and its evaluation's
        evaluated = "eval_loss" in row
        assert row["bytes_up"] == k * (payload + 8 * evaluated) and row["bytes_down"] == k * d * 4 * (1 + evaluated)


def test_the_shm_segment_carries_the_payload_bytes_not_a_float_copy():
    config = make_config(*WIDE, *TOPK_EF)
    args = worker_args(config)[0]
    worker = ShardWorker(**args)
    payload = answer_payload_bytes(config)
    dense = Layout(1, 20, "float32")
    layout = Layout(1, 20, "float32", payload)
    assert dict((f, s) for f, s, _ in layout.sizes())["payload"] == (1, payload)
    assert "grads" not in {f for f, _, _ in layout.sizes()} and layout.nbytes() <= dense.nbytes()
    end = ShmServerEnd(layout)
    try:
        worker_end = ShmWorkerEnd(end.segment.name, layout, 0)
        weights = torch.linspace(-1, 1, 20)
        end.publish(0, weights)
        end.send(0, Command(GRADIENT, step=3, reset=True))
        command, sent = worker_end.wait()
        assert command.reset and torch.equal(sent, weights)
        answer = worker.execute(command, sent)
        assert isinstance(answer.grad, Compressed) and answer.nbytes == payload
        worker_end.answer(answer)
        arrival = end.receive(timeout=5)
        assert isinstance(arrival.grad, Compressed) and arrival.nbytes == payload
        assert torch.equal(decompress(arrival.grad), decompress(answer.grad))
        worker_end.close()
    finally:
        end.close()


def test_the_simulated_networks_delay_charges_the_compressed_answer(monkeypatch):
    net = ("cluster.network.latency_ms=1", "cluster.network.bandwidth_gbps=0.001")
    config = make_config(*WIDE, *TOPK_EF, *net)
    worker = ShardWorker(**worker_args(config)[0])
    slept = []
    monkeypatch.setattr(worker_module.time, "sleep", slept.append)
    worker.execute(Command(GRADIENT, step=0), torch.zeros(20))
    expected = round_trip_delay_s(config.cluster.network, 20, 4, GRADIENT, answer_payload_bytes(config))
    assert slept == [pytest.approx(expected)] and expected < round_trip_delay_s(config.cluster.network, 20, 4)
    worker.execute(Command(EVALUATE), torch.zeros(20))
    assert slept[1] == pytest.approx(round_trip_delay_s(config.cluster.network, 20, 4, EVALUATE))


def test_the_virtual_clock_charges_the_compressed_bytes(tmp_path):
    """One worker, a 1 kb/s link: every answer's time on the link is its bytes x 8 ms; top-k saves that much."""
    common = (*WIDE, "cluster.num_workers=1", "cluster.backend=virtual", "cluster.network.bandwidth_gbps=1e-6",
              "train.eval_every=0")
    dense = run(tmp_path, "dense", *common)
    sparse = run(tmp_path, "sparse", *common, *TOPK_EF)
    saved_s = dense.summary["train_time_s"] - sparse.summary["train_time_s"]
    link_s = 20 * (80 - 32) * 8 / 1e3  # 20 answers, 80 dense bytes against 32 compressed, at 1e3 bit/s
    assert sparse.summary["bytes_up"] < dense.summary["bytes_up"]
    assert link_s <= saved_s < link_s * 1.1  # the rest: the server's handling, which the bytes also shorten


# -- error feedback under faults ------------------------------------------------------------------------------------

def test_a_replaced_workers_residual_reset_is_recorded_and_replay_follows_it(tmp_path):
    common = (*WIDE, *TOPK_EF, "cluster.num_workers=3", "cluster.backend=virtual", "train.eval_every=0")
    plain = run(tmp_path, "plain", *common)
    killed = run(tmp_path, "killed", *common, "faults=[{kind: kill_worker, worker: 1, step: 5}]")
    replaced = next(f for f in killed.summary["faults"] if f["fault"] == "worker_replaced")
    assert replaced["residual"].startswith("reset")
    assert killed.summary["residual_resets"] == [[1, 5]]
    assert killed.summary["weights"] != plain.summary["weights"]  # the residual it had was lost with it
    assert replay(killed.run_dir, tmp_path / "again").exact
    # without the record the replay keeps worker 1's residual, and differs: the record is what makes it exact
    edited = tmp_path / "edited"
    shutil.copytree(killed.run_dir, edited)
    summary = json.loads((edited / "summary.json").read_text())
    (edited / "summary.json").write_text(json.dumps({**summary, "residual_resets": []}))
    assert not replay(edited, tmp_path / "again-without").exact


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_restored_server_resets_every_residual_and_replay_still_reproduces_the_run(tmp_path, mode):
    common = (*WIDE, *TOPK_EF, "cluster.num_workers=3", "cluster.backend=virtual", f"train.mode={mode}",
              "train.checkpoint_every=8", "train.eval_every=0")
    killed = run(tmp_path, "killed", *common, "faults=[{kind: kill_server, step: 13}]")
    reset = [f for f in killed.summary["faults"] if f["fault"] == "residual_reset"]
    assert len(reset) == 1 and reset[0]["workers"] == [0, 1, 2] and reset[0]["step"] == 8
    assert {w for w, _ in killed.summary["residual_resets"]} == {0, 1, 2}
    assert replay(killed.run_dir, tmp_path / "again").exact


@pytest.mark.slow
def test_a_killed_ray_worker_under_error_feedback_replays_bit_for_bit(ray_session, tmp_path):
    result = run(tmp_path, "run", *WIDE, *TOPK_EF, "cluster.transport=shm", "train.steps=30",
                 "faults=[{kind: kill_worker, worker: 1, step: 10}]")
    assert [w for w, _ in result.summary["residual_resets"]] == [1]
    assert replay(result.run_dir, tmp_path / "again").exact


def test_with_down_each_command_carries_the_compressed_delta_and_evaluations_the_exact_weights(tmp_path):
    config = make_config(*WIDE, *KIND_CASES["topk-ef-down"])
    result = run(tmp_path, "run", *WIDE, *KIND_CASES["topk-ef-down"], "cluster.backend=serial")
    rows, k, d = read_metrics(result.run_dir), 2, 20
    payload = answer_payload_bytes(config)
    assert payload == 16 + 5 * 4 + 5 * 4 < d * 4  # ceil(0.25 x 20) = 5 values and indices
    for row in rows[1:]:
        evaluated = "eval_loss" in row
        assert row["bytes_down"] == k * (payload + d * 4 * evaluated)
        assert row["bytes_up"] == k * (payload + 8 * evaluated)


def test_a_replaced_worker_under_down_compression_starts_from_zero_and_replay_follows(tmp_path):
    result = run(tmp_path, "killed", *WIDE, *KIND_CASES["randk-down"], "cluster.num_workers=3",
                 "cluster.backend=virtual", "train.eval_every=0", "faults=[{kind: kill_worker, worker: 2, step: 7}]")
    assert result.summary["residual_resets"] == [[2, 7]]
    assert replay(result.run_dir, tmp_path / "again").exact


@pytest.mark.deploy  # two simulated clusters started and stopped: ~30 s on a quiet machine, 90 s on a busy one
def test_the_benchmarks_compression_rows_set_the_byte_saving_beside_the_time(tmp_path):
    """On 2 simulated nodes (a fresh process: a simulated cluster cannot start inside the session's Ray); the bytes
    are exact, the times only reported."""
    script = ("import json, sys; from sgd_dist.bench.compression import compression_rows, compression_markdown; "
              "rows = compression_rows({'none': {}, 'topk': {'kind': 'topk', 'ratio': 0.01, 'error_feedback': True}}, "
              "d=1000, steps=4); print(compression_markdown(rows), file=sys.stderr); "
              "print(json.dumps([r.__dict__ for r in rows]))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    none, topk = json.loads(proc.stdout.splitlines()[-1])
    evals = 2 * 2 * (8 + 4000)  # the start's and the last: 2 workers, the weights down and a float64 back
    dense = (4 * 2 * (4000 + 4000) + evals) / 4
    sparse = (4 * 2 * (payload_nbytes("topk", 1000, 4, ratio=0.01) + 4000) + evals) / 4
    assert (none["bytes_per_step"], topk["bytes_per_step"]) == (dense, sparse)
    assert topk["byte_saving"] == dense / sparse and topk["time_saving"] > 0 and none["median_ms"] > 0
    assert "| topk | 1,000 | 2 / 2 | 0.1 Gb/s |" in proc.stderr


def test_a_restored_sync_run_records_the_undisturbed_runs_bytes_row_for_row(tmp_path):
    """The bytes received before a checkpoint for the row after it travel in the checkpoint; a lost command's
    bytes are not counted, its redone copy's are."""
    common = (*WIDE, "compression.kind=int8", "cluster.num_workers=3", "cluster.backend=virtual",
              "train.checkpoint_every=8")
    plain = run(tmp_path, "plain", *common)
    faulty = run(tmp_path, "faulty", *common, "faults=[{kind: kill_server, step: 13}, {kind: kill_worker, worker: 1, "
                 "step: 16}]")
    assert {"server_lost", "worker_replaced"} <= {f["fault"] for f in faulty.summary["faults"]}
    assert numbers(faulty.run_dir) == numbers(plain.run_dir)
    assert (faulty.summary["bytes_up"], faulty.summary["bytes_down"]) == (plain.summary["bytes_up"],
                                                                        plain.summary["bytes_down"])
