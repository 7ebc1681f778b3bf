"""Simulated clusters (cluster.simulated_nodes) and the simulated network (cluster.network).

The network's formulas and its effect (wall time only) are checked without Ray. A simulated cluster needs a
process that is not connected to Ray yet, and this session shares one embedded Ray, so the runs on a simulated
cluster happen in fresh processes: `sgd-dist train` itself (twice), and tests/simulated_support.py for removing
a node. Each starts a loopback cluster of 2 nodes (about 4-10 s here, more on a busy machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_config

from sgd_dist.backends.base import worker_args
from sgd_dist.backends.ray import simulated
from sgd_dist.config import ConfigError, NetworkConfig, describe_fields, dump_config, load_config
from sgd_dist.engine.delays import message_bytes, message_delay_s, round_trip_delay_s
from sgd_dist.engine.messages import EVALUATE, GRADIENT, LOCAL, Command
from sgd_dist.engine.worker import ShardWorker
from sgd_dist.run.replay import replay
from sgd_dist.run.rundir import read_metrics
from sgd_dist.run.trainer import train
from sgd_dist.transports.base import alive
from sgd_dist.transports.channel import _raylet_pid
from sgd_dist.transports.shm import PREFIX, SHM_DIR

TESTS = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
LATENCY_MS = 2.0


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def _run(config, tmp_path, name, console=False):
    config = config.model_copy(update={"output": config.output.model_copy(update={"dir": str(tmp_path / name)})})
    result = train(config, console=console, progress=False)
    return result.summary, read_metrics(result.run_dir)


def losses(rows):
    return [r["loss"] for r in rows if r["step"] > 0]


def evals(rows):
    return [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]


def _shm_entries() -> set[str]:
    return {p.name for p in SHM_DIR.iterdir()}


def _stale(names: set[str]) -> list[str]:
    """Of ``names`` in /dev/shm, those left by a process that is gone: our segments and Ray's semaphores."""
    left = []
    for name in names:
        if name.startswith(PREFIX):
            pid = name[len(PREFIX):].split("-")[0]
            if pid.isdigit() and not alive(int(pid)):
                left.append(name)
        elif (pid := _raylet_pid(name)) is not None and not alive(pid):
            left.append(name)
    return [name for name in left if (SHM_DIR / name).exists()]


# -- the config ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["cluster.simulated_nodes=2", "cluster.backend=serial"],
     r"^cluster\.simulated_nodes=2 applies only to cluster\.backend=ray .*set it to null for the serial backend$"),
    (["cluster.simulated_nodes=2", "cluster.address=127.0.0.1:6379"],
     r"^cluster\.simulated_nodes=2 starts its own Ray cluster on this machine: it needs cluster\.address=null"),
    (["cluster.simulated_nodes=0"], r"^cluster\.simulated_nodes: Input should be greater than or equal to 1"),
    (["cluster.simulated_nodes=1.5"], r"^cluster\.simulated_nodes: .*integer"),
    (["cluster.simulated_nodes=2", "cluster.transport=shm"],
     r"^cluster\.transport=shm needs every worker on one node; cluster\.simulated_nodes=2 puts the 2 workers on 2 "
     r"nodes \(use cluster\.transport=ray or auto\)$"),
    (["cluster.network.latency_ms=-1"], r"^cluster\.network\.latency_ms: Input should be greater than or equal to 0"),
    (["cluster.network.bandwidth_gbps=0"], r"^cluster\.network\.bandwidth_gbps: Input should be greater than 0"),
    (["cluster.network.jitter_ms=1"], r"^cluster\.network\.jitter_ms: unknown key$"),
])
def test_bad_simulated_cluster_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config(None, overrides)
    assert "\n" not in str(error.value)


def test_simulated_cluster_settings_load_dump_and_describe(tmp_path):
    config = load_config(None, ["cluster.simulated_nodes=3", "cluster.network.latency_ms=0.5",
                                "cluster.network.bandwidth_gbps=10"])
    assert config.cluster.simulated_nodes == 3 and config.cluster.network == NetworkConfig(latency_ms=0.5,
                                                                                           bandwidth_gbps=10)
    (tmp_path / "c.yaml").write_text(dump_config(config))
    assert load_config(tmp_path / "c.yaml") == config
    # one worker on shm is fine: it sits on one node whatever the cluster's size
    assert load_config(None, ["cluster.simulated_nodes=2", "cluster.num_workers=1", "cluster.transport=shm"])
    keys = {key: (default, text) for key, default, text in describe_fields()}
    assert keys["cluster.simulated_nodes"][0] == "null" and "r mod N" in keys["cluster.simulated_nodes"][1]
    assert keys["cluster.network.latency_ms"][0] == "0.0" and keys["cluster.network.bandwidth_gbps"][0] == "null"


