"""What a run needs of the machine, checked before anything starts (no Ray): memory, cores, a GPU."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config

from sgd_dist.backends import capacity
from sgd_dist.config import ConfigError
from sgd_dist.engine.worker import ShardWorker


@pytest.mark.parametrize("overrides", [[], ["train.batch_size=full"], ["data.dtype=float64", "data.n_features=30"]])
def test_a_workers_data_is_what_a_real_worker_holds(overrides):
    config = make_config("data.n_samples=5001", "cluster.num_workers=3", *overrides)
    rows = 1667  # the largest of 1667, 1667, 1667
    worker = ShardWorker(config.data, 0, 0, rows, config.train.batch_size, seed=0)
    held = worker.X.nbytes + worker.y.nbytes
    if worker.sampler is not None:
        worker.sampler.indices(0)
        held += worker.sampler._perm.nbytes  # one epoch's permutation
    block = min(capacity.GENERATION_BLOCK_BYTES, held)  # generation holds one block beside the shard
    need = capacity.memory_need(config)
    assert held <= need.shard <= held + block
    assert need.per_worker == need.shard + capacity.WORKER_RUNTIME_BYTES
    assert need.total == 3 * need.per_worker + capacity.WORKER_RUNTIME_BYTES  # and the server


def test_where_the_check_applies():
    assert capacity.runs_on_this_machine(make_config("cluster.backend=serial"))
    assert capacity.runs_on_this_machine(make_config("cluster.simulated_nodes=2"))
    assert not capacity.runs_on_this_machine(make_config("cluster.address=10.0.0.1:6379"))


def test_a_ray_address_in_the_environment_is_a_cluster_to_join(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert not capacity.runs_on_this_machine(make_config())


def test_oversubscribed_cores_are_allowed_with_a_note(monkeypatch):
    monkeypatch.setattr(capacity, "runs_on_this_machine", lambda config: True)
    monkeypatch.setattr(capacity.os, "cpu_count", lambda: 2)
    assert capacity.check_this_machine(make_config("cluster.num_workers=4")) == [
        "sgd-dist: note: 4 workers share this machine's 2 cores: the numbers are the same, the steps take longer"]
    assert capacity.check_this_machine(make_config("cluster.num_workers=2")) == []
    assert capacity.check_this_machine(make_config("cluster.num_workers=4", "cluster.backend=serial")) == []


def test_workers_that_cannot_fit_name_what_they_need_and_what_is_there(monkeypatch):
    monkeypatch.setattr(capacity, "runs_on_this_machine", lambda config: True)
    monkeypatch.setattr(capacity, "machine_memory", lambda: (4_000_000_000, 8_000_000_000))
    with pytest.raises(ConfigError, match=r"^cluster\.num_workers=64 needs about 20\.2 GB on this machine \(each "
                                          r"worker 310 MB of runtime \+ .* of data, plus the server\); it has 4 GB "
                                          r"available of 8 GB: use fewer workers \(cluster\.num_workers=11 fits\)"):
        capacity.check_this_machine(make_config("cluster.num_workers=64", "train.batch_size=4"))
    assert capacity.check_this_machine(make_config("cluster.num_workers=11", "train.batch_size=4")) is not None


def test_a_worker_too_big_for_every_node_of_a_joined_cluster_is_refused():
    config = make_config("data.n_samples=1e9", "data.n_features=10")
    # 5e8 rows of 11 float32 parameters and a label, their int64 permutation and one 64 MiB generation block
    assert capacity.memory_need(config).shard == 5e8 * 12 * 4 + 5e8 * 8 + 64 * 2**20
    with pytest.raises(ConfigError, match=r"^each worker needs about 28\.4 GB "
                                          r"\(28\.1 GB of data \+ 310 MB of runtime\); "
                                          r"the Ray cluster's largest node has 16 GB of memory for tasks"):
        capacity.check_node_memory(config, 16e9)
    capacity.check_node_memory(make_config(), 16e9)


def test_cuda_without_a_gpu_is_refused_before_anything_starts(monkeypatch):
    monkeypatch.setattr(capacity, "runs_on_this_machine", lambda config: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^cluster\.device=cuda, but this machine has no CUDA device"):
        capacity.check_this_machine(make_config("cluster.device=cuda"))
    monkeypatch.setattr(capacity, "runs_on_this_machine", lambda config: False)  # a cluster's GPUs are its own
    assert capacity.check_this_machine(make_config("cluster.device=cuda")) == []
