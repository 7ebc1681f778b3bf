"""The gradient noise scale against per-example gradients from torch.func, shards adding up, the point at a gap,
the McCandlish fit; then the serial backend's and a serial run's numbers. No Ray."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_config
from torch.func import grad, vmap

from sgd_dist.backends.serial import SerialBackend
from sgd_dist.core import noise_scale as ns
from sgd_dist.core import objectives as obj
from sgd_dist.core.data import generate, shard_bounds
from sgd_dist.run.trainer import train


def tiny(kind: str, n: int = 37):
    cfg = make_config(f"data.kind={kind}", f"data.n_samples={n}", "data.dtype=float64")
    return generate(cfg.data)


def per_example_gradients(kind: str, w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each row's gradient of its own loss, by torch.func: the reference, independent of noise_scale's algebra."""
    if kind == "linear":
        def loss(w, x, t):
            return (x @ w - t) ** 2
    else:
        def loss(w, x, t):
            return torch.nn.functional.binary_cross_entropy_with_logits(x @ w, t)
    return vmap(grad(loss), in_dims=(None, 0, 0))(w, X, y)


W = torch.tensor([0.3, -1.0, 2.0, 0.5], dtype=torch.float64)


@pytest.mark.parametrize("kind", ["linear", "logistic"])
def test_moments_equal_the_sums_of_per_example_gradients(kind):
    X, y = tiny(kind)
    g = per_example_gradients(kind, W, X, y)
    m = ns.gradient_moments(kind, W, X, y, chunk_rows=5)
    assert m.n == 37
    torch.testing.assert_close(m.grad_sum, g.sum(0), rtol=1e-12, atol=1e-12)
    assert m.sq_norm_sum == pytest.approx((g * g).sum().item(), rel=1e-12)
    # the mean per-example gradient is the mini-batch gradient that training uses
    torch.testing.assert_close(m.grad_sum / m.n, obj.loss_and_grad(kind, W, X, y)[1], rtol=1e-12, atol=1e-12)
    scale = ns.noise_scale(m)
    cov = torch.cov(g.T, correction=0)  # population covariance of the per-example gradients
    assert scale.trace_cov == pytest.approx(cov.trace().item(), rel=1e-10)
    assert scale.grad_sq_norm == pytest.approx((g.mean(0) ** 2).sum().item(), rel=1e-12)
    assert scale.b_simple == pytest.approx(cov.trace().item() / (g.mean(0) ** 2).sum().item(), rel=1e-10)


@pytest.mark.parametrize("kind", ["linear", "logistic"])
def test_shard_moments_add_up_to_the_whole_data(kind):
    X, y = tiny(kind, n=101)
    whole = ns.gradient_moments(kind, W, X, y)
    parts = [ns.gradient_moments(kind, W, X[a:b], y[a:b], chunk_rows=7) for a, b in shard_bounds(101, 3)]
    summed = parts[0] + parts[1] + parts[2]
    assert summed.n == whole.n
    torch.testing.assert_close(summed.grad_sum, whole.grad_sum, rtol=1e-12, atol=1e-12)
    assert summed.sq_norm_sum == pytest.approx(whole.sq_norm_sum, rel=1e-12)
    assert ns.noise_scale(summed).b_simple == pytest.approx(ns.noise_scale(whole).b_simple, rel=1e-10)


def test_weight_decay_moves_the_mean_gradient_and_not_the_noise():
    X, y = tiny("linear")
    m = ns.gradient_moments("linear", W, X, y)
    plain, decayed = ns.noise_scale(m), ns.noise_scale(m, W, weight_decay=0.1)
    assert decayed.trace_cov == plain.trace_cov
    G = m.grad_sum / m.n + 0.1 * W
    assert decayed.grad_sq_norm == pytest.approx(float(G @ G), rel=1e-12)
    assert ns.noise_scale(ns.GradientMoments(torch.zeros(2, dtype=torch.float64), 3.0, 3)).b_simple == math.inf


