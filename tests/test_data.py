"""Synthetic data: the seed's generator, shard identity, the samplers and the batches they take. No Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_config

from sgd_dist.core.data import (
    BLOCK_ROWS,
    Batches,
    BlockSampler,
    MiniBatchSampler,
    generate,
    make_sampler,
    shard_bounds,
    true_weights,
)
from sgd_dist.core.objectives import mse


def lesson2_data(n: int):
    return make_config(f"data.n_samples={n}", "data.n_features=1", "data.true_weights=[3, 2]").data


def test_lesson2_generator_matches_the_seed():
    cfg = lesson2_data(50_000)
    X, y = generate(cfg)
    assert X.shape == (50_000, 2) and X.dtype == torch.float32
    assert torch.all(X[:, 1] == 1)  # x = [U(-1,1), 1]
    assert X[:, 0].min() >= -1 and X[:, 0].max() < 1
    assert abs(X[:, 0].mean().item()) < 0.02 and abs(X[:, 0].var().item() - 1 / 3) < 0.01
    noise = y - X @ torch.tensor([3.0, 2.0])
    assert noise.min() >= -1e-5 and noise.max() <= 1 + 1e-5  # U(0, 1)
    assert abs(noise.mean().item() - 0.5) < 0.01


def test_mse_at_the_seeds_starting_point_is_23_over_3():
    # y_hat - y = -4 x - 1 - u with x ~ U(-1,1), u ~ U(0,1): E = 16/3 + E[(1+u)^2] = 16/3 + 7/3 = 7.667
    X, y = generate(lesson2_data(2_000_000))
    loss = mse(X @ torch.tensor([-1.0, 1.0]), y).item()
    assert loss == pytest.approx(23 / 3, abs=0.02)


@pytest.mark.parametrize("kind", ["linear", "logistic"])
@pytest.mark.parametrize("num_shards", [1, 2, 3, 7])
def test_shards_end_to_end_are_bit_identical_to_one_piece(kind, num_shards):
    # straddles block boundaries, uneven shards
    cfg = make_config(f"data.n_samples={2 * BLOCK_ROWS + 12_345}", f"data.kind={kind}", "data.x_dist=normal").data
    X, y = generate(cfg)
    parts = [generate(cfg, start, stop) for start, stop in shard_bounds(cfg.n_samples, num_shards)]
    assert torch.equal(torch.cat([p[0] for p in parts]), X)
    assert torch.equal(torch.cat([p[1] for p in parts]), y)


def test_any_row_range_is_a_slice_of_the_whole():
    cfg = make_config(f"data.n_samples={BLOCK_ROWS + 100}", "data.noise=normal", "data.noise_scale=0.3").data
    X, y = generate(cfg)
    for start, stop in [(0, 1), (BLOCK_ROWS - 1, BLOCK_ROWS + 1), (17, 60_001), (BLOCK_ROWS + 99, BLOCK_ROWS + 100)]:
        xs, ys = generate(cfg, start, stop)
        assert torch.equal(xs, X[start:stop]) and torch.equal(ys, y[start:stop])


def test_seed_changes_the_data_and_is_reproducible():
    a = generate(make_config("data.seed=1").data)[0]
    assert torch.equal(a, generate(make_config("data.seed=1").data)[0])
    assert not torch.equal(a, generate(make_config("data.seed=2").data)[0])


def test_variants():
    cfg = make_config("data.bias=false", "data.x_dist=normal", "data.dtype=float64", "data.n_samples=20000").data
    X, y = generate(cfg)
    assert X.shape == (20_000, 3) and X.dtype == torch.float64 and abs(X.std().item() - 1) < 0.02
    logistic = make_config("data.kind=logistic", "data.n_samples=20000").data
    X, y = generate(logistic)
    assert set(y.unique().tolist()) <= {0.0, 1.0}
    p = torch.sigmoid(X @ true_weights(logistic))
    assert abs(y.mean().item() - p.mean().item()) < 0.02  # labels drawn from sigmoid(x @ a)


def test_true_weights_drawn_from_the_seed_when_not_given():
    cfg = make_config().data
    assert cfg.true_weights is None
    assert torch.equal(true_weights(cfg), true_weights(cfg)) and true_weights(cfg).shape == (4,)


def test_shard_bounds():
    assert shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shard_bounds(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_sampler_draws_without_replacement_per_epoch():
    rows, batch = 103, 10  # 10 batches per epoch, 3 rows left out each epoch
    sampler = MiniBatchSampler(seed=3, rank=1, shard_rows=rows, batch_size=batch)
    for epoch in range(3):
        seen = torch.cat([sampler.indices(epoch * 10 + i) for i in range(10)])
        assert len(set(seen.tolist())) == 100 and seen.max() < rows
    assert not torch.equal(sampler.indices(0), sampler.indices(10))  # a new permutation each epoch


def test_batch_is_a_pure_function_of_seed_rank_step():
    def fresh(seed: int, rank: int, step: int) -> torch.Tensor:  # a sampler with nothing cached
        return MiniBatchSampler(seed, rank, shard_rows=1000, batch_size=32).indices(step)

    sampler = MiniBatchSampler(seed=3, rank=1, shard_rows=1000, batch_size=32)
    for step in [0, 5, 31, 40, 31, 0]:  # out of order, revisiting epochs
        assert torch.equal(sampler.indices(step), fresh(3, 1, step))
    assert not torch.equal(fresh(3, 0, 0), fresh(3, 1, 0))
    assert not torch.equal(fresh(3, 1, 0), fresh(4, 1, 0))


def test_rows_outside_the_dataset_are_refused():
    with pytest.raises(ValueError, match=r"rows \[0, 600\) are outside the dataset \[0, 512\)"):
        generate(make_config().data, 0, 600)


def keyed(*keys: int) -> torch.Generator:
    """A torch generator seeded from numpy's SeedSequence of the keys: the samplers' key, written out."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0]))


