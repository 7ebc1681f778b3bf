"""The virtual backend end to end: a modelled cluster's run equals the serial reference bit for bit, replays, shows
its timing (staleness, stragglers, faults) and refuses bad settings in one line. No Ray.

Times come from a test profile of dyadic coefficients (0.25, 2^-10, ...), so the hand-computed ones are exact.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_config

from sgd_dist.backends import capacity
from sgd_dist.backends.base import worker_args
from sgd_dist.backends.virtual import SHIPPED_PROFILE, VirtualBackend, load_profile
from sgd_dist.config import ConfigError
from sgd_dist.core.data import generate
from sgd_dist.engine.recovery import RECOVERY_POLL_S
from sgd_dist.engine.worker import ShardWorker
from sgd_dist.run.rundir import read_metrics
from sgd_dist.run.trainer import train

SGD_DIST = str(Path(sys.executable).with_name("sgd-dist"))
GRAD_S, PER_ELEM, HANDLE_S = 0.25, 2 ** -10, 2 ** -6  # the test profile's gradient and per-answer costs
REPLACEMENT_S, RESTART_S = 2.0, 4.0
D, BATCH = 4, 16  # make_config: 3 features and the bias, 16 rows a step


@pytest.fixture
def profile(tmp_path) -> str:
    """A profile whose only costs are a gradient's, an answer's handling, the replacement and the restart."""
    values = dict.fromkeys(("local_s", "local_s_per_elem", "eval_s", "eval_s_per_elem", "apply_s",
                            "apply_s_per_param", "message_s_per_byte"), 0.0)
    values.update(grad_s=GRAD_S, grad_s_per_elem=PER_ELEM, message_s=HANDLE_S, replacement_s=REPLACEMENT_S,
                  restart_s=RESTART_S, cores=2, source="tests: dyadic coefficients", date="2026-12-02")
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(values))
    return str(path)


def run(tmp_path, name: str, *overrides: str):
    """A run of the tiny config; returns the trainer's result."""
    config = make_config(*overrides, f"output.dir={tmp_path / name}")
    return train(config, console=False, progress=False)


def virtual(tmp_path, profile: str, name: str, *overrides: str):
    return run(tmp_path, name, "cluster.backend=virtual", f"cluster.virtual.profile={profile}", *overrides)


def numbers(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in read_metrics(run_dir)]


def compute_s(rows: int = BATCH) -> float:
    """One gradient's time under the test profile, written from its definition."""
    return GRAD_S + PER_ELEM * rows * D


# -- the numbers ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [("train.mode=sync",), ("train.mode=local_sgd", "train.local_steps=3"),
                                       ("train.mode=sync", "optim.momentum=0.9", "data.dtype=float64")])
def test_a_virtual_run_with_uneven_timing_equals_the_serial_reference_bit_for_bit(tmp_path, profile, overrides):
    common = ("cluster.num_workers=3", *overrides)
    serial = run(tmp_path, "serial", "cluster.backend=serial", *common)
    timed = virtual(tmp_path, profile, "virtual", *common, "cluster.virtual.speed={0: 3.0}", "cluster.virtual.cores=2",
                    "cluster.network.latency_ms=1", "cluster.network.bandwidth_gbps=1e-6",
                    "stragglers.delay=exponential", "stragglers.delay_ms=5")
    assert timed.summary["weights"] == serial.summary["weights"]
    assert numbers(timed.run_dir) == numbers(serial.run_dir)
    assert timed.summary["backend"] == "virtual" and timed.summary["clock"] == "virtual"


