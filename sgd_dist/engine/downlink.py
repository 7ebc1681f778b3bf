"""Compressed weights from the server to its workers (``compression.down``), as deltas, both ends kept equal.

The server keeps, for each worker, a copy of the weights that worker holds. A command carries the compressed
difference between the weights it must use and that copy; server and worker add the same decompressed delta to
their copies, so they stay bit-equal and what compression left out goes into the next delta (error feedback
without a residual). The compressor is a contraction for that reason (rand-k unscaled). A worker starting afresh
(``Command.reset``: its first command, a replacement, a restored run) and its copy on the server start at zero.
Each draw is keyed by (seed, worker, local step) on the DOWN channel. Evaluations get the exact weights.
"""

from __future__ import annotations

import torch

from sgd_dist.config import CompressionConfig
from sgd_dist.core.compression import DOWN, Compressed, Key, build_compressor, decompress
from sgd_dist.engine.messages import Command


def down_compressor(compression: CompressionConfig):
    return build_compressor(compression.kind, ratio=compression.ratio, error_feedback=True, bucket=compression.bucket)


class Downlink:
    """The server's side: each worker's copy, and the payload of a command."""

    def __init__(self, compression: CompressionConfig, seed: int) -> None:
        self.compressor, self.seed = down_compressor(compression), seed
        self.copies: dict[int, torch.Tensor] = {}

    def encode(self, worker: int, command: Command, weights: torch.Tensor) -> Compressed:
        """The payload that brings ``worker``'s copy towards ``weights``; the server's copy moves with it."""
        copy = self.copies.get(worker)
        if copy is None or command.reset:
            copy = self.copies[worker] = torch.zeros_like(weights)
        payload = self.compressor.compress(weights - copy, Key(self.seed, worker, command.step, DOWN))
        copy.add_(decompress(payload))
        return payload


class HeldWeights:
    """A worker's side: the weights it holds, moved by each payload as the server's copy of them was."""

    def __init__(self) -> None:
        self.weights: torch.Tensor | None = None

    def receive(self, command: Command, payload: Compressed) -> torch.Tensor:
        if self.weights is None or command.reset:
            self.weights = torch.zeros(payload.dim, dtype=payload.dtype)
        self.weights.add_(decompress(payload))
        return self.weights
