"""The distributed peer systems, each a plain function that runs ``warmup + steps`` steps of the benchmark's
problem and returns the wall-clock times (seconds, one clock per system) at which its steps ended.

Every system does the same arithmetic as the seed: a mean-squared-error loss, its gradient by
``loss.backward()``, then ``w.sub_(lr * g)`` under ``no_grad``; every worker draws its mini-batches from its
own shard with ``sgd_dist.core.data.MiniBatchSampler`` (a per-epoch permutation, gathered with ``X[idx]``). Ray is
imported only by the functions that use it, so a torch.distributed child process stays light.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from pathlib import Path

import torch

from sgd_dist.bench.problem import Problem
from sgd_dist.core.data import MiniBatchSampler, generate, shard_bounds

PEER_THREADS = 1  # each process of a distributed peer computes on one thread: K processes share K cores


def _shard(problem: Problem, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    start, stop = shard_bounds(problem.n_samples, problem.num_workers)[rank]
    return generate(problem.data_config(), start, stop)


def _mse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((pred - y) ** 2).mean()


# -- 1. Ray's documentation pattern: DataWorker / ParameterServer actors ----------------------------------

class DataWorker:
    """As in Ray's parameter-server example, but holding only its own shard (not the whole dataset)."""

    def __init__(self, problem: Problem, rank: int) -> None:
        torch.set_num_threads(PEER_THREADS)
        self.X, self.y = _shard(problem, rank)
        self.sampler = MiniBatchSampler(problem.seed, rank, self.X.shape[0], problem.batch_size)
        self.step = 0

    def ready(self) -> bool:
        return True

    def compute_gradients(self, weights):
        w = torch.tensor(weights, requires_grad=True)  # a copy, as the example's set_weights makes
        idx = self.sampler.indices(self.step)
        self.step += 1
        _mse(self.X[idx] @ w, self.y[idx]).backward()
        return w.grad.numpy()


class ParameterServer:
    """As in Ray's example, but averaging the gradients (the example sums them); stamps each update."""

    def __init__(self, problem: Problem) -> None:
        torch.set_num_threads(PEER_THREADS)
        self.w = torch.zeros(problem.dim)
        self.lr = problem.lr
        self.stamps: list[float] = []

    def get_weights(self):
        self.stamps = [time.perf_counter()]
        return self.w.numpy()

    def apply_gradients(self, *gradients):
        import numpy as np

        grad = torch.from_numpy(np.stack(gradients).mean(axis=0))
        self.w.sub_(self.lr * grad)
        self.stamps.append(time.perf_counter())
        return self.w.numpy()

    def get_stamps(self) -> list[float]:
        return self.stamps


def run_docs_ps(problem: Problem, num_steps: int) -> list[float]:
    """The driver chains ObjectRefs (``weights = ps.apply_gradients.remote(*grads)``) and waits only at the
    end; the step times are the server's own clock. Needs Ray initialised."""
    import ray

    worker_cls = ray.remote(num_cpus=1)(DataWorker)
    server_cls = ray.remote(num_cpus=1)(ParameterServer)
    workers = [worker_cls.remote(problem, rank) for rank in range(problem.num_workers)]
    ps = server_cls.remote(problem)
    try:
        ray.get([w.ready.remote() for w in workers])  # shards generated before the clock starts
        weights = ps.get_weights.remote()
        for _ in range(num_steps):
            grads = [w.compute_gradients.remote(weights) for w in workers]
            weights = ps.apply_gradients.remote(*grads)
        ray.get(weights)
        return ray.get(ps.get_stamps.remote())
    finally:
        for actor in [*workers, ps]:
            ray.kill(actor)


# -- 2. torch.distributed gloo DDP, K processes ------------------------------------------------------------

class _Linear(torch.nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(dim))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X @ self.w


