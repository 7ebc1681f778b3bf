"""Wide data: generation holds the shard plus a block bounded in bytes, and 1e5- and 1e6-feature rows train."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config

from sgd_dist.core.data import BLOCK_BYTES, BLOCK_ROWS, block_rows, generate, shard_bounds
from sgd_dist.run.rundir import read_metrics
from sgd_dist.run.trainer import train


def test_blocks_are_bounded_in_bytes_and_narrow_data_keeps_its_blocks():
    assert block_rows(make_config("data.n_features=10").data) == BLOCK_ROWS
    for features, dtype in [(3000, "float32"), (100_000, "float32"), (1_000_000, "float64")]:
        cfg = make_config(f"data.n_features={features}", f"data.dtype={dtype}").data
        rows = block_rows(cfg)
        assert 1 <= rows < BLOCK_ROWS and rows * (cfg.dim + 1) * (4 if dtype == "float32" else 8) <= BLOCK_BYTES


def test_wide_shards_are_bit_identical_to_one_piece_across_block_boundaries():
    cfg = make_config("data.n_samples=12001", "data.n_features=3000").data
    assert block_rows(cfg) < 12001 // 2  # several blocks, shards straddle them
    X, y = generate(cfg)
    parts = [generate(cfg, a, b) for a, b in shard_bounds(cfg.n_samples, 3)]
    assert torch.equal(torch.cat([p[0] for p in parts]), X) and torch.equal(torch.cat([p[1] for p in parts]), y)


def _train_wide(tmp_path, rows: int, features: int):
    config = make_config(f"data.n_samples={rows}", f"data.n_features={features}", "train.batch_size=16",
                         "train.steps=4", "train.eval_every=2", "optim.lr=1e-5", f"output.dir={tmp_path / 'w'}")
    summary = train(config, console=False, progress=False).summary
    return summary, read_metrics(tmp_path / "w")


def test_1024_rows_by_1e5_features_train(ray_session, tmp_path):
    summary, rows = _train_wide(tmp_path, 1024, 100_000)
    assert summary["status"] == "completed" and summary["steps"] == 4 and len(summary["weights"]) == 100_001
    # n <= d: least squares interpolates, so the optimum is 0 and the gap is the loss itself
    assert summary["optimal_loss"] == 0.0 and summary["optimality_gap"] == summary["final_loss"] > 0
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0]  # it learns
    assert all(w["data_bytes"] == 512 * 100_002 * 4 for w in summary["workers"])


@pytest.mark.slow
def test_256_rows_by_1e6_features_train(ray_session, tmp_path):
    summary, rows = _train_wide(tmp_path, 256, 1_000_000)
    assert summary["status"] == "completed" and summary["steps"] == 4 and len(summary["weights"]) == 1_000_001
    assert [r["step"] for r in rows] == list(range(5))
