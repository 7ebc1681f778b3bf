"""A plan's results: plan.csv (one row per config, every number from its virtual run), the ranking, the Pareto
front of time against cost, the budget of simulated work, the recommendation in words, and the rank
correlation that compares a plan's ranking with real runs'.

Per config, to the target gap: the virtual seconds (the run's clock at its first evaluation below the target),
the updates and samples, the bytes moved (each applied or dropped answer and its command carry d weights, each
evaluation d weights out and one float64 back), and the worker-seconds (workers x seconds: the cost); and the
final gap, the failures the run went through and the worker steps it computed.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sgd_dist.run.rundir import METRICS_FILE, read_metrics, read_summary, write_text_atomic
from sgd_dist.study.results import csv_cell

PLAN_FILE = "plan.csv"
COLUMNS = ["rank", "config", "stage", "workers", "mode", "mode_parameter", "worker_batch", "global_batch",
           "lr_scaling", "updates_run", "status", "reached", "time_to_target_s", "updates_to_target",
           "samples_to_target", "bytes_to_target", "worker_seconds", "final_gap", "noise_scale", "noise_scale_at",
           "failures", "worker_steps", "run", "error"]
INTS = {"rank", "workers", "mode_parameter", "worker_batch", "global_batch", "updates_run", "updates_to_target",
        "samples_to_target", "bytes_to_target", "failures", "worker_steps"}
FLOATS = {"time_to_target_s", "worker_seconds", "final_gap", "noise_scale"}


@dataclass
class Budget:
    """The simulated work a plan may spend: virtual runs and worker steps (gradients and local steps computed)."""

    runs: int
    worker_steps: float
    used_runs: int = 0
    used_steps: float = 0.0
    refused: list[str] = field(default_factory=list)

    def refuse(self, steps: float) -> str | None:
        """Why a run of ``steps`` worker steps does not fit what is left, or None."""
        if self.used_runs + 1 > self.runs:
            return f"over the budget of {self.runs} runs"
        if self.used_steps + steps > self.worker_steps:
            return (f"over the budget of {self.worker_steps:.3g} worker steps ({steps:.3g} more, "
                    f"{self.used_steps:.3g} used)")
        return None

    def take(self, steps: float) -> None:
        self.used_runs += 1
        self.used_steps += steps

    def limits(self) -> dict:
        return {"runs": self.runs, "worker_steps": self.worker_steps}


def parse_budget(text: str | None, runs: int = 60, worker_steps: float = 2e6) -> Budget:
    """'runs=40,worker_steps=5e5' (either or both) -> a Budget; ValueError naming what is wrong."""
    limits = {"runs": float(runs), "worker_steps": float(worker_steps)}
    for part in (p.strip() for p in (text or "").split(",") if p.strip()):
        key, _, value = part.partition("=")
        if key not in limits:
            raise ValueError(f"--budget: unknown {key!r}; give runs=N and/or worker_steps=N (e.g. runs=40)")
        try:
            number = float(value.replace("_", ""))
        except ValueError:
            raise ValueError(f"--budget: {part!r} needs a number") from None
        if not (number >= 1 and math.isfinite(number)):
            raise ValueError(f"--budget: {part!r} must be at least 1")
        limits[key] = number
    return Budget(int(limits["runs"]), limits["worker_steps"])


def plan_row(candidate: Any, stage: str, sweep_row: dict, run_dir: Path, out: Path, itemsize: int) -> dict:
    """One plan.csv row from a candidate, its sweep row (results.csv's) and its run directory's files
    (``itemsize``: the bytes of one weight)."""
    k = candidate.workers
    row: dict[str, Any] = {
        "config": candidate.label(), "stage": stage, "workers": k, "mode": candidate.mode,
        "mode_parameter": candidate.parameter, "worker_batch": candidate.batch, "global_batch": k * candidate.batch,
        "lr_scaling": candidate.lr_scaling, "updates_run": candidate.updates, "status": sweep_row["status"],
        "reached": "no", "run": str(run_dir.relative_to(out)), "error": sweep_row.get("error"),
        "final_gap": sweep_row.get("final_relative_gap"), "noise_scale": sweep_row.get("gradient_noise_scale"),
        "candidate": candidate, "point": candidate.point(),
    }
    if sweep_row["status"] != "completed":
        return row
    summary = read_summary(run_dir)
    row.update(noise_scale_where(row["noise_scale"], summary.get("gradient_noise_scale")))
    row["failures"] = sum(1 for f in summary.get("faults", []) if f.get("fault") in ("worker_lost", "server_lost"))
    local = candidate.parameter if candidate.mode == "local_sgd" else 1
    row["worker_steps"] = local * sum(w["answers"] for w in summary.get("per_worker", {}).values())
    if sweep_row.get("target_step") is None:
        return row
    step = sweep_row["target_step"]
    row.update(reached="yes", time_to_target_s=sweep_row["target_time_s"], updates_to_target=step,
               samples_to_target=sweep_row["target_samples"], worker_seconds=k * sweep_row["target_time_s"],
               bytes_to_target=bytes_to(run_dir, summary, step, k, itemsize))
    return row


def noise_scale_where(at_target: float | None, report: dict | None) -> dict:
    """The run's noise scale for S(B) and where it was measured: at the target gap, or, where there is no w* to find
    the target's point on the segment to (f* = 0 without w*), at the initial weights."""
    if at_target is not None:
        return {"noise_scale": at_target, "noise_scale_at": "target gap"}
    initial = (report or {}).get("initial", {}).get("b_simple")
    if report is not None and not report.get("at_gap") and initial is not None and math.isfinite(initial):
        return {"noise_scale": initial, "noise_scale_at": "initial weights (no w*)"}
    return {"noise_scale": None, "noise_scale_at": None}


def bytes_to(run_dir: Path, summary: dict, step: int, workers: int, itemsize: int) -> int:
    """Bytes the server's messages carried up to update ``step``: each applied or dropped answer and its command
    (d weights each way), each evaluation's commands (d weights) and answers (one float64 each)."""
    nbytes = len(summary["weights"]) * itemsize
    rows = [r for r in read_metrics(run_dir) if r["step"] <= step] if (run_dir / METRICS_FILE).is_file() else []
    answers = sum(len(r.get("applied") or []) for r in rows)
    dropped = sum(1 for d in summary.get("dropped", []) if d[3] <= step)
    evaluations = sum(1 for r in rows if r.get("eval_loss") is not None)
    return 2 * nbytes * (answers + dropped) + evaluations * workers * (nbytes + 8)


def sort_key(row: dict, objective: str) -> tuple:
    """Reached configs first, by the objective then the other; then the rest by their final gap."""
    if row.get("reached") == "yes":
        first, second = (("time_to_target_s", "worker_seconds") if objective == "time"
                         else ("worker_seconds", "time_to_target_s"))
        return (0, row[first], row[second], row["config"])
    gap = row.get("final_gap")
    return (1 if row.get("status") == "completed" else 2, gap if gap is not None else math.inf, 0.0, row["config"])


def rank_rows(rows: list[dict], objective: str) -> list[dict]:
    """The rows in rank order, each with its rank (1 is the recommendation)."""
    ranked = sorted(rows, key=lambda row: sort_key(row, objective))
    for i, row in enumerate(ranked, 1):
        row["rank"] = i
    return ranked


def write_plan(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: csv_cell(row.get(key)) for key in COLUMNS})
    write_text_atomic(path, buffer.getvalue())


