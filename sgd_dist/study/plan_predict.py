"""What a plan predicts before it runs a config, to size and prune its runs, and to say why a mode won.

Modelled, never measured: the steps to the target from the noise scale (McCandlish et al. 2018's
S(B) = S_min (1 + B_noise / B), with S_min from the pilot run's steps and B_noise its measured B_simple), and a
step's time from the time model's formulas (``core/time_model.py``: compute, the server's work per answer and
update, the server's shared link, the latency, the expected straggler delays). These numbers decide how long a
run is and which configs are not worth running; none of them goes into plan.csv.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from sgd_dist.core.time_model import TimeProfile, compute_s, message_s, server_answer_s, server_update_s
from sgd_dist.study.cluster_spec import ClusterSpec

ITEMSIZE = {"float32": 4, "float64": 8}


@dataclass(frozen=True)
class StepsModel:
    """S(B) = s_min (1 + b_noise / B): updates to the target at global batch B (McCandlish et al.), fitted through
    the pilot's (batch, updates)."""

    s_min: float
    b_noise: float
    pilot_batch: int
    pilot_updates: int

    def steps(self, batch: float) -> float:
        return self.s_min * (1 + self.b_noise / batch)

    def at_most(self, batch: float) -> float:
        """Updates a run at ``batch`` is sized for: S(B), but never fewer than the pilot's. S(B) assumes the lr
        tuned for each batch; at the problem's fixed lr a larger batch cannot cut the updates below what the lr
        allows (the descent is then lr-limited), and a run sized by S(B) alone would stop short of the target."""
        return max(self.pilot_updates, self.steps(batch))


def steps_model(rows: list[dict], batch: int, say: Callable[[str], None]) -> StepsModel | None:
    """S(B) from the pilot (the first row): its updates to the target and its noise scale at the target; None
    (each run then takes the problem's train.steps) when it did not reach the target or has no noise scale."""
    pilot = rows[0] if rows else None
    if pilot is None or pilot["reached"] != "yes" or not pilot.get("noise_scale"):
        say("  no S(B) model (the pilot did not reach the target or measured no noise scale): every run takes the "
            "problem's train.steps")
        return None
    b_noise, global_batch = float(pilot["noise_scale"]), pilot["workers"] * batch
    model = StepsModel(pilot["updates_to_target"] / (1 + b_noise / global_batch), b_noise, global_batch,
                       pilot["updates_to_target"])
    where = pilot.get("noise_scale_at") or "target gap"
    say(f"  S(B) = {model.s_min:.3g} x (1 + {b_noise:.3g} / B) updates to the target at global batch B "
        f"(the pilot's updates and its noise scale B_simple at the {where})")
    return model


def step_batch(c: Any) -> int:
    """The rows one update's gradient averages: sync and ssp every worker's batch, backup the kept ones', async one
    worker's; local SGD one worker's local step's (its averaging is not counted: sizing errs long)."""
    if c.mode in ("async", "local_sgd"):
        return c.batch
    return (c.workers - (c.parameter if c.mode == "backup" else 0)) * c.batch


def updates_to_target(model: StepsModel, c: Any, sizing: bool = False) -> float:
    """The updates S(B) predicts for candidate ``c`` (``sizing``: never fewer than the pilot's, see
    ``StepsModel.at_most``): async twice its batch's (for its staleness) plus a round of stale ones, local SGD
    S / H rounds, sync, ssp and backup S of the batch they average."""
    steps = (model.at_most if sizing else model.steps)(step_batch(c) if sizing else _optimistic_batch(c))
    if c.mode == "async":
        return 2 * steps + c.workers
    if c.mode == "local_sgd":
        return steps / c.parameter
    return steps


def _optimistic_batch(c: Any) -> int:
    """For predictions that prune: local SGD's round counted as H steps of the whole global batch."""
    return c.workers * c.batch if c.mode == "local_sgd" else step_batch(c)


@dataclass(frozen=True)
class Guess:
    time_s: float
    worker_seconds: float
    why: str


def step_terms(profile: TimeProfile, spec: ClusterSpec, problem: dict, c: Any) -> dict[str, float]:
    """The time model's terms of one update of candidate ``c`` (sync-like: every answer of a round), seconds."""
    k, d = c.workers, _dim(problem)
    nbytes = d * ITEMSIZE[problem["data"].get("dtype", "float32")]
    steps = c.parameter if c.mode == "local_sgd" else 1
    compute = compute_s(profile, "local" if steps > 1 else "gradient", c.batch, d, steps)
    if spec.cores is not None:
        compute *= max(1.0, (k + 1) / spec.cores)
    remote = k - min(k, spec.workers_per_node or 0)
    bandwidth = None if spec.network.bandwidth_gbps is None else spec.network.bandwidth_gbps * 1e9
    answers = k if c.mode != "async" else 1
    return {
        "compute": compute * _slowest(spec, problem, c),
        "stragglers": _expected_delay_s(spec, problem, c),
        "server": answers * server_answer_s(profile, nbytes) + server_update_s(profile, d),
        "link": remote * message_s(0.0, bandwidth, nbytes) if remote else 0.0,
        "latency": 2 * spec.network.latency_ms / 1e3 if remote else 0.0,
    }


