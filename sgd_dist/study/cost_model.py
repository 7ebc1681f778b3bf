"""A cost model of a step, fitted from a sweep's runs, that predicts beyond the machine they ran on. No Ray.

There is one model of time: a ``CostModel`` holds a ``core.time_model.TimeProfile``, the coefficients a virtual
cluster's clock uses, and every formula below calls that module's (``compute_s``, ``server_update_s``,
``server_answer_s``, ``message_s``). So a profile measured by ``sgd-dist calibrate`` predicts here as it times a
virtual run, and a fitted model is a profile a virtual run can use (``CostModel.profile``).

What is measured and what is modelled:

- **Measured** (from each run's ``summary.json`` and ``config.yaml``): each worker's median answer time
  (``answer_ms``: the worker's own clock from reading a command to writing its answer), the median interval
  between two updates (``median_step_ms``, the server's clock), the training time and step count (their
  difference to the median steps is the evaluations' cost), the first step at the target gap.
- **Fitted** (least squares, coefficients kept non-negative; a coefficient the runs cannot tell apart from
  another, such as a per-parameter term when every run has the same d, is fixed at 0 and named in
  ``CostModel.unidentified``; one no run measures, such as a local step's without local SGD runs or the
  replacement and restart times, is the base profile's, named in ``CostModel.from_base``):

  - one worker's gradient: ``grad_s + grad_s_per_elem x rows x parameters`` (a local step's ``local_s`` and
    ``local_s_per_elem`` from the local SGD runs, per step), from the answer times of runs where every process
    had a core of its own (K + 1 <= cores), or of all runs if those have one batch size;
  - the server's work per update: ``apply_s + apply_s_per_param x d`` plus, for each of the answers it
    handles one after the other, the per-message transport cost ``message_s + message_s_per_byte x bytes``,
    from what the synchronous runs' step times leave after the modelled compute: the K serial messages are
    what makes a parameter server stop scaling;
  - one evaluation: ``eval_s + eval_s_per_elem x shard rows x parameters``, from the training time the
    median steps do not account for.

- **Modelled** (formulas, not fitted): the network, from the config (``cluster.network.latency_ms`` and
  ``bandwidth_gbps``; none on one machine): each worker's update costs a command (d weights) and an answer
  (d gradient values) message of ``latency + bytes x 8 / bandwidth`` each on its own path, and the server's
  link carries every worker's two messages one after the other. Cores: on the measured machine K workers
  share ``cores`` cores (a compute phase takes ``max(1, K / cores)`` x one gradient, as the virtual clock's
  processor sharing gives while the server waits), and each hand-off between the server and a worker takes
  ``max(1, (K + 1) / cores)`` x its cost (the real transports poll: an oversubscribed machine makes every
  hand-off wait for a core; the virtual clock has no such term); a cluster (``cores`` None) gives every process a
  core. Stragglers multiply a worker's compute by their slowdown and add the median of their random delay. Per
  mode, with c_k worker k's compute:

  - sync: max_k c_k + network + server(K answers) (the virtual clock's step exactly when the workers' answers
    arrive together: without a network and with equal compute; an earlier answer's handling overlaps the
    others' compute there);
  - backup b: the (K - b)-th smallest c_k instead of the largest;
  - ssp s >= 1: the server's work overlaps the workers' (max of the two), the slowest worker still sets the
    pace in the long run; s = 0 is sync;
  - local_sgd H: H local steps' compute per round, one round of messages per H local steps;
  - async: workers cycle independently (an update every 1 / sum_k 1 / (c_k + messages)), bounded below by
    the server's work for one answer and by the server link carrying one answer and one command.

- **Time to target** = steps to the target x the predicted step, plus the evaluations before it. The steps
  to the target (statistical efficiency) are measured: the mean over the runs of the same mode and problem
  (the grid values other than the workers, mode and batch) with the same rows per update, else
  ``steps = S_min + S_min x B_noise / B`` fitted over that mode's runs (the empirical steps/batch trade-off of
  McCandlish et al. 2018); async's extra staleness at many workers is not modelled.

Everything here is plain arithmetic on dataclasses; ``load_observations`` reads a sweep's files, and ``fit`` without
a base profile reads the shipped one.
What a sweep writes and prints of the model is model_report.py.
"""

