"""What every backend shares: K shard workers, one parameter server, and the setup calls.

A backend builds the workers and the server, answers the setup questions (worker info, the exact
reference's sums) through a two-verb call mechanism (``_call`` / ``_get``: a direct call in the serial
backend, an actor task on Ray), and runs the training loop: ``engine.loop.Loop`` over a transport, with the
metrics rows handed to the driver in batches. The loop itself is the same code everywhere.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Collection, Protocol, Sequence

import torch

from sgd_dist.config import Config
from sgd_dist.core.compression import payload_nbytes
from sgd_dist.core.data import shard_bounds, torch_dtype
from sgd_dist.core.noise_scale import GradientMoments
from sgd_dist.core.objectives import LinearStats, NewtonTerms
from sgd_dist.engine.policies import make_policy
from sgd_dist.errors import ClusterError, one_line  # noqa: F401 (the backends raise and show them from here)

Handle = Any  # a value (serial) or a ray.ObjectRef (ray)


class Sink(Protocol):
    """Where a run's records go (the trainer's Recorder)."""

    def rows(self, rows: list[dict]) -> None:
        """Metrics rows, in step order."""

    def checkpoint(self, state: dict) -> None:
        """A checkpoint; every row up to its step has reached ``rows`` before it."""

    def fault(self, entry: dict) -> None:
        """A fault that happened (injected, noticed, recovered from)."""

    def rewind(self, step: int) -> None:
        """The server was restored to ``step``: rows after it will come again (-1: from the start)."""


class Backend(ABC):
    name: str

    def __init__(self, config: Config) -> None:
        self.config = config
        self.workers: list[Any] = []
        self.server: Any = None
        self.device = "cpu"
        self.transport = "local"  # the transport the loop ran on
        self.info: list[dict] = []
        self.address: str | None = None  # the Ray cluster joined, if any
        self.loop_stats: dict = {}

    # -- setup calls ----------------------------------------------------------------------------
    @abstractmethod
    def _call(self, target: Any, method: str, *args: Any) -> Handle:
        """Start ``target.method(*args)``; return a handle."""

    @abstractmethod
    def _get(self, handles: Sequence[Handle]) -> list[Any]:
        """Wait for the handles and return their values."""

    def close(self) -> None:  # noqa: B027  (an optional hook: a backend that holds nothing need not close)
        """Release the workers, the server and the transport."""

    def worker_info(self) -> list[dict]:
        return self._get([self._call(w, "info") for w in self.workers])

    def linear_stats(self) -> LinearStats:
        parts = self._get([self._call(w, "linear_stats") for w in self.workers])
        return sum(parts[1:], parts[0])

    def newton_terms(self, weights: torch.Tensor) -> NewtonTerms:
        parts = self._get([self._call(w, "newton_terms", weights) for w in self.workers])
        return sum(parts[1:], parts[0])

    def gradient_moments(self, weights: torch.Tensor) -> GradientMoments:
        """The per-example gradient moments at ``weights``, each worker's on its shard, summed (float64)."""
        parts = self._get([self._call(w, "gradient_moments", weights) for w in self.workers])
        return sum(parts[1:], parts[0])

    def loss_sum(self, weights: torch.Tensor) -> tuple[float, int]:
        """(sum of the per-row loss over every shard, rows), in float64."""
        parts = self._get([self._call(w, "evaluate", weights) for w in self.workers])
        return sum(p[0] for p in parts), sum(p[1] for p in parts)

    # -- the training loop ----------------------------------------------------------------------
    @abstractmethod
    def run(self, policy, eval_at: Collection[int], sink: Sink, restore: dict | None = None) -> None:
        """Train to the end: the server runs the consistency policy over the transport (from the checkpoint
        ``restore``, if given); every metrics row reaches ``sink.rows`` (in batches, in step order), also those
        computed before a failure, and checkpoints and survived faults reach the sink as they happen; the loop's
        statistics end up in ``loop_stats``."""

    @abstractmethod
    def final_weights(self) -> torch.Tensor:
        """The server's weights after the run."""

    def clock_summary(self) -> dict:
        """What the run's times are measured on, for the summary: this machine's clock (a modelled one says so,
        with its model)."""
        return {"clock": "wall"}


def worker_args(config: Config) -> list[dict]:
    """Constructor arguments of each shard worker (the device and threads are the backend's to add)."""
    bounds = shard_bounds(config.data.n_samples, config.cluster.num_workers)
    return [
        dict(data=config.data, rank=rank, start=start, stop=stop, batch_size=size, seed=config.train.seed,
             optim=config.optim, total_steps=config.train.steps * config.train.local_steps,
             global_batch_size=config.global_batch_size(), stragglers=config.stragglers,
             network=config.cluster.network, sampling=config.train.sampling, compression=config.compression,
             delays={f.step: f.seconds for f in config.faults if f.kind == "delay" and f.worker == rank})
        for rank, ((start, stop), size) in enumerate(zip(bounds, config.worker_batch_sizes()))
    ]


def answer_payload_bytes(config: Config) -> int:
    """The exact wire size of a worker's compressed answer (a transport sizes its slots by it); 0: uncompressed."""
    c = config.compression
    if not c.enabled:
        return 0
    itemsize = torch.empty((), dtype=torch_dtype(config.data.dtype)).element_size()
    return payload_nbytes(c.kind, config.data.dim, itemsize, ratio=c.ratio, bucket=c.bucket)


def worker_threads(config: Config) -> int:
    """torch threads of each worker: its reserved CPUs, at least one (the serial reference uses the same)."""
    return max(1, int(config.cluster.cpus_per_worker))


def policy_for(config: Config):
    """The consistency policy of the config's mode."""
    train = config.train
    return make_policy(train.mode, config.cluster.num_workers, train.steps, staleness_bound=train.staleness_bound,
                       backup_workers=train.backup_workers, local_steps=train.local_steps)


def server_args(config: Config) -> dict:
    """Constructor arguments of the parameter server."""
    dtype = torch_dtype(config.data.dtype)
    init = config.model.init
    weights = torch.zeros(config.data.dim, dtype=dtype) if init == "zeros" else torch.tensor(init, dtype=dtype)
    return dict(init_weights=weights, optim=config.optim, total_steps=config.train.steps,
                global_batch_size=config.global_batch_size(), outer=config.train.outer,
                compression=config.compression, seed=config.train.seed)