def predict(profile: TimeProfile, spec: ClusterSpec, problem: dict, model: StepsModel, c: Any) -> Guess:
    """Candidate ``c``'s predicted time to the target and worker-seconds."""
    terms = step_terms(profile, spec, problem, c)
    updates = updates_to_target(model, c)
    if c.mode == "async":  # k workers each on its own cycle; the server handles one answer and update at a time
        cycle = terms["compute"] + terms["stragglers"] + terms["latency"] + 2 * terms["link"] / max(c.workers, 1)
        step = max(cycle / c.workers, terms["server"])
    else:
        step = terms["compute"] + terms["stragglers"] + terms["latency"] + terms["server"] + terms["link"]
    time_s = updates * step
    why = f"{updates:.3g} updates of {duration(step)}: {bound_words(terms)}"
    return Guess(time_s, c.workers * time_s, why)


def duration(seconds: float) -> str:
    """'2.1 s', '4.2 ms' or '25 us'."""
    if seconds >= 1:
        return f"{seconds:.3g} s"
    return f"{1e3 * seconds:.3g} ms" if seconds >= 1e-3 else f"{1e6 * seconds:.3g} us"


def bound_words(terms: dict[str, float]) -> str:
    """'link-bound (4.2 ms of 4.6 ms)': the largest term of a step."""
    total = sum(terms.values())
    name, largest = max(terms.items(), key=lambda item: item[1])
    word = {"compute": "compute-bound", "stragglers": "straggler-bound", "server": "server-bound",
            "link": "link-bound", "latency": "latency-bound"}[name]
    return f"{word} ({duration(largest)} of {duration(total)})"


def sync_step_words(profile: TimeProfile, spec: ClusterSpec, problem: dict, c: Any) -> str:
    """Why a sync step at ``c``'s workers takes what it takes, in words, from the time model's terms."""
    sync = _Sync(c.workers, c.batch)
    terms = step_terms(profile, spec, problem, sync)
    k = c.workers
    d = _dim(problem)
    if max(terms, key=terms.get) == "link":
        kb = d * ITEMSIZE[problem["data"].get("dtype", "float32")] / 1e3
        return (f"its steps are link-bound: {k} answers of {kb:.3g} KB share the server's "
                f"{spec.network.bandwidth_gbps:g} Gbit/s link, {duration(terms['link'])} a step against "
                f"{duration(terms['compute'])} of compute")
    if max(terms, key=terms.get) == "server":
        return (f"its steps are server-bound: the server handles {k} answers a step, {duration(terms['server'])} "
                f"against {duration(terms['compute'])} of compute")
    if max(terms, key=terms.get) == "latency":
        return f"its steps are latency-bound: {duration(terms['latency'])} of round trip a step"
    if max(terms, key=terms.get) == "stragglers":
        return (f"each of its steps waits for the latest of {k} workers' random delays, about "
                f"{duration(terms['stragglers'])} of a {duration(sum(terms.values()))} step")
    return (f"its steps are compute-bound: the slowest of {k} workers computes {duration(terms['compute'])} of a "
            f"{duration(sum(terms.values()))} step")


@dataclass(frozen=True)
class _Sync:
    workers: int
    batch: int
    mode: str = "sync"
    parameter: int | None = None


def _dim(problem: dict) -> int:
    data = problem["data"]
    return int(data.get("n_features", 1)) + int(data.get("bias", True))


def _slowest(spec: ClusterSpec, problem: dict, c: Any) -> float:
    """The compute-time factor of the slowest worker a step waits for (backup drops the b slowest)."""
    slow = {int(r): f for r, f in (problem.get("stragglers") or {}).get("slowdown", {}).items()}
    if spec.stragglers.model_fields_set:
        slow = dict(spec.stragglers.slowdown)
    factors = sorted(spec.factor(r) * slow.get(r, 1.0) for r in range(c.workers))
    sigma = spec.speed.sigma
    if c.mode == "async":  # the mean worker: a lognormal's mean is exp(sigma^2 / 2)
        return sum(factors) / len(factors) * math.exp(sigma * sigma / 2)
    keep = c.workers - (c.parameter if c.mode == "backup" else 0)
    # the largest of k lognormal draws is about exp(sigma sqrt(2 ln k))
    return factors[keep - 1] * math.exp(sigma * math.sqrt(2 * math.log(keep))) if keep > 1 else factors[0]


def _expected_delay_s(spec: ClusterSpec, problem: dict, c: Any) -> float:
    """The expected extra delay a step waits: the largest of the kept workers' delays (exponential: mean x the
    harmonic sum; uniform: about the largest, 2 x mean)."""
    stragglers = spec.stragglers.model_dump() if spec.stragglers.model_fields_set else problem.get("stragglers") or {}
    kind, mean = stragglers.get("delay", "none"), stragglers.get("delay_ms", 0.0) / 1e3
    if kind == "none" or mean == 0:
        return 0.0
    if c.mode == "async":
        return mean
    dropped = c.parameter if c.mode == "backup" else 0
    if kind == "exponential":
        return mean * sum(1 / i for i in range(dropped + 1, c.workers + 1))
    return 2 * mean * (c.workers - dropped) / (c.workers + 1)
