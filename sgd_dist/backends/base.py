"""What every backend does, written once over a two-verb transport (``_call`` and ``_get``).

A backend owns K shard workers and one parameter server. The serial backend's transport calls the objects
directly; the Ray backend's submits actor tasks and returns ObjectRefs, which it chains without waiting:
a worker's gradient goes straight into the server's ``apply`` and the new weights straight into the next
gradients, so no step makes a round trip through the driver. Metrics rows and evaluation results come
back in batches through ``collect``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

import torch

from sgd_dist.config import Config
from sgd_dist.data import shard_bounds, torch_dtype
from sgd_dist.objectives import LinearStats, NewtonTerms

Handle = Any  # a value (serial) or a ray.ObjectRef (ray)


class Backend(ABC):
    name: str

    def __init__(self, config: Config) -> None:
        self.config = config
        self.workers: list[Any] = []
        self.server: Any = None
        self.device = "cpu"
        self.info: list[dict] = []
        self.address: str | None = None  # the Ray cluster joined, if any
        self.version = 0
        self._weights: Handle = None
        self._rows: list[tuple[int, Handle]] = []
        self._evals: dict[int, list[Handle]] = {}

    # -- transport -------------------------------------------------------------------------------
    @abstractmethod
    def _call(self, target: Any, method: str, *args: Any, num_returns: int = 1) -> Any:
        """Start ``target.method(*args)``; return a handle (or a tuple of ``num_returns`` handles)."""

    @abstractmethod
    def _get(self, handles: Sequence[Handle]) -> list[Any]:
        """Wait for the handles and return their values."""

    def close(self) -> None:
        """Release the workers and the server."""

    # -- setup and reference ---------------------------------------------------------------------
    def worker_info(self) -> list[dict]:
        return self._get([self._call(w, "info") for w in self.workers])

    def linear_stats(self) -> LinearStats:
        parts = self._get([self._call(w, "linear_stats") for w in self.workers])
        return sum(parts[1:], parts[0])

    def newton_terms(self, weights: torch.Tensor) -> NewtonTerms:
        parts = self._get([self._call(w, "newton_terms", weights) for w in self.workers])
        return sum(parts[1:], parts[0])

    # -- the schedule's verbs --------------------------------------------------------------------
    def start(self) -> None:
        """Start the server's clock; the starting weights are version 0."""
        self._weights, row = self._call(self.server, "start", num_returns=2)
        self._rows.append((0, row))

    def dispatch(self, worker: int, step: int) -> Handle:
        """Worker ``worker`` computes its mini-batch ``step``'s gradient on the newest weights."""
        return self._call(self.workers[worker], "gradient", self._weights, step)

    def apply(self, gradients: Sequence[Handle]) -> int:
        """The server averages these gradients and updates; returns the new version."""
        self._weights, row = self._call(self.server, "apply", *gradients, num_returns=2)
        self.version += 1
        self._rows.append((self.version, row))
        return self.version

    def evaluate(self) -> None:
        """Every worker evaluates the full-shard loss at the current version."""
        self._evals[self.version] = [self._call(w, "evaluate", self._weights) for w in self.workers]

    def collect(self, upto: int) -> list[dict]:
        """Metrics rows of versions <= upto not yet collected, with eval_loss merged into evaluated ones."""
        take = [(v, h) for v, h in self._rows if v <= upto]
        if not take:
            return []
        evals = [(v, self._evals[v]) for v, _ in take if v in self._evals]
        flat = [h for _, hs in evals for h in hs]
        values = self._get([h for _, h in take] + flat)
        # forget the handles only once they are read: after a failure the finished rows can still be collected
        self._rows = self._rows[len(take):]
        for v, _ in evals:
            del self._evals[v]
        rows = [dict(r) for r in values[: len(take)]]
        by_version = {row["step"]: row for row in rows}
        pos = len(take)
        for v, hs in evals:
            parts = values[pos : pos + len(hs)]
            pos += len(hs)
            by_version[v]["eval_loss"] = sum(s for s, _ in parts) / sum(n for _, n in parts)
        return rows

    def final_weights(self) -> torch.Tensor:
        return self._get([self._weights])[0]


def worker_args(config: Config) -> list[dict]:
    """Constructor arguments of each shard worker (the device and threads are the backend's to add)."""
    return [
        dict(data=config.data, rank=rank, start=start, stop=stop, batch_size=config.train.batch_size,
             seed=config.train.seed)
        for rank, (start, stop) in enumerate(shard_bounds(config.data.n_samples, config.cluster.num_workers))
    ]


def worker_threads(config: Config) -> int:
    """torch threads of each worker: its reserved CPUs, at least one (the serial reference uses the same)."""
    return max(1, int(config.cluster.cpus_per_worker))


def server_args(config: Config) -> dict:
    """Constructor arguments of the parameter server."""
    dtype = torch_dtype(config.data.dtype)
    init = config.model.init
    weights = torch.zeros(config.data.dim, dtype=dtype) if init == "zeros" else torch.tensor(init, dtype=dtype)
    return dict(init_weights=weights, optim=config.optim, total_steps=config.train.steps,
                global_batch_size=config.global_batch_size())