from __future__ import annotations

import datetime
import math
import os
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from sgd_dist.backends.virtual import load_profile
from sgd_dist.config import MODES, load_config
from sgd_dist.core import time_model
from sgd_dist.core.time_model import TimeProfile
from sgd_dist.engine.evaluations import eval_steps
from sgd_dist.run.rundir import read_summary
from sgd_dist.study.results import RESULTS_FILE, RUNS_DIR, grid_keys, read_results, series

SYNC_LIKE = ("sync", "backup", "local_sgd", "ssp")  # modes whose step time the server-cost fit uses (ssp: s = 0 only)


# ---------------------------------------------------------------------------------------------------------
# What a run is (the scenario) and what it measured (the observation)


@dataclass(frozen=True)
class Scenario:
    """Everything the model needs to predict one run's step: the config's numbers, on a machine of ``cores``."""

    mode: str
    num_workers: int
    worker_batches: tuple[int, ...]  # rows per step of each worker
    dim: int  # parameters (features plus bias)
    n_samples: int
    itemsize: int = 4  # bytes per weight or gradient value
    steps: int = 100
    eval_every: int = 0
    staleness_bound: int = 0
    backup_workers: int = 0
    local_steps: int = 1
    slowdown: tuple[float, ...] = ()  # per worker; empty: none
    delay_median_s: tuple[float, ...] = ()  # per worker: the median of its random delay
    latency_s: float = 0.0
    bandwidth_bps: float | None = None  # bits per second; None: unlimited
    cores: int | None = None  # cores the workers and the server share; None: one each (a cluster)

    @property
    def message_bytes(self) -> int:
        return self.dim * self.itemsize

    def rows_per_update(self) -> int:
        """Rows behind one update: one worker's batch (async), the fastest K - b (backup), H x all (local_sgd)."""
        if self.mode == "async":
            return self.worker_batches[0]
        if self.mode == "backup":
            return sum(sorted(self.worker_batches)[:self.num_workers - self.backup_workers])
        return sum(self.worker_batches) * (self.local_steps if self.mode == "local_sgd" else 1)

    def num_evaluations(self) -> int:
        """Evaluations in the run: step 0, every eval_every, the last (engine.evaluations.eval_steps)."""
        return len(eval_steps(self.steps, self.eval_every))

    def evaluations_before(self, step: int) -> int:
        """Evaluations whose time is inside the server clock at update ``step`` (those of earlier versions)."""
        return sum(1 for s in eval_steps(max(self.steps, step), self.eval_every) if s < step)


@dataclass(frozen=True)
class Observation:
    """One completed run: its scenario (on the measured machine) and what it measured, in seconds."""

    run: str
    point: tuple  # the grid point without the repeat: runs of one point are left out together
    series: tuple  # the speedup series (scaling, global batch, grid values but the worker count)
    scaling: str
    scenario: Scenario
    answer_s: tuple[float, ...]  # each worker's median answer time
    step_s: float  # median interval between updates
    train_time_s: float
    samples_per_s: float
    target_step: int | None
    target_time_s: float | None
    problem: tuple = ()  # the grid values that change what is solved (not the workers, mode or batch)


# ---------------------------------------------------------------------------------------------------------
# The fitted coefficients


FITTED = ("grad_s", "grad_s_per_elem", "local_s", "local_s_per_elem", "apply_s", "apply_s_per_param", "message_s",
          "message_s_per_byte", "eval_s", "eval_s_per_elem")  # what a sweep's runs can measure; the rest: the base's


@dataclass(frozen=True)
class CostModel:
    """A time profile (the virtual clock's coefficients, see the module docstring for what each multiplies) and
    where its numbers came from."""

    profile: TimeProfile
    cores: int | None  # cores of the machine the runs were measured on
    num_runs: int = 0  # observations behind the fit (0: a profile used as it is)
    unidentified: tuple[str, ...] = ()  # coefficients fixed at 0: the runs cannot separate them
    from_base: tuple[str, ...] = ()  # coefficients no run measured: the base profile's
    base: str = ""  # the base profile, in words

    def describe(self) -> list[str]:
        lines = time_model.describe(self.profile)  # its last line: where the numbers came from
        if self.num_runs:
            lines[-1] = f"fitted on {self.num_runs} runs measured on {self.cores or 'unknown'} cores"
        if self.unidentified:
            lines.append("not identifiable from these runs (fixed at 0): " + ", ".join(self.unidentified))
        if self.from_base:
            lines.append(f"not measured by these runs (from {self.base}): " + ", ".join(self.from_base))
        return lines

    def to_dict(self) -> dict:
        return {"profile": time_model.to_dict(self.profile), "cores": self.cores, "num_runs": self.num_runs,
                "unidentified": list(self.unidentified), "from_base": list(self.from_base), "base": self.base}


