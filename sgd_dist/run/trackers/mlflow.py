"""MLflow: the flattened config as params, every step's scalars in batches, the summary's figures, the run
directory as artifacts and the run's status; a resumed run goes on in the same MLflow run, whose id the run
directory keeps in mlflow.json.

Every MLflow call runs on a thread of the tracker's own (MLflow's client retries a lost server for minutes):
the driver only queues rows. A tracking server that cannot be reached is one warning line; the run goes on and
its directory keeps every record, for export_run to send later.

MLflow cannot take a metric value back, so each step goes to it once: rows computed again after a restored
checkpoint are sent only past the last step it has (kept in mlflow.json, for a resumed run too). In sync mode
the steps computed again are bit-equal to the first ones; in the others they may differ from what MLflow kept,
and metrics.jsonl (and an export of it) has the later ones.
"""

from __future__ import annotations

import importlib.util
import json
import queue
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import yaml

import sgd_dist
from sgd_dist.config import Config, dump_config
from sgd_dist.run.rundir import METRICS_FILE, write_json_atomic
from sgd_dist.run.trackers.base import (
    MissingExtra,
    Scalars,
    Tracker,
    final_step,
    flatten,
    guarded,
    row_at,
    run_origin,
    summary_figures,
)

MLFLOW_FILE = "mlflow.json"  # the MLflow run this run directory is recorded in: a resumed run goes on in it
RUN_STATUS = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
WAIT_NOTE_S = 5.0  # finish says it is still sending after this long
SAVE_EVERY_S = 1.0  # how often mlflow.json notes the last step sent: a crash sends at most that much again


class MlflowTracker(Tracker):
    """Records the run in ``experiment`` (created if missing) at ``tracking_uri`` (None: MLflow's default, from
    MLFLOW_TRACKING_URI), under ``run_name`` (None: the run directory's name).

    ``probe_timeout_s``: how long an http(s) tracking server has to answer before the first call (MLflow's own
    client would retry an absent server for minutes); ``stall_timeout_s``: how long ``finish`` waits while
    nothing more reaches MLflow before it gives up on the rest (which stays in the run directory); it waits as
    long as the records keep going.
    """

    name = "MLflow"

    def __init__(self, tracking_uri: str | None = None, experiment: str = "sgd_dist", run_name: str | None = None,
                 *, probe_timeout_s: float = 5.0, stall_timeout_s: float = 60.0) -> None:
        # mlflow takes a second or more to import: only look for it here, import it on the tracker's thread
        if importlib.util.find_spec("mlflow") is None:
            raise MissingExtra("output.mlflow", "mlflow", "mlflow")
        self.tracking_uri = tracking_uri
        self.where = tracking_uri or "MLflow's default tracking URI"
        self.experiment = experiment
        self.run_name = run_name
        self.probe_timeout_s = probe_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self._ml: _Mlflow | None = None  # MLflow's side, built on the tracker's thread
        self.run_id: str | None = None
        self._saved: dict = {}
        self._saved_at = 0.0
        self._last_step: int | None = None  # the last step MLflow has (on the tracker's thread)
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._scalars = Scalars()

    @guarded
    def start(self, config: Config, run_dir: Path, resumed: bool) -> None:
        self.run_dir = run_dir
        self._origin = run_origin(run_dir)
        self._thread = threading.Thread(target=self._work, args=(config, run_dir, resumed), daemon=True,
                                        name="sgd-dist-mlflow")
        self._thread.start()

    @guarded
    def rows(self, rows: list[dict]) -> None:
        if rows:
            self._queue.put(("rows", self._scalars(rows)))

    def fault(self, entry: dict) -> None:
        """Nothing now: MLflow has no events; faults.jsonl goes among the artifacts, their count among the figures."""

    @guarded
    def rewind(self, step: int) -> None:
        self._scalars.rewind(row_at(self.run_dir / METRICS_FILE, step))

    def finish(self, summary: dict | None, status: str) -> None:
        if self._thread is None:
            return
        self._queue.put(("finish", summary, status))
        start = time.monotonic()
        progress, since, noted = self._progress(), start, False
        while True:
            self._thread.join(1.0)
            if not self._thread.is_alive():
                break
            now = time.monotonic()
            if not noted and now - start >= WAIT_NOTE_S:
                print(f"sgd-dist: sending the queued records to MLflow at {self.where}", file=sys.stderr, flush=True)
                noted = True
            if self._progress() != progress:
                progress, since = self._progress(), now
            elif now - since >= self.stall_timeout_s:
                self.give_up(TimeoutError(f"nothing more reached it in {self.stall_timeout_s:g} s"))
                break
        self._thread = None

    def _progress(self) -> int:
        return 0 if self._ml is None else self._ml.calls

    # on the tracker's thread

    def _work(self, config: Config, run_dir: Path, resumed: bool) -> None:
        try:
            ml = self._ml = _Mlflow(self.tracking_uri)
            self.where = ml.uri
            _probe(ml.uri, self.probe_timeout_s)
            self._open(ml, config, run_dir, resumed)
            while True:
                items = [self._queue.get()]
                while items[-1][0] != "finish":
                    try:
                        items.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                self._send([value for item in items if item[0] == "rows" for value in item[1]], ml, run_dir)
                if items[-1][0] == "finish":
                    self._close(ml, run_dir, *items[-1][1:])
                    return
        except Exception as exc:
            self.give_up(exc)

    def _open(self, ml: _Mlflow, config: Config, run_dir: Path, resumed: bool) -> None:
        """The MLflow run: the one in mlflow.json when resuming (set running again), else a new one with the
        config as params."""
        saved = _saved_run(run_dir) if resumed else None
        if saved is not None and saved.get("tracking_uri") == ml.uri:
            try:
                ml.client.update_run(saved["run_id"], status="RUNNING")
                self.run_id, self._saved, self._last_step = saved["run_id"], saved, saved.get("last_step")
                return
            except ml.MlflowException as exc:  # gone from the server: record the rest in a new run
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
        experiment_id = ml.experiment_id(self.experiment)
        tags = {"sgd_dist.run_dir": str(run_dir.resolve()), "sgd_dist.version": sgd_dist.__version__}
        run = ml.client.create_run(experiment_id, start_time=_ms(self._origin), tags=tags,
                                   run_name=self.run_name or run_dir.name)
        self.run_id = run.info.run_id
        self._saved = {"tracking_uri": ml.uri, "experiment": self.experiment, "experiment_id": experiment_id,
                       "run_id": self.run_id, "last_step": None}
        self._save(run_dir)
        ml.log_params(self.run_id, flatten(yaml.safe_load(dump_config(config))))  # config.yaml's keys, dotted

    def _send(self, scalars: list[tuple[int, float, dict[str, float]]], ml: _Mlflow, run_dir: Path) -> None:
        """The steps past the last one MLflow has; mlflow.json notes the last one sent every SAVE_EVERY_S."""
        last, metrics = self._last_step, []
        for step, wall, values in scalars:
            if last is None or step > last:
                metrics += [(key, value, self._origin + wall, step) for key, value in values.items()]
                last = step
        ml.log_metrics(self.run_id, metrics)
        if last != self._last_step:
            self._last_step = last
            if time.monotonic() - self._saved_at >= SAVE_EVERY_S:
                self._save(run_dir)

    def _save(self, run_dir: Path) -> None:
        self._saved["last_step"] = self._last_step
        write_json_atomic(run_dir / MLFLOW_FILE, self._saved)
        self._saved_at = time.monotonic()

    def _close(self, ml: _Mlflow, run_dir: Path, summary: dict | None, status: str) -> None:
        """The summary's figures at the last step and its error (if any) as a tag, the run directory as
        artifacts, then the status."""
        now = time.time()
        if summary is not None:
            step = final_step(summary, self._last_step)
            ml.log_metrics(self.run_id, [(key, value, now, step) for key, value in summary_figures(summary).items()])
            if summary.get("error"):
                ml.set_tag(self.run_id, "sgd_dist.error", str(summary["error"]))
        self._save(run_dir)
        ml.client.log_artifacts(self.run_id, str(run_dir))
        ml.client.set_terminated(self.run_id, status=RUN_STATUS[status], end_time=_ms(now))


