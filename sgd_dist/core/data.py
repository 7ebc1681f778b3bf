"""Seeded synthetic data, generated shard by shard where it lives, and the mini-batch samplers. No Ray.

The dataset is cut into fixed blocks of ``block_rows(cfg)`` rows (BLOCK_ROWS, or fewer for wide rows so that a
block stays within BLOCK_BYTES); block b is drawn from a generator seeded by (data seed, b) and always in
full, so any row's values depend only on the config and its index. A shard
[start, stop) generates just the blocks it overlaps: the shards laid end to end are bit-identical to the
dataset generated in one piece, and a lost shard can be regenerated exactly.

A worker's mini-batches come from one of SAMPLINGS, each keyed by (seed, worker, local epoch): ``shuffle`` takes
the next rows of a fresh permutation of the shard, gathered into buffers the worker keeps; ``blocks`` takes the
shard's contiguous batches in a permuted order, as views (the rows are i.i.d. by construction).
"""

from __future__ import annotations

import numpy as np
import torch

from sgd_dist.config import DataConfig

BLOCK_ROWS = 1 << 16
BLOCK_BYTES = 64 << 20  # the generation buffer beside the shard: 1,024 rows x 1e5 features need no 26 GB block

# Independent random streams derived from one user seed.
_STREAM_DATA = 0
_STREAM_WEIGHTS = 1
_STREAM_BATCHES = 2
_STREAM_BLOCKS = 3

SAMPLINGS = ("shuffle", "blocks")


def derive_seed(*keys: int) -> int:
    """A 64-bit seed from a tuple of non-negative ints (numpy's SeedSequence: well mixed, collision-free)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0])


def generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*keys))


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[name]


def true_weights(cfg: DataConfig) -> torch.Tensor:
    """The true parameter vector a (features, then bias): given in the config, or drawn from N(0, 1)."""
    dtype = torch_dtype(cfg.dtype)
    if cfg.true_weights is not None:
        return torch.tensor(cfg.true_weights, dtype=dtype)
    return torch.randn(cfg.dim, generator=generator(cfg.seed, _STREAM_WEIGHTS), dtype=dtype)


def shard_bounds(n_samples: int, num_shards: int) -> list[tuple[int, int]]:
    """[start, stop) of each shard: as even as possible, the first n % K shards one row longer."""
    base, extra = divmod(n_samples, num_shards)
    bounds, start = [], 0
    for rank in range(num_shards):
        stop = start + base + (rank < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def block_rows(cfg: DataConfig) -> int:
    """Rows per generation block: BLOCK_ROWS, fewer when a block of them would pass BLOCK_BYTES (at least 1)."""
    row_bytes = (cfg.dim + 1) * torch_dtype(cfg.dtype).itemsize
    return max(1, min(BLOCK_ROWS, BLOCK_BYTES // row_bytes))


def _block(cfg: DataConfig, index: int, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All block_rows(cfg) rows of block ``index``, x then y, always drawn in the same order."""
    dtype = a.dtype
    rows = block_rows(cfg)
    g = generator(cfg.seed, _STREAM_DATA, index)
    x = torch.empty(rows, cfg.dim, dtype=dtype)
    features = x[:, : cfg.n_features]
    if cfg.x_dist == "uniform":
        features.uniform_(-1.0, 1.0, generator=g)
    else:
        features.normal_(generator=g)
    if cfg.bias:
        x[:, -1] = 1.0
    u = torch.empty(rows, dtype=dtype)
    if cfg.kind == "linear":
        if cfg.noise == "uniform":
            u.uniform_(0.0, 1.0, generator=g)
        else:
            u.normal_(generator=g)
        y = x @ a + cfg.noise_scale * u
    else:
        u.uniform_(0.0, 1.0, generator=g)
        y = (u < torch.sigmoid(x @ a)).to(dtype)
    return x, y


