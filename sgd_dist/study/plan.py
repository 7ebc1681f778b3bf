"""``sgd-dist plan``: which mode, how many workers, what batch and learning-rate scaling reach a target gap soonest
(or most cheaply) on a cluster you describe, found by virtual runs of it.

The search is staged, each stage a sweep (``study/sweep.py``: one run at a time, each kept on disk, so a half-done
plan resumes) of virtual runs (``cluster.backend: virtual``):

1. *pilot*: sync at the fewest workers, the problem's batch; it also measures the gradient noise scale at the
   target gap (``core/noise_scale.py``; at the initial weights where f* = 0 has no w*), which with its steps to the
   target gives McCandlish et al.'s S(B) = S_min (1 + B_noise / B): the steps to the target at any global batch;
2. *workers*: sync at every worker count (powers of two up to the cluster's largest), with each lr scaling;
3. *modes*: at the two best worker counts, every mode and its parameter (ssp's staleness bound, backup's backup
   workers, local SGD's local steps), and at the most workers those predicted within reach;
4. *batch*: at the three best configs, a quarter and four times the per-worker batch, with and without linear
   learning-rate scaling;
5. *extend*: each config that ran out of updates before the target runs again with four times as many.

Each run's length (train.steps) is twice the updates S(B) predicts for it, but never fewer than the pilot's (at
the problem's fixed lr a larger batch cannot cut the updates below what the lr allows), and at least 20. The
time model's formulas (``core/time_model.py``) and S(B) predict each config's time to the target and
worker-seconds, anchored on the nearest measured config; a config predicted at more than ``PRUNE_FACTOR`` times
the best measured is pruned, as is whatever does not fit the budget of simulated work (runs and worker steps).
What was pruned is said, with why. Predictions only size and prune: every number in plan.csv comes from a
virtual run.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import yaml

from sgd_dist.config import (
    MODE_PARAMETERS,
    ConfigError,
    _read_yaml,
    apply_overrides,
    build_config,
    dump_config,
    set_dotted,
)
from sgd_dist.core.time_model import TimeProfile, to_dict
from sgd_dist.errors import UsageError
from sgd_dist.run.rundir import write_text_atomic
from sgd_dist.study import plan_predict
from sgd_dist.study.cluster_spec import (
    ClusterSpec,
    cluster_section,
    speed_factors,
    stragglers_among,
    stragglers_at,
    write_profile,
)
from sgd_dist.study.experiment import Experiment, Sweep, plan_runs
from sgd_dist.study.plan_results import (
    PLAN_FILE,
    Budget,
    plan_row,
    rank_rows,
    recommendation,
    table_lines,
    write_plan,
)
from sgd_dist.study.sweep import run_sweep

Objective = Literal["time", "cost"]
INPUTS_FILE = "plan.yaml"
STAGES_DIR = "stages"
PROFILE_FILE = "profile.json"
PRUNED_FILE = "pruned.txt"  # what was not run, and why, one line each
SAFETY = 2.0  # a run's updates: this many times what S(B) predicts for it (never fewer than the pilot's)
MIN_UPDATES = 20
EVALUATIONS = 25  # evaluations per run (its time to the target is read at the first one below the target)
PRUNE_FACTOR = 3.0  # a config predicted at more than this many times the stage's best prediction is not run
EXTEND_FACTOR = 4
# the keys a plan's runs differ in: one joint grid key of each stage's sweep
KEYS = ("cluster.num_workers", "cluster.virtual.speed", "stragglers.slowdown", "stragglers.delay_workers",
        "train.mode", "train.staleness_bound", "train.backup_workers", "train.local_steps", "train.batch_size",
        "optim.lr_scaling", "optim.warmup_steps", "train.steps", "train.eval_every")
SHORT = {"ssp": "s", "backup": "b", "local_sgd": "H"}  # a mode parameter's letter in labels
ASYNC_LINEAR = ("not run: linear scaling multiplies the lr by the global batch K x B / optim.base_batch_size, but an "
                "async update applies one worker's B rows (with staleness, it diverges)")


@dataclass(frozen=True, order=True)
class Candidate:
    """One config the plan may run: the worker count, the mode and its parameter, the per-worker batch, the lr
    scaling, and how many updates it runs."""

    workers: int
    mode: str
    parameter: int | None
    batch: int
    lr_scaling: str
    updates: int = 0

    def label(self) -> str:
        """'backup b=8, 128 workers, batch 32, lr none'."""
        mode = self.mode if self.parameter is None else f"{self.mode} {SHORT[self.mode]}={self.parameter}"
        workers = f"{self.workers} worker{'s' if self.workers > 1 else ''}"
        return f"{mode}, {workers}, batch {self.batch}, lr {self.lr_scaling}"

    def name(self) -> str:
        """The run directory's name: 'k128-backup-b8-B32-lr_none-u300'."""
        mode = self.mode if self.parameter is None else f"{self.mode}-{SHORT[self.mode]}{self.parameter}"
        return f"k{self.workers}-{mode}-B{self.batch}-lr_{self.lr_scaling}-u{self.updates}"

    def point(self) -> tuple:
        """The config without its length: what a second run of it (extended) shares with the first."""
        return (self.workers, self.mode, self.parameter, self.batch, self.lr_scaling)

    def answers_per_update(self) -> int:
        """Worker steps (gradients, or local steps) one update costs."""
        if self.mode == "async":
            return 1
        return self.workers * (self.parameter if self.mode == "local_sgd" else 1)