def read_plan(path: str | Path) -> list[dict]:
    """plan.csv's rows, numbers as numbers and empty cells as None."""
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            rows.append({key: None if text == "" else int(text) if key in INTS else float(text) if key in FLOATS
                         else text for key, text in raw.items()})
    return rows


def pareto_front(rows: list[dict]) -> list[dict]:
    """The reached configs no other beats on both time to the target and worker-seconds, fastest first."""
    reached = sorted((r for r in rows if r.get("reached") == "yes"),
                     key=lambda r: (r["time_to_target_s"], r["worker_seconds"]))
    front, cheapest = [], math.inf
    for row in reached:
        if row["worker_seconds"] < cheapest:
            front.append(row)
            cheapest = row["worker_seconds"]
    return front


def table_lines(rows: list[dict], top: int = 12) -> list[str]:
    """The ranked table for the console (the first ``top`` rows)."""
    lines = [f"{'rank':>4}  {'config':<44} {'time s':>9} {'worker-s':>10} {'updates':>8} {'samples':>10} "
             f"{'MB moved':>9} {'final gap':>9}"]
    for row in rows[:top]:
        def number(key: str, fmt: str, scale: float = 1.0, cells: dict = row) -> str:
            value = cells.get(key)
            return format(value * scale, fmt) if value is not None else "-"

        time = number("time_to_target_s", "9.4g") if row.get("reached") == "yes" else "no"
        lines.append(f"{row['rank']:>4}  {row['config']:<44} {time:>9} {number('worker_seconds', '10.4g'):>10} "
                     f"{number('updates_to_target', '.0f'):>8} {number('samples_to_target', '.0f'):>10} "
                     f"{number('bytes_to_target', '9.3g', 1e-6):>9} {number('final_gap', '9.2e'):>9}")
    if len(rows) > top:
        lines.append(f"      ... {len(rows) - top} more in {PLAN_FILE}")
    return lines


