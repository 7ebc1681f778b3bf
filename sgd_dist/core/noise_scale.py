"""The gradient noise scale of McCandlish et al. 2018, computed exactly from the data. Pure functions, no Ray.

For the mean loss f(w) = (1/n) sum_i l_i(w), a mini-batch gradient is the mean of B per-example gradients
g_i = grad l_i(w). A shard's *moments* are sum_i g_i (a d-vector), sum_i |g_i|^2 and its row count, summed in
float64 over row chunks; the moments of shards add up to the whole data's. From them:

    G = mean_i g_i,    tr(Sigma) = mean_i |g_i|^2 - |G|^2,    B_simple = tr(Sigma) / |G|^2

Sigma is the population covariance of the per-example gradients (a batch of B rows drawn with replacement has
gradient noise tr(Sigma) / B), so B_simple is the batch size at which the mini-batch gradient's noise equals
its signal: McCandlish et al.'s "simple" noise scale, their predictor of the critical batch size. It depends
on w (it grows as |G| shrinks near the optimum), so it is always reported with the point where it was taken.

Per-example gradients have the scale of ``objectives.loss_and_grad`` on a batch of one row:
    linear   (squared error (x.w - y)^2):         g_i = 2 (x_i.w - y_i) x_i
    logistic (cross-entropy with logits x.w):     g_i = (sigmoid(x_i.w) - y_i) x_i
Both are r_i x_i for a scalar r_i, so sum_i g_i = X^T r and sum_i |g_i|^2 = sum_i r_i^2 |x_i|^2: no
per-example gradient is ever materialised. An L2 term wd/2 |w|^2 adds wd w to every g_i: to G, not to Sigma.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from sgd_dist.core.objectives import Float64Chunks, _chunks


@dataclass(frozen=True)
class GradientMoments:
    """sum_i g_i, sum_i |g_i|^2 and n over some rows, in float64; shards add."""

    grad_sum: torch.Tensor
    sq_norm_sum: float
    n: int

    def __add__(self, other: GradientMoments) -> GradientMoments:
        return GradientMoments(self.grad_sum + other.grad_sum, self.sq_norm_sum + other.sq_norm_sum, self.n + other.n)


def residual(kind: str, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """r_i with g_i = r_i x_i, from the logits / predictions z = X w."""
    if kind == "linear":
        return 2 * (z - y)
    if kind == "logistic":
        return torch.sigmoid(z) - y
    raise ValueError(f"unknown objective {kind!r}")


def gradient_moments(kind: str, w: torch.Tensor, X: torch.Tensor, y: torch.Tensor,
                     chunk_rows: int | None = None, chunks: Float64Chunks | None = None) -> GradientMoments:
    """The per-example gradient moments of rows (X, y) at w, in float64, over row chunks (bounded memory;
    ``chunks`` holds the float64 copies between calls)."""
    w = w.to(device=X.device, dtype=torch.float64)
    grad_sum = torch.zeros(X.shape[1], dtype=torch.float64, device=X.device)
    sq = torch.zeros((), dtype=torch.float64, device=X.device)
    for xc, yc in _chunks(X, y, chunk_rows, chunks):
        r = residual(kind, xc @ w, yc)
        grad_sum += xc.T @ r
        # |x_i|^2 as one dot product per row: no chunk-sized temporary x * x
        sq += (r * r) @ torch.bmm(xc.unsqueeze(1), xc.unsqueeze(2)).view(-1)
    return GradientMoments(grad_sum.cpu(), sq.item(), X.shape[0])


@dataclass(frozen=True)
class NoiseScale:
    """G's squared norm, tr(Sigma) and B_simple = tr(Sigma) / |G|^2 (inf where G = 0) at one point."""

    grad_sq_norm: float
    trace_cov: float
    b_simple: float

    def as_dict(self) -> dict:
        return {"b_simple": self.b_simple, "trace_cov": self.trace_cov, "grad_sq_norm": self.grad_sq_norm}


def noise_scale(moments: GradientMoments, w: torch.Tensor | None = None, weight_decay: float = 0.0) -> NoiseScale:
    """G, tr(Sigma) and B_simple from the whole data's moments (and the L2 term's wd w added to G)."""
    mean = moments.grad_sum / moments.n
    trace = max(moments.sq_norm_sum / moments.n - float(mean @ mean), 0.0)  # >= 0 up to round-off
    if weight_decay and w is not None:
        mean = mean + weight_decay * w.double()
    g2 = float(mean @ mean)
    return NoiseScale(g2, trace, trace / g2 if g2 > 0 else math.inf)