@dataclass(frozen=True)
class Space:
    """What the plan may try: worker counts, modes (each with its parameters, None: chosen per worker count),
    per-worker batches (None: the problem's, a quarter and four times it) and lr scalings."""

    workers: tuple[int, ...]
    modes: tuple[tuple[str, int | None], ...]
    batches: tuple[int, ...] | None = None
    lr_scalings: tuple[str, ...] = ("none", "linear")


@dataclass
class Plan:
    """A plan's inputs and what it found so far."""

    out: Path
    problem_path: Path
    problem_raw: dict
    spec: ClusterSpec
    profile: TimeProfile
    target_gap: float
    objective: Objective
    budget: Budget
    space: Space
    rows: list[dict] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    steps_model: plan_predict.StepsModel | None = None
    say: Callable[[str], None] = print
    progress: bool | None = None
    prune: bool = True  # prune by prediction (the budget and misfits prune whatever this says)

    @property
    def base_batch(self) -> int:
        return int(self.problem_raw["train"]["batch_size"])


def modes_from(text: str) -> tuple[tuple[str, int | None], ...]:
    """'sync,async,backup:1,local_sgd' -> the modes and their parameters (None: chosen per worker count)."""
    modes = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        mode, _, value = part.partition(":")
        if mode not in ("sync", "async", *MODE_PARAMETERS):
            raise UsageError(f"--modes: unknown mode {mode!r}; allowed: sync, async, ssp, backup, local_sgd "
                             "(ssp, backup and local_sgd may name their parameter: backup:2)")
        if value and (mode not in MODE_PARAMETERS or not value.isdigit()):
            raise UsageError(f"--modes: {part!r}: only ssp, backup and local_sgd take a parameter, a whole number")
        modes.append((mode, int(value) if value else None))
    if not modes:
        raise UsageError("--modes lists no mode")
    return tuple(modes)


def default_space(spec: ClusterSpec) -> Space:
    """Worker counts 1, 2, 4, ... up to the cluster's largest (and it), every mode with parameters chosen per
    worker count."""
    counts = [2 ** i for i in range(spec.max_workers.bit_length()) if 2 ** i <= spec.max_workers]
    counts += [spec.max_workers] if counts[-1] != spec.max_workers else []
    return Space(tuple(counts), modes_from("sync,async,ssp,backup,local_sgd"))


