"""TensorBoard: every step's scalars, the resolved config and the faults as text, the staleness of the applied
gradients and the workers' answer times as histograms, in one directory of event files per run, so that
`tensorboard --logdir runs/` overlays every run.

Written with PyTorch's SummaryWriter (the `tensorboard` extra), from the driver: one event per step carrying all
its scalars. Rows dropped to be computed again (a restored checkpoint, a resumed run) are superseded, so that
TensorBoard shows each step once with metrics.jsonl's values: its Python loader drops what it read from a
restart marker's step on (a SessionLog START at the first step that comes again), its fast loader drops a tag's
later steps when an earlier one comes. The faults dropped with them are written again, in step order, once the
rows are back at their step. (An interrupted run's status text stays beside the resumed run's in the fast loader.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sgd_dist.config import Config, dump_config
from sgd_dist.run.rundir import FAULTS_FILE, METRICS_FILE
from sgd_dist.run.trackers.base import (
    MissingExtra,
    Scalars,
    Tracker,
    final_step,
    guarded,
    read_jsonl,
    row_at,
    run_origin,
)

TENSORBOARD_DIR = "tensorboard"  # under the run directory, unless the user names a directory of their own


class TensorBoardTracker(Tracker):
    """Event files in ``log_dir / <run directory's name>``, or in ``<run directory>/tensorboard`` when
    ``log_dir`` is None; either way a directory per run under a common root."""

    name = "TensorBoard"

    def __init__(self, log_dir: str | Path | None = None, *, flush_secs: float = 5.0) -> None:
        try:
            # imported here: an optional extra (and a second or so to import)
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog
            from tensorboard.compat.proto.summary_pb2 import Summary
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise MissingExtra("output.tensorboard", "tensorboard", "tensorboard") from exc
        self._classes = SummaryWriter, Summary, Event, SessionLog
        self.root = None if log_dir is None else Path(log_dir)
        self.flush_secs = flush_secs
        self.log_dir: Path | None = None
        self._writer = None
        self._scalars = Scalars()
        self._faults: list[dict] = []
        self._pending: list[dict] = []  # faults a rewind dropped, to write again (in step order)
        self._last_step: int | None = None

    @guarded
    def start(self, config: Config, run_dir: Path, resumed: bool) -> None:
        self.run_dir = run_dir
        self.log_dir = run_dir / TENSORBOARD_DIR if self.root is None else self.root / run_dir.name
        self.where = str(self.log_dir)
        self._origin = run_origin(run_dir)
        self._config_text = dump_config(config)
        self._faults = read_jsonl(run_dir / FAULTS_FILE) if resumed else []
        # a fresh start supersedes whatever an earlier writer left in this directory (an export written again);
        # a resumed run goes on from its events, and its rewind() says from which step
        self._writer = self._classes[0](str(self.log_dir), purge_step=None if resumed else 0, max_queue=1000,
                                        flush_secs=self.flush_secs)
        if not resumed:
            self._write_config()

    @guarded
    def rows(self, rows: list[dict]) -> None:
        summary_class = self._classes[1]
        for step, wall, values in self._scalars(rows):
            summary = summary_class(value=[summary_class.Value(tag=tag, simple_value=v) for tag, v in values.items()])
            self._writer.file_writer.add_summary(summary, step, self._origin + wall)
        if rows:
            self._last_step = rows[-1]["step"]
            self._write_pending(self._last_step)

    @guarded
    def fault(self, entry: dict) -> None:
        self._faults.append(entry)
        self._write_pending(entry["step"])
        self._write_fault(entry)

    @guarded
    def rewind(self, step: int) -> None:
        event_class, session_log = self._classes[2], self._classes[3]
        # readers drop every event at this step or later read so far, faults included
        restart = event_class(step=step + 1, session_log=session_log(status=session_log.START))
        self._writer.file_writer.add_event(restart)
        self._scalars.rewind(row_at(self.run_dir / METRICS_FILE, step))
        self._last_step = step
        if step + 1 <= 0:
            self._write_config()
        # the faults dropped are written again once the rows come back to their step: each tag's steps in order,
        # as TensorBoard's fast loader (which drops a tag's later steps when an earlier one comes) needs them
        self._pending = sorted((f for f in self._faults if f["step"] > step), key=lambda f: f["step"])

    def finish(self, summary: dict | None, status: str) -> None:
        self._close_records(summary, status)
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception as exc:
                self.give_up(exc)
            self._writer = None

    @guarded
    def _close_records(self, summary: dict | None, status: str) -> None:
        self._write_pending(None)
        step = final_step(summary, self._last_step)
        if summary is not None:
            self._write_workers(summary, step)
        error = f": {summary['error']}" if summary is not None and summary.get("error") else ""
        self._writer.add_text("status", f"{status}{error}", step)

    def _write_config(self) -> None:
        self._writer.add_text("config", _code(self._config_text), 0, walltime=self._origin)

    def _write_pending(self, step: int | None) -> None:
        """The faults dropped by a rewind, up to ``step`` (None: all)."""
        while self._pending and (step is None or self._pending[0]["step"] <= step):
            self._write_fault(self._pending.pop(0))

    def _write_fault(self, entry: dict) -> None:
        text = f"**{entry['fault']}** at step {entry['step']}\n\n" + _code(json.dumps(entry, indent=2))
        when = entry.get("at_unix") or entry.get("noticed_unix")
        self._writer.add_text("faults", text, entry["step"], walltime=when)

    def _write_workers(self, summary: dict, step: int) -> None:
        """Histograms of every applied gradient's staleness and of the workers' median answer times (with each
        worker's as a scalar), from the summary: the loop counts them over the whole run."""
        counts = {int(age): int(n) for age, n in (summary.get("staleness") or {}).get("counts", {}).items()}
        if counts:
            ages = range(max(counts) + 1)  # a bucket per age, (age - 0.5, age + 0.5]
            n = [counts.get(age, 0) for age in ages]
            self._writer.add_histogram_raw(
                "histograms/staleness", min=min(counts), max=max(counts), num=sum(n),
                sum=float(sum(age * counts[age] for age in counts)),
                sum_squares=float(sum(age * age * counts[age] for age in counts)),
                bucket_limits=[age + 0.5 for age in ages], bucket_counts=n, global_step=step)
        answer_ms = {int(r): float(ms) for r, ms in (summary.get("answer_ms") or {}).items()}
        if answer_ms:
            self._writer.add_histogram("histograms/answer_ms", np.array(list(answer_ms.values())), step)
            for r, ms in sorted(answer_ms.items()):
                self._writer.add_scalar(f"workers/answer_ms/worker_{r}", ms, step)


def _code(text: str) -> str:
    """Text that TensorBoard's markdown shows as it is (an indented code block)."""
    return "\n".join(f"    {line}" for line in text.splitlines())
