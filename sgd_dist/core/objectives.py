"""Losses, their gradients and the exact references, as pure functions on tensors. No Ray.

A mini-batch gradient has two forms: ``loss_and_grad`` by autograd exactly as in the seed (``loss.backward()``),
the reference, and ``fast_loss_and_grad``, the same tensor operations autograd runs, written out (no graph,
no extra pass), which the workers use; tests show the two equal bit for bit. Full-data
quantities (evaluation loss, sufficient statistics, Newton terms) are accumulated in float64 over row
chunks, so a shard of any size is summarised in bounded extra memory and the optimality gap is exact to
double precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

EVAL_CHUNK_ROWS = 1 << 18
EVAL_CHUNK_BYTES = 64 << 20  # a float64 chunk of wide rows stays this small


def chunk_rows_for(dim: int) -> int:
    """Rows per float64 chunk of ``dim`` columns: EVAL_CHUNK_ROWS, fewer for wide rows (at least 1)."""
    return max(1, min(EVAL_CHUNK_ROWS, EVAL_CHUNK_BYTES // (8 * dim)))


def mse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The seed's mean squared error."""
    return ((pred - y) ** 2).mean()


def logistic_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of labels y in {0, 1} given logits x @ w."""
    return F.binary_cross_entropy_with_logits(logits, y)


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "linear": mse,
    "logistic": logistic_loss,
}


def loss_and_grad(kind: str, w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Mean loss over (X, y) at w and its gradient in w, by autograd as the seed does."""
    w = w.detach().requires_grad_(True)
    loss = LOSSES[kind](X @ w, y)
    loss.backward()
    return loss.item(), w.grad


def _linear_loss_and_grad(w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    # autograd's steps for mean((Xw - y)^2): mean's backward (1 / B for each row), pow's (times 2 r), mv's (X^T g)
    r = X @ w - y
    loss = (r**2).mean()  # mse(X @ w, y)
    g = torch.ones((), dtype=r.dtype, device=r.device).expand(r.shape) / r.numel()
    return loss.item(), X.t().mv(g * (2.0 * r))


def _logistic_loss_and_grad(w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    # autograd's steps for the mean cross-entropy with logits: (sigmoid(z) - y) / B, then mv's (X^T g)
    z = X @ w
    loss = logistic_loss(z, y)
    return loss.item(), X.t().mv(z.sigmoid().sub_(y).div_(z.numel()))


FAST_GRADIENTS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[float, torch.Tensor]]] = {
    "linear": _linear_loss_and_grad,
    "logistic": _logistic_loss_and_grad,
}