# ---------------------------------------------------------------------------------------------------------
# Prediction


@dataclass(frozen=True)
class Prediction:
    step_s: float  # one update (a round for local_sgd)
    eval_s: float  # one evaluation
    rows_per_update: int

    def samples_per_s(self, scenario: Scenario) -> float:
        """Over a whole run: samples over training time, evaluations included (as summary.json's)."""
        time = scenario.steps * self.step_s + scenario.num_evaluations() * self.eval_s
        return scenario.steps * self.rows_per_update / time

    def seconds_to(self, step: int, scenario: Scenario) -> float:
        """The server's clock at update ``step``: the steps and the evaluations before it."""
        return step * self.step_s + scenario.evaluations_before(step) * self.eval_s


def _contention(scenario: Scenario) -> float:
    """How much longer a compute phase takes when K workers share the measured machine's cores."""
    if scenario.cores is None:
        return 1.0
    return max(1.0, scenario.num_workers / scenario.cores)


def _handoff_contention(scenario: Scenario) -> float:
    """How much longer each server-worker hand-off takes when the K + 1 processes outnumber the cores."""
    if scenario.cores is None:
        return 1.0
    return max(1.0, (scenario.num_workers + 1) / scenario.cores)


def compute_s(model: CostModel, scenario: Scenario) -> list[float]:
    """Each worker's time for one answer (H local steps for local_sgd), on a core of its own."""
    local = scenario.mode == "local_sgd"
    out = []
    for k, rows in enumerate(scenario.worker_batches):
        c = time_model.compute_s(model.profile, "local" if local else "gradient", rows, scenario.dim,
                                 scenario.local_steps if local else 1)
        if scenario.slowdown:
            c *= scenario.slowdown[k]
        if scenario.delay_median_s:
            c += scenario.delay_median_s[k]
        out.append(c)
    return out


def _wire_s(scenario: Scenario) -> float:
    """One message's serialisation on a link: bytes x 8 / bandwidth."""
    return time_model.message_s(0.0, scenario.bandwidth_bps or None, scenario.message_bytes)


def server_s(model: CostModel, scenario: Scenario, answers: int) -> float:
    """The server's work for one update of ``answers`` answers, each handled one after the other."""
    return time_model.server_update_s(model.profile, scenario.dim) + answers * message_cost_s(model, scenario)


def message_cost_s(model: CostModel, scenario: Scenario) -> float:
    """One answer's handling at the server (the transport's cost, not the network's)."""
    return time_model.server_answer_s(model.profile, scenario.message_bytes) * _handoff_contention(scenario)


def step_s(model: CostModel, scenario: Scenario) -> float:
    """The predicted time of one update (one round for local_sgd) in ``scenario``'s mode."""
    k = scenario.num_workers
    f = _contention(scenario)
    compute = compute_s(model, scenario)
    wire = _wire_s(scenario)
    one_way = time_model.message_s(scenario.latency_s, scenario.bandwidth_bps or None, scenario.message_bytes)
    path = 2 * one_way  # a command and its answer
    link = 2 * k * wire  # every worker's command and answer through the server's link, one after another
    mode = scenario.mode
    if mode == "async":
        per_message = message_cost_s(model, scenario)
        rate = sum(1 / (c * f + path + per_message) for c in compute)
        return max(1 / rate, server_s(model, scenario, 1), 2 * wire)
    if mode == "backup":
        slowest = sorted(compute)[k - scenario.backup_workers - 1]
    else:
        slowest = max(compute)
    network = max(path, link)
    if mode == "ssp" and scenario.staleness_bound > 0:
        return max(slowest * f + network, server_s(model, scenario, k))
    return slowest * f + network + server_s(model, scenario, k)


