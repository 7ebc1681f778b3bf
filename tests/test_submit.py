"""sgd_dist.jobs.client without a cluster: the run directory through a job's log, the staged working_dir, and the
CLI's refusals before anything is submitted. The cluster round trips are in tests/test_deploy.py."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_config

from sgd_dist.config import dump_config
from sgd_dist.jobs.client import (
    ARCHIVE_LINE_CHARS,
    ARCHIVE_MARK,
    JOB_CONFIG,
    JOB_SCRIPT,
    SubmitError,
    archive_lines,
    extract_archive,
    stage_project,
    unpack_archive,
)

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent


def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("train:\n  steps: 5\n")
    (run / "metrics.jsonl").write_text("".join(f'{{"step": {i}}}\n' for i in range(6)))
    (run / "loss.png").write_bytes(random.Random(0).randbytes(30_000))  # incompressible: several log lines
    (run / ".summary.json.tmp").write_text("a temporary file is not part of the run")
    return run


def test_a_run_directory_survives_the_log_byte_for_byte(tmp_path):
    run = _run_dir(tmp_path)
    lines = archive_lines(run)
    assert len(lines) > 2 and all(len(line) <= len(ARCHIVE_MARK) + ARCHIVE_LINE_CHARS for line in lines[:-1])
    # the job's own output and Ray's worker lines around and between the archive's lines are ignored
    log = "\n".join(["step 5/5 | loss 1.0", *lines[:2], "(ShardWorker pid=12) a worker line", *lines[2:], "bye"])
    unpack_archive(extract_archive(log), tmp_path / "back")
    back = tmp_path / "back"
    assert sorted(p.name for p in back.iterdir()) == ["config.yaml", "loss.png", "metrics.jsonl"]
    for name in ("config.yaml", "loss.png", "metrics.jsonl"):
        assert (back / name).read_bytes() == (run / name).read_bytes()


def test_a_log_without_an_archive_gives_none_and_a_damaged_one_an_error(tmp_path):
    assert extract_archive("step 1\nstep 2\n") is None
    lines = archive_lines(_run_dir(tmp_path))
    with pytest.raises(SubmitError, match="damaged"):
        extract_archive("\n".join(lines[:1] + lines[2:]))  # a chunk lost
    flipped = lines[0][:-1] + ("A" if lines[0][-1] != "A" else "B")
    with pytest.raises(SubmitError, match="damaged"):
        extract_archive("\n".join([flipped, *lines[1:]]))
    assert hashlib.sha256(extract_archive("\n".join(lines))).hexdigest() == lines[-1].split()[-1]


def test_the_staged_working_dir_holds_the_package_and_the_resolved_config(tmp_path):
    config = make_config("train.steps=7")
    stage_project(config, tmp_path)
    assert (tmp_path / JOB_CONFIG).read_text() == dump_config(config)
    package = ROOT / "sgd_dist"
    shipped = sorted(p.relative_to(tmp_path / "sgd_dist") for p in (tmp_path / "sgd_dist").rglob("*.py"))
    assert shipped == sorted(p.relative_to(package) for p in package.rglob("*.py"))
    assert not list(tmp_path.rglob("__pycache__"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([JOB_CONFIG, JOB_SCRIPT, "sgd_dist"])


# Ray's job supervisor, as far as the entrypoint can tell: a Python process that has Ray's core library loaded,
# running the entrypoint in a shell with the head's PATH (here one without the venv, whose python has no torch).
SUPERVISOR = """
import os, subprocess, sys
import ray._raylet  # what makes the supervisor's interpreter findable: the Ray library it has mapped
code = subprocess.run(sys.argv[1], shell=True, env={"PATH": "/usr/bin:/bin", "HOME": os.environ["HOME"]}).returncode
sys.exit(code)
"""


def test_the_job_runs_with_the_interpreter_of_the_heads_ray_not_the_paths_python(tmp_path):
    stage_project(make_config(), tmp_path)
    proc = subprocess.run([sys.executable, "-c", SUPERVISOR, f"sh {JOB_SCRIPT} no-such-config.yaml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    line = next((line for line in proc.stdout.splitlines() if line.startswith("sgd-dist job: ")), None)
    assert line is not None, proc.stdout + proc.stderr
    python = line.rsplit("(python ", 1)[1].rstrip(")")
    assert Path(python).parent == BIN  # the venv's, found from the supervisor's Ray; the PATH has none with torch
    assert f"from {tmp_path / 'sgd_dist'} " in line  # the staged copy of the package, not an installed one
    assert proc.returncode == 2 and "no-such-config.yaml' does not exist" in proc.stderr  # the job side ran


def _sgd_dist(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "sgd-dist"), *args], capture_output=True, text=True, timeout=120)


def test_submit_refuses_a_bad_config_or_out_before_contacting_the_cluster(tmp_path):
    # nothing listens at this address: exit 2 (not 1) shows that no request was made
    address = "http://127.0.0.1:9"
    config = str(ROOT / "configs" / "lesson2.yaml")
    proc = _sgd_dist("submit", "--address", address, "--config", config, "train.stepz=5")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "train.stepz" in proc.stderr
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("another run")
    proc = _sgd_dist("submit", "--address", address, "--config", config, "--out", str(tmp_path / "taken"))
    assert proc.returncode == 2 and "already exists and is not empty" in proc.stderr
    proc = _sgd_dist("submit", "--config", config)
    assert proc.returncode == 2 and "--address" in proc.stderr
    proc = _sgd_dist("jobs", "--address", address, "--follow", "a", "--stop", "b")
    assert proc.returncode == 2 and "not allowed with" in proc.stderr
