"""The CUDA path: shards and gradients on the GPU, equal to the CPU within float32 round-off.

Skipped where torch or Ray sees no GPU (as on the 2-core CI machines)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config

from sgd_dist.backends.base import worker_args
from sgd_dist.engine.worker import ShardWorker
from sgd_dist.run.rundir import read_metrics
from sgd_dist.run.trainer import train

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@needs_cuda
def test_worker_holds_its_shard_on_the_gpu_and_matches_the_cpu():
    args = worker_args(make_config())[0]
    gpu, cpu = ShardWorker(**args, device="cuda"), ShardWorker(**args, device="cpu")
    assert gpu.X.is_cuda and torch.equal(gpu.X.cpu(), cpu.X)  # generated on the CPU, copied: same numbers
    w = torch.tensor([0.5, -1.0, 2.0, 0.1])
    g, c = gpu.gradient(w, 4), cpu.gradient(w, 4)
    assert not g.grad.is_cuda  # gradients travel on the CPU to the server
    torch.testing.assert_close(g.grad, c.grad, rtol=1e-5, atol=1e-6)


@needs_cuda
def test_serial_run_on_cuda_tracks_the_cpu_run(tmp_path):
    runs = {}
    for device in ["cuda", "cpu"]:
        config = make_config("cluster.backend=serial", f"cluster.device={device}", f"output.dir={tmp_path / device}")
        runs[device] = train(config, console=False, progress=False)
    assert runs["cuda"].summary["device"] == "cuda"
    a = [r["loss"] for r in read_metrics(runs["cuda"].run_dir)[1:]]
    b = [r["loss"] for r in read_metrics(runs["cpu"].run_dir)[1:]]
    assert a == pytest.approx(b, rel=1e-4)


@needs_cuda
def test_ray_workers_ask_for_gpus(ray_session, tmp_path):
    if not ray_session.cluster_resources().get("GPU"):
        pytest.skip("the Ray session has no GPU")
    config = make_config("cluster.device=auto", "cluster.gpus_per_worker=0.5", f"output.dir={tmp_path / 'r'}")
    summary = train(config, console=False, progress=False).summary
    assert summary["device"] == "cuda" and all(w["device"].startswith("cuda") for w in summary["workers"])