def eval_s(model: CostModel, scenario: Scenario) -> float:
    """One evaluation: every worker sums the loss over its shard, and the server collects K answers."""
    rows = scenario.n_samples / scenario.num_workers
    return (time_model.compute_s(model.profile, "evaluate", rows, scenario.dim) * _contention(scenario)
            + scenario.num_workers * message_cost_s(model, scenario))


def predict(model: CostModel, scenario: Scenario) -> Prediction:
    if scenario.mode not in MODES:
        raise ValueError(f"mode {scenario.mode!r}: the cost model knows {', '.join(MODES)}")
    return Prediction(step_s(model, scenario), eval_s(model, scenario), scenario.rows_per_update())


# ---------------------------------------------------------------------------------------------------------
# Fitting


def _nonneg_lstsq(columns: dict[str, np.ndarray], y: np.ndarray,
                  order: Sequence[str]) -> tuple[dict[str, float], list[str]]:
    """Least squares on the columns in ``order`` that add rank, with every coefficient >= 0.

    A column that adds no rank (the runs cannot separate it from the ones before it) is left out, and so is one
    whose coefficient comes out negative (then the rest is refitted): both are fixed at 0 and returned as
    unidentified.
    """
    kept: list[str] = []
    dropped: list[str] = []
    for name in order:
        trial = kept + [name]
        matrix = np.column_stack([columns[c] / (np.linalg.norm(columns[c]) or 1.0) for c in trial])
        if len(y) >= len(trial) and np.linalg.matrix_rank(matrix, tol=1e-9) == len(trial):
            kept.append(name)
        else:
            dropped.append(name)
    while True:
        if not kept:
            return {name: 0.0 for name in order}, dropped
        scale = np.array([np.linalg.norm(columns[c]) or 1.0 for c in kept])
        matrix = np.column_stack([columns[c] for c in kept]) / scale
        coef = np.linalg.lstsq(matrix, y, rcond=None)[0] / scale
        negative = [c for c, v in zip(kept, coef) if v < 0]
        if not negative:
            fitted = dict(zip(kept, (float(v) for v in coef)))
            return {name: fitted.get(name, 0.0) for name in order}, dropped
        worst = min(zip(kept, coef), key=lambda cv: cv[1])[0]
        kept.remove(worst)
        dropped.append(worst)


def _uncontended(obs: Observation, cores: int | None) -> bool:
    return cores is None or obs.scenario.num_workers + 1 <= cores


def fit(observations: Sequence[Observation], cores: int | None = None, base: TimeProfile | None = None,
        base_name: str = "the shipped profile") -> CostModel:
    """Fit every coefficient the runs measure from ``observations`` measured on a machine of ``cores`` cores (None:
    a core each); the others are ``base``'s (None: the profile shipped with the package, ``base_name``).

    ValueError if there is nothing to fit (no completed run).
    """
    if not observations:
        raise ValueError("the cost model needs at least one completed run")
    base = load_profile(None) if base is None else base
    fitted: dict[str, float] = {}
    unidentified: list[str] = []
    for local in (False, True):
        pool = [o for o in observations if (o.scenario.mode == "local_sgd") == local]
        if pool:
            coef, dropped = _fit_compute(pool, cores, local)
            fitted.update(coef)
            unidentified += dropped
    silent = dict.fromkeys(("apply_s", "apply_s_per_param", "message_s", "message_s_per_byte", "eval_s",
                            "eval_s_per_elem"), 0.0)
    partial = _model(base, {**fitted, **silent}, cores)
    server, dropped = _fit_server(observations, cores, partial)
    unidentified += dropped
    ev, dropped = _fit_evaluation(observations, cores, _model(base, {**fitted, **silent, **server}, cores))
    unidentified += dropped
    fitted.update(server, **ev)
    from_base = tuple(name for name in time_model.COEFFICIENTS if name not in fitted)
    profile = replace(base, **fitted, cores=cores or base.cores, date=datetime.date.today().isoformat(),
                      source=f"the cost model's fit on {len(observations)} runs"
                             + (f"; {', '.join(from_base)} from {base_name}" if from_base else ""))
    return CostModel(profile, cores, len(observations), tuple(dict.fromkeys(unidentified)), from_base, base_name)