def recommendation(rows: list[dict], objective: str, stragglers: Callable[[int], bool],
                   sync_words: Callable[[dict], str]) -> str:
    """The plan's advice in one sentence, from the numbers: the best config, how much it beats sync at its worker
    count (or, when it is sync, the best other mode) by, and why (``stragglers(k)``: whether k workers have a slow
    or late one; ``sync_words(row)``: what bounds a sync step at that row's workers, from the time model)."""
    reached = [r for r in rows if r.get("reached") == "yes"]
    if not reached:
        closest = min(rows, key=lambda r: sort_key(r, objective), default=None)
        near = f"; the closest was {closest['config']} (gap {closest['final_gap']:.2e})" if closest and closest.get(
            "final_gap") is not None else ""
        return f"No config reached the target within its updates{near}: raise --budget or relax --target-gap."
    key, word = ("time_to_target_s", "sooner") if objective == "time" else ("worker_seconds", "cheaper")
    best = min(reached, key=lambda r: sort_key(r, objective))
    head = (f"{best['config']}: {best['time_to_target_s']:.3g} s to the target, "
            f"{best['worker_seconds']:.3g} worker-seconds")
    k = best["workers"]
    if best["mode"] != "sync":
        sync = [r for r in rows if r["mode"] == "sync" and r["workers"] == k]
        done = [r for r in sync if r.get("reached") == "yes"]
        if done:
            ref = min(done, key=lambda r: r[key])
            pct = 100 * (1 - best[key] / ref[key])
            why = _because(best, ref, stragglers(k), sync_words)
            return f"{head}, {pct:.0f} % {word} than sync at {_workers(k)}, {why}."
        if sync:
            return f"{head}; sync at {_workers(k)} did not reach the target in {sync[0]['updates_run']} updates."
        return f"{head}."
    others = [r for r in reached if r["mode"] != "sync"]
    if not others:
        tried = any(r["mode"] != "sync" for r in rows)
        return f"{head}; {'no other mode reached the target' if tried else 'only sync was tried'}."
    other = min(others, key=lambda r: r[key])
    pct = 100 * (1 - best[key] / other[key])
    return (f"{head}, {pct:.0f} % {word} than the best other mode ({other['config']}): "
            f"{_sync_wins(best, rows, objective, sync_words)}.")


def _workers(k: int) -> str:
    return f"{k} worker{'s' if k != 1 else ''}"


def _because(row: dict, sync: dict, stragglers: bool, sync_words: Callable[[dict], str]) -> str:
    k, p = row["workers"], row["mode_parameter"]
    if row["mode"] == "backup":
        if stragglers:
            return f"which waits on the slowest of {k} workers each step (backup drops the {p} slowest)"
        return f"whose step waits for all {k} answers where backup takes the first {k - p}"
    if row["mode"] == "async":
        if stragglers:
            return f"which waits on the slowest of {k} workers each step (async waits on none)"
        return (f"which took {sync['updates_to_target']} updates of {k} answers each against async's "
                f"{row['updates_to_target']} of one, and async makes about {k} updates in the time of one sync step")
    if row["mode"] == "ssp":
        return f"where ssp lets a worker run {p} steps ahead of the slowest instead of waiting"
    return (f"which exchanges weights with the server every step where local SGD does every {p} steps; "
            f"{sync_words(row)}")