def test_the_point_at_a_gap_on_a_quadratic_is_the_closed_form():
    """f is quadratic in w for least squares: gap(w* + s (w0 - w*)) = s^2 gap(w0), so s = sqrt(gap / gap(w0))."""
    X, y = tiny("linear", n=500)
    stats = obj.linear_stats(X, y)
    w_star = obj.least_squares_optimum(stats)
    f_star = obj.linear_objective(w_star, stats)
    w0 = torch.zeros(4, dtype=torch.float64)
    f = lambda w: obj.linear_objective(w, stats)  # noqa: E731
    point, s = ns.point_at_gap(f, w0, w_star, f_star, f_star, 0.05)
    assert s == pytest.approx(math.sqrt(0.05 * f_star / (f(w0) - f_star)), rel=1e-9)
    assert (f(point) - f_star) / f_star == pytest.approx(0.05, rel=1e-9)
    assert ns.point_at_gap(f, w0, w_star, f_star, f_star, 1e9) is None  # w0 is already closer


def test_the_report_reads_b_at_a_gap_exactly_or_log_log_between_two():
    report = {"at_gap": [{"relative_gap": 0.1, "b_simple": 10.0}, {"relative_gap": 0.001, "b_simple": 1000.0},
                         {"relative_gap": 1.0, "b_simple": None}]}
    assert ns.at_relative_gap(report, 0.1) == 10.0
    assert ns.at_relative_gap(report, 0.01) == pytest.approx(100.0)  # B ~ 1/gap here: exact in log-log
    assert ns.at_relative_gap(report, 0.5) is None and ns.at_relative_gap({}, 0.1) is None


def test_the_mccandlish_fit_recovers_s_min_and_b_noise():
    bs = [2 ** k for k in range(13)]
    steps = [12.0 * (1 + 150.0 / b) for b in bs]
    s_min, b_noise = ns.fit_steps(bs, steps)
    assert s_min == pytest.approx(12.0, rel=0.01) and b_noise == pytest.approx(150.0, rel=0.01)
    assert ns.fit_steps(bs, steps, 150.0) == (pytest.approx(12.0, rel=1e-9), 150.0)


def test_the_serial_backend_sums_the_workers_moments_over_their_shards():
    config = make_config("cluster.backend=serial", "cluster.num_workers=3", "data.dtype=float64")
    backend = SerialBackend(config)
    try:
        X, y = generate(config.data)
        summed = backend.gradient_moments(W)
        whole = ns.gradient_moments("linear", W, X, y)
        torch.testing.assert_close(summed.grad_sum, whole.grad_sum, rtol=1e-12, atol=1e-12)
        assert summed.sq_norm_sum == pytest.approx(whole.sq_norm_sum, rel=1e-12) and summed.n == 512
        assert backend.loss_sum(W) == (pytest.approx(obj.loss_sum("linear", W, X, y), rel=1e-12), 512)
    finally:
        backend.close()


def test_a_run_asked_for_the_noise_scale_records_it_at_each_gap(tmp_path):
    config = make_config("cluster.backend=serial", "train.gradient_noise_scale=[0.5, 0.05]", f"output.dir={tmp_path}")
    summary = train(config, console=False).summary
    report = summary["gradient_noise_scale"]
    assert set(report) >= {"initial", "at_gap", "final", "where"}
    gaps = [p["relative_gap"] for p in report["at_gap"]]
    assert gaps == [0.5, 0.05]
    b = [p["b_simple"] for p in report["at_gap"]]
    assert 0 < report["initial"]["b_simple"] < b[0] < b[1]  # the noise scale grows as the gradient shrinks
    assert report["final"]["b_simple"] > 0
    assert "gradient_noise_scale" not in train(make_config("cluster.backend=serial", f"output.dir={tmp_path / 'b'}"),
                                               console=False).summary