def _model(base: TimeProfile, coefficients: dict[str, float], cores: int | None) -> CostModel:
    """``base`` with ``coefficients`` set: a model for fitting the rest against."""
    return CostModel(replace(base, **coefficients), cores)


def _fit_compute(pool: Sequence[Observation], cores: int | None,
                 local: bool) -> tuple[dict[str, float], list[str]]:
    """One worker's gradient (``local``: one local step) from the workers' own answer times."""
    uncontended = [o for o in pool if _uncontended(o, cores)]
    if len({_elems(o.scenario, b) for o in uncontended for b in o.scenario.worker_batches}) >= 2:
        pool = uncontended
    calls, elems, ys = [], [], []
    for o in pool:
        s = o.scenario
        h = s.local_steps if local else 1
        for k, (rows, answer) in enumerate(zip(s.worker_batches, o.answer_s)):
            slow = s.slowdown[k] if s.slowdown else 1.0
            delay = s.delay_median_s[k] if s.delay_median_s else 0.0
            calls.append(h)
            elems.append(h * rows * s.dim)
            ys.append(max(0.0, answer - delay) / slow)
    names = ["local_s", "local_s_per_elem"] if local else ["grad_s", "grad_s_per_elem"]
    return _nonneg_lstsq({names[0]: np.array(calls, float), names[1]: np.array(elems, float)}, np.array(ys), names)


def _fit_server(observations: Sequence[Observation], cores: int | None,
                partial: CostModel) -> tuple[dict[str, float], list[str]]:
    """The server: what the synchronous steps leave after the modelled compute and network."""
    sync = [o for o in observations if o.scenario.mode in SYNC_LIKE
            and not (o.scenario.mode == "ssp" and o.scenario.staleness_bound > 0)]
    cols: dict[str, list[float]] = {"apply_s": [], "message_s": [], "apply_s_per_param": [], "message_s_per_byte": []}
    ys = []
    for o in sync:
        s = replace(o.scenario, cores=cores)
        k = s.num_workers * _handoff_contention(s)
        cols["apply_s"].append(1.0)
        cols["apply_s_per_param"].append(s.dim)
        cols["message_s"].append(k)
        cols["message_s_per_byte"].append(k * s.message_bytes)
        ys.append(o.step_s - step_s(partial, s))
    return _nonneg_lstsq({c: np.array(v, float) for c, v in cols.items()}, np.array(ys),
                         ["apply_s", "message_s", "apply_s_per_param", "message_s_per_byte"])


def _fit_evaluation(observations: Sequence[Observation], cores: int | None,
                    messages: CostModel) -> tuple[dict[str, float], list[str]]:
    """Evaluations: the training time that the median steps leave over, per evaluation (the steps slower than the
    median are in it too), less the K answers' handling at the fitted per-message cost."""
    ones, shard, ys = [], [], []
    for o in observations:
        s = replace(o.scenario, cores=cores)
        ones.append(_contention(s))
        shard.append(s.n_samples / s.num_workers * s.dim * _contention(s))
        left = (o.train_time_s - s.steps * o.step_s) / s.num_evaluations()
        ys.append(max(0.0, left - eval_s(messages, s)))
    return _nonneg_lstsq({"eval_s": np.array(ones, float), "eval_s_per_elem": np.array(shard, float)},
                         np.array(ys), ["eval_s", "eval_s_per_elem"])


def _elems(s: Scenario, rows: int) -> int:
    return rows * s.dim * (s.local_steps if s.mode == "local_sgd" else 1)


# ---------------------------------------------------------------------------------------------------------
# Statistical efficiency: steps to the target


@dataclass(frozen=True)
class StepsToTarget:
    """Steps to the target per mode and problem: measured means by rows per update, and S_min (1 + B_noise / B) fits."""

    measured: dict[tuple[str, tuple, int], float]  # (mode, problem, rows per update) -> mean steps
    fitted: dict[tuple[str, tuple], tuple[float, float]]  # (mode, problem) -> (S_min, S_min x B_noise)

    def steps(self, mode: str, rows: int, problem: tuple = ()) -> float | None:
        if (mode, problem, rows) in self.measured:
            return self.measured[(mode, problem, rows)]
        if (mode, problem) in self.fitted:
            a, c = self.fitted[(mode, problem)]
            return a + c / rows
        return None


