"""Delays that cost wall time only, never a value: stragglers and the simulated network. No Ray.

Stragglers: a worker sleeps after computing (``cluster``'s slowdown factors and random delays), so a run with
stragglers computes bit for bit what the same run without them computes; the random delays are keyed by
(seed, worker, step) like every other random choice here, so a delay pattern repeats exactly.

The network (``cluster.network``): one link per worker between it and the server (a star, as a parameter
server's is); a message of B bytes takes ``latency + B * 8 / bandwidth`` seconds, and the links are
independent, so the workers' delays overlap as their computations do. What counts as a message:

- a command carries the weights (d numbers of the data dtype) to the worker: GRADIENT, LOCAL and EVALUATE
  alike (an evaluation is of a given version, whose weights travel with it);
- an answer carries d numbers back (GRADIENT: the gradient; LOCAL: the model delta), or one float64 for
  EVALUATE (the shard's loss sum); under ``compression`` it carries the compressed payload's bytes instead
  (``Arrival.nbytes``, as measured on the payload that travels).

The few bytes around the payload (step, version, loss, row count) are not counted. The worker applies the
delay (``ShardWorker.execute`` sleeps one round trip after computing), so the same model holds on every
transport. On the serial backend the workers run one after another in one process, so their delays add up
instead of overlapping.
"""


from __future__ import annotations

import bisect
import math

import torch

from sgd_dist.config import NetworkConfig, StragglersConfig
from sgd_dist.core.data import generator
from sgd_dist.core.time_model import message_s
from sgd_dist.engine.messages import EVALUATE, GRADIENT

_STREAM_DELAYS = 3
SLOW_RATIO = 2.0  # a worker whose median answer time is more than this many times the others' is named


def extra_delay_s(cfg: StragglersConfig, worker: int, step: int, compute_s: float) -> float:
    """Seconds worker ``worker`` waits after computing its answer for local step ``step`` in ``compute_s``."""
    extra = (cfg.slowdown.get(worker, 1.0) - 1.0) * compute_s
    if cfg.delay != "none" and (cfg.delay_workers is None or worker in cfg.delay_workers):
        u = torch.rand((), generator=generator(cfg.seed, _STREAM_DELAYS, worker, step), dtype=torch.float64).item()
        mean = cfg.delay_ms / 1e3
        extra += 2 * mean * u if cfg.delay == "uniform" else -mean * math.log1p(-u)
    return extra


def find_stragglers(median_ms: dict[int, float], ratio: float = SLOW_RATIO) -> list[dict]:
    """Workers whose median answer time is more than ``ratio`` x the median of the other workers' medians."""
    ordered = sorted(median_ms.values())  # the others' median read off it: O(K log K) for K workers, not O(K^2)
    slow = []
    for worker, ms in sorted(median_ms.items()):
        others = _median_without(ordered, ms)
        if others is not None and others > 0 and ms / others > ratio:
            slow.append({"worker": worker, "ratio": ms / others})
    return slow


def _median_without(ordered: list[float], value: float) -> float | None:
    """statistics.median of sorted ``ordered`` with one ``value`` taken out (None if nothing is left)."""
    n = len(ordered) - 1
    if n < 1:
        return None
    gone = bisect.bisect_left(ordered, value)

    def rest(j: int) -> float:  # the j-th of what is left
        return ordered[j if j < gone else j + 1]

    return rest(n // 2) if n % 2 else (rest(n // 2 - 1) + rest(n // 2)) / 2


def describe_stragglers(slow: list[dict]) -> list[str]:
    return [f"worker {s['worker']} is {s['ratio']:.1f}x slower than the median" for s in slow]

EVALUATE_ANSWER_BYTES = 8  # one float64: the shard's loss sum


def message_delay_s(network: NetworkConfig | None, nbytes: int) -> float:
    """Seconds one message of ``nbytes`` bytes takes on one link of ``network`` (None: no network model)."""
    if network is None:
        return 0.0
    bandwidth = None if network.bandwidth_gbps is None else network.bandwidth_gbps * 1e9
    return message_s(network.latency_ms / 1e3, bandwidth, nbytes)


def message_bytes(dim: int, itemsize: int, kind: int = GRADIENT) -> tuple[int, int]:
    """(command bytes, answer bytes) of one command of ``kind`` with ``dim`` weights of ``itemsize`` bytes."""
    weights = dim * itemsize
    return weights, EVALUATE_ANSWER_BYTES if kind == EVALUATE else weights


def round_trip_delay_s(network: NetworkConfig | None, dim: int, itemsize: int, kind: int = GRADIENT,
                       answer_bytes: int | None = None) -> float:
    """Seconds a worker's command and its answer spend on the network: 2 x latency + their bytes / bandwidth.
    ``answer_bytes``: what the answer actually carried (a compressed payload); None: a dense vector's."""
    sent, answered = message_bytes(dim, itemsize, kind)
    return message_delay_s(network, sent) + message_delay_s(network, answered if answer_bytes is None else answer_bytes)


def describe_network(network: NetworkConfig) -> str:
    """'1 ms latency, 10 Gb/s' for the console."""
    bandwidth = "unlimited bandwidth" if network.bandwidth_gbps is None else f"{network.bandwidth_gbps:g} Gb/s"
    return f"{network.latency_ms:g} ms latency, {bandwidth}"