def test_each_simulated_node_gets_the_cpus_of_its_workers():
    assert [simulated.node_of(r, 2) for r in range(5)] == [0, 1, 0, 1, 0]
    assert simulated.cpus_per_node(2, 1.0, 2) == 1
    assert simulated.cpus_per_node(3, 1.0, 2) == 2  # node 0 holds workers 0 and 2
    assert simulated.cpus_per_node(5, 2.0, 2) == 6
    assert simulated.cpus_per_node(4, 0.5, 2) == 1
    assert simulated.cpus_per_node(2, 0.0, 4) == 1  # at least one


# -- the network model, without Ray -------------------------------------------------------------------------


def test_a_message_takes_the_latency_plus_its_bits_over_the_bandwidth():
    net = NetworkConfig(latency_ms=2.0, bandwidth_gbps=0.5)
    assert message_delay_s(net, 0) == pytest.approx(0.002)
    assert message_delay_s(net, 1_000_000) == pytest.approx(0.002 + 8e6 / 0.5e9)
    assert message_delay_s(NetworkConfig(latency_ms=1.5), 10**9) == pytest.approx(0.0015)  # unlimited bandwidth
    assert message_delay_s(None, 10**9) == 0.0 and message_delay_s(NetworkConfig(), 10**9) == 0.0


def test_a_round_trip_is_the_weights_out_and_the_answer_back():
    net = NetworkConfig(latency_ms=1.0, bandwidth_gbps=1.0)
    # d = 1000 float32: 4,000 bytes each way for a gradient or a local-SGD delta
    assert message_bytes(1000, 4, GRADIENT) == message_bytes(1000, 4, LOCAL) == (4000, 4000)
    assert round_trip_delay_s(net, 1000, 4) == pytest.approx(2e-3 + 2 * 32_000 / 1e9)
    assert round_trip_delay_s(net, 1000, 4, LOCAL) == round_trip_delay_s(net, 1000, 4, GRADIENT)
    # an evaluation sends the weights and answers one float64
    assert message_bytes(1000, 8, EVALUATE) == (8000, 8)
    assert round_trip_delay_s(net, 1000, 8, EVALUATE) == pytest.approx(2e-3 + (64_000 + 64) / 1e9)
    assert round_trip_delay_s(None, 1000, 4) == 0.0


def test_a_workers_answer_time_includes_the_network_and_its_numbers_do_not_change():
    net = ["cluster.network.latency_ms=5", "cluster.network.bandwidth_gbps=0.001"]  # 1 Mb/s: 16 bytes take 0.128 ms
    args = worker_args(make_config(*net))[1]
    plain, delayed = ShardWorker(**{**args, "network": None}), ShardWorker(**args)
    weights = torch.tensor([0.5, -1.0, 2.0, 0.25])
    for kind in (GRADIENT, LOCAL, EVALUATE):
        expected = round_trip_delay_s(args["network"], 4, 4, kind)
        a, b = plain.execute(Command(kind, step=3), weights), delayed.execute(Command(kind, step=3), weights)
        assert b.seconds >= expected > 0.010  # sleeping never takes less
        assert (a.loss, a.count) == (b.loss, b.count)
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad)


def test_a_network_costs_wall_time_only_on_the_serial_backend(tmp_path):
    plain, plain_rows = _run(make_config("cluster.backend=serial"), tmp_path, "plain")
    config = make_config("cluster.backend=serial", f"cluster.network.latency_ms={LATENCY_MS}")
    slow, slow_rows = _run(config, tmp_path, "slow")
    assert losses(slow_rows) == losses(plain_rows) and evals(slow_rows) == evals(plain_rows)
    assert slow["weights"] == plain["weights"]
    assert slow["network"] == {"latency_ms": LATENCY_MS, "bandwidth_gbps": None} and slow["simulated_nodes"] is None
    assert plain["network"] == {"latency_ms": 0.0, "bandwidth_gbps": None}
    # each answer waited out its round trip (sleeping never takes less); one process runs the workers in turn
    assert all(ms >= 2 * LATENCY_MS for ms in slow["answer_ms"].values()), slow["answer_ms"]
    assert slow["median_step_ms"] >= 2 * 2 * LATENCY_MS


