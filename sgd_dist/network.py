"""The simulated network of ``cluster.network``: how long a message between the server and a worker takes.

Pure functions, no Ray. The model is one link per worker between it and the server (a star, as a
parameter server's is): a message of B bytes takes ``latency + B * 8 / bandwidth`` seconds, and the links
are independent, so the workers' delays overlap as their computations do. What counts as a message:

- a command carries the weights (d numbers of the data dtype) to the worker: GRADIENT, LOCAL and EVALUATE
  alike (an evaluation is of a given version, whose weights travel with it);
- an answer carries d numbers back (GRADIENT: the gradient; LOCAL: the model delta), or one float64 for
  EVALUATE (the shard's loss sum).

The few bytes around the payload (step, version, loss, row count) are not counted. The worker applies the
delay (``ShardWorker.execute`` sleeps one round trip after computing), so the numbers never change, only
the wall time, and the same model holds on every transport. On the serial backend the workers run one after
another in one process, so their delays add up instead of overlapping.
"""

from __future__ import annotations

from sgd_dist.config import NetworkConfig
from sgd_dist.transports import EVALUATE, GRADIENT

EVALUATE_ANSWER_BYTES = 8  # one float64: the shard's loss sum


def message_delay_s(network: NetworkConfig | None, nbytes: int) -> float:
    """Seconds one message of ``nbytes`` bytes takes on one link: latency + nbytes * 8 / bandwidth."""
    if network is None:
        return 0.0
    seconds = network.latency_ms / 1e3
    if network.bandwidth_gbps is not None:
        seconds += nbytes * 8 / (network.bandwidth_gbps * 1e9)
    return seconds


def message_bytes(dim: int, itemsize: int, kind: int = GRADIENT) -> tuple[int, int]:
    """(command bytes, answer bytes) of one command of ``kind`` with ``dim`` weights of ``itemsize`` bytes."""
    weights = dim * itemsize
    return weights, EVALUATE_ANSWER_BYTES if kind == EVALUATE else weights


def round_trip_delay_s(network: NetworkConfig | None, dim: int, itemsize: int, kind: int = GRADIENT) -> float:
    """Seconds a worker's command and its answer spend on the network: 2 x latency + their bytes / bandwidth."""
    sent, answered = message_bytes(dim, itemsize, kind)
    return message_delay_s(network, sent) + message_delay_s(network, answered)


def describe(network: NetworkConfig) -> str:
    """'1 ms latency, 10 Gb/s' for the console."""
    bandwidth = "unlimited bandwidth" if network.bandwidth_gbps is None else f"{network.bandwidth_gbps:g} Gb/s"
    return f"{network.latency_ms:g} ms latency, {bandwidth}"
