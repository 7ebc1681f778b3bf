"""Run a training as a Ray job on a cluster, through its job API, and bring the run directory back.

``submit(address, config)`` is what ``sgd-dist submit`` runs, as a function a notebook can call;
``list_jobs``, ``follow`` and ``stop`` are ``sgd-dist jobs``. The project travels with the job
(``runtime_env.working_dir`` holds a copy of the ``sgd_dist`` package and the resolved config), so the
cluster's nodes need Ray and torch but no install of ``sgd_dist``.

The job side, ``python -m sgd_dist.jobs.entry CONFIG`` (started with the head's own interpreter by a small
entrypoint script), trains into a temporary run directory on the cluster and prints it, as a marked base64
tar.gz, at the end of its log; ``archive_lines`` and ``extract_archive`` are the two ends of that.

Token authentication (Ray 2.60 turns it on for clusters made with ``ray start``): the client sends the
token when ``RAY_AUTH_MODE=token`` is exported, reading it from ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``
or ``~/.ray/auth_token``, as every Ray client does.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import shutil
import tarfile
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import sgd_dist
from sgd_dist.config import Config, dump_config
from sgd_dist.errors import SubmitError
from sgd_dist.run.rundir import SUMMARY_FILE, check_run_dir, default_run_dir

# The run directory comes back through the job's log. The client cannot read the cluster's disk, and Ray's
# job API has no way to fetch a job's files; its log is the one channel that the job API already
# authenticates (the same port, the same token), that needs no shared file system, object store access or
# extra port, and that Ray keeps after the job has ended (so `sgd-dist jobs --follow` of a finished job, or
# a client that lost its connection, can still fetch the results). A run directory is small: config,
# metrics rows, summary and two PNGs, compressed; a checksum catches a damaged copy.
ARCHIVE_MARK = "SGD_DIST_RUN_ARCHIVE "
ARCHIVE_END = "SGD_DIST_RUN_ARCHIVE_END "
ARCHIVE_LINE_CHARS = 8192
JOB_CONFIG = "sgd_dist_job.yaml"
JOB_SCRIPT = "sgd_dist_job.sh"
# The job's entrypoint. Ray runs it in a shell with the head's PATH, and on a head started as
# `.venv/bin/ray start --head` a bare `python` is another interpreter (one without torch, or none). The job
# supervisor that started the shell runs in the head's own Python: the script finds that interpreter from the
# Ray library the supervisor has loaded (its site-packages' prefix, else the process's binary) and runs the job
# side with it; without /proc it falls back to the python on the PATH.
JOB_SCRIPT_TEXT = r"""#!/bin/sh
pid=$$
for _ in 1 2 3 4 5; do
    pid=$(sed -n 's/^[0-9]* (.*) [A-Za-z] \([0-9]*\) .*/\1/p' "/proc/$pid/stat" 2>/dev/null)
    [ -n "$pid" ] && [ "$pid" -gt 1 ] || break
    lib=$(grep -o -m 1 '/.*/site-packages/ray/_raylet\.so' "/proc/$pid/maps" 2>/dev/null)
    [ -n "$lib" ] || continue
    prefix=${lib%/lib/python*/site-packages/ray/_raylet.so}
    for py in "$prefix/bin/python3" "$prefix/bin/python" "$(readlink "/proc/$pid/exe")"; do
        if [ -x "$py" ] && "$py" -c "import importlib.util as u, sys; sys.exit(u.find_spec('ray') is None)"; then
            exec "$py" -m sgd_dist.jobs.entry "$@"
        fi
    done
    break