# -- a run on 2 simulated nodes, in its own process ---------------------------------------------------------


@pytest.fixture(scope="module")
def simulated_run(tmp_path_factory):
    """`sgd-dist train` of the tiny config on 2 simulated nodes with 2 ms of latency; /dev/shm before and after."""
    root = tmp_path_factory.mktemp("simulated")
    (root / "tiny.yaml").write_text(dump_config(make_config()))
    before = _shm_entries()
    proc = subprocess.run(
        [str(BIN / "sgd-dist"), "train", "--config", str(root / "tiny.yaml"), "--out", str(root / "run"),
         "cluster.simulated_nodes=2", f"cluster.network.latency_ms={LATENCY_MS}"],
        capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr
    return root / "run", proc, before


@pytest.mark.slow
def test_two_simulated_nodes_equal_the_serial_reference(simulated_run, tmp_path):
    run_dir, proc, _ = simulated_run
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = read_metrics(run_dir)
    serial, serial_rows = _run(make_config("cluster.backend=serial"), tmp_path, "serial")  # and no network
    assert summary["status"] == "completed" and summary["backend"] == "ray" and summary["simulated_nodes"] == 2
    assert summary["transport"] == "ray"  # auto, with the workers on two nodes
    nodes = [w["node_id"] for w in summary["workers"]]
    assert len(set(nodes)) == 2, nodes
    assert len(losses(rows)) == 20
    assert losses(rows) == losses(serial_rows) and evals(rows) == evals(serial_rows)
    assert summary["weights"] == serial["weights"]
    assert summary["network"] == {"latency_ms": LATENCY_MS, "bandwidth_gbps": None}
    assert all(ms >= 2 * LATENCY_MS for ms in summary["answer_ms"].values()), summary["answer_ms"]
    assert summary["median_step_ms"] >= 2 * LATENCY_MS
    assert summary["ray_address"].startswith("127.0.0.1:")
    first = proc.stdout.splitlines()[0]
    assert first.startswith("sgd-dist: ray backend, 2 workers on 2 simulated nodes (network: 2 ms latency, "
                            "unlimited bandwidth), 512 rows x 4 parameters"), first


def test_a_simulated_cluster_leaves_no_process_and_nothing_in_dev_shm(simulated_run):
    run_dir, _, before = simulated_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert not any(alive(w["pid"]) for w in summary["workers"])
    gcs = f"--gcs-address={summary['ray_address']}"
    leftovers = [p for p in Path("/proc").iterdir() if p.name.isdigit() and gcs.encode() in _cmdline(p)]
    assert leftovers == []
    assert _stale(_shm_entries() - before) == []


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return b""


def test_a_simulated_run_replays_on_the_serial_backend(simulated_run, tmp_path):
    run_dir, _, _ = simulated_run
    report = replay(run_dir, tmp_path / "replayed")
    assert report.exact and report.losses_compared > 20
    replayed = json.loads((tmp_path / "replayed" / "summary.json").read_text())
    assert replayed["simulated_nodes"] is None and replayed["network"]["latency_ms"] == 0


def test_a_process_connected_to_ray_refuses_to_start_a_simulated_cluster(ray_session):
    from sgd_dist.backends.base import ClusterError
    from sgd_dist.backends.ray.backend import RayBackend

    with pytest.raises(ClusterError, match=r"^cluster\.simulated_nodes=2 starts its own Ray cluster, but this "
                                           r"process is already connected to Ray at 127\.0\.0\.1:\d+: run it in a "
                                           r"fresh process"):
        RayBackend(make_config("cluster.simulated_nodes=2"))


# -- removing a node, in its own process --------------------------------------------------------------------


@pytest.mark.slow
def test_removing_a_simulated_node_kills_the_workers_on_it(tmp_path):
    before = _shm_entries()
    script = TESTS / "simulated_support.py"
    proc = subprocess.run([sys.executable, str(script), "remove_node", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=300, env=_env(), cwd=TESTS)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads((tmp_path / "r.json").read_text())
    head, other = seen["node_ids"]
    assert seen["worker_nodes"] == [head, other, head]  # round-robin: worker r on node r mod 2
    assert seen["server_node"] == head and seen["transport"] == "ray"
    assert seen["node_addresses"] == ["127.0.0.1", "127.0.0.1"]
    assert len(seen["listening"]) >= 4 and set(seen["listening"]) == {"127.0.0.1"}  # loopback only
    assert seen["remove_head"].startswith("ValueError: simulated node 0 cannot be removed: nodes 1..1 can")
    assert seen["remove_unknown"].startswith("ValueError: simulated node 2 cannot be removed")
    assert seen["removed_worker"] == "ActorDiedError"  # worker 1 lived on node 1
    assert seen["others"] == [0, 2] and seen["server_after"] == head  # node 0's actors still answer
    assert "already were" in seen["remove_again"] and seen["node_ids_after"] == [head, None]
    assert not seen["ray_initialized_after"] and not seen["simulated_after"]
    # close() stopped the whole cluster: every raylet, the GCS, the workers; nothing left in /dev/shm
    assert not any(alive(pid) for pid in seen["cluster_pids"] + seen["worker_pids"])
    assert [p for p in Path("/proc").iterdir() if p.name.isdigit() and seen["session"].encode() in _cmdline(p)] == []
    assert not any(_raylet_pid(name) in seen["raylet_pids"] for name in _shm_entries())
    assert _stale(_shm_entries() - before) == []


@pytest.mark.slow
def test_a_worker_on_a_removed_node_is_replaced_in_seconds(tmp_path):
    """A remove_node fault mid-run: the lost worker's bundle was pinned to that node, so its replacement goes
    straight to a live node instead of waiting out the replacement timeout (30 s); then the server is killed
    too, and rebuilt with its workers on the surviving node from the latest checkpoint. The run stays exact."""
    steps = ["train.steps=3000", "train.eval_every=500"]  # long enough for the driver to see step 20 mid-run
    (tmp_path / "tiny.yaml").write_text(dump_config(make_config(*steps)))
    proc = subprocess.run(
        [str(BIN / "sgd-dist"), "train", "--config", str(tmp_path / "tiny.yaml"), "--out", str(tmp_path / "run"),
         "cluster.simulated_nodes=2", "train.checkpoint_every=500",
         "faults=[{kind: remove_node, node: 1, step: 20}, {kind: kill_server, step: 1800}]"],
        capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    kinds = [f["fault"] for f in summary["faults"]]
    assert kinds == ["remove_node", "worker_lost", "worker_replaced", "kill_server", "server_lost"], summary["faults"]
    lost, replaced = summary["faults"][1:3]
    assert lost["worker"] == replaced["worker"] == 1 and lost["noticed_s"] < 2, lost
    assert replaced["recovery_s"] < 15, replaced
    assert summary["faults"][4]["restored_step"] == 1500 and summary["status"] == "completed"
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    steps_recorded = [json.loads(line)["step"] for line in metrics.splitlines()]
    assert steps_recorded == list(range(3001))
    serial, _ = _run(make_config(*steps, "cluster.backend=serial"), tmp_path, "serial")
    assert summary["weights"] == serial["weights"]


@pytest.mark.slow
def test_a_simulated_cluster_stops_after_a_failed_run(tmp_path):
    """A run on 2 simulated nodes fails (its loss diverges while the server's loop still runs): the whole cluster
    stops all the same (every raylet, the GCS, the workers), leaving nothing in /dev/shm and Ray's current-cluster
    file as it was, and the run directory says failed."""
    proc = subprocess.run([sys.executable, str(TESTS / "simulated_support.py"), "failed_run", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=300, env=_env(), cwd=TESTS)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads((tmp_path / "r.json").read_text())
    assert seen["error"].startswith("DivergenceError: the mini-batch loss is"), seen["error"]
    assert seen["worker_nodes"] == 2 and seen["transport"] == "ray"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"].startswith("DivergenceError")
    assert not seen["ray_initialized_after"] and seen["address_file_after"] == seen["address_file_before"]
    assert len(seen["cluster_pids"]) >= 4 and not any(alive(pid) for pid in seen["cluster_pids"] + seen["worker_pids"])
    assert [p for p in Path("/proc").iterdir() if p.name.isdigit() and seen["session"].encode() in _cmdline(p)] == []
    # nothing in /dev/shm named after the run's processes: a segment after its server, a semaphore after its raylet
    # (other sessions on this machine may leave their own meanwhile)
    pids = {*seen["cluster_pids"], *seen["worker_pids"], seen["server_pid"]}
    assert [name for name in _shm_entries() if _creator(name) in pids] == []


def _creator(name: str) -> int | None:
    """The pid an entry of /dev/shm is named after: a segment's creator, a channel semaphore's raylet."""
    if name.startswith(PREFIX):
        pid = name[len(PREFIX):].split("-")[0]
        return int(pid) if pid.isdigit() else None
    return _raylet_pid(name)