def steps_to_target(observations: Iterable[Observation]) -> StepsToTarget:
    by: dict[tuple[str, tuple, int], list[int]] = {}
    for o in observations:
        if o.target_step is not None:
            by.setdefault((o.scenario.mode, o.problem, o.scenario.rows_per_update()), []).append(o.target_step)
    measured = {key: statistics.fmean(v) for key, v in by.items()}
    fitted = {}
    for mode, problem in {(m, p) for m, p, _ in measured}:
        pairs = [(b, s) for (m, p, b), s in measured.items() if (m, p) == (mode, problem)]
        if len(pairs) < 2:
            continue
        coef, _ = _nonneg_lstsq({"a": np.ones(len(pairs)), "c": np.array([1 / b for b, _ in pairs])},
                                np.array([s for _, s in pairs], float), ["a", "c"])
        fitted[(mode, problem)] = (coef["a"], coef["c"])
    return StepsToTarget(measured, fitted)


# ---------------------------------------------------------------------------------------------------------
# Predictions beside the measured runs (leave one grid point out)


def error_pct(predicted: float | None, measured: float | None) -> float | None:
    if predicted is None or measured is None or not measured:
        return None
    return 100.0 * (predicted - measured) / measured


def leave_one_out(observations: Sequence[Observation], cores: int | None) -> dict[str, dict]:
    """Each run's prediction from a model fitted on every other grid point's runs (its own repeats left out too).

    Returns run name -> the PREDICTION_COLUMNS. A point whose leaving out leaves nothing to fit gets the fit on
    all runs, and says so in ``prediction_fit``.
    """
    out: dict[str, dict] = {}
    for point in dict.fromkeys(o.point for o in observations):
        rest = [o for o in observations if o.point != point]
        how = "leave-one-point-out"
        try:
            model = fit(rest, cores)
        except ValueError:
            model, rest, how = fit(observations, cores), list(observations), "all runs (nothing else to fit)"
        efficiency = steps_to_target(rest)
        for o in (o for o in observations if o.point == point):
            out[o.run] = prediction_row(model, efficiency, o, cores, how)
    return out


def prediction_row(model: CostModel, efficiency: StepsToTarget, o: Observation, cores: int | None, how: str) -> dict:
    s = replace(o.scenario, cores=cores)
    p = predict(model, s)
    steps = efficiency.steps(s.mode, s.rows_per_update(), o.problem)
    target = p.seconds_to(math.ceil(steps), s) if steps is not None else None
    return {
        "predicted_step_ms": 1e3 * p.step_s, "step_ms_error_pct": error_pct(p.step_s, o.step_s),
        "predicted_samples_per_s": p.samples_per_s(s),
        "samples_per_s_error_pct": error_pct(p.samples_per_s(s), o.samples_per_s),
        "predicted_seconds_to_target": target, "seconds_to_target_error_pct": error_pct(target, o.target_time_s),
        "prediction_fit": how,
    }


def error_summary(rows: Iterable[dict]) -> dict[str, tuple[float, float, int]]:
    """Per error column: (median |error| %, worst |error| %, runs)."""
    out = {}
    for column in ("step_ms_error_pct", "samples_per_s_error_pct", "seconds_to_target_error_pct"):
        errors = [abs(r[column]) for r in rows if r.get(column) is not None]
        if errors:
            out[column] = (statistics.median(errors), max(errors), len(errors))
    return out


# ---------------------------------------------------------------------------------------------------------
# Beyond the machine: 1 to 1,024 workers


def worker_counts(maximum: int = 1024) -> list[int]:
    return [2 ** i for i in range(int(math.log2(maximum)) + 1)]


