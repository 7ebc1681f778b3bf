"""Compression of a 1-D payload (a worker's gradient, or a model delta) with error feedback. No Ray, no I/O.

A ``Compressor`` turns a float32 or float64 vector into a ``Compressed``: exactly the tensors that would travel,
so ``Compressed.nbytes`` is the wire size, and ``decompress`` gives back a vector of the input's dtype.
Kinds: ``none``, ``fp16``, ``bf16``, ``int8`` (QSGD-style unbiased stochastic rounding), ``topk``, ``randk``.
``compress_with_feedback`` is error feedback, the residual passed in and returned. Every random draw comes
from a generator keyed by (seed, channel, worker, step) on a stream of its own, so replay and recovery redraw
the same bits.

Wire format: ``none`` is the raw vector (d x itemsize, as carried uncompressed: both ends know d and the dtype
from the config). Every other kind starts with a HEADER_BYTES = 16 header, so that a payload describes
itself: kind (uint8, its index in KINDS), dtype (uint8: 0 float32, 1 float64), the int8 bucket size (uint16,
0 for the others), the number of values (uint32), d (uint64). Then, by kind:
- fp16, bf16: d values of 2 bytes;
- int8: ceil(d / bucket) float32 scales, one per bucket of ``bucket`` coordinates, then d levels of 1 byte;
- topk, randk: k values in the payload's dtype, then k indices as int32 (int64 if d > 2**31 - 1), ascending.

PowerSGD (low rank, for models with matrix parameters) fits as one more Compressor: its compress would take
the parameter shapes, its factors would travel in ``values``, and its warm-start matrix would be state
passed in and returned, as the residual is.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from fractions import Fraction

import torch

from sgd_dist.config import COMPRESSION_KINDS
from sgd_dist.core.data import derive_seed

KINDS = COMPRESSION_KINDS  # none, fp16, bf16, int8, topk, randk: the config owns the list
SPARSE_KINDS = ("topk", "randk")  # the kinds that read compression.ratio
HEADER_BYTES = 16
INT8_LEVELS = 127  # levels on each side of 0: int8 holds -127..127 symmetrically
INT8_BUCKET = 512  # coordinates per scale, as in QSGD's experiments; 4 bytes of scale per 512 of levels
STREAM_COMPRESSION = 4  # the data module's streams are 0-2, the stragglers' delays 3
UP, DOWN = 0, 1  # channels: worker to server, server to worker


@dataclass(frozen=True)
class Key:
    """What a random draw is keyed by: the run's seed, the worker, the step, and the channel.

    UP is a worker's answer to the server; DOWN is what the server sends to ``worker`` (its weights as a delta).
    """

    seed: int
    worker: int
    step: int
    channel: int = UP

    def generator(self) -> torch.Generator:
        seed = derive_seed(self.seed, STREAM_COMPRESSION, self.channel, self.worker, self.step)
        return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class Compressed:
    """One compressed payload: the tensors that travel, and what the header carries."""

    kind: str
    dim: int
    dtype: torch.dtype  # of the vector before compression, and of what decompress returns
    values: torch.Tensor
    indices: torch.Tensor | None = None  # topk, randk: int32 (int64 past 2**31 - 1), ascending
    scales: torch.Tensor | None = None  # int8: float32, one per bucket
    bucket: int = 0  # int8: coordinates per scale

    def numel(self) -> int:
        """The dense vector's length (what code that sizes a message by its vector reads)."""
        return self.dim

    def element_size(self) -> int:
        """The dense vector's bytes per value."""
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        """The bytes on the wire: the tensors' bytes, plus the header for every kind but ``none``."""
        tensors = [t for t in (self.values, self.indices, self.scales) if t is not None]
        body = sum(t.numel() * t.element_size() for t in tensors)
        return body if self.kind == "none" else body + HEADER_BYTES


