"""The exact optimum a run is measured against, and the gradient noise scale on the way to it.

Both come from the backend's sums over the shards in float64, before the run starts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable

import torch

from sgd_dist.backends import Backend
from sgd_dist.config import Config
from sgd_dist.core import noise_scale, objectives


@dataclass(frozen=True)
class Reference:
    """The exact optimum of the objective SGD minimises (the loss plus the L2 term, if any)."""

    weights: torch.Tensor | None
    objective: float | None
    loss: float | None
    method: str
    gap_scale: float | None = None
    """What the relative gap divides the optimality gap by: f* (the optimal loss) when it is positive, else the
    initial gap f(w0) - f* (f* = 0 is no scale: least squares that interpolates); None without an optimum."""
    gap_scale_is: str = "no relative gap: no exact optimum"


def with_gap_scale(reference: Reference, initial_objective: Callable[[], float]) -> Reference:
    """``reference`` with its gap scale: f* if positive, else f(w0) - f* (``initial_objective()`` gives f(w0))."""
    if reference.objective is None or reference.loss is None:
        return reference
    if reference.loss > 0:
        return replace(reference, gap_scale=reference.loss, gap_scale_is="f*: the optimal loss")
    initial = initial_objective() - reference.objective
    if not initial > 0:
        return replace(reference, gap_scale_is="no relative gap: f* = 0 and the initial weights are optimal")
    return replace(reference, gap_scale=initial, gap_scale_is="f(w0) - f*: the initial gap (f* = 0)")


MAX_REFERENCE_DIM = 8192  # the d x d float64 sums (512 MB) beyond which the exact optimum is not computed


def initial_weights(config: Config) -> torch.Tensor:
    """model.init as float64 weights."""
    init = config.model.init
    return (torch.zeros(config.data.dim, dtype=torch.float64) if init == "zeros"
            else torch.tensor(init, dtype=torch.float64))


def objective_at(config: Config, backend: Backend, w: torch.Tensor) -> float:
    """The full objective at ``w`` (the per-row loss summed over the shards, plus the L2 term), in float64."""
    total, rows = backend.loss_sum(w)
    return total / rows + objectives.penalty(w, config.optim.weight_decay)


def compute_reference(config: Config, backend: Backend) -> Reference:
    """The exact optimum and the scale of the relative gap measured against it."""
    reference = exact_optimum(config, backend)
    return with_gap_scale(reference, lambda: objective_at(config, backend, initial_weights(config)))


def exact_optimum(config: Config, backend: Backend) -> Reference:
    wd = config.optim.weight_decay
    d, n = config.data.dim, config.data.n_samples
    if d > MAX_REFERENCE_DIM:
        if config.data.kind == "linear" and wd == 0 and n <= d:
            # n generic rows in d >= n dimensions have full row rank: least squares fits them exactly
            return Reference(None, 0.0, 0.0, f"n={n} <= d={d}: least squares interpolates, f* = 0 (w* not computed)")
        return Reference(None, None, None, f"not computed: the d x d statistics at d={d} would take "
                                           f"{d * d * 8 / 1e9:.0f} GB (limit d={MAX_REFERENCE_DIM})")
    if config.data.kind == "linear":
        w = objectives.least_squares_optimum(backend.linear_stats(), wd)
        method = "closed-form least squares from X^T X and X^T y summed over the shards (float64)"
    else:
        w, _, iterations = objectives.newton_logistic_optimum(backend.newton_terms, config.data.dim, wd)
        method = f"damped Newton on the full data, sums over the shards in float64 ({iterations} iterations)"
    # f* by the very path a run's evaluation takes (the per-row loss summed over the shards, the penalty from the
    # weights, both in float64), so that the gap of a run at the optimum is 0 to rounding and never negative
    total, rows = backend.loss_sum(w)
    loss = total / rows
    return Reference(w, loss + objectives.penalty(w, wd), loss, method)


def measure_noise_scale(config: Config, backend: Backend, reference: Reference) -> dict:
    """The gradient noise scale at the initial weights and at each train.gradient_noise_scale relative gap on the
    segment from them to the optimum, from the workers' per-example gradient moments summed over the shards."""
    wd = config.optim.weight_decay
    w0 = initial_weights(config)
    if reference.weights is None or not reference.gap_scale:
        return {"initial": noise_scale.noise_scale(backend.gradient_moments(w0), w0, wd).as_dict(), "at_gap": [],
                "why": "no exact optimum w* to find the points at the gaps on the segment to it"}
    t0 = time.perf_counter()
    report = noise_scale.along_the_way(backend.gradient_moments, lambda w: objective_at(config, backend, w), w0,
                                       reference.weights, reference.objective, reference.gap_scale,
                                       config.train.gradient_noise_scale, wd)
    return {**report, "where": "initial: model.init; at_gap: the point w* + s (w0 - w*) with that relative gap; "
                               "final: the last weights", "seconds": time.perf_counter() - t0}


def final_noise_scale(config: Config, backend: Backend, weights: torch.Tensor) -> dict:
    """The gradient noise scale at the run's last weights."""
    return noise_scale.noise_scale(backend.gradient_moments(weights), weights, config.optim.weight_decay).as_dict()
