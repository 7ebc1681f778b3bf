"""Synthetic data: the seed's generator, shard identity, the sampler. No Ray."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config

from sgd_dist.core.data import BLOCK_ROWS, MiniBatchSampler, generate, shard_bounds, true_weights
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
