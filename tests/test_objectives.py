"""The pure math against trusted references: closed-form gradients, big-batch gradients, lstsq, Newton."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config

from sgd_dist.core import objectives as obj
from sgd_dist.core.data import generate, shard_bounds


def data(kind="linear", n=3000, **extra):
    overrides = [f"data.kind={kind}", f"data.n_samples={n}", "data.dtype=float64",
                 *[f"{k}={v}" for k, v in extra.items()]]
    return generate(make_config(*overrides).data)


def test_linear_gradient_equals_the_closed_form():
    X, y = data()
    w = torch.tensor([0.3, -1.0, 2.0, 0.5], dtype=torch.float64)
    loss, grad = obj.loss_and_grad("linear", w, X, y)
    assert loss == pytest.approx(((X @ w - y) ** 2).mean().item(), rel=1e-12)
    torch.testing.assert_close(grad, 2 / len(y) * X.T @ (X @ w - y), rtol=1e-12, atol=1e-12)


def test_logistic_gradient_equals_the_closed_form():
    X, y = data("logistic")
    w = torch.tensor([0.3, -1.0, 2.0, 0.5], dtype=torch.float64)
    _, grad = obj.loss_and_grad("logistic", w, X, y)
    torch.testing.assert_close(grad, X.T @ (torch.sigmoid(X @ w) - y) / len(y), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "logistic"])
def test_weighted_mean_of_shard_gradients_is_the_big_batch_gradient(kind):
    X, y = data(kind, n=1001)
    w = torch.tensor([1.0, -2.0, 0.5, 0.1], dtype=torch.float64)
    _, full = obj.loss_and_grad(kind, w, X, y)
    parts = [obj.loss_and_grad(kind, w, X[a:b], y[a:b]) for a, b in shard_bounds(1001, 3)]  # 334, 334, 333 rows
    counts = [b - a for a, b in shard_bounds(1001, 3)]
    torch.testing.assert_close(obj.weighted_mean([g for _, g in parts], counts), full, rtol=1e-12, atol=1e-14)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def batch_of(kind: str, rows: int, dtype: str, features: int = 40):
    X, y = generate(make_config(f"data.kind={kind}", f"data.n_samples={rows}", f"data.n_features={features}",
                                f"data.dtype={dtype}", "cluster.num_workers=1", "train.batch_size=full").data)
    w = torch.randn(X.shape[1], generator=torch.Generator().manual_seed(rows), dtype=X.dtype)
    return w, X, y


def assert_written_out_equals_autograd(kind: str, w, X, y) -> None:
    loss, grad = obj.loss_and_grad(kind, w, X, y)  # autograd, the seed's way
    fast_loss, fast_grad = obj.fast_loss_and_grad(kind, w, X, y)
    assert fast_loss == loss
    assert torch.equal(fast_grad, grad), (fast_grad - grad).abs().max().item()


@pytest.mark.parametrize("kind", ["linear", "logistic"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("rows", [1, 16, 100, 333, 4096])  # 100 and 333: 1 / B is not exact in binary
def test_the_written_out_gradient_equals_autograd_bit_for_bit(kind, dtype, rows):
    w, X, y = batch_of(kind, rows, dtype)
    previous = torch.get_num_threads()
    try:
        for threads in sorted({1, previous}):
            torch.set_num_threads(threads)
            assert_written_out_equals_autograd(kind, w, X, y)
            assert_written_out_equals_autograd(kind, w, X[rows // 4 :], y[rows // 4 :])  # a view: a block batch
    finally:
        torch.set_num_threads(previous)


@needs_cuda
@pytest.mark.parametrize("kind", ["linear", "logistic"])
@pytest.mark.parametrize("rows", [16, 333, 4096])
def test_the_written_out_gradient_equals_autograd_bit_for_bit_on_cuda(kind, rows):
    w, X, y = batch_of(kind, rows, "float32", features=1000)
    assert_written_out_equals_autograd(kind, w.cuda(), X.cuda(), y.cuda())


@pytest.mark.parametrize("kind", ["linear", "logistic"])
def test_full_data_passes_with_kept_chunks_equal_fresh_float64_copies(kind):
    X, y = generate(make_config(f"data.kind={kind}", "data.n_samples=1001").data)  # float32 rows
    w = torch.tensor([1.0, -2.0, 0.5, 0.1])
    chunks = obj.Float64Chunks()
    fresh = [X[lo : lo + 300].double() for lo in range(0, 1001, 300)]
    expected = sum(float(((xc @ w.double() - y[lo : lo + 300].double()) ** 2).sum()) if kind == "linear" else
                   float(torch.nn.functional.binary_cross_entropy_with_logits(
                       xc @ w.double(), y[lo : lo + 300].double(), reduction="sum"))
                   for lo, xc in zip(range(0, 1001, 300), fresh))
    for _ in range(2):  # the second pass reuses the first one's buffers
        assert obj.loss_sum(kind, w, X, y, chunk_rows=300, chunks=chunks) == pytest.approx(expected, rel=1e-14)
    assert obj.loss_sum(kind, w, X, y, chunk_rows=300, chunks=chunks) == obj.loss_sum(kind, w, X, y, chunk_rows=300)
    first = [xc.data_ptr() for xc, _ in chunks(X, y, 300)]
    assert len(set(first)) == 1 and [xc.data_ptr() for xc, _ in chunks(X, y, 300)] == first  # kept, not remade
    stats, again = obj.linear_stats(X, y, 300, chunks), obj.linear_stats(X, y, 300)
    assert torch.equal(stats.xtx, again.xtx) and torch.equal(stats.xty, again.xty) and stats.yty == again.yty


def test_least_squares_from_summed_shard_statistics_equals_lstsq_on_all_rows():
    X, y = data(n=5000, **{"data.noise": "normal"})
    stats = [obj.linear_stats(X[a:b], y[a:b], chunk_rows=700) for a, b in shard_bounds(5000, 4)]
    total = sum(stats[1:], stats[0])
    w = obj.least_squares_optimum(total)
    torch.testing.assert_close(w, torch.linalg.lstsq(X, y.unsqueeze(1)).solution.squeeze(1), rtol=1e-10, atol=1e-10)
    assert obj.linear_objective(w, total) == pytest.approx(obj.mse(X @ w, y).item(), rel=1e-10)
    assert obj.loss_sum("linear", w, X, y, chunk_rows=999) / len(y) == pytest.approx(obj.linear_objective(w, total),
                                                                                      rel=1e-12)


def test_ridge_optimum_zeroes_the_penalised_gradient():
    X, y = data()
    wd = 0.3
    w = obj.least_squares_optimum(obj.linear_stats(X, y), weight_decay=wd)
    _, grad = obj.loss_and_grad("linear", w, X, y)
    assert (grad + wd * w).abs().max() < 1e-10


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_newton_reaches_the_logistic_optimum(wd):
    X, y = data("logistic", n=4000)
    w, value, iterations = obj.newton_logistic_optimum(lambda v: obj.logistic_newton_terms(v, X, y), 4, wd)
    _, grad = obj.loss_and_grad("logistic", w, X, y)
    assert (grad + wd * w).abs().max() < 1e-9 and iterations < 20
    assert value == pytest.approx(obj.logistic_loss(X @ w, y).item() + obj.penalty(w, wd), rel=1e-12)
    # no other point does better
    for _ in range(5):
        other = w + 0.05 * torch.randn(4, dtype=torch.float64)
        assert obj.logistic_loss(X @ other, y).item() + obj.penalty(other, wd) > value


def test_float32_data_with_float64_sums():
    X, y = generate(make_config("data.n_samples=4096").data)
    w = torch.tensor([1.0, 2.0, 3.0, 4.0])
    exact = ((X.double() @ w.double() - y.double()) ** 2).sum().item()
    assert obj.loss_sum("linear", w, X, y, chunk_rows=1000) == pytest.approx(exact, rel=1e-14)
