"""The tracker interface: what the run's Recorder hands to TensorBoard, MLflow and the like, from the driver, in
batches, off the step path; and export_run, which sends a run directory through a tracker from its files alone.

The run directory stays the record: a tracker that fails says so in one line and is dropped, the run goes on, and
export_run can send the whole run again later.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from sgd_dist.config import Config, ConfigError, load_config
from sgd_dist.errors import one_line
from sgd_dist.run.rundir import CONFIG_FILE, FAULTS_FILE, SUMMARY_FILE, read_metrics, read_summary

STATUSES = ("completed", "failed", "interrupted")

# metrics.jsonl's keys and their name in every tracker: "train/" and "eval/" group the charts
SCALARS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "weight_norm": "train/weight_norm",
    "staleness": "train/staleness",
    "eval_loss": "eval/loss",
    "optimality_gap": "eval/optimality_gap",
    "bytes_up": "comm/bytes_up",  # the step's answers as sent (compressed, if they are)
    "bytes_down": "comm/bytes_down",  # the weights (or their delta) sent to the workers that step
}
SAMPLES_PER_S = "train/samples_per_s"  # derived: samples_seen and wall_time_s against the previous step's row


class MissingExtra(ConfigError):
    """A setting needs an optional package that is not installed; the message names the extra to install."""

    def __init__(self, setting: str, package: str, extra: str) -> None:
        super().__init__(f"{setting} needs the {package} package: pip install 'sgd_dist[{extra}]'")


class Tracker(ABC):
    """A sink beside the run directory. The Recorder calls, from the driver:

    ``start`` once (after config.yaml is written), ``rewind`` when rows are dropped to be computed again (a
    restored checkpoint; on ``--resume`` right after ``start``), ``rows`` with each batch of metrics rows as they
    arrive (the Recorder's own, optimality_gap included), ``fault`` with each fault record, and ``finish`` once,
    after summary.json and the figures are written (its artifacts are the directory as it is then). All but
    ``finish`` return quickly: a tracker that needs the network works on a thread of its own, and ``finish``
    waits for it. A tracker that fails warns once on stderr, sets ``error`` and ignores the calls after; it never
    raises into the run.
    """

    name = "tracker"
    where = ""  # where the records go (a directory, a URI), for the warning
    run_dir: Path | None = None
    error: str | None = None  # why the tracker gave up (one line); None while every record reached it

    @abstractmethod
    def start(self, config: Config, run_dir: Path, resumed: bool) -> None:
        """Begin (``resumed``: go on with the run recorded in ``run_dir`` before)."""

    @abstractmethod
    def rows(self, rows: list[dict]) -> None:
        """Metrics rows in step order, as metrics.jsonl holds them; the tracker does not keep or change them."""

    @abstractmethod
    def fault(self, entry: dict) -> None:
        """A fault record, as faults.jsonl holds it (``fault``, ``step`` and the kind's own fields)."""

    def schedule(self, lines: list[dict]) -> None:
        """schedule.jsonl's lines for the same rows (each update's applied [worker, step, version] answers and
        their times, ``answer_s``); the per-worker views use them, the others need not."""
        return None  # optional, unlike the rest: a tracker of the rows alone leaves it

    @abstractmethod
    def rewind(self, step: int) -> None:
        """The rows after ``step`` are dropped and will come again; metrics.jsonl keeps the row at ``step``."""

    @abstractmethod
    def finish(self, summary: dict | None, status: str) -> None:
        """End with the run's summary (None when the run failed before it had one) and its status, one of
        STATUSES; returns once everything is sent (or the tracker gave up)."""

    def give_up(self, exc: BaseException) -> None:
        """Warn once, in one line naming where the records went and the cause; ignore the calls from now on."""
        with _warned:
            if self.error is not None:
                return
            self.error = one_line(exc)
        kept = f"; {self.run_dir} keeps every record, to send later" if self.run_dir else ""
        print(f"sgd-dist: warning: {self.name} at {self.where} failed: {self.error}{kept}", file=sys.stderr,
              flush=True)


_warned = threading.Lock()  # a tracker's thread and the driver may give up at once: one warning


def guarded(method):
    """A tracker method whose failure gives the tracker up (one warning) instead of reaching the run, and that
    does nothing once the tracker has given up."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if self.error is not None:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            self.give_up(exc)
            return None

    return call


class Scalars:
    """Metrics rows as (step, wall_time_s, {name: value}) with SCALARS' names, leaving out the values a row does
    not have (null in metrics.jsonl), plus samples/s from the previous step's row when the stream has it."""

    def __init__(self) -> None:
        self._previous: tuple[int, float, int] | None = None

    def __call__(self, rows: list[dict]) -> list[tuple[int, float, dict[str, float]]]:
        out = []
        for row in rows:
            values = {name: float(row[key]) for key, name in SCALARS.items() if _finite(row.get(key))}
            step, wall, samples = row["step"], row["wall_time_s"], row["samples_seen"]
            previous = self._previous
            if previous is not None and step == previous[0] + 1 and wall > previous[1]:
                values[SAMPLES_PER_S] = (samples - previous[2]) / (wall - previous[1])
            self._previous = (step, wall, samples)
            out.append((step, wall, values))
        return out

    def rewind(self, row: dict | None) -> None:
        """Go on after ``row`` (the last row kept; None: none is)."""
        self._previous = None if row is None else (row["step"], row["wall_time_s"], row["samples_seen"])


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings (and lists of mappings) as dotted keys: {"optim": {"lr": 0.1}} -> {"optim.lr": 0.1},
    {"faults": [{"kind": ...}]} -> {"faults.0.kind": ...}; other values, lists of numbers included, as they are."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)) and tree and all(isinstance(v, dict) for v in tree):
        items = enumerate(tree)
    else:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def summary_figures(summary: dict) -> dict[str, float]:
    """The summary's numbers as ``summary/<dotted key>`` (per-worker figures included), plus the number of
    faults and of stragglers; lists (weights, records) are left out."""
    figures = {f"summary/{key}": float(v) for key, v in flatten(summary).items() if _finite(v)}
    for key in ("faults", "stragglers"):
        if isinstance(summary.get(key), list):
            figures[f"summary/{key}"] = float(len(summary[key]))
    return figures


def final_step(summary: dict | None, last_row_step: int | None) -> int:
    """The step a run's closing records go at: the last one recorded (a failed run's summary also names the
    steps it was to make)."""
    for key in ("steps_recorded", "steps"):
        if summary is not None and isinstance(summary.get(key), int):
            return summary[key]
    return last_row_step or 0


def run_origin(run_dir: Path) -> float:
    """The Unix time the run's wall_time_s counts from, near enough: when config.yaml was written. Trackers
    stamp each row with it plus the row's wall_time_s, so a live run and its export carry the same times."""
    try:
        return (run_dir / CONFIG_FILE).stat().st_mtime
    except OSError:
        return time.time()


def read_jsonl(path: Path) -> list[dict]:
    """The whole rows of a JSON-lines file (none if it does not exist; a half-written last line left out)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def row_at(path: Path, step: int) -> dict | None:
    """The last row at ``step`` of a metrics file, read backwards from its end (where a rewind's step is)."""
    try:
        f = open(path, "rb")
    except OSError:
        return None
    with f:
        end, head = f.seek(0, 2), b""
        while end > 0:
            start = max(0, end - (1 << 16))
            f.seek(start)
            lines = (f.read(end - start) + head).split(b"\n")
            head, lines = (lines[0], lines[1:]) if start > 0 else (b"", lines)  # a line cut by the chunk: later
            for line in reversed(lines):
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if row["step"] == step:
                    return row
                if row["step"] < step:
                    return None
            end = start
    return None


def export_run(run_dir: str | Path, tracker: Tracker, *, batch: int = 1000) -> str | None:
    """Send a run directory to ``tracker`` from its files alone, in the order a run sends them: config.yaml,
    metrics.jsonl in batches, faults.jsonl, then summary.json and its status (a directory without one: the
    driver was killed, status 'failed'). The tracker starts afresh (a new MLflow run; a TensorBoard directory's
    earlier events are superseded). Returns the tracker's error, None when everything reached it."""
    run_dir = Path(run_dir)
    config = load_config(run_dir / CONFIG_FILE)
    rows = read_metrics(run_dir)
    summary = read_summary(run_dir) if (run_dir / SUMMARY_FILE).exists() else None
    status = summary.get("status", "failed") if summary is not None else "failed"
    tracker.start(config, run_dir, resumed=False)
    for i in range(0, len(rows), batch):
        tracker.rows(rows[i:i + batch])
    for entry in read_jsonl(run_dir / FAULTS_FILE):
        tracker.fault(entry)
    tracker.finish(summary, status)
    return tracker.error