def _sync_wins(row: dict, rows: list[dict], objective: str, sync_words: Callable[[dict], str]) -> str:
    """Why sync at these workers won: on cost, what more workers would have cost (the next sync count that reached
    the target); on time, what bounds its step."""
    more = sorted((r for r in rows if r["mode"] == "sync" and r["workers"] > row["workers"]
                   and r.get("reached") == "yes" and r.get("worker_batch") == row.get("worker_batch")),
                  key=lambda r: r["workers"])
    more = [r for r in more if r.get("lr_scaling") == row.get("lr_scaling")]
    if objective == "cost" and more:
        nxt = more[0]
        return (f"{_workers(nxt['workers'])} took {nxt['updates_to_target']} updates against "
                f"{row['updates_to_target']}, too few fewer to pay for {nxt['workers'] / row['workers']:g}x the "
                f"workers ({nxt['worker_seconds'] / row['worker_seconds']:.2g}x the worker-seconds)")
    if more:
        nxt = more[0]
        return (f"{sync_words(row)}; with {nxt['workers']} workers it took {nxt['time_to_target_s']:.3g} s "
                f"({nxt['updates_to_target']} updates)")
    return sync_words(row)


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation of two equally long lists (ties take their mean rank); nan with fewer than two
    items or a list that is all one value."""
    if len(a) != len(b):
        raise ValueError(f"spearman needs two lists of one length (got {len(a)} and {len(b)})")
    ra, rb = _ranks(a), _ranks(b)
    n = len(a)
    if n < 2:
        return math.nan
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else math.nan


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for m in range(i, j + 1):
            ranks[order[m]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


@dataclass(frozen=True)
class Comparison:
    """A plan's ranking against real runs of the same configs."""

    configs: list[str]
    virtual_s: list[float | None]  # None: not reached
    real_s: list[float | None]
    rho: float
    top: str  # the planner's top choice
    real_best: str
    top_over_best: float  # the real time of the planner's top choice / the real best's
    rho_target: float = 0.8
    within: float = 0.2

    @property
    def passed(self) -> bool:
        return self.rho >= self.rho_target and self.top_over_best <= 1 + self.within and len(self.configs) >= 6

    def lines(self) -> list[str]:
        out = [f"{'config':<44} {'virtual s':>10} {'real s':>10}"]
        def cell(t: float | None) -> str:
            return f"{t:>10.4g}" if t is not None else f"{'no':>10}"

        out += [f"{c:<44} {cell(v)} {cell(r)}" for c, v, r in zip(self.configs, self.virtual_s, self.real_s)]
        out.append(f"Spearman rank correlation of time to target: {self.rho:.3f} over {len(self.configs)} configs "
                   f"(target >= {self.rho_target})")
        out.append(f"planner's top choice {self.top}: {self.top_over_best:.3f} x the real best ({self.real_best}; "
                   f"target <= {1 + self.within:.2f})")
        out.append("PASS" if self.passed else "MISS")
        return out


def compare(virtual: dict[str, float | None], real: dict[str, float | None]) -> Comparison:
    """Compare times to the target by config: a config that did not reach it (None) ranks after every one that
    did. The planner's top choice is its fastest config."""
    configs = sorted(set(virtual) & set(real))
    if not configs:
        raise ValueError("no config is in both the plan and the real runs")
    slowest = 1 + max((t for t in [*virtual.values(), *real.values()] if t is not None), default=1.0)
    v = [virtual[c] if virtual[c] is not None else 10 * slowest for c in configs]
    r = [real[c] if real[c] is not None else 10 * slowest for c in configs]
    top = configs[v.index(min(v))]
    best = configs[r.index(min(r))]
    ratio = real[top] / real[best] if real[top] is not None and real[best] is not None else math.inf
    return Comparison(configs, [virtual[c] for c in configs], [real[c] for c in configs], spearman(v, r), top, best,
                      ratio)