@dataclass(frozen=True)
class Curve:
    """Predicted numbers of one series and mode over the worker counts, with the speedup over 1 worker."""

    series: tuple
    mode: str
    network: str  # how the network was set, in words
    workers: list[int]
    step_ms: list[float]
    samples_per_s: list[float]
    seconds_to_target: list[float | None]
    speedup: list[float]
    basis: str  # time_to_target or samples_per_s, as the measured speedups

    def peak(self) -> tuple[int, float]:
        best = max(range(len(self.workers)), key=self.speedup.__getitem__)
        return self.workers[best], self.speedup[best]

    def knee(self) -> int:
        """The worker count past which doubling the workers gains less than 10 % (the last one if it always does)."""
        for i in range(len(self.workers) - 1):
            if self.speedup[i + 1] < 1.1 * self.speedup[i]:
                return self.workers[i]
        return self.workers[-1]

    def stops_paying(self) -> str:
        k, s = self.peak()
        knee = self.knee()
        if knee == self.workers[-1]:
            return f"still paying at K={knee} (speedup {s:.3g})"
        tail = f"; peak {s:.3g} at K={k}" if k != knee else ""
        return f"stops paying at K={knee} (speedup {self.speedup[self.workers.index(knee)]:.3g}{tail})"


def scale_scenario(template: Scenario, scaling: str, k: int, global_batch: int | None,
                   cores: int | None) -> Scenario | None:
    """``template`` with k workers: strong splits ``global_batch`` (None if it does not split), weak keeps the batch."""
    if scaling == "strong":
        if global_batch is None or global_batch % k:
            return None
        batch = global_batch // k
    else:
        batch = template.worker_batches[0]
    slow = template.slowdown[:k] + (1.0,) * max(0, k - len(template.slowdown)) if template.slowdown else ()
    delay = (template.delay_median_s[:k] + (0.0,) * max(0, k - len(template.delay_median_s))
             if template.delay_median_s else ())
    return replace(template, num_workers=k, worker_batches=(batch,) * k, slowdown=slow, delay_median_s=delay,
                   backup_workers=min(template.backup_workers, k - 1), cores=cores)


def curve(model: CostModel, efficiency: StepsToTarget, template: Observation, workers: Sequence[int],
          cores: int | None, latency_s: float | None = None, bandwidth_bps: float | None = None,
          network: str = "as measured") -> Curve | None:
    """The predicted speedup of ``template``'s series over ``workers`` (K = 1 must be one of them)."""
    s0 = template.scenario
    if latency_s is not None:
        s0 = replace(s0, latency_s=latency_s, bandwidth_bps=bandwidth_bps)
    batch = sum(s0.worker_batches) if template.scaling == "strong" else None
    ks, steps, sps, ttt = [], [], [], []
    for k in workers:
        s = scale_scenario(s0, template.scaling, k, batch, cores)
        if s is None:
            continue
        p = predict(model, s)
        n = efficiency.steps(s.mode, s.rows_per_update(), template.problem)
        ks.append(k)
        steps.append(1e3 * p.step_s)
        sps.append(p.samples_per_s(s))
        ttt.append(p.seconds_to(math.ceil(n), s) if n is not None else None)
    if not ks or ks[0] != 1:
        return None
    if template.scaling == "strong" and None not in ttt:
        speedup, basis = [ttt[0] / t for t in ttt], "time_to_target"
    else:
        speedup, basis = [v / sps[0] for v in sps], "samples_per_s"
    return Curve(template.series, s0.mode, network, ks, steps, sps, ttt, speedup, basis)


def curves(observations: Sequence[Observation], model: CostModel, workers: Sequence[int], cores: int | None,
           latency_s: float | None = None, bandwidth_bps: float | None = None,
           network: str = "as measured") -> list[Curve]:
    """One curve per speedup series (and mode), from a template run of the series (its fewest workers)."""
    efficiency = steps_to_target(observations)
    out = []
    for key in dict.fromkeys(o.series for o in observations):
        template = min((o for o in observations if o.series == key), key=lambda o: o.scenario.num_workers)
        c = curve(model, efficiency, template, workers, cores, latency_s, bandwidth_bps, network)
        if c is not None:
            out.append(c)
    return out


# ---------------------------------------------------------------------------------------------------------
# Reading a sweep directory