done
if command -v python > /dev/null; then exec python -m sgd_dist.jobs.entry "$@"; fi
exec python3 -m sgd_dist.jobs.entry "$@"
"""
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AUTH_HINT = ("; export RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or "
             "~/.ray/auth_token)")


@dataclass(frozen=True)
class SubmitResult:
    job_id: str
    status: str
    run_dir: Path | None
    summary: dict | None


# --- the client ------------------------------------------------------------------------------------------

def job_api_url(address: str) -> str:
    """The job API's URL: http://HOST:PORT (the dashboard's port, 8265 by default); a bare HOST:PORT gets http."""
    return address if "://" in address else f"http://{address}"


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    with _cluster_errors(address):
        return JobSubmissionClient(job_api_url(address))


@contextmanager
def _cluster_errors(address: str) -> Iterator[None]:
    """Turn Ray's connection, authentication and request errors into one-line SubmitErrors."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except SubmitError:
        raise
    except AuthenticationError as exc:
        raise SubmitError(f"the cluster at {address} refused the request: {_first_line(exc)}{AUTH_HINT}") from None
    except ConnectionError as exc:
        raise SubmitError(f"cannot reach a Ray job API at {address}: {_first_line(exc)}") from None
    except Exception as exc:  # Ray's request errors (an unknown job id, ...) are RuntimeErrors with the reply
        raise SubmitError(f"{type(exc).__name__}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def stage_project(config: Config, into: Path) -> Path:
    """A working_dir for the job: a copy of the sgd_dist package, the resolved config and the entrypoint script."""
    package = Path(sgd_dist.__file__).resolve().parent
    shutil.copytree(package, into / "sgd_dist", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (into / JOB_CONFIG).write_text(dump_config(config))
    (into / JOB_SCRIPT).write_text(JOB_SCRIPT_TEXT)
    return into


def submit(
    address: str,
    config: Config,
    *,
    out: str | Path | None = None,
    config_name: str = "run",
    echo: Callable[[str], None] = print,
) -> SubmitResult:
    """Submit one training to the cluster's job API, stream its log through ``echo``, wait for it, and
    unpack its run directory into ``out`` (default ``runs/<config_name>-<timestamp>``).

    Raises SubmitError (one line) if the cluster cannot be reached or refuses the token, or if the job did
    not succeed (its run directory, if it made one, still comes back first).
    """
    if out is not None:
        run_dir = Path(out)
        check_run_dir(run_dir)  # before anything runs: never write over another run's records
    else:
        run_dir = default_run_dir(config.output.name or config_name)
    client = _client(address)
    with tempfile.TemporaryDirectory(prefix="sgd-dist-submit-") as tmp:
        stage_project(config, Path(tmp))
        with _cluster_errors(address):
            job_id = _submit_job(client, entrypoint=f"sh {JOB_SCRIPT} {JOB_CONFIG}", runtime_env={"working_dir": tmp},
                                 metadata={"sgd_dist": sgd_dist.__version__, "config": config_name})
    echo(f"sgd-dist: submitted job {job_id} to {address}")
    status = follow(address, job_id, echo=echo, client=client)
    with _cluster_errors(address):
        logs = client.get_job_logs(job_id)
        archive = extract_archive(logs)
        if archive is not None:
            unpack_archive(archive, run_dir)
        summary_path = run_dir / SUMMARY_FILE
        summary = _read_json(summary_path) if archive is not None and summary_path.is_file() else None
        if status != "SUCCEEDED":
            where = f"; its run directory is in {run_dir}" if archive is not None else ""
            raise SubmitError(f"job {job_id} {status.lower()}: {_job_error(client, job_id, logs)}{where}")
    if archive is None:
        raise SubmitError(f"job {job_id} succeeded but its log holds no run directory")
    return SubmitResult(job_id, status, run_dir, summary)


AGENT_WAIT_S = 30.0  # a head that just came up answers "no available agent" until its job agent has started


def _submit_job(client, **job) -> str:
    """client.submit_job, asked again for up to AGENT_WAIT_S while the head's job agent is still starting."""
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def list_jobs(address: str) -> list:
    """The cluster's jobs (Ray's JobDetails), oldest first."""
    client = _client(address)
    with _cluster_errors(address):
        jobs = client.list_jobs()
    return sorted(jobs, key=lambda job: job.start_time or 0)


def follow(address: str, job_id: str, *, echo: Callable[[str], None] = print, client=None) -> str:
    """Stream a job's log through ``echo`` (without the run-directory archive) until it ends; its status."""
    client = client or _client(address)
    with _cluster_errors(address):
        client.get_job_status(job_id)  # an unknown id fails here, in one line, not inside the stream
        asyncio.run(_tail(client, job_id, echo))
        status = client.get_job_status(job_id).value  # JobStatus, a str enum: "SUCCEEDED", ...
        while status not in TERMINAL:
            time.sleep(0.2)  # the log stream can close a moment before the status turns final
            status = client.get_job_status(job_id).value
    return status


def stop(address: str, job_id: str) -> bool:
    """Ask the cluster to stop a job; False if it had already ended."""
    client = _client(address)
    with _cluster_errors(address):
        return bool(client.stop_job(job_id))


async def _tail(client, job_id: str, echo: Callable[[str], None]) -> None:
    pending = ""
    async for chunk in client.tail_job_logs(job_id):
        pending += chunk
        *lines, pending = pending.split("\n")
        for line in _shown(lines):
            echo(line)
    for line in _shown([pending] if pending else []):
        echo(line)


def _shown(lines: Sequence[str]) -> Iterator[str]:
    return (line for line in lines if not line.startswith((ARCHIVE_MARK, ARCHIVE_END)))


def _job_error(client, job_id: str, logs: str) -> str:
    """The job's one-line reason: sgd-dist's own error line if the log has one, else Ray's message."""
    mine = [line for line in logs.splitlines() if line.startswith("sgd-dist: error: ")]
    if mine:
        return mine[-1].removeprefix("sgd-dist: error: ")
    info = client.get_job_info(job_id)
    return ((info.message or "no message").strip().splitlines() or ["no message"])[-1]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# --- the archive -----------------------------------------------------------------------------------------

def archive_lines(run_dir: Path) -> list[str]:
    """The run directory as log lines: base64 chunks of a tar.gz, then its size and sha256."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(run_dir.iterdir()):
            if path.is_file() and not path.name.startswith("."):
                tar.add(path, arcname=path.name)
    data = buffer.getvalue()
    text = base64.b64encode(data).decode("ascii")
    chunks = [text[i:i + ARCHIVE_LINE_CHARS] for i in range(0, len(text), ARCHIVE_LINE_CHARS)]
    return [ARCHIVE_MARK + chunk for chunk in chunks] + [f"{ARCHIVE_END}{len(data)} {hashlib.sha256(data).hexdigest()}"]


def extract_archive(logs: str) -> bytes | None:
    """The archive from a job's log, checked against its size and sha256; None if the log has none."""
    chunks, end = [], None
    for line in logs.splitlines():
        if line.startswith(ARCHIVE_MARK):
            chunks.append(line[len(ARCHIVE_MARK):].strip())
        elif line.startswith(ARCHIVE_END):
            end = line[len(ARCHIVE_END):].split()
    if end is None:
        return None
    try:
        data = base64.b64decode("".join(chunks), validate=True)
    except ValueError:
        data = b""
    if len(end) != 2 or str(len(data)) != end[0] or hashlib.sha256(data).hexdigest() != end[1]:
        raise SubmitError("the run directory in the job's log is damaged (size or sha256 differ)")
    return data


def unpack_archive(data: bytes, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(run_dir, filter="data")  # "data": plain files inside run_dir only