_HEADER = struct.Struct("<BBHIQ")  # kind, dtype, bucket, number of values, d: HEADER_BYTES
_DTYPES = (torch.float32, torch.float64)
_WIRE = {"fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8}


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def encode(c: Compressed) -> torch.Tensor:
    """The payload as the bytes that travel (uint8, ``c.nbytes`` of them), in the module docstring's format."""
    assert c.kind != "none", "an uncompressed vector travels as itself"
    header = _HEADER.pack(KINDS.index(c.kind), _DTYPES.index(c.dtype), c.bucket, c.values.numel(), c.dim)
    parts = [torch.frombuffer(bytearray(header), dtype=torch.uint8)]
    parts += [_raw(t) for t in ((c.scales, c.values) if c.kind == "int8" else (c.values, c.indices)) if t is not None]
    return torch.cat(parts)


def decode(buf: torch.Tensor) -> Compressed:
    """The payload that ``encode`` wrote into ``buf`` (uint8; its tensors are copies: ``buf`` may be reused)."""
    kind_i, dtype_i, bucket, count, dim = _HEADER.unpack(bytes(buf[:HEADER_BYTES].numpy()))
    kind, dtype = KINDS[kind_i], _DTYPES[dtype_i]
    at = HEADER_BYTES

    def take(n: int, wire: torch.dtype) -> torch.Tensor:
        nonlocal at
        size = n * torch.empty((), dtype=wire).element_size()
        t, at = buf[at : at + size].clone().view(wire), at + size
        return t

    if kind == "int8":
        scales = take(-(-dim // bucket), torch.float32)
        return Compressed(kind, dim, dtype, take(count, torch.int8), scales=scales, bucket=bucket)
    if kind in SPARSE_KINDS:
        values = take(count, dtype)
        return Compressed(kind, dim, dtype, values, indices=take(count, index_dtype(dim)))
    return Compressed(kind, dim, dtype, take(count, _WIRE[kind]))


def payload_nbytes(kind: str, dim: int, itemsize: int, *, ratio: float | None = None,
                   bucket: int = INT8_BUCKET) -> int:
    """``Compressed.nbytes`` of any d-vector of ``itemsize``-byte values under ``kind``: it depends on nothing else."""
    if kind == "none":
        return dim * itemsize
    if kind in ("fp16", "bf16"):
        body = 2 * dim
    elif kind == "int8":
        body = dim + 4 * -(-dim // bucket)
    else:
        k = kept(ratio, dim)
        body = k * (itemsize + torch.empty((), dtype=index_dtype(dim)).element_size())
    return HEADER_BYTES + body


def check_ratio(ratio) -> float:
    """``ratio`` as a float if it lies in (0, 1]; else a ValueError naming the field."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"compression.ratio must be in (0, 1] (the fraction of coordinates sent), got {ratio!r}")
    return float(ratio)


def kept(ratio: float, d: int) -> int:
    """k = ceil(ratio * d), with ratio read as the decimal it was written as (0.07 of 100 is 7, not 8)."""
    return max(1, math.ceil(Fraction(repr(ratio)) * d))


def index_dtype(d: int) -> torch.dtype:
    return torch.int32 if d <= torch.iinfo(torch.int32).max else torch.int64


def decompress(c: Compressed) -> torch.Tensor:
    """The dense vector a payload stands for, in the dtype it was compressed from (``none``: the same tensor)."""
    if c.kind in ("none", "fp16", "bf16"):
        return c.values.to(c.dtype)
    if c.kind == "int8":
        scales = c.scales.to(c.dtype).repeat_interleave(c.bucket)[: c.dim]
        return c.values.to(c.dtype) * scales / INT8_LEVELS
    out = torch.zeros(c.dim, dtype=c.dtype)
    out[c.indices.long()] = c.values
    return out


class Compressor:
    """The interface, and the ``none`` kind: ``compress(x, key)`` and ``decompress(payload)`` on 1-D vectors."""

    kind = "none"

    def compress(self, x: torch.Tensor, key: Key) -> Compressed:
        """The payload for x (1-D, float32 or float64); ``key`` keys any random draw. ``none``: x itself."""
        return Compressed(self.kind, x.numel(), x.dtype, x)

    def decompress(self, c: Compressed) -> torch.Tensor:
        return decompress(c)


class Cast(Compressor):
    """fp16 or bf16: each value rounded to nearest. fp16 overflows to inf past 65504; bf16 has float32's range."""

    def __init__(self, kind: str):
        assert kind in ("fp16", "bf16"), kind
        self.kind = kind
        self.wire = torch.float16 if kind == "fp16" else torch.bfloat16

    def compress(self, x: torch.Tensor, key: Key) -> Compressed:
        return Compressed(self.kind, x.numel(), x.dtype, x.to(self.wire))


class Int8(Compressor):
    """QSGD-style stochastic rounding to 127 levels a side of a per-bucket scale: unbiased, E[decompress] = x.

    A bucket's scale is its largest magnitude, rounded up to float32 (so every |x| / scale <= 1); a coordinate
    at u = 127 |x| / scale goes to floor(u) + 1 with probability u - floor(u), else to floor(u), its sign kept.
    """

    kind = "int8"

    def __init__(self, bucket: int = INT8_BUCKET):
        assert 0 < bucket < 1 << 16, bucket  # the header's uint16
        self.bucket = bucket

    def compress(self, x: torch.Tensor, key: Key) -> Compressed:
        d = x.numel()
        mags = x.abs()
        padded = torch.cat([mags, mags.new_zeros(-d % self.bucket)])
        peak = padded.view(-1, self.bucket).amax(dim=1)
        scales = peak.to(torch.float32)
        scales = torch.where(scales.to(x.dtype) < peak, torch.nextafter(scales, torch.tensor(math.inf)), scales)
        s = scales.to(x.dtype).repeat_interleave(self.bucket)[:d]
        u = mags / torch.where(s > 0, s, 1.0) * INT8_LEVELS
        low = u.floor()
        draw = torch.rand(d, generator=key.generator(), dtype=x.dtype)
        levels = (low + (draw < u - low).to(x.dtype)) * x.sign()
        return Compressed(self.kind, d, x.dtype, levels.to(torch.int8), scales=scales, bucket=self.bucket)


class TopK(Compressor):
    """The k = ceil(ratio * d) coordinates of largest magnitude, ties going to the lower index. Not scaled."""

    kind = "topk"

    def __init__(self, ratio: float):
        self.ratio = check_ratio(ratio)

    def compress(self, x: torch.Tensor, key: Key) -> Compressed:
        d = x.numel()
        k = kept(self.ratio, d)
        mags = x.abs()
        kth = torch.topk(mags, k, sorted=False).values.min()  # the k-th largest magnitude, whichever index has it
        above = (mags > kth).nonzero().squeeze(1)
        ties = (mags == kth).nonzero().squeeze(1)[: k - above.numel()]
        idx = torch.cat([above, ties]).sort().values
        return Compressed(self.kind, d, x.dtype, x[idx], indices=idx.to(index_dtype(d)))


class RandK(Compressor):
    """k = ceil(ratio * d) coordinates drawn without replacement (keyed), scaled by d / k unless ``scaled=False``.

    Scaled, it is unbiased (E[decompress] = x), which plain compressed SGD needs. Error feedback needs the
    opposite: a contraction, ||C(x) - x|| < ||x||. Scaled rand-k is not one (its expected squared error is
    (d/k - 1) ||x||^2, so the residual grows when k < d/2), unscaled rand-k is, as in DGC and Stich et al.'s
    sparsified SGD with memory; ``build_compressor`` picks unscaled under error feedback.
    """

    kind = "randk"

    def __init__(self, ratio: float, *, scaled: bool = True):
        self.ratio = check_ratio(ratio)
        self.scaled = scaled

    def compress(self, x: torch.Tensor, key: Key) -> Compressed:
        d = x.numel()
        k = kept(self.ratio, d)
        idx = torch.randperm(d, generator=key.generator())[:k].sort().values
        values = x[idx] * (d / k) if self.scaled else x[idx]
        return Compressed(self.kind, d, x.dtype, values, indices=idx.to(index_dtype(d)))


def build_compressor(kind: str, *, ratio: float | None = None, error_feedback: bool = False,
                     bucket: int = INT8_BUCKET) -> Compressor:
    """The compressor for a config's ``compression`` settings; a ValueError naming the field if one is bad.

    ``ratio`` is read by topk and randk only; ``bucket`` by int8 only. Under error feedback randk is unscaled
    (see RandK).
    """
    if kind not in KINDS:
        raise ValueError(f"compression.kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind in ("fp16", "bf16"):
        return Cast(kind)
    if kind == "int8":
        return Int8(bucket)
    if kind == "topk":
        return TopK(ratio)
    if kind == "randk":
        return RandK(ratio, scaled=not error_feedback)
    return Compressor()


def compress_with_feedback(compressor: Compressor, g: torch.Tensor, residual: torch.Tensor | None,
                           key: Key) -> tuple[Compressed, torch.Tensor]:
    """Error feedback: compress g + e, and return the payload with the new residual (g + e) - decompress(it).

    ``residual`` is the worker's e from its previous call, None for a zero one (its first). Neither input is
    changed. The residual is in the units of g (a gradient, or a model delta), not scaled by a learning rate.
    """
    corrected = g if residual is None else g + residual
    payload = compressor.compress(corrected, key)
    return payload, corrected - compressor.decompress(payload)