SHUFFLE_STREAM, BLOCKS_STREAM = 2, 3  # the batch streams' keys after the user seed


def test_shuffle_takes_the_next_rows_of_its_epochs_permutation():
    rows, batch, seed, rank = 103, 10, 3, 1
    sampler = make_sampler("shuffle", seed, rank, rows, batch)
    for step in [0, 9, 10, 25, 3]:
        epoch, position = divmod(step, 10)
        perm = torch.randperm(rows, generator=keyed(seed, SHUFFLE_STREAM, rank, epoch))
        assert torch.equal(sampler.indices(step), perm[position * batch : (position + 1) * batch])


def test_blocks_is_its_definition():
    """Epoch e: the batches [o + jB, o + (j + 1)B) in the order of randperm(n // B), then o uniform on 0..n mod B,
    both from the generator keyed by (seed, rank, e)."""
    rows, batch, seed, rank = 103, 10, 3, 1
    sampler = make_sampler("blocks", seed, rank, rows, batch)
    for step in [0, 9, 10, 25, 3, 41]:
        epoch, position = divmod(step, 10)
        g = keyed(seed, BLOCKS_STREAM, rank, epoch)
        order = torch.randperm(10, generator=g)
        offset = int(torch.randint(4, (), generator=g))
        lo = offset + int(order[position]) * batch
        assert torch.equal(sampler.indices(step), torch.arange(lo, lo + batch))


def test_blocks_visits_every_row_once_per_epoch_in_contiguous_batches():
    rows, batch = 120, 8  # 15 batches, no row left over
    sampler = BlockSampler(seed=3, rank=1, shard_rows=rows, batch_size=batch)
    orders = []
    for epoch in range(4):
        starts = [sampler.start(epoch * 15 + i) for i in range(15)]
        assert sorted(starts) == list(range(0, rows, batch))  # contiguous batches tiling the shard
        seen = torch.cat([sampler.indices(epoch * 15 + i) for i in range(15)])
        assert sorted(seen.tolist()) == list(range(rows))  # every row once
        orders.append(starts)
    assert len({tuple(o) for o in orders}) == 4  # a new order each epoch


def test_blocks_with_rows_left_over_moves_its_window():
    rows, batch = 103, 10  # 10 batches, 3 rows outside the epoch's window
    sampler = BlockSampler(seed=3, rank=1, shard_rows=rows, batch_size=batch)
    offsets = set()
    for epoch in range(12):
        starts = sorted(sampler.start(epoch * 10 + i) for i in range(10))
        offsets.add(starts[0])
        assert starts == list(range(starts[0], starts[0] + 100, batch)) and starts[-1] + batch <= rows
    assert offsets == {0, 1, 2, 3}  # over epochs every row is visited


def test_blocks_is_keyed_by_seed_worker_and_epoch():
    def order(seed, rank, epoch):
        sampler = BlockSampler(seed, rank, 400, 10)
        return [sampler.start(epoch * 40 + i) for i in range(40)]

    assert order(3, 1, 2) == order(3, 1, 2)  # two samplers, one key: the same batches
    assert order(3, 1, 2) != order(3, 0, 2) and order(3, 1, 2) != order(4, 1, 2) and order(3, 1, 2) != order(3, 1, 3)
    revisit = BlockSampler(3, 1, 400, 10)
    assert [revisit.start(s) for s in [85, 5, 85]] == [order(3, 1, 2)[5], order(3, 1, 0)[5], order(3, 1, 2)[5]]


def test_an_unknown_sampling_is_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"^train\.sampling must be one of shuffle, blocks, got 'random'$"):
        make_sampler("random", 0, 0, 100, 10)


def test_shuffled_batches_are_gathered_into_the_same_buffers_every_step():
    X, y = generate(make_config("data.n_samples=300").data)
    batches = Batches(X, y, MiniBatchSampler(3, 0, 300, 32))
    pointers = set()
    for step in [0, 4, 9, 12]:
        idx = MiniBatchSampler(3, 0, 300, 32).indices(step)
        xb, yb = batches(step)
        assert torch.equal(xb, X[idx]) and torch.equal(yb, y[idx])
        pointers.add((xb.data_ptr(), yb.data_ptr()))
    assert len(pointers) == 1  # no new tensor per step


def test_block_batches_are_views_of_the_shard():
    X, y = generate(make_config("data.n_samples=300").data)
    batches = Batches(X, y, BlockSampler(3, 0, 300, 32))
    for step in [0, 4, 9, 12]:
        lo = BlockSampler(3, 0, 300, 32).start(step)
        xb, yb = batches(step)
        assert torch.equal(xb, X[lo : lo + 32]) and torch.equal(yb, y[lo : lo + 32])
        assert xb.data_ptr() == X[lo].data_ptr() and yb.data_ptr() == y[lo:].data_ptr()  # no copy
    whole = Batches(X, y, None)(7)
    assert whole[0] is X and whole[1] is y
