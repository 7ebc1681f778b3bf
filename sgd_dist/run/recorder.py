"""The run's sink: every row the loop hands over goes to metrics.jsonl (with its optimality gap), the
schedule goes to schedule.jsonl, faults to faults.jsonl, checkpoints to checkpoints/; the console gets one
line per logged step and a progress bar."""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path

from tqdm import std as tqdm_std

from sgd_dist.config import Config
from sgd_dist.errors import DivergenceError
from sgd_dist.run.checkpoint import write_checkpoint
from sgd_dist.run.progress import RunStats
from sgd_dist.run.reference import Reference
from sgd_dist.run.rundir import FAULTS_FILE, METRICS_FILE, SCHEDULE_FILE, MetricsWriter, truncate_jsonl
from sgd_dist.run.summary import describe_fault
from sgd_dist.run.trackers.fanout import Trackers


class Recorder:
    """The run's sink: adds the optimality gap to evaluated rows, appends every row to metrics.jsonl, prints one
    console line per logged step and drives the progress bar; writes the checkpoints and logs the faults."""

    def __init__(self, run_dir: Path, config: Config, reference: Reference, console: bool, progress: bool | None,
                 bar: type = tqdm_std.tqdm, trackers: Trackers | None = None):
        self.run_dir = run_dir
        self.config = config
        self.reference = reference
        self.console = console
        self.writer = MetricsWriter(run_dir / METRICS_FILE)
        self.schedule = MetricsWriter(run_dir / SCHEDULE_FILE)  # which answers each update averaged: the replay
        self.bar = bar(total=config.train.steps, unit="step", disable=None if progress is None else not progress,
                        file=sys.stderr, dynamic_ncols=True, leave=False)
        self.times: list[float] = []
        self.traffic = {"bytes_up": 0, "bytes_down": 0}  # totals over the rows recorded
        self.last: dict | None = None
        self.last_eval: dict | None = None
        self._logged: tuple[int, float] = (0, 0.0)
        faults = run_dir / FAULTS_FILE
        self.faults: list[dict] = ([json.loads(line) for line in faults.read_text().splitlines()]
                                   if faults.exists() else [])
        self._faults_file: MetricsWriter | None = None
        self.checkpoints = 0
        self.checkpoint_seconds = 0.0
        self.trackers = trackers or Trackers()  # TensorBoard, MLflow, Ray's metrics: fed each batch as it comes
        self.stats = RunStats()  # the bar's samples/s and gap

    def checkpoint(self, state: dict) -> None:
        t0 = time.perf_counter()
        write_checkpoint(self.run_dir, state, self.config)
        self.checkpoints += 1
        self.checkpoint_seconds += time.perf_counter() - t0

    def fault(self, entry: dict) -> None:
        self.faults.append(entry)
        if self._faults_file is None:
            self._faults_file = MetricsWriter(self.run_dir / FAULTS_FILE)
        self._faults_file.write(entry)
        self.trackers.fault(entry)
        if self.console:
            self.bar.write(f"fault: {describe_fault(entry)}")

    def rewind(self, step: int) -> None:
        """Keep the rows up to ``step`` (the restored checkpoint's) in the files and in memory; the rest come again."""
        self.writer.close()
        self.schedule.close()
        kept = truncate_jsonl(self.run_dir / METRICS_FILE, "step", step)
        truncate_jsonl(self.run_dir / SCHEDULE_FILE, "update", step)
        self.writer = MetricsWriter(self.run_dir / METRICS_FILE)
        self.schedule = MetricsWriter(self.run_dir / SCHEDULE_FILE)
        self.times = [row["wall_time_s"] for row in kept]
        self.traffic = {key: sum(row.get(key, 0) for row in kept) for key in self.traffic}
        self.last = kept[-1] if kept else None
        self.last_eval = next((row for row in reversed(kept) if "eval_loss" in row), None)
        self.bar.n = max(step, 0)
        self.bar.refresh()
        self.trackers.rewind(step)
        self.stats.rewind()

    # the backends' Sink interface
    def rows(self, rows: list[dict]) -> None:
        self.record(rows)

    def record(self, rows: list[dict]) -> None:
        log_every, steps = self.config.train.log_every, self.config.train.steps
        schedule = []
        for row in rows:
            applied, answer_s = row.pop("applied", None), row.pop("answer_s", None)
            if applied is not None:
                schedule.append({"update": row["step"], "applied": applied, "answer_s": answer_s})
                self.schedule.write(schedule[-1])
            if "eval_loss" in row:
                if self.reference.objective is not None:
                    row["optimality_gap"] = row["eval_loss"] + row["eval_penalty"] - self.reference.objective
                self.last_eval = row
            self.writer.write(row)
            self.times.append(row["wall_time_s"])
            for key in self.traffic:
                self.traffic[key] += row.get(key, 0)
            self.last = row
            if row["loss"] is not None and not math.isfinite(row["loss"]):
                raise DivergenceError(
                    f"the mini-batch loss is {row['loss']} at step {row['step']}: the run diverged; "
                    f"try a smaller optim.lr (step {row['step']} used lr {row['lr']:.4g})"
                )
            step = row["step"]
            if self.console and log_every and (step % log_every == 0 or step == steps):
                self.bar.write(self._line(row))
        if rows:
            self.bar.set_postfix_str(self.stats(rows, self.last_eval), refresh=False)
            self.bar.update(rows[-1]["step"] - self.bar.n)
        self.trackers.rows(rows, schedule)

    def _line(self, row: dict) -> str:
        step, t = row["step"], row["wall_time_s"]
        prev_step, prev_t = self._logged
        self._logged = (step, t)
        width = len(str(self.config.train.steps))
        parts = [f"step {step:>{width}}/{self.config.train.steps}"]
        if step:
            parts.append(f"loss {row['loss']:.6g}")
        if "eval_loss" in row:
            parts.append(f"eval {row['eval_loss']:.6g}")
        if "optimality_gap" in row:
            parts.append(f"gap {row['optimality_gap']:.3e}")
        if step:
            parts += [f"lr {row['lr']:.4g}", f"{1e3 * (t - prev_t) / (step - prev_step):.3f} ms/step"]
        return " | ".join(parts)

    def median_step_ms(self) -> float | None:
        gaps = [b - a for a, b in zip(self.times, self.times[1:])]
        return 1e3 * statistics.median(gaps) if gaps else None

    def close(self) -> None:
        self.bar.close()
        self.writer.close()
        self.schedule.close()
        if self._faults_file is not None:
            self._faults_file.close()
