"""The distributed run equals the serial reference: same per-step losses and final weights, on each transport."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config

from sgd_dist.run.rundir import read_metrics
from sgd_dist.run.trainer import train


def run(config, tmp_path, name):
    result = train(config.model_copy(update={"output": config.output.model_copy(update={"dir": str(tmp_path / name)})}),
                   console=False, progress=False)
    rows = read_metrics(result.run_dir)
    return result.summary, rows


def losses(rows):
    return [r["loss"] for r in rows if r["step"] > 0]


def evals(rows):
    return [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]


TRANSPORTS = ["shm", "ray"]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("num_workers", [1, 2, 4])
def test_ray_equals_serial(ray_session, tmp_path, num_workers, transport):
    config = make_config(f"cluster.num_workers={num_workers}", "train.steps=30", f"cluster.transport={transport}")
    ray_summary, ray_rows = run(config, tmp_path, "ray")
    serial_config = make_config(f"cluster.num_workers={num_workers}", "train.steps=30", "cluster.backend=serial")
    serial_summary, serial_rows = run(serial_config, tmp_path, "serial")
    assert ray_summary["backend"] == "ray" and serial_summary["backend"] == "serial"
    assert ray_summary["transport"] == transport and serial_summary["transport"] == "local"
    assert len(losses(ray_rows)) == 30
    assert losses(ray_rows) == losses(serial_rows)  # bit-equal: same math, same order
    assert ray_summary["weights"] == serial_summary["weights"]
    assert evals(ray_rows) == evals(serial_rows)


@pytest.mark.parametrize(
    "overrides",
    [
        ("optim.momentum=0.9", "optim.nesterov=true", "optim.schedule=cosine", "optim.warmup_steps=5",
         "optim.weight_decay=0.01"),
        ("data.kind=logistic", "optim.schedule=step", "optim.step_size=7", "optim.lr_scaling=linear",
         "optim.base_batch_size=16", "data.x_dist=normal"),
        ("data.n_samples=515", "cluster.num_workers=3", "train.batch_size=full", "data.dtype=float64"),
        ("train.sampling=blocks", "train.batch_size=24", "train.steps=25", "data.kind=logistic"),  # 10 batches
    ],
    ids=["momentum-cosine-wd", "logistic-step-scaled", "uneven-full-batch-f64", "blocks"],
)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_ray_equals_serial_across_options(ray_session, tmp_path, overrides, transport):
    _, ray_rows = run(make_config(*overrides, f"cluster.transport={transport}"), tmp_path, "ray")
    _, serial_rows = run(make_config(*overrides, "cluster.backend=serial"), tmp_path, "serial")
    assert losses(ray_rows) == losses(serial_rows)
    assert [r["lr"] for r in ray_rows] == [r["lr"] for r in serial_rows]
    assert evals(ray_rows) == evals(serial_rows)


def test_full_batch_over_k_workers_equals_one_worker(tmp_path):
    # averaging the shard gradients weighted by rows is the big-batch gradient, up to float32 round-off
    one, _ = run(make_config("cluster.num_workers=1", "train.batch_size=full", "cluster.backend=serial"),
                 tmp_path, "k1")
    three, _ = run(make_config("cluster.num_workers=3", "train.batch_size=full", "cluster.backend=serial"),
                   tmp_path, "k3")
    torch.testing.assert_close(torch.tensor(three["weights"]), torch.tensor(one["weights"]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_ray_equals_serial_bit_for_bit_at_a_realistic_size(ray_session, tmp_path, transport):
    """1e5 rows x 100 features, 2 x 4096 rows a step: reductions this large round differently with different
    thread counts, so the serial reference must compute with the Ray workers' count (cluster.cpus_per_worker),
    whatever this process uses, and give this process its own count back afterwards."""
    overrides = ("data.n_samples=1e5", "data.n_features=100", "train.batch_size=4096", "train.steps=30",
                 "train.eval_every=10", "optim.lr=0.05", "cluster.cpus_per_worker=1")
    previous = torch.get_num_threads()
    torch.set_num_threads(4)  # not the workers' 1 thread, on any machine
    try:
        serial_summary, serial_rows = run(make_config(*overrides, "cluster.backend=serial"), tmp_path, "serial")
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(previous)
    ray_summary, ray_rows = run(make_config(*overrides, f"cluster.transport={transport}"), tmp_path, "ray")
    assert len(losses(ray_rows)) == 30
    assert losses(ray_rows) == losses(serial_rows)
    assert evals(ray_rows) == evals(serial_rows)
    assert ray_summary["weights"] == serial_summary["weights"]