def generate(
    cfg: DataConfig, start: int = 0, stop: int | None = None, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [start, stop) of the dataset as (X, y), X with the bias column last when cfg.bias.

    Blocks are drawn on the CPU (so every device sees the same numbers) and copied into tensors
    preallocated on ``device``: the peak is the shard plus one block (at most BLOCK_BYTES).
    """
    stop = cfg.n_samples if stop is None else stop
    if not 0 <= start <= stop <= cfg.n_samples:
        raise ValueError(f"rows [{start}, {stop}) are outside the dataset [0, {cfg.n_samples})")
    a = true_weights(cfg)
    X = torch.empty(stop - start, cfg.dim, dtype=a.dtype, device=device)
    y = torch.empty(stop - start, dtype=a.dtype, device=device)
    rows = block_rows(cfg)
    for index in range(start // rows, -(-stop // rows)):
        lo, hi = index * rows, (index + 1) * rows
        bx, by = _block(cfg, index, a)
        take_lo, take_hi = max(lo, start), min(hi, stop)
        X[take_lo - start : take_hi - start].copy_(bx[take_lo - lo : take_hi - lo])
        y[take_lo - start : take_hi - start].copy_(by[take_lo - lo : take_hi - lo])
    return X, y


def batches_per_epoch(shard_rows: int, batch_size: int) -> int:
    """Full batches in one pass over a shard (the last partial batch of an epoch is dropped)."""
    return shard_rows // batch_size


class _Sampler:
    """What every sampler of one shard holds: its key (seed, rank), the shard's rows, the batch, the epoch cached."""

    def __init__(self, seed: int, rank: int, shard_rows: int, batch_size: int) -> None:
        if not 1 <= batch_size <= shard_rows:
            raise ValueError(f"batch size {batch_size} must be between 1 and the shard's {shard_rows} rows")
        self.seed, self.rank, self.shard_rows, self.batch_size = seed, rank, shard_rows, batch_size
        self.per_epoch = batches_per_epoch(shard_rows, batch_size)
        self._epoch: int | None = None


class MiniBatchSampler(_Sampler):
    """Worker ``rank``'s mini-batch rows at each local step, a pure function of (seed, rank, step).

    Local epoch e = step // batches_per_epoch is a permutation of the shard drawn from a generator seeded by
    (seed, rank, e); the step takes the next batch_size rows of it, so rows are drawn without replacement
    within an epoch. The current epoch's permutation is cached (one randperm per epoch).
    """

    def __init__(self, seed: int, rank: int, shard_rows: int, batch_size: int) -> None:
        super().__init__(seed, rank, shard_rows, batch_size)
        self._perm: torch.Tensor | None = None

    def indices(self, step: int) -> torch.Tensor:
        epoch, position = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = generator(self.seed, _STREAM_BATCHES, self.rank, epoch)
            self._perm, self._epoch = torch.randperm(self.shard_rows, generator=g), epoch
        return self._perm[position * self.batch_size : (position + 1) * self.batch_size]


class BlockSampler(_Sampler):
    """Contiguous batches: local epoch e visits the shard's batches [o + jB, o + (j + 1)B), j < n // B, in the order
    of a permutation of j drawn from a generator seeded by (seed, rank, e); o is drawn from the same generator,
    uniform on 0..n mod B, so the rows a partial batch would hold are not the same ones left out every epoch."""

    def __init__(self, seed: int, rank: int, shard_rows: int, batch_size: int) -> None:
        super().__init__(seed, rank, shard_rows, batch_size)
        self._order: list[int] = []
        self._offset = 0

    def start(self, step: int) -> int:
        """The first row of local step ``step``'s batch; it holds rows [start, start + batch_size)."""
        epoch, position = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = generator(self.seed, _STREAM_BLOCKS, self.rank, epoch)
            self._order = torch.randperm(self.per_epoch, generator=g).tolist()
            spare = self.shard_rows - self.per_epoch * self.batch_size
            self._offset, self._epoch = int(torch.randint(spare + 1, (), generator=g)), epoch
        return self._offset + self._order[position] * self.batch_size

    def indices(self, step: int) -> torch.Tensor:
        lo = self.start(step)
        return torch.arange(lo, lo + self.batch_size)


def make_sampler(sampling: str, seed: int, rank: int, shard_rows: int,
                 batch_size: int) -> MiniBatchSampler | BlockSampler:
    """The sampler that ``train.sampling`` names."""
    if sampling == "shuffle":
        return MiniBatchSampler(seed, rank, shard_rows, batch_size)
    if sampling == "blocks":
        return BlockSampler(seed, rank, shard_rows, batch_size)
    raise ValueError(f"train.sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}")


class Batches:
    """Each local step's rows of one shard (X, y): the whole shard without a sampler, a view of it under
    ``blocks``, and under ``shuffle`` gathered into two buffers kept for the worker's life (a fresh tensor each
    step costs more than the gradient on wide rows). A returned batch is valid until the next call."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor, sampler: MiniBatchSampler | BlockSampler | None) -> None:
        self.X, self.y, self.sampler = X, y, sampler
        if isinstance(sampler, MiniBatchSampler):
            self._xb = X.new_empty(sampler.batch_size, X.shape[1])
            self._yb = y.new_empty(sampler.batch_size)

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        sampler = self.sampler
        if sampler is None:
            return self.X, self.y
        if isinstance(sampler, BlockSampler):
            lo = sampler.start(step)
            return self.X[lo : lo + sampler.batch_size], self.y[lo : lo + sampler.batch_size]
        idx = sampler.indices(step).to(self.X.device)
        return (torch.index_select(self.X, 0, idx, out=self._xb), torch.index_select(self.y, 0, idx, out=self._yb))