def fast_loss_and_grad(kind: str, w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    """``loss_and_grad`` without autograd: the same mean loss and the gradient from its written-out formula."""
    return FAST_GRADIENTS[kind](w.detach(), X, y)


def weighted_mean(tensors: list[torch.Tensor], counts: list[int]) -> torch.Tensor:
    """sum_r n_r g_r / sum_r n_r, accumulated in list order (so every backend rounds the same way)."""
    total = sum(counts)
    out = torch.zeros_like(tensors[0])
    for t, n in zip(tensors, counts):
        out.add_(t, alpha=n / total)
    return out


class Float64Chunks:
    """Row chunks of (X, y) in float64, copied into two buffers that the owner keeps between passes (a worker
    evaluates every few steps, and a fresh float64 chunk each time costs page faults on wide rows). Float64 rows
    are read in place. A chunk is valid until the next one."""

    def __init__(self) -> None:
        self._x: torch.Tensor | None = None
        self._y: torch.Tensor | None = None

    def _buffers(self, X: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (rows, X.shape[1])
        if self._x is None or self._x.shape != shape or self._x.device != X.device:
            self._x = X.new_empty(shape, dtype=torch.float64)
            self._y = X.new_empty(rows, dtype=torch.float64)
        return self._x, self._y

    def __call__(self, X: torch.Tensor, y: torch.Tensor, rows: int | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rows = max(1, min(rows or chunk_rows_for(X.shape[1]), X.shape[0]))
        if X.dtype == torch.float64 and y.dtype == torch.float64:
            for lo in range(0, X.shape[0], rows):
                yield X[lo : lo + rows], y[lo : lo + rows]
            return
        xbuf, ybuf = self._buffers(X, rows)
        for lo in range(0, X.shape[0], rows):
            m = min(rows, X.shape[0] - lo)
            yield xbuf[:m].copy_(X[lo : lo + m]), ybuf[:m].copy_(y[lo : lo + m])


def _chunks(X: torch.Tensor, y: torch.Tensor, rows: int | None, chunks: Float64Chunks | None
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    return (chunks if chunks is not None else Float64Chunks())(X, y, rows)


def loss_sum(kind: str, w: torch.Tensor, X: torch.Tensor, y: torch.Tensor, chunk_rows: int | None = None,
             chunks: Float64Chunks | None = None) -> float:
    """Sum (not mean) of the per-row loss over (X, y) at w, in float64, so shards add up exactly."""
    w = w.to(device=X.device, dtype=torch.float64)
    total = torch.zeros((), dtype=torch.float64, device=X.device)
    for xc, yc in _chunks(X, y, chunk_rows, chunks):
        z = xc @ w
        if kind == "linear":
            total += ((z - yc) ** 2).sum()
        else:
            total += F.binary_cross_entropy_with_logits(z, yc, reduction="sum")
    return total.item()


PENALTY_CHUNK = 8192  # below torch's parallel grain size: each chunk's sum is the same on any thread count


def penalty(w: torch.Tensor, weight_decay: float) -> float:
    """The L2 term wd/2 |w|^2 that torch.optim.SGD's weight_decay minimises along with the loss, in float64 from
    the weights themselves (a float32 norm would be off by ~1e-7 relative, more than a converged run's gap)."""
    if not weight_decay:
        return 0.0
    w = w.detach().reshape(-1).to(torch.float64)
    total = 0.0
    for lo in range(0, w.numel(), PENALTY_CHUNK):
        chunk = w[lo : lo + PENALTY_CHUNK]
        total += float((chunk * chunk).sum())
    return 0.5 * weight_decay * total


@dataclass(frozen=True)
class LinearStats:
    """Sufficient statistics of least squares: X^T X, X^T y, y^T y and n, summed over rows in float64."""

    xtx: torch.Tensor
    xty: torch.Tensor
    yty: float
    n: int

    def __add__(self, other: LinearStats) -> LinearStats:
        return LinearStats(self.xtx + other.xtx, self.xty + other.xty, self.yty + other.yty, self.n + other.n)


def linear_stats(X: torch.Tensor, y: torch.Tensor, chunk_rows: int | None = None,
                 chunks: Float64Chunks | None = None) -> LinearStats:
    d = X.shape[1]
    xtx = torch.zeros(d, d, dtype=torch.float64, device=X.device)
    xty = torch.zeros(d, dtype=torch.float64, device=X.device)
    yty = torch.zeros((), dtype=torch.float64, device=X.device)
    for xc, yc in _chunks(X, y, chunk_rows, chunks):
        xtx += xc.T @ xc
        xty += xc.T @ yc
        yty += yc @ yc
    return LinearStats(xtx.cpu(), xty.cpu(), yty.item(), X.shape[0])


def linear_objective(w: torch.Tensor, stats: LinearStats, weight_decay: float = 0.0) -> float:
    """Mean squared error over the whole dataset (plus the L2 term) from the sufficient statistics alone.

    Its three terms cancel: near the optimum it is off by many ulps of the loss, so a run's optimality gap is
    measured with ``loss_sum`` over the rows on both sides instead."""
    w = w.double()
    sse = w @ stats.xtx @ w - 2 * w @ stats.xty + stats.yty
    return float(sse) / stats.n + penalty(w, weight_decay)


def least_squares_optimum(stats: LinearStats, weight_decay: float = 0.0) -> torch.Tensor:
    """argmin_w mean((Xw - y)^2) + wd/2 |w|^2, solved from the statistics: (2 X^T X / n + wd I) w = 2 X^T y / n.

    Solved by least squares (SVD-based) so a rank-deficient X still gets its minimum-norm optimum.
    """
    d = stats.xty.shape[0]
    A = 2 * stats.xtx / stats.n + weight_decay * torch.eye(d, dtype=torch.float64)
    b = 2 * stats.xty / stats.n
    return torch.linalg.lstsq(A, b.unsqueeze(1), driver="gelsd").solution.squeeze(1)


@dataclass(frozen=True)
class NewtonTerms:
    """Sums over rows of the logistic loss, its gradient and its Hessian at one point, in float64."""

    loss: float
    grad: torch.Tensor
    hess: torch.Tensor
    n: int

    def __add__(self, other: NewtonTerms) -> NewtonTerms:
        return NewtonTerms(self.loss + other.loss, self.grad + other.grad, self.hess + other.hess, self.n + other.n)


def logistic_newton_terms(
    w: torch.Tensor, X: torch.Tensor, y: torch.Tensor, chunk_rows: int | None = None,
    chunks: Float64Chunks | None = None,
) -> NewtonTerms:
    d = X.shape[1]
    w = w.to(device=X.device, dtype=torch.float64)
    loss = torch.zeros((), dtype=torch.float64, device=X.device)
    grad = torch.zeros(d, dtype=torch.float64, device=X.device)
    hess = torch.zeros(d, d, dtype=torch.float64, device=X.device)
    for xc, yc in _chunks(X, y, chunk_rows, chunks):
        z = xc @ w
        p = torch.sigmoid(z)
        loss += F.binary_cross_entropy_with_logits(z, yc, reduction="sum")
        grad += xc.T @ (p - yc)
        hess += (xc * (p * (1 - p)).unsqueeze(1)).T @ xc
    return NewtonTerms(loss.item(), grad.cpu(), hess.cpu(), X.shape[0])


def newton_logistic_optimum(
    terms_at: Callable[[torch.Tensor], NewtonTerms],
    dim: int,
    weight_decay: float = 0.0,
    tol: float = 1e-10,
    max_iter: int = 100,
) -> tuple[torch.Tensor, float, int]:
    """Minimise the mean logistic loss (+ wd/2 |w|^2) by damped Newton steps on full-data terms.

    ``terms_at(w)`` returns the row sums at w (over every shard). Stops when the gradient's max-norm is
    below ``tol`` or when no step along the Newton direction decreases the objective any more; returns
    (w*, objective at w*, iterations). Backtracking halves a step that does not decrease the objective, so
    the solve is monotone even far from the optimum.
    """
    w = torch.zeros(dim, dtype=torch.float64)
    eye = torch.eye(dim, dtype=torch.float64)

    def objective(t: NewtonTerms, at: torch.Tensor) -> float:
        return t.loss / t.n + penalty(at, weight_decay)

    terms = terms_at(w)
    value = objective(terms, w)
    for iteration in range(1, max_iter + 1):
        grad = terms.grad / terms.n + weight_decay * w
        if grad.abs().max().item() < tol:
            return w, value, iteration - 1
        hess = terms.hess / terms.n + weight_decay * eye
        step = torch.linalg.lstsq(hess, grad.unsqueeze(1), driver="gelsd").solution.squeeze(1)
        scale = 1.0
        while scale >= 1e-4:
            candidate = w - scale * step
            cand_terms = terms_at(candidate)
            cand_value = objective(cand_terms, candidate)
            if cand_value <= value:
                break
            scale /= 2
        else:  # no decrease along the Newton direction: w is optimal to the precision of the sums
            return w, value, iteration
        w, terms, value = candidate, cand_terms, cand_value
    return w, value, max_iter