def _ddp_loop(model: torch.nn.Module, weight: torch.nn.Parameter, problem: Problem, rank: int,
              num_steps: int) -> list[float]:
    """The training loop shared by plain DDP and Ray Train: DDP averages the gradients in backward()."""
    X, y = _shard(problem, rank)
    sampler = MiniBatchSampler(problem.seed, rank, X.shape[0], problem.batch_size)
    stamps = [time.perf_counter()]
    for step in range(num_steps):
        idx = sampler.indices(step)
        _mse(model(X[idx]), y[idx]).backward()
        with torch.no_grad():
            weight.sub_(problem.lr * weight.grad)
        weight.grad = None
        stamps.append(time.perf_counter())
    return stamps


def _loopback_gloo() -> None:
    """Keep gloo's sockets on loopback (it would otherwise bind the address the host name resolves to)."""
    if any(name == "lo" for _, name in socket.if_nameindex()):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


def _ddp_process(rank: int, problem: Problem, num_steps: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(PEER_THREADS)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    _loopback_gloo()
    dist.init_process_group("gloo", rank=rank, world_size=problem.num_workers)
    try:
        model = _Linear(problem.dim)
        stamps = _ddp_loop(DistributedDataParallel(model), model.w, problem, rank, num_steps)
        if rank == 0:
            Path(out).write_text(json.dumps(stamps))
        dist.barrier()  # nobody tears gloo down while a peer still talks to it
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ddp(problem: Problem, num_steps: int) -> list[float]:
    """K processes started with torch.multiprocessing (spawn), MASTER_ADDR 127.0.0.1, gloo; rank 0's clock."""
    import torch.multiprocessing as mp

    for attempt in range(2):  # gloo's threads now and then abort a process at exit ("terminate called without
        with tempfile.TemporaryDirectory(prefix="sgd-bench-ddp-") as tmp:  # an active exception"): once more
            out = os.path.join(tmp, "stamps.json")
            try:
                mp.spawn(_ddp_process, args=(problem, num_steps, free_port(), out), nprocs=problem.num_workers,
                         join=True)
            except mp.ProcessExitedException:
                if not os.path.exists(out):  # it died before rank 0 wrote its times: measure again, then give up
                    if attempt:
                        raise
                    continue
            return json.loads(Path(out).read_text())
    raise AssertionError("unreachable")


# -- 3. Ray Train's TorchTrainer, DDP over gloo ------------------------------------------------------------

RAY_TRAIN_HEALTH_CHECK_INTERVAL_S = "0.25"  # Ray's default of 2 s adds up to 2 s to every report()


def ray_train_available() -> bool:
    try:
        import ray.train.torch  # noqa: F401
    except ImportError:
        return False
    return True


def _ray_train_loop(config: dict) -> None:
    import ray.train
    from ray.train.torch import prepare_model

    torch.set_num_threads(PEER_THREADS)
    problem, num_steps = config["problem"], config["num_steps"]
    rank = ray.train.get_context().get_world_rank()
    model = _Linear(problem.dim)
    ddp = prepare_model(model)
    stamps = _ddp_loop(ddp, model.w, problem, rank, num_steps)
    if rank == 0:  # Result.metrics keeps only what came with a checkpoint: rank 0 writes a file (one machine)
        Path(config["out"]).write_text(json.dumps(stamps))
    ray.train.report({"steps": num_steps})  # once, after the last step: report() is not on the timed path


def run_ray_train(problem: Problem, num_steps: int) -> list[float]:
    """TorchTrainer with K CPU workers; the step times come from rank 0's clock inside the training function,
    so ``fit()``'s start-up (~8 s) is not in them. Needs Ray initialised and ``ray[train]`` installed."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S)
    with tempfile.TemporaryDirectory(prefix="sgd-bench-raytrain-") as tmp:
        out = os.path.join(tmp, "stamps.json")
        trainer = TorchTrainer(
            _ray_train_loop,
            train_loop_config={"problem": problem, "num_steps": num_steps, "out": out},
            scaling_config=ScalingConfig(num_workers=problem.num_workers, use_gpu=False,
                                         resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name="sgd-bench", storage_path=tmp),
        )
        trainer.fit()
        return json.loads(Path(out).read_text())