class _Mlflow:
    """MLflow's client with its types and batch limits, built on the tracker's thread."""

    def __init__(self, tracking_uri: str | None) -> None:
        import mlflow  # imported here: an optional extra, slow to import (on this thread, not the driver's)
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.exceptions import MlflowException
        from mlflow.utils import validation

        self.uri = tracking_uri or mlflow.get_tracking_uri()
        self.client = mlflow.MlflowClient(tracking_uri=self.uri)
        self.Metric, self.Param, self.RunTag, self.MlflowException = Metric, Param, RunTag, MlflowException
        self.limits = validation
        self.calls = 0  # metric batches that reached MLflow: finish waits as long as this grows

    def experiment_id(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except self.MlflowException:  # another run created it meanwhile
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def log_metrics(self, run_id: str, metrics: list[tuple[str, float, float, int]]) -> None:
        """(key, value, unix time, step) in batches within MLflow's limit."""
        most = self.limits.MAX_METRICS_PER_BATCH
        for i in range(0, len(metrics), most):
            batch = [self.Metric(key, value, _ms(t), step) for key, value, t, step in metrics[i:i + most]]
            self.client.log_batch(run_id, metrics=batch, synchronous=True)
            self.calls += 1

    def log_params(self, run_id: str, params: dict) -> None:
        """As text cut to MLflow's length limit (the whole config is config.yaml, an artifact), in batches."""
        limit, most = self.limits.MAX_PARAM_VAL_LENGTH, self.limits.MAX_PARAMS_TAGS_PER_BATCH
        texts = [(key, value if isinstance(value, str) else json.dumps(value)) for key, value in params.items()]
        batch = [self.Param(key, text if len(text) <= limit else text[:limit - 3] + "...") for key, text in texts]
        for i in range(0, len(batch), most):
            self.client.log_batch(run_id, params=batch[i:i + most], synchronous=True)

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.client.log_batch(run_id, tags=[self.RunTag(key, value[:self.limits.MAX_TAG_VAL_LENGTH])], synchronous=True)


def _probe(uri: str, timeout_s: float) -> None:
    """Raise the connection's error if an http(s) tracking server does not answer within ``timeout_s``; any
    answer, an HTTP error included, means it is there."""
    if urlsplit(uri).scheme not in ("http", "https"):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return
    except urllib.error.URLError as exc:
        raise exc.reason if isinstance(exc.reason, BaseException) else exc from None


def _saved_run(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / MLFLOW_FILE).read_text())
    except (OSError, ValueError):
        return None


def _ms(unix_s: float) -> int:
    return int(round(unix_s * 1000))