@pytest.mark.parametrize("mode", [("train.mode=async",), ("train.mode=backup", "train.backup_workers=1")])
def test_an_async_or_backup_virtual_run_replays_bit_for_bit_with_sgd_dist_replay(tmp_path, profile, mode):
    common = ("cluster.num_workers=3", "train.steps=30", *mode)
    timed = virtual(tmp_path, profile, "timed", *common, "cluster.virtual.speed={0: 2.5, 2: 1.5}",
                    "stragglers.delay=exponential", "stragglers.delay_ms=50")
    serial = run(tmp_path, "serial", "cluster.backend=serial", *common)
    schedule = (timed.run_dir / "schedule.jsonl").read_text()
    assert schedule != (serial.run_dir / "schedule.jsonl").read_text()  # the modelled timing changed the order
    proc = subprocess.run([SGD_DIST, "replay", str(timed.run_dir), "--out", str(tmp_path / "again")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((tmp_path / "again" / "summary.json").read_text())["weights"] == timed.summary["weights"]
    assert numbers(tmp_path / "again") == numbers(timed.run_dir)


# -- the timing -------------------------------------------------------------------------------------------------

def test_async_staleness_is_k_minus_1_at_equal_speeds_and_spreads_with_mixed_ones(tmp_path, profile):
    k = 16
    common = (f"cluster.num_workers={k}", "train.mode=async", "train.steps=200", "train.batch_size=8",
              "train.eval_every=0")
    equal = virtual(tmp_path, profile, "equal", *common)
    ages = [row["staleness"] for row in read_metrics(equal.run_dir)[1:]]
    assert statistics.median(ages[k:]) == k - 1 and set(ages[k:]) == {k - 1}  # round robin once the first k are in
    mixed = virtual(tmp_path, profile, "mixed", *common, "cluster.virtual.speed_sigma=0.5")
    ages = [row["staleness"] for row in read_metrics(mixed.run_dir)[1:]]
    assert len(set(ages[k:])) > 3 and min(ages[k:]) < k - 1 < max(ages[k:])


def test_a_4x_straggler_shows_in_its_answer_times_and_slows_each_sync_step_4x(tmp_path, profile):
    plain = virtual(tmp_path, profile, "plain", "train.eval_every=0")
    slow = virtual(tmp_path, profile, "slow", "train.eval_every=0", "stragglers.slowdown={1: 4.0}")
    answer_ms = slow.summary["answer_ms"]
    assert answer_ms[0] == 1e3 * compute_s() and answer_ms[1] == 4e3 * compute_s()
    assert slow.summary["stragglers"] == [{"worker": 1, "ratio": 4.0}]
    # a step: both compute from its start; plain, the server then handles the two answers one after the other;
    # slow, it has handled worker 0's long before worker 1's arrives. Step 0's evaluation (free, but each answer
    # is handled: h) delays worker 0's first command by h and worker 1's by 2h; the last one adds 2h.
    c, h = compute_s(), HANDLE_S
    assert plain.summary["time_model"]["end_s"] == (c + 3 * h) + 19 * (c + 2 * h) + 2 * h
    assert slow.summary["time_model"]["end_s"] == (4 * c + 3 * h) + 19 * (4 * c + h) + 2 * h


def test_the_summary_names_the_clock_and_every_term_of_the_time_model(tmp_path, profile):
    timed = virtual(tmp_path, profile, "v")
    model = timed.summary["time_model"]
    assert model["profile"] == profile and model["source"] == "tests: dyadic coefficients"
    assert model["coefficients"]["grad_s"] == GRAD_S and model["coefficients"]["restart_s"] == RESTART_S
    named = " ".join(model["terms"])
    for term in ("gradient", "local step", "evaluation", "server update", "server answer", "replacement", "network",
                 "nodes", "cores", "speed", "stragglers", "failures"):
        assert term in named, term
    shipped = run(tmp_path, "shipped", "cluster.backend=virtual")
    assert shipped.summary["time_model"]["profile"] == "shipped (default.json)"
    assert shipped.summary["time_model"]["source"] == load_profile(None).source
    assert run(tmp_path, "serial", "cluster.backend=serial").summary["clock"] == "wall"


def test_the_shipped_profile_says_where_its_numbers_came_from():
    values = json.loads(SHIPPED_PROFILE.read_text())
    assert "not by sgd-dist calibrate" in values["source"] and "loaded" in values["source"]
    assert load_profile(None).date == values["date"]


def test_the_shards_are_sliced_from_one_generation_bit_for_bit():
    config = make_config("cluster.backend=virtual", "cluster.num_workers=5", "data.n_samples=1000")
    backend = VirtualBackend(config)
    try:
        X, y = generate(config.data)
        for worker in backend.workers:
            alone_X, alone_y = generate(config.data, worker.start, worker.stop)
            assert worker.X.equal(alone_X) and worker.y.equal(alone_y)
        assert sum(w.X.shape[0] for w in backend.workers) == X.shape[0]
        assert backend.workers[1].X.data_ptr() == backend.workers[0].X.data_ptr() + backend.workers[0].X.nbytes
    finally:
        backend.close()


def test_the_workers_share_one_set_of_float64_chunks_per_shard_size_and_the_sums_stay_exact():
    config = make_config("cluster.backend=virtual", "cluster.num_workers=7", "data.n_samples=1000")
    backend = VirtualBackend(config)
    try:
        sizes = {w.X.shape[0] for w in backend.workers}
        assert len(sizes) == 2  # 1,000 rows over 7 workers: shards of 143 and 142 rows
        assert len({id(w.chunks) for w in backend.workers}) == len(sizes)
        weights = torch.linspace(-1, 1, config.data.dim)
        for worker in backend.workers:  # the same sums as a worker with buffers of its own
            alone = ShardWorker(**worker_args(config)[worker.rank], shard=(worker.X, worker.y))
            assert worker.evaluate(weights) == alone.evaluate(weights)
            assert worker.linear_stats().xtx.equal(alone.linear_stats().xtx)
    finally:
        backend.close()


def test_the_worker_info_read_once_for_the_process_is_each_workers_own():
    backend = VirtualBackend(make_config("cluster.backend=virtual", "cluster.num_workers=5", "data.n_samples=1000"))
    try:
        infos = backend.worker_info()
        assert [i["rows"] for i in infos] == [[w.start, w.stop] for w in backend.workers]
        for info, worker in zip(infos, backend.workers):
            own = worker.info()
            assert info.keys() == own.keys()  # a field info() gains must be added to the backend's worker_info too
            assert {k: v for k, v in info.items() if k != "peak_rss_bytes"} == {
                k: v for k, v in own.items() if k != "peak_rss_bytes"}
    finally:
        backend.close()


# -- faults on the virtual clock ----------------------------------------------------------------------------------

def test_a_killed_worker_in_a_sync_run_leaves_the_serial_weights_and_costs_the_replacement_time(tmp_path, profile):
    common = ("cluster.num_workers=3", "train.eval_every=0")
    serial = run(tmp_path, "serial", "cluster.backend=serial", *common)
    plain = virtual(tmp_path, profile, "plain", *common)
    killed = virtual(tmp_path, profile, "killed", *common, "faults=[{kind: kill_worker, worker: 1, step: 5}]")
    assert killed.summary["weights"] == serial.summary["weights"]
    assert numbers(killed.run_dir) == numbers(serial.run_dir)
    kinds = [f["fault"] for f in killed.summary["faults"]]
    assert kinds == ["kill_worker", "worker_lost", "worker_replaced"] and killed.summary["replacements"] == {1: 1}
    lost = killed.summary["faults"][1]
    assert lost["noticed_s"] == 0.0  # idle right after the update, noticed as it is sent its next command
    # the lost step waits the replacement time (to the loop's next poll) for worker 1's answer, less the two
    # other answers' handling, which the server does meanwhile instead of after it
    extra = killed.summary["time_model"]["end_s"] - plain.summary["time_model"]["end_s"]
    assert REPLACEMENT_S - 2 * HANDLE_S <= extra <= REPLACEMENT_S - 2 * HANDLE_S + RECOVERY_POLL_S


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_killed_server_rolls_back_to_the_checkpoint_after_the_restart_time(tmp_path, profile, mode):
    common = ("cluster.num_workers=3", f"train.mode={mode}", "train.checkpoint_every=8", "train.eval_every=0")
    plain = virtual(tmp_path, profile, "plain", *common)
    killed = virtual(tmp_path, profile, "killed", *common, "faults=[{kind: kill_server, step: 13}]")
    lost = [f for f in killed.summary["faults"] if f["fault"] == "server_lost"]
    assert len(lost) == 1 and (lost[0]["restored_step"], lost[0]["steps_redone"]) == (8, 5)
    assert lost[0]["recovery_s"] == RESTART_S
    assert [row["step"] for row in read_metrics(killed.run_dir)] == list(range(21))  # every step once
    assert (killed.run_dir / "metrics.rewound.jsonl").exists()
    if mode == "sync":  # the same schedule, and so the same run, only later by the restart and the redone steps
        assert killed.summary["weights"] == plain.summary["weights"]
        step_s = compute_s() + 3 * HANDLE_S  # a step between two others: compute, then three answers handled
        assert killed.summary["time_model"]["end_s"] == plain.summary["time_model"]["end_s"] + RESTART_S + 5 * step_s
    proc = subprocess.run([SGD_DIST, "replay", str(killed.run_dir), "--out", str(tmp_path / "again")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_random_failures_are_keyed_by_the_seed_and_the_run_survives_them(tmp_path, profile):
    common = ("cluster.num_workers=3", "train.mode=async", "train.steps=40", "train.checkpoint_every=10",
              "train.eval_every=0", "cluster.virtual.worker_mtbf_s=4", "cluster.virtual.server_mtbf_s=3")

    def failures(result) -> list:
        return [(f["fault"], f.get("worker"), f["step"]) for f in result.summary["faults"]]

    first = virtual(tmp_path, profile, "first", *common)
    again = virtual(tmp_path, profile, "again", *common)
    other = virtual(tmp_path, profile, "other", *common, "cluster.virtual.seed=1")
    assert {"worker_lost", "worker_replaced", "server_lost"} <= {f[0] for f in failures(first)}
    assert failures(first) == failures(again) and first.summary["weights"] == again.summary["weights"]
    assert failures(other) != failures(first)
    assert [row["step"] for row in read_metrics(first.run_dir)] == list(range(41))


# -- bad settings -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("cluster.virtual.cores=0", r"^cluster\.virtual\.cores: Input should be greater than or equal to 1"),
    ("cluster.virtual.workers_per_node=0", r"^cluster\.virtual\.workers_per_node: Input should be greater"),
    ("cluster.virtual.speed={5: 2.0}", r"^cluster\.virtual\.speed names worker 5; workers are 0\.\.1$"),
    ("cluster.virtual.speed={0: 0}", r"^cluster\.virtual\.speed: needs worker index >= 0 -> factor > 0"),
    ("cluster.virtual.speed_sigma=-1", r"^cluster\.virtual\.speed_sigma: Input should be greater than or equal to 0"),
    ("cluster.virtual.worker_mtbf_s=0", r"^cluster\.virtual\.worker_mtbf_s: Input should be greater than 0"),
    ("cluster.virtual.cpus=2", r"^cluster\.virtual\.cpus: unknown key$"),
])
def test_bad_virtual_settings_are_one_line_errors_naming_the_field(override, message):
    with pytest.raises(ConfigError, match=message) as error:
        make_config("cluster.backend=virtual", override)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("content, message", [
    (None, r"^cluster\.virtual\.profile='.*' does not exist"),
    ("{not json", r"^cluster\.virtual\.profile='.*' is not JSON: "),
    ('{"grad_s": 1.0}', r"^cluster\.virtual\.profile='.*': unknown field|^cluster\.virtual\.profile='.*': missing"),
])
def test_a_bad_profile_is_a_one_line_error_before_anything_is_written(tmp_path, content, message):
    path = tmp_path / "profile.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message) as error:
        run(tmp_path, "never", "cluster.backend=virtual", f"cluster.virtual.profile={path}")
    assert "\n" not in str(error.value) and not (tmp_path / "never").exists()


def test_a_profile_with_a_bad_coefficient_names_it(tmp_path, profile):
    values = json.loads(Path(profile).read_text())
    path = tmp_path / "negative.json"
    path.write_text(json.dumps({**values, "apply_s": -1.0}))
    with pytest.raises(ConfigError, match=r"^cluster\.virtual\.profile='.*': apply_s must be >= 0 \(got -1\.0\)$"):
        load_profile(str(path))


def test_the_memory_guard_points_many_workers_at_the_virtual_backend(monkeypatch):
    monkeypatch.setattr(capacity, "runs_on_this_machine", lambda config: True)
    monkeypatch.setattr(capacity, "machine_memory", lambda: (4_000_000_000, 8_000_000_000))
    config = make_config("cluster.num_workers=64", "train.batch_size=4")
    with pytest.raises(ConfigError, match=r"cluster\.num_workers=11 fits\), or a cluster \(cluster\.address\), or "
                                          r"cluster\.backend=virtual \(every worker in this one process"):
        capacity.check_this_machine(config)
    assert capacity.check_this_machine(make_config("cluster.num_workers=64", "train.batch_size=4",
                                                   "cluster.backend=virtual")) == []


# -- the command ------------------------------------------------------------------------------------------------

def test_sgd_dist_train_runs_64_virtual_workers_end_to_end(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"data": {"n_samples": 4096, "n_features": 3},
                                      "train": {"steps": 50, "batch_size": 8, "eval_every": 25, "log_every": 25,
                                                "mode": "async"}}))
    out = tmp_path / "run"
    proc = subprocess.run([SGD_DIST, "train", "--config", str(config), "--out", str(out), "cluster.backend=virtual",
                           "cluster.num_workers=64"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "of virtual time" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["num_workers"] == 64 and summary["clock"] == "virtual"
    assert summary["staleness"]["max"] >= 32 and (out / "loss.png").exists()