def machine_cores() -> int:
    """Cores this process may run on: the measured machine's, when the model is fitted where the sweep ran."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def network_of(config: Any) -> tuple[float, float | None]:
    """(latency s, bandwidth bit/s or None) from ``cluster.network``; (0, None) for configs without one."""
    network = getattr(config.cluster, "network", None)
    latency_ms = getattr(network, "latency_ms", 0.0) or 0.0
    gbps = getattr(network, "bandwidth_gbps", None)
    return latency_ms / 1e3, (gbps * 1e9 if gbps else None)


def scenario_of(config: Any, cores: int | None) -> Scenario:
    """A run's scenario from its validated Config."""
    k = config.cluster.num_workers
    n = config.data.n_samples
    batches = tuple(n // k if b == "full" else int(b) for b in config.worker_batch_sizes())
    st = config.stragglers
    slowdown = tuple(float(st.slowdown.get(r, 1.0)) for r in range(k)) if st.slowdown else ()
    delay = ()
    if st.delay != "none":
        median = st.delay_ms / 1e3 * (1.0 if st.delay == "uniform" else math.log(2))
        delay = tuple(median if st.delay_workers is None or r in st.delay_workers else 0.0 for r in range(k))
    latency, bandwidth = network_of(config)
    return Scenario(
        mode=config.train.mode, num_workers=k, worker_batches=batches, dim=config.data.dim, n_samples=n,
        itemsize=4 if config.data.dtype == "float32" else 8, steps=config.train.steps,
        eval_every=config.train.eval_every, staleness_bound=config.train.staleness_bound,
        backup_workers=config.train.backup_workers, local_steps=config.train.local_steps,
        slowdown=slowdown, delay_median_s=delay, latency_s=latency, bandwidth_bps=bandwidth, cores=cores)


def observation(row: dict, config: Any, summary: dict, grid_keys: Sequence[str],
                cores: int | None) -> Observation | None:
    """A results.csv row with its run's config and summary.json; None unless the run completed with answer times."""
    answers = {int(r): ms for r, ms in (summary.get("answer_ms") or {}).items()}
    s = scenario_of(config, cores)
    if summary.get("status") != "completed" or not summary.get("median_step_ms") or len(answers) != s.num_workers:
        return None
    grid = tuple((k, row.get(k)) for k in grid_keys)
    batch = row.get("global_batch") if row.get("scaling") == "strong" else None
    return Observation(
        run=row["run"], point=(row.get("scaling"), batch, grid), series=series(row, grid_keys),
        scaling=row.get("scaling") or "weak",
        scenario=s, answer_s=tuple(answers[r] / 1e3 for r in range(s.num_workers)),
        step_s=summary["median_step_ms"] / 1e3, train_time_s=summary["train_time_s"],
        samples_per_s=summary["samples_per_s"], target_step=row.get("target_step"),
        target_time_s=row.get("target_time_s"),
        problem=tuple((k, v) for k, v in grid if k not in ("cluster.num_workers", "train.mode", "train.batch_size")))


def load_observations(sweep_dir: str | Path, cores: int | None = None) -> list[Observation]:
    """Every completed run of a sweep directory: results.csv, and each run's config.yaml and summary.json."""
    sweep_dir = Path(sweep_dir)
    keys = grid_keys(sweep_dir / RESULTS_FILE)
    out = []
    for row in read_results(sweep_dir / RESULTS_FILE):
        run_dir = sweep_dir / RUNS_DIR / row["run"]
        if row.get("status") != "completed" or not (run_dir / "summary.json").is_file():
            continue
        o = observation(row, load_config(run_dir / "config.yaml"), read_summary(run_dir), keys, cores)
        if o is not None:
            out.append(o)
    return out


@dataclass
class SweepModel:
    """A sweep's model: fitted on all its runs (for the curves), and each run's leave-one-point-out prediction."""

    observations: list[Observation]
    model: CostModel
    predictions: dict[str, dict] = field(default_factory=dict)


def model_sweep(sweep_dir: str | Path, cores: int | None = None, profile: TimeProfile | None = None,
                profile_name: str = "") -> SweepModel:
    """The sweep's runs and their model: fitted on them (each run predicted by leave-one-point-out), or ``profile``
    as it is (``profile_name``: where it came from), each run predicted from it with the sweep's own steps to the
    target."""
    cores = cores or machine_cores()
    observations = load_observations(sweep_dir, cores)
    if profile is None:
        return SweepModel(observations, fit(observations, cores), leave_one_out(observations, cores))
    if not observations:
        raise ValueError("no completed run to set the profile's predictions beside")
    model = CostModel(profile, cores, base=profile_name)
    efficiency = steps_to_target(observations)
    how = f"the profile {profile_name}"
    return SweepModel(observations, model, {o.run: prediction_row(model, efficiency, o, cores, how)
                                            for o in observations})
