"""The run directory: config.yaml, metrics.jsonl (one row per recorded step, flushed as written),
summary.json (written atomically), and the readers that plots and tests use."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from sgd_dist.config import Config, ConfigError, dump_config

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
SCHEDULE_FILE = "schedule.jsonl"
FAULTS_FILE = "faults.jsonl"  # each fault as it happens (a resumed run keeps the earlier ones)


def default_run_dir(name: str, root: str | Path = "runs") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(root) / f"{name}-{stamp}"
    suffix = 2
    while path.exists():
        path = Path(root) / f"{name}-{stamp}-{suffix}"
        suffix += 1
    check_run_dir(path)
    return path


def check_run_dir(path: Path) -> None:
    """A run directory must be new or empty, and creatable: a run never writes over another's records, and
    a directory it cannot write fails before the cluster is started. Creatable is tried, not guessed from
    permissions (root may write anywhere but in /proc): a directory is made beside it and removed."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output directory {str(path)!r} is a file, not a directory; choose another --out")
    if path.exists() and any(path.iterdir()):
        raise ConfigError(f"output directory {str(path)!r} already exists and is not empty; choose another --out")
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"output directory {str(path)!r} cannot be created: {str(existing)!r} is a file")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".sgd-dist-probe-", dir=existing))
    except OSError as exc:
        raise ConfigError(f"output directory {str(path)!r} cannot be created in {str(existing)!r}: "
                          f"{exc.strerror}") from None


def write_config(run_dir: Path, config: Config) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / CONFIG_FILE, dump_config(config))


def write_bytes_atomic(path: Path, data: bytes, *, sync_dir: bool = False) -> None:
    """Write to a temporary file, fsync, then rename: readers see the old file or the whole new one. ``sync_dir``
    also fsyncs the directory, so that the rename itself survives a crash (checkpoints)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if sync_dir:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(_jsonable(obj), indent=2) + "\n")


class MetricsWriter:
    """Appends one JSON row per line and flushes each, so a killed run keeps every row it wrote."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "a")

    def write(self, row: dict) -> None:
        self._file.write(json.dumps(_jsonable(row)) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    rows = []
    with open(Path(run_dir) / METRICS_FILE) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def last_recorded_step(path: Path) -> int:
    """The step of the last whole row in a metrics file (0 if none): what is on disk, whatever was interrupted."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            lines = f.read().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue  # a half-written last line
    return 0


def truncate_jsonl(path: Path, key: str, last: int) -> list[dict]:
    """Rewrite a JSON-lines file atomically keeping the rows whose ``key`` is at most ``last`` (and dropping a
    half-written last line); return the kept rows. The rows taken out are appended to ``<name>.rewound.jsonl``
    beside it first: a rewound run loses nothing it once recorded."""
    kept, lines, rewound = [], [], []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row[key] <= last:
                kept.append(row)
                lines.append(line)
            else:
                rewound.append(line)
    if rewound:
        with open(path.with_name(f"{path.stem}.rewound.jsonl"), "a") as f:
            f.write("".join(f"{line}\n" for line in rewound))
            f.flush()
            os.fsync(f.fileno())
    write_text_atomic(path, "".join(f"{line}\n" for line in lines))
    return kept


def read_summary(run_dir: str | Path) -> dict:
    with open(Path(run_dir) / SUMMARY_FILE) as f:
        return json.load(f)


def _jsonable(obj: Any) -> Any:
    """Plain JSON: non-finite floats become null (JSON has no NaN), tuples become lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