def mode_variants(mode: str, parameter: int | None, workers: int) -> list[tuple[str, int | None]]:
    """The (mode, parameter) pairs to try at ``workers`` workers: the parameter given, or a few chosen."""
    if mode == "sync":
        return [("sync", None)]
    if mode == "async":
        return [("async", None)] if workers > 1 else []
    if mode == "ssp":
        values = [parameter] if parameter is not None else [1, 4]
        return [("ssp", s) for s in values if s >= 1] if workers > 1 else []
    if mode == "backup":
        values = [parameter] if parameter is not None else sorted({1, workers // 8, workers // 4})
        return [("backup", b) for b in values if 1 <= b < workers]
    values = [parameter] if parameter is not None else [2, 8, 32]
    return [("local_sgd", h) for h in values if h >= 2]


def load_problem(path: str | Path, overrides: Sequence[str] = ()) -> dict:
    """The problem's config (with dotted ``overrides``) as a raw mapping, validated; a plan needs a constant lr and
    no faults section."""
    raw = _read_yaml(Path(path))
    apply_overrides(raw, overrides)
    config = build_config(raw)
    if config.optim.schedule != "constant":
        raise ConfigError(f"{str(path)!r}: optim.schedule={config.optim.schedule}: a plan sets each run's length, "
                          "and a schedule over train.steps would change with it; use optim.schedule=constant")
    if config.faults:
        raise ConfigError(f"{str(path)!r}: faults: a plan's failures come from the cluster description "
                          "(failures.worker_mtbf_s, server_mtbf_s); drop the faults section")
    if config.train.batch_size == "full" or isinstance(config.train.batch_size, tuple):
        raise ConfigError(f"{str(path)!r}: train.batch_size must be one number (the plan varies it per worker)")
    raw = yaml.safe_load(dump_config(config))  # every field written out, as a run directory's config.yaml
    raw.pop("output")
    return raw


def base_raw(plan: Plan) -> dict:
    """What every run of the plan shares: the problem, the cluster, the noise scale measured at the target."""
    raw = yaml.safe_load(yaml.safe_dump(plan.problem_raw))
    for key in ("staleness_bound", "backup_workers", "local_steps"):
        raw["train"].pop(key, None)  # each run sets its mode's own
    raw["cluster"] = {**raw.get("cluster", {}), **cluster_section(plan.spec, str(plan.out.resolve() / PROFILE_FILE))}
    raw["cluster"].update(address=None, simulated_nodes=None)
    if plan.spec.stragglers.model_fields_set:
        raw["stragglers"] = plan.spec.stragglers.model_dump(mode="json")
    raw["train"].update(gradient_noise_scale=[plan.target_gap], log_every=0)
    raw["output"] = {"plots": False}
    return raw


def values(plan: Plan, c: Candidate) -> list[Any]:
    """The candidate's values of KEYS."""
    stragglers = stragglers_at(base_raw(plan).get("stragglers") or {}, c.workers)
    param = {key: MODE_PARAMETERS[m].sync_value for m, key in (("ssp", "staleness_bound"), ("backup", "backup_workers"),
                                                                ("local_sgd", "local_steps"))}
    if c.parameter is not None:
        param[MODE_PARAMETERS[c.mode].key] = c.parameter
    warmup = min(int(plan.problem_raw["optim"].get("warmup_steps", 0)), c.updates)
    return [c.workers, speed_factors(plan.spec, c.workers), stragglers.get("slowdown", {}),
            stragglers.get("delay_workers"), c.mode, param["staleness_bound"], param["backup_workers"],
            param["local_steps"], c.batch, c.lr_scaling, warmup, c.updates, max(1, c.updates // EVALUATIONS)]


def stage_sweep(plan: Plan, stage: str, candidates: list[Candidate], raw: dict | None = None) -> Sweep:
    """The sweep that runs ``candidates``: one joint grid key over KEYS, each run named after its candidate, every
    config built and validated here. ``raw``: what every run shares (default: base_raw, the virtual cluster)."""
    raw = base_raw(plan) if raw is None else raw
    experiment = Experiment(base=str(plan.problem_path), grid={",".join(KEYS): [values(plan, c) for c in candidates]},
                            target_gap=plan.target_gap)
    runs = [replace(run, name=c.name()) for run, c in
            zip(plan_runs(experiment, raw, f"plan stage {stage}"), candidates)]
    return Sweep(plan.problem_path, experiment, plan.problem_path, raw, runs)


def run_stage(plan: Plan, index: int, stage: str, candidates: list[Candidate]) -> list[dict]:
    """Run ``candidates`` as one sweep under stages/INDEX-STAGE (resuming what is there); their plan rows."""
    if not candidates:
        return []
    stage_dir = plan.out / STAGES_DIR / f"{index}-{stage}"
    result = run_sweep(stage_sweep(plan, stage, candidates), stage_dir, plots=False, stderr=io.StringIO(),
                       progress=plan.progress, desc=f"plan: {stage}", model=False)
    itemsize = plan_predict.ITEMSIZE[plan.problem_raw["data"].get("dtype", "float32")]
    rows = [plan_row(c, stage, row, stage_dir / "runs" / c.name(), plan.out, itemsize)
            for c, row in zip(candidates, result.rows)]
    for row in rows:
        plan.say(f"  {row['config']}: {describe_row(row)}")
    return rows


def describe_row(row: dict) -> str:
    if row["status"] != "completed":
        return f"{row['status']} ({row['error']})"
    if row["reached"] != "yes":
        gap = "no relative gap: no optimum" if row["final_gap"] is None else f"gap {row['final_gap']:.2e}"
        return f"not reached in {row['updates_run']} updates ({gap})"
    return (f"{row['time_to_target_s']:.4g} s to the target, {row['worker_seconds']:.4g} worker-s, "
            f"{row['updates_to_target']} updates")


def admit(plan: Plan, stage: str, candidates: list[Candidate], *, predicted: bool = True,
          again: bool = False) -> list[Candidate]:
    """The stage's candidates that are new (``again``: run before, now longer), fit the problem, are predicted within
    PRUNE_FACTOR of the stage's best (``predicted``) and fit the budget, in order; the others go into plan.pruned
    with the reason."""
    done = set() if again else {row["point"] for row in plan.rows}
    fresh, seen = [], set()
    for c in candidates:
        if c.point() in done or c.point() in seen:
            continue
        seen.add(c.point())
        why = ASYNC_LINEAR if c.mode == "async" and c.lr_scaling == "linear" else misfit(plan, c)
        if why:
            plan.pruned.append(f"{stage}: {c.label()}: {why}")
        else:
            fresh.append(c)
    if predicted and plan.prune and plan.steps_model is not None and fresh:
        fresh = _prune_predicted(plan, stage, fresh)
    kept = []
    for c in fresh:
        why = plan.budget.refuse(c.updates * c.answers_per_update())
        if why:
            plan.pruned.append(f"{stage}: {c.label()}: {why}")
        else:
            plan.budget.take(c.updates * c.answers_per_update())
            kept.append(c)
    return kept


def misfit(plan: Plan, c: Candidate) -> str | None:
    """Why candidate ``c`` cannot run on this problem (its config's one-line error), or None."""
    raw = base_raw(plan)
    for key, value in zip(KEYS, values(plan, c)):
        set_dotted(raw, key, value)
    try:
        build_config(raw)
    except ConfigError as exc:
        return f"does not fit ({exc})"
    return None


def _prune_predicted(plan: Plan, stage: str, fresh: list[Candidate]) -> list[Candidate]:
    """Drop the candidates predicted at over PRUNE_FACTOR x the best measured so far. A prediction is anchored on a
    measured config (the nearest: same workers and mode, else same mode, else the pilot) times the models' ratio,
    so that what the models get wrong about both cancels."""
    key = "time_to_target_s" if plan.objective == "time" else "worker_seconds"
    measured = [row for row in plan.rows if row.get("reached") == "yes"]
    if not measured:
        return fresh
    best = min(row[key] for row in measured)
    unit = "s" if plan.objective == "time" else "worker-s"

    def guess(c: Any) -> plan_predict.Guess:
        return plan_predict.predict(plan.profile, plan.spec, plan.problem_raw, plan.steps_model, c)

    kept = []
    for c in fresh:
        anchor = min(measured, key=lambda row: _distance(row["candidate"], c))
        ours, theirs = guess(c), guess(anchor["candidate"])
        ratio = (ours.time_s / theirs.time_s if plan.objective == "time"
                 else ours.worker_seconds / theirs.worker_seconds)
        value = anchor[key] * ratio
        if value > PRUNE_FACTOR * best:
            plan.pruned.append(f"{stage}: {c.label()}: predicted {value:.3g} {unit} to the target, over "
                               f"{PRUNE_FACTOR:g}x the best measured ({best:.3g} {unit}): {ratio:.3g}x the measured "
                               f"{anchor['config']} by the model ({ours.why})")
        else:
            kept.append(c)
    return kept


def _distance(a: Candidate, b: Candidate) -> tuple:
    """How far apart two configs are, for choosing a prediction's anchor: mode first, then workers, batch."""
    return (a.mode != b.mode, a.parameter != b.parameter, abs(math.log2(a.workers / b.workers)),
            abs(math.log2(a.batch / b.batch)), a.lr_scaling != b.lr_scaling, a.point())


def sized(plan: Plan, c: Candidate) -> Candidate:
    """The candidate with its length: SAFETY x the updates S(B) predicts, never fewer than the pilot's (the problem's
    train.steps without a model)."""
    if plan.steps_model is None:
        updates = int(plan.problem_raw["train"]["steps"])
    else:
        updates = max(MIN_UPDATES, math.ceil(SAFETY * plan_predict.updates_to_target(plan.steps_model, c,
                                                                                     sizing=True)))
    return replace(c, updates=updates)


def search(plan: Plan) -> list[dict]:
    """The staged search (see the module docstring); plan.csv is rewritten after every stage."""
    space, b0 = plan.space, plan.base_batch
    lr0 = plan.problem_raw["optim"].get("lr_scaling", "none")
    pilot = Candidate(space.workers[0], "sync", None, b0, lr0, int(plan.problem_raw["train"]["steps"]))
    _stage(plan, 0, "pilot", admit(plan, "pilot", [pilot], predicted=False))
    plan.steps_model = plan_predict.steps_model(plan.rows, b0, plan.say)
    scale = [sized(plan, Candidate(k, "sync", None, b0, lr)) for k in space.workers
             for lr in dict.fromkeys([lr0, *space.lr_scalings])]
    _stage(plan, 1, "workers", admit(plan, "workers", scale))
    best: dict[int, str] = {}  # the best worker counts, each with its best lr scaling
    for row in rank_rows(plan.rows, plan.objective):
        best.setdefault(row["workers"], row["lr_scaling"] if row.get("reached") == "yes" else lr0)

    def modes_at(k: int) -> list[Candidate]:
        return [sized(plan, Candidate(k, m, p, b0, "none" if m == "async" else best.get(k, lr0)))
                for mode, given in space.modes for m, p in mode_variants(mode, given, k)]

    top_k = list(best)[:2]
    largest = [k for k in space.workers[-1:] if k not in top_k]  # where sync may lose most to another mode
    _stage(plan, 2, "modes", admit(plan, "modes", [c for k in top_k for c in modes_at(k)], predicted=False)
           + admit(plan, "modes", [c for k in largest for c in modes_at(k)]))
    batches = space.batches or tuple(sorted({max(1, b0 // 4), b0, 4 * b0}))
    top = [row["candidate"] for row in rank_rows(plan.rows, plan.objective)[:3]]
    variants = [sized(plan, replace(c, batch=b, lr_scaling=lr)) for c in top for b in batches
                for lr in space.lr_scalings]
    _stage(plan, 3, "batch", admit(plan, "batch", variants))
    short = [row["candidate"] for row in rank_rows(plan.rows, plan.objective)
             if row["status"] == "completed" and row["reached"] != "yes"]
    longer = [replace(c, updates=c.updates * EXTEND_FACTOR) for c in short]
    _stage(plan, 4, "extend", admit(plan, "extend", longer, predicted=False, again=True), replaces=True)
    return rank_rows(plan.rows, plan.objective)


def _stage(plan: Plan, index: int, stage: str, candidates: list[Candidate], replaces: bool = False) -> None:
    plan.say(f"stage {index} {stage}: {len(candidates)} virtual run{'s' if len(candidates) != 1 else ''}")
    rows = run_stage(plan, index, stage, candidates)
    if replaces:  # a longer run of a config takes the place of its shorter one
        points = {row["point"] for row in rows}
        plan.rows = [row for row in plan.rows if row["point"] not in points]
    plan.rows += rows
    write_plan(plan.out / PLAN_FILE, rank_rows(plan.rows, plan.objective))
    write_text_atomic(plan.out / PRUNED_FILE, "".join(f"{line}\n" for line in plan.pruned))


def inputs(plan: Plan) -> dict:
    """What plan.yaml records: every input that decides the plan's runs (a resumed plan must match it)."""
    return {"problem": plan.problem_raw, "problem_file": str(plan.problem_path), "cluster": plan.spec.model_dump(
        mode="json"), "profile": to_dict(plan.profile), "target_gap": plan.target_gap,
        "objective": plan.objective, "budget": plan.budget.limits(), "prune_by_prediction": plan.prune,
        "space": {"workers": list(plan.space.workers), "modes": [list(m) for m in plan.space.modes],
                  "batches": None if plan.space.batches is None else list(plan.space.batches),
                  "lr_scalings": list(plan.space.lr_scalings)}}


def check_out(plan: Plan) -> None:
    """--out must be new, empty, or a plan of these very inputs (then it resumes)."""
    out = plan.out
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file, not a directory")
    saved = out / INPUTS_FILE
    if not saved.is_file():
        if any(out.iterdir()):
            raise UsageError(f"--out {str(out)!r} is not empty and holds no {INPUTS_FILE}: not a plan to resume; "
                             "choose another --out")
        return
    old = yaml.safe_load(saved.read_text()) or {}
    new = yaml.safe_load(yaml.safe_dump(inputs(plan)))
    differ = [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key) and key != "problem_file"]
    if differ:
        raise UsageError(f"--out {str(out)!r} holds a plan of other inputs ({', '.join(differ)} differ); resume it "
                         "with the same command, or choose another --out")


def run_plan(plan: Plan) -> list[dict]:
    """Search, writing plan.yaml, profile.json, the stages' sweeps and plan.csv under plan.out; the ranked rows."""
    check_out(plan)
    plan.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(plan.out / INPUTS_FILE, yaml.safe_dump(inputs(plan), sort_keys=False))
    write_profile(plan.profile, plan.out / PROFILE_FILE)
    return search(plan)


def report(plan: Plan, ranked: list[dict]) -> list[str]:
    """The lines to print at the end: the ranked table, what was pruned, the budget spent, the recommendation."""
    lines = [f"plan for {plan.spec.name or 'the cluster'}: {len(ranked)} configs run on virtual clusters, ranked by "
             f"{'time to the target' if plan.objective == 'time' else 'worker-seconds to the target'} "
             f"(relative gap {plan.target_gap:g})", *table_lines(ranked)]
    if plan.pruned:
        lines.append(f"pruned {len(plan.pruned)}:")
        lines += [f"  {why}" for why in plan.pruned]
    spent = sum(row.get("worker_steps") or 0 for row in ranked)
    lines.append(f"simulated work: {len(ranked)} virtual runs, {spent:,} worker steps (budget {plan.budget.runs} "
                 f"runs, {plan.budget.worker_steps:.3g} worker steps)")

    def sync_words(row: dict) -> str:
        return plan_predict.sync_step_words(plan.profile, plan.spec, plan.problem_raw, row["candidate"])

    def stragglers(workers: int) -> bool:
        return plan.spec.uneven(workers) or stragglers_among(base_raw(plan).get("stragglers") or {}, workers)

    lines.append("recommendation: " + recommendation(ranked, plan.objective, stragglers, sync_words))
    return lines


def space_from(spec: ClusterSpec, workers: list[int] | None, modes: str | None, batches: list[int] | None,
               lr_scaling: str) -> Space:
    """The search space from the command line's restrictions over the default one."""
    space = default_space(spec)
    if workers:
        over = [k for k in workers if k > spec.max_workers]
        if over:
            raise UsageError(f"--workers {over[0]} is more than the cluster's max_workers={spec.max_workers}")
        space = replace(space, workers=tuple(sorted(set(workers))))
    if modes is not None:
        space = replace(space, modes=modes_from(modes))
    scalings = tuple(s.strip() for s in lr_scaling.split(",") if s.strip())
    if not scalings or any(s not in ("none", "linear") for s in scalings):
        raise UsageError(f"--lr-scaling {lr_scaling!r}: give none, linear or none,linear")
    return replace(space, batches=tuple(sorted(set(batches))) if batches else None, lr_scalings=scalings)
