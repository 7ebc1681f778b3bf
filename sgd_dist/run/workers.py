"""Per-worker views of a run: each worker's answers, median and p90 answer time, share of its answers dropped
and replacements, from the loop's statistics; the table the end of a run prints; and the worst worker's ratio,
the straggler factor a sweep's results carry for every run.

Pure functions of the loop's numbers: no Ray, no files.
"""

from __future__ import annotations

import math
import statistics

from sgd_dist.engine.delays import find_stragglers


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` by linear interpolation between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    at = q * (len(ordered) - 1)
    low = math.floor(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def worker_table(num_workers: int, answer_s: dict, dropped: list, replacements: dict) -> dict[int, dict]:
    """Each worker's gradient answers (dropped ones included), their median and p90 time in ms, the share of
    them dropped, and how many times the worker was replaced. ``answer_s``: each worker's answer times in
    seconds (keys int or text, as a checkpoint or JSON gives them); ``dropped``: the loop's [worker, ...] list."""
    table = {}
    for r in range(num_workers):
        times = [1e3 * t for t in answer_s.get(r, answer_s.get(str(r), []))]
        n = len(times)
        table[r] = {
            "answers": n,
            "median_ms": statistics.median(times) if n else None,
            "p90_ms": quantile(times, 0.9) if n else None,
            "dropped_share": sum(1 for d in dropped if d[0] == r) / n if n else None,
            "replacements": int(replacements.get(r, replacements.get(str(r), 0))),
        }
    return table


def worst_worker_ratio(table: dict) -> float | None:
    """The slowest worker's median answer time over the median of the other workers' medians (the straggler
    factor; None with fewer than two workers that answered)."""
    medians = {int(r): w["median_ms"] for r, w in table.items() if w["median_ms"] is not None}
    ratios = [s["ratio"] for s in find_stragglers(medians, ratio=0.0)]
    return max(ratios, default=None)


def table_lines(table: dict, stragglers: list[dict]) -> list[str]:
    """The per-worker table for the console, a straggler named with its factor on its own row."""
    factor = {int(s["worker"]): s["ratio"] for s in stragglers}
    lines = ["worker  answers  median ms   p90 ms  dropped  replaced"]
    for r, w in sorted(table.items(), key=lambda item: int(item[0])):
        def ms(value):
            return f"{value:9.3f}" if value is not None else f"{'-':>9}"

        share = f"{100 * w['dropped_share']:6.1f}%" if w["dropped_share"] is not None else f"{'-':>7}"
        line = f"{int(r):>6}  {w['answers']:>7}  {ms(w['median_ms'])}{ms(w['p90_ms'])}  {share}  {w['replacements']:>8}"
        if int(r) in factor:
            line += f"  <- straggler, {factor[int(r)]:.1f}x the others' median"
        lines.append(line)
    return lines