def point_at_gap(objective: Callable[[torch.Tensor], float], w0: torch.Tensor, w_star: torch.Tensor,
                 f_star: float, scale: float, gap: float, iterations: int = 60) -> tuple[torch.Tensor, float] | None:
    """The point w* + s (w0 - w*), s in (0, 1], whose (objective - f_star) / scale equals ``gap``, by bisection.

    The objective is convex, so along the segment from the optimum it only grows: one s per gap. None when even
    w0 is closer than ``gap`` (the run starts below it). Returns (point, s).
    """
    w0, w_star = w0.double(), w_star.double()

    def rel(s: float) -> float:
        return (objective(w_star + s * (w0 - w_star)) - f_star) / scale

    if rel(1.0) <= gap:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rel(mid) < gap else (lo, mid)
    s = (lo + hi) / 2
    return w_star + s * (w0 - w_star), s


def along_the_way(moments_at: Callable[[torch.Tensor], GradientMoments], objective: Callable[[torch.Tensor], float],
                  w0: torch.Tensor, w_star: torch.Tensor, f_star: float, scale: float, gaps: Sequence[float],
                  weight_decay: float = 0.0) -> dict:
    """B_simple at the initial weights and at each relative gap on the segment from the optimum to w0.

    ``moments_at(w)`` sums the moments over every shard; ``objective(w)`` is the full objective (loss plus the
    L2 term) and (objective - f_star) / scale the relative gap, as the sweep measures its target.
    """
    report = {"initial": noise_scale(moments_at(w0), w0, weight_decay).as_dict(), "at_gap": []}
    for gap in gaps:
        found = point_at_gap(objective, w0, w_star, f_star, scale, gap)
        if found is None:
            report["at_gap"].append({"relative_gap": gap, "b_simple": None, "why": "the initial weights are closer"})
            continue
        w, s = found
        report["at_gap"].append({"relative_gap": gap, "segment_s": s,
                                 **noise_scale(moments_at(w), w, weight_decay).as_dict()})
    return report


def at_relative_gap(report: dict, gap: float) -> float | None:
    """B_simple at relative gap ``gap`` from a report's at_gap list: the entry itself if listed, else interpolated
    log-log between the two listed gaps around it; None outside them."""
    points = sorted((p["relative_gap"], p["b_simple"]) for p in report.get("at_gap", []) if p.get("b_simple"))
    for g, b in points:
        if math.isclose(g, gap, rel_tol=1e-9):
            return b
    for (g1, b1), (g2, b2) in zip(points, points[1:]):
        if g1 < gap < g2:
            t = math.log(gap / g1) / math.log(g2 / g1)
            return math.exp(math.log(b1) + t * math.log(b2 / b1))
    return None


def fit_steps(batches: Sequence[float], steps: Sequence[float], b_noise: float | None = None) -> tuple[float, float]:
    """Fit McCandlish et al.'s S = S_min (1 + B_noise / B) to steps-to-target against batch, in log space.

    With ``b_noise`` given, only S_min is fitted (its least-squares value in log space is closed-form); without,
    B_noise is searched on a fine log grid spanning the batches a thousandfold either way. Returns (S_min, B_noise).
    """
    logs = [math.log(s) for s in steps]

    def s_min_for(bn: float) -> tuple[float, float]:
        shifts = [math.log1p(bn / b) for b in batches]
        log_s_min = sum(log_s - c for log_s, c in zip(logs, shifts)) / len(logs)
        return log_s_min, sum((log_s - log_s_min - c) ** 2 for log_s, c in zip(logs, shifts))

    if b_noise is not None:
        return math.exp(s_min_for(b_noise)[0]), b_noise
    lo, hi = math.log(min(batches) / 1e3), math.log(max(batches) * 1e3)
    grid = [math.exp(lo + (hi - lo) * i / 2000) for i in range(2001)]
    best = min(grid, key=lambda bn: s_min_for(bn)[1])
    return math.exp(s_min_for(best)[0]), best
