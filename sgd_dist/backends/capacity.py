"""Whether a run fits where it will run, checked before anything starts (no Ray here).

A run on this machine (the serial or virtual backend, an embedded local Ray, a simulated cluster) needs memory for
every worker's runtime and shard (the virtual backend: the data once and each worker's small state); the embedded
Ray gives itself as many logical CPUs as the workers reserve, so Ray's own "cluster too small" can never fire
there, and without this check a thousand workers would be forked until the machine stalls. Oversubscribed cores
are allowed (the numbers do not change, the steps slow down): they only get a console note. On a cluster that is
joined, each worker must fit the largest node's memory.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

import torch

from sgd_dist.config import Config, ConfigError
from sgd_dist.core.data import shard_bounds, torch_dtype

# A worker actor's own memory with a tiny shard: torch, Ray's core worker and the transport imported, after a
# run (peak RSS 0.31 GB measured here, Ray 2.60, torch 2.13 CPU; the server actor is the same process kind).
WORKER_RUNTIME_BYTES = 310_000_000
GENERATION_BLOCK_BYTES = 64 * 1024 * 1024  # data.BLOCK_BYTES: the one block held while a shard is generated
# A virtual backend's worker beside its slice of the data: the ShardWorker object, its sampler and batch buffers,
# rounded up (measured here about 5 KB: peak RSS 0.37 GB with 10,000 workers of the default problem, batch 64,
# against 0.33 GB with 1,024).
VIRTUAL_WORKER_BYTES = 20_000


@dataclass(frozen=True)
class Need:
    """The memory a run's processes hold at their peak, in bytes."""

    per_worker: int  # the largest worker: runtime plus shard
    shard: int  # the largest worker's shard, its labels, its epoch permutation and one generation block
    total: int  # every worker plus the server's runtime


def memory_need(config: Config) -> Need:
    """What the run's workers (and its server) hold at their peak, from the config alone."""
    data = config.data
    itemsize = torch_dtype(data.dtype).itemsize
    rows = max(stop - start for start, stop in shard_bounds(data.n_samples, config.cluster.num_workers))
    minibatch = config.train.batch_size != "full"
    shard = rows * (data.dim + 1) * itemsize + (rows * 8 if minibatch else 0) + min(
        GENERATION_BLOCK_BYTES, rows * (data.dim + 1) * itemsize)
    per_worker = WORKER_RUNTIME_BYTES + shard
    total = config.cluster.num_workers * per_worker + WORKER_RUNTIME_BYTES
    return Need(per_worker, shard, total)


def virtual_need(config: Config) -> int:
    """What a virtual run holds at its peak, in bytes: the dataset generated once (its rows, labels, the epoch
    permutations and one generation block), each worker's state and its batch, and this process's runtime."""
    data, train = config.data, config.train
    itemsize = torch_dtype(data.dtype).itemsize
    rows = data.n_samples * (data.dim + 1) * itemsize
    minibatch = train.batch_size != "full"
    batches = sum(0 if b == "full" else b for b in config.worker_batch_sizes()) * (data.dim + 1) * itemsize
    return (rows + (data.n_samples * 8 if minibatch else 0) + min(GENERATION_BLOCK_BYTES, rows) + batches
            + config.cluster.num_workers * VIRTUAL_WORKER_BYTES + WORKER_RUNTIME_BYTES)


def machine_memory() -> tuple[int, int]:
    """(available, total) bytes of this machine's memory (/proc/meminfo; else the physical pages)."""
    try:
        fields = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                fields[key] = int(value.split()[0]) * 1024
        return fields.get("MemAvailable", fields["MemFree"]), fields["MemTotal"]
    except (OSError, KeyError, ValueError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return total, total


def runs_on_this_machine(config: Config) -> bool:
    """Whether the run's workers will be processes of this machine that nothing else has sized: the serial
    backend, a simulated cluster, or the embedded Ray this process will start (no address, no RAY_ADDRESS,
    no Ray already connected)."""
    cluster = config.cluster
    if cluster.backend in ("serial", "virtual") or cluster.simulated_nodes:
        return True
    ray = sys.modules.get("ray")
    connected = ray is not None and ray.is_initialized()
    return cluster.address is None and not os.environ.get("RAY_ADDRESS") and not connected


def check_this_machine(config: Config) -> list[str]:
    """Refuse (ConfigError, one line) a run on this machine that its memory cannot hold, or that wants a GPU it
    does not have; return the console notes (oversubscribed cores)."""
    if not runs_on_this_machine(config):
        return []
    cluster = config.cluster
    if cluster.device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("cluster.device=cuda, but this machine has no CUDA device (torch sees none); "
                              "use cpu or auto")
    available, total = machine_memory()
    if cluster.backend == "virtual":
        needed = virtual_need(config)
        if needed > available:
            raise ConfigError(f"cluster.backend=virtual needs about {_gb(needed)} in this process (the data once, "
                              f"and {cluster.num_workers} workers' state); this machine has {_gb(available)} "
                              f"available of {_gb(total)}: lower data.n_samples or data.n_features")
        return []
    need = memory_need(config)
    serial = cluster.backend == "serial"
    needed = need.shard * cluster.num_workers if serial else need.total  # serial: one process, every shard
    if needed > available:
        k = cluster.num_workers
        if serial:
            raise ConfigError(f"the data needs about {_gb(needed)} in this process ({k} shards of "
                              f"{_gb(need.shard)}); this machine has {_gb(available)} available of {_gb(total)}: "
                              "lower data.n_samples or data.n_features")
        fit = max(0, (available - WORKER_RUNTIME_BYTES) // need.per_worker)
        advice = ("lower data.n_samples or data.n_features" if fit < 1 or need.shard > WORKER_RUNTIME_BYTES
                  else f"use fewer workers (cluster.num_workers={fit} fits), or a cluster (cluster.address)")
        if virtual_need(config) <= available:
            advice += (f", or cluster.backend=virtual (every worker in this one process, on a modelled cluster's "
                       f"clock: about {_gb(virtual_need(config))})")
        raise ConfigError(f"cluster.num_workers={k} needs about {_gb(needed)} on this machine (each worker "
                          f"{_gb(WORKER_RUNTIME_BYTES)} of runtime + {_gb(need.shard)} of data, plus the server); "
                          f"it has {_gb(available)} available of {_gb(total)}: {advice}")
    cores = os.cpu_count() or 1
    reserved = cluster.num_workers * max(cluster.cpus_per_worker, 1.0)
    if not serial and reserved > cores:
        return [f"sgd-dist: note: {cluster.num_workers} workers share this machine's {cores} cores: the numbers "
                "are the same, the steps take longer"]
    return []


def check_node_memory(config: Config, largest_node_bytes: float) -> None:
    """Refuse (ConfigError) a run on a joined cluster whose largest worker fits no node's memory."""
    need = memory_need(config)
    if need.per_worker > largest_node_bytes:
        raise ConfigError(f"each worker needs about {_gb(need.per_worker)} ({_gb(need.shard)} of data + "
                          f"{_gb(WORKER_RUNTIME_BYTES)} of runtime); the Ray cluster's largest node has "
                          f"{_gb(largest_node_bytes)} of memory for tasks: lower data.n_samples or "
                          "data.n_features, or raise cluster.num_workers")


def _gb(n: float) -> str:
    """Bytes in the unit that reads best: 0.31 GB, 4.8 TB, 2.4 KB."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{math.ceil(n)} bytes"
