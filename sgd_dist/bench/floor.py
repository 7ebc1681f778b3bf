"""The floor: the one-process loop a user would write, and the machine's memory bandwidth.

The loops run in this process at torch's default thread count (all cores) on the whole dataset, K x 256 rows a
step: contiguous batches (views of the data, no copy) or a per-epoch permutation gathered with ``X[idx]``; the
gradient by ``loss.backward()`` or written out, ``(2 / B) * ((Xb @ w - yb) @ Xb)``. The faster of the two gradient
forms is the floor of its sampling. The bandwidth is that of a large tensor copy, also at all threads.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch

from sgd_dist.bench.options import SAMPLINGS
from sgd_dist.bench.problem import Problem
from sgd_dist.core.data import generate

# torch's own default in this process (all cores), read before any system of the benchmark changes it
DEFAULT_THREADS = torch.get_num_threads()
GRADIENTS = ("autograd", "formula")
BANDWIDTH_BYTES = 1 << 30
BANDWIDTH_REPEATS = 5


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_loop(problem: Problem, num_steps: int, sampling: str, gradient: str) -> tuple[list[float], torch.Tensor]:
    """``num_steps`` SGD steps from w = 0; the times at which the steps ended, and the final weights.

    Epoch e visits the dataset's ``n / B`` batches once: rows [iB, (i+1)B) in order (blocks), or the batches of
    the e-th ``torch.randperm(n)`` of one generator seeded with ``problem.seed`` (shuffle).
    """
    if sampling not in SAMPLINGS or gradient not in GRADIENTS:
        raise ValueError(f"sampling {sampling!r}, gradient {gradient!r}: choose from {SAMPLINGS} and {GRADIENTS}")
    X, y = generate(problem.data_config())
    B, n, lr = problem.global_batch, problem.n_samples, problem.lr
    per_epoch = n // B
    g = torch.Generator().manual_seed(problem.seed)
    w = torch.zeros(problem.dim, dtype=X.dtype, requires_grad=gradient == "autograd")
    perm = None
    with torch_threads(DEFAULT_THREADS):
        stamps = [time.perf_counter()]
        for step in range(num_steps):
            i = step % per_epoch
            if sampling == "blocks":
                Xb, yb = X[i * B:(i + 1) * B], y[i * B:(i + 1) * B]
            else:
                if i == 0:
                    perm = torch.randperm(n, generator=g)
                idx = perm[i * B:(i + 1) * B]
                Xb, yb = X[idx], y[idx]
            if gradient == "autograd":
                ((Xb @ w - yb) ** 2).mean().backward()
                with torch.no_grad():
                    w.sub_(lr * w.grad)
                w.grad = None
            else:
                w.sub_(lr * ((2.0 / B) * ((Xb @ w - yb) @ Xb)))
            stamps.append(time.perf_counter())
    return stamps, w.detach().clone()


def memory_bandwidth(nbytes: int = BANDWIDTH_BYTES, repeats: int = BANDWIDTH_REPEATS) -> dict:
    """GB/s of ``dst.copy_(src)`` of ``nbytes`` at torch's default threads, the best of ``repeats`` copies.

    Bytes read plus bytes written (STREAM's convention for a copy), over the fastest copy's seconds; both
    tensors are written once before, so no copy pays for page faults.
    """
    n = max(nbytes // 4, 1)
    with torch_threads(DEFAULT_THREADS):
        src = torch.ones(n, dtype=torch.float32)
        dst = torch.zeros(n, dtype=torch.float32)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t0)
    return {"gb_s": 2 * 4 * n / best / 1e9, "copy_bytes": 4 * n, "best_s": best, "repeats": repeats,
            "threads": DEFAULT_THREADS}
