"""The sgd-dist command end to end, as a user runs it: exit codes, one-line errors, nothing half-written."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import assert_png, shm_entries_of

from sgd_dist.transports.shm import PREFIX, SHM_DIR

SGD_DIST = str(Path(sys.executable).with_name("sgd-dist"))  # the installed console script
ROOT = Path(__file__).resolve().parent.parent
TINY = {
    "data": {"n_samples": 400, "n_features": 1, "seed": 3, "true_weights": [3.0, 2.0]},
    "model": {"init": [-1.0, 1.0]},
    "cluster": {"num_workers": 2},
    "train": {"steps": 40, "batch_size": 20, "eval_every": 10, "log_every": 10},
}


def sgd_dist(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the command as a user's shell would: without the loopback switch this test session's Ray set."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    return subprocess.run([SGD_DIST, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)


@pytest.fixture
def tiny(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.mark.slow
def test_train_on_an_embedded_ray_end_to_end(tiny, tmp_path):
    out = tmp_path / "run"
    proc = sgd_dist("train", "--config", str(tiny), "--out", str(out), "train.steps=30")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split("|")[0].strip() for line in lines if line.startswith("step")] == [
        "step  0/30", "step 10/30", "step 20/30", "step 30/30"]  # one console line per logged step
    assert any(line.startswith("done: 30 steps") for line in lines) and f"results in {out}/" in proc.stdout
    assert {p.name for p in out.iterdir()} == {"config.yaml", "metrics.jsonl", "schedule.jsonl", "summary.json",
                                               "loss.png", "fit.png"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "ray" and summary["steps"] == 30
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["steps"] == 30


@pytest.mark.slow
def test_train_joins_an_existing_cluster_with_address(ray_session, tiny, tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    out = tmp_path / "joined"
    proc = sgd_dist("train", "--config", str(tiny), "--out", str(out), "--address", address, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["cluster"]["address"] == address
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ray_address"] == address and summary["final_loss"] > 0


@pytest.mark.slow
def test_ray_address_in_the_environment_is_joined_as_inside_a_ray_job(ray_session, tiny, tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    out = tmp_path / "job"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    proc = subprocess.run([SGD_DIST, "train", "--config", str(tiny), "--out", str(out), "train.steps=5"],
                          capture_output=True, text=True, timeout=120, env={**env, "RAY_ADDRESS": address})
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "summary.json").read_text())["ray_address"] == address


def test_serial_backend_flag(tiny, tmp_path):
    proc = sgd_dist("train", "--config", str(tiny), "--out", str(tmp_path / "s"), "--backend", "serial")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["backend"] == "serial"


@pytest.mark.parametrize(
    "args, message",
    [
        (["train.stesp=5"], "sgd-dist: error: train.stesp: unknown key"),
        (["optim.lr=-1"], "sgd-dist: error: optim.lr: Input should be greater than 0 (got -1)"),
        (["train.batch_size=500"], "sgd-dist: error: train.batch_size=500 is larger than the smallest shard"),
        (["--backend", "spark"], "sgd-dist train: error: argument --backend: invalid choice: 'spark'"),
        (["--frobnicate"], "sgd-dist: error: unrecognized arguments: --frobnicate"),
    ],
)
def test_invalid_config_or_usage_exits_2_with_one_line_and_writes_nothing(tiny, tmp_path, args, message):
    proc = sgd_dist("train", "--config", str(tiny), "--out", str(tmp_path / "never"), *args, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "never").exists() and not (tmp_path / "runs").exists()


def test_missing_config_file_exits_2(tmp_path):
    proc = sgd_dist("train", "--config", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr and proc.stderr.count("\n") == 1


def test_non_empty_output_directory_exits_2(tiny, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    proc = sgd_dist("train", "--config", str(tiny), "--out", str(tmp_path / "busy"), "--backend", "serial")
    assert proc.returncode == 2 and "already exists and is not empty" in proc.stderr


def test_unwritable_output_directory_exits_2_before_anything_starts(tiny, tmp_path):
    (tmp_path / "file").write_text("")
    proc = sgd_dist("train", "--config", str(tiny), "--out", str(tmp_path / "file" / "run"))
    assert proc.returncode == 2 and "cannot be created" in proc.stderr and proc.stderr.count("\n") == 1


def test_unreachable_cluster_exits_1_fast_and_writes_nothing(tiny, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    proc = sgd_dist("train", "--config", str(tiny), "--out", str(tmp_path / "never"), "--address",
                    f"127.0.0.1:{port}", timeout=60)
    # fast: the command's own start-up (~3 s here) and one refused connection, not Ray's minutes of retries
    assert time.monotonic() - start < 15
    assert proc.returncode == 1
    # a cluster error is the whole story: no "(--traceback shows where)"
    assert proc.stderr.strip() == (f"sgd-dist: error: run failed: ClusterError: cannot reach a Ray cluster at "
                                   f"'127.0.0.1:{port}': Connection refused")
    assert not (tmp_path / "never").exists()


def test_cluster_too_small_exits_1(ray_session, tiny, tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    proc = sgd_dist("train", "--config", str(tiny), "--out", str(tmp_path / "never"), "--address", address,
                    "cluster.cpus_per_worker=50")
    assert proc.returncode == 1 and "needs 100 CPUs" in proc.stderr and proc.stderr.count("\n") == 1
    assert proc.stderr.endswith("or cluster.num_workers)\n")  # no "(--traceback shows where)"
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_plot_redraws_from_the_files(tiny, tmp_path):
    run = tmp_path / "r"
    assert sgd_dist("train", "--config", str(tiny), "--out", str(run), "--backend", "serial").returncode == 0
    (run / "loss.png").unlink()
    proc = sgd_dist("plot", str(run))
    assert proc.returncode == 0 and proc.stdout.split() == [str(run / "loss.png"), str(run / "fit.png")]
    assert_png(run / "loss.png")
    assert_png(run / "fit.png")
    bad = sgd_dist("plot", str(tmp_path))
    assert bad.returncode == 2 and "is not a run directory" in bad.stderr


def test_config_prints_the_resolved_yaml(tiny):
    proc = sgd_dist("config", "--config", str(tiny), "train.steps=7")
    assert proc.returncode == 0
    resolved = yaml.safe_load(proc.stdout)
    assert resolved["train"]["steps"] == 7 and resolved["optim"]["lr"] == 0.1  # defaults filled in
    assert "train.batch_size" in sgd_dist("config", "--describe").stdout


def test_overrides_are_accepted_on_both_sides_of_options(tiny, tmp_path):
    proc = sgd_dist("config", "--config", str(tiny), "train.steps=7", "--describe")  # a flag between: --describe
    assert proc.returncode == 0 and "train.batch_size" in proc.stdout
    proc = sgd_dist("train", "--config", str(tiny), "train.steps=7", "--out", str(tmp_path / "r"), "optim.lr=0.05",
                    "--backend", "serial", "output.plots=false")
    assert proc.returncode == 0, proc.stderr
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert (saved["train"]["steps"], saved["optim"]["lr"], saved["cluster"]["backend"]) == (7, 0.05, "serial")
    assert saved["output"]["plots"] is False


def test_output_piped_into_a_reader_that_stops_early_ends_quietly(tiny, tmp_path):
    # `sgd-dist train ... | head -n 1`: the reader goes away; the command stops without a traceback
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    proc = subprocess.Popen([SGD_DIST, "train", "--config", str(tiny), "--out", str(tmp_path / "r"), "--backend",
                             "serial", "train.steps=20000", "train.log_every=1", "data.n_samples=4000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = proc.stdout.readline()
    proc.stdout.close()
    _, stderr = proc.communicate(timeout=120)
    assert first.startswith(b"sgd-dist: serial backend")
    assert proc.returncode == 141, stderr  # 128 + SIGPIPE, what a shell reports for a command the pipe stopped
    assert stderr == b""
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "failed" and "BrokenPipeError" in summary["error"]
    assert summary["steps_recorded"] < 20000  # it stopped: where depends on stdout's buffering, not on the run


def _user_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}


def _wait_for_rows(run: Path, count: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if len((run / "metrics.jsonl").read_text().splitlines()) >= count:
                return
        except FileNotFoundError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"the run wrote fewer than {count} rows (exit {proc.poll()})")


def _assert_rows_up_to_the_summary(run: Path, status: str = "failed") -> dict:
    summary = json.loads((run / "summary.json").read_text())
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert summary["status"] == status and steps == list(range(summary["steps_recorded"] + 1))
    return summary


DIVERGES = ["--backend", "serial", "optim.lr=50", "train.steps=200", "--no-progress"]
DIVERGED = (r"run failed: DivergenceError: the mini-batch loss is (inf|nan) at step (\d+): the run diverged; "
            r"try a smaller optim\.lr \(step \d+ used lr 50\)")


@pytest.mark.slow
def test_a_run_failing_part_way_exits_1_in_one_line_keeping_its_rows(tiny, tmp_path):
    run = tmp_path / "diverged"
    proc = sgd_dist("train", "--config", str(tiny), "--out", str(run), *DIVERGES)
    assert proc.returncode == 1
    match = re.fullmatch(rf"sgd-dist: error: {DIVERGED} \(--traceback shows where\)\n", proc.stderr)
    assert match, proc.stderr
    summary = _assert_rows_up_to_the_summary(run)
    assert 0 < summary["steps_recorded"] == int(match.group(2)) < 200
    assert "DivergenceError" in summary["error"]
    plot = sgd_dist("plot", str(run))  # a failed run redraws
    assert plot.returncode == 0 and plot.stdout.split() == [str(run / "loss.png")]
    assert_png(run / "loss.png")


def test_traceback_prints_where_a_run_failed(tiny, tmp_path):
    proc = sgd_dist("train", "--config", str(tiny), "--out", str(tmp_path / "d"), "--traceback", *DIVERGES)
    assert proc.returncode == 1
    assert proc.stderr.startswith("Traceback (most recent call last):\n")
    assert re.search(r'File ".*sgd_dist/run/recorder\.py", line \d+, in record\n', proc.stderr), proc.stderr
    last = proc.stderr.splitlines()[-1]
    assert re.fullmatch(rf"sgd-dist: error: {DIVERGED}", last), last  # no "--traceback shows where" now


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_exits_130_keeping_the_rows(tiny, tmp_path):
    # Ctrl-C as a terminal sends it: to the process's own group, with SIGINT's default disposition (a test run
    # started in the background, as CI may be, ignores SIGINT, and children inherit that: see NOTES.md)
    run = tmp_path / "interrupted"
    proc = subprocess.Popen([SGD_DIST, "train", "--config", str(tiny), "--out", str(run), "--backend", "serial",
                             "train.steps=1e7", "train.log_every=0", "train.eval_every=0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_user_env(),
                            start_new_session=True, preexec_fn=_default_sigint)
    try:
        _wait_for_rows(run, 20, proc)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    _assert_interrupted_line(stderr, run)
    summary = _assert_rows_up_to_the_summary(run, "interrupted")
    assert summary["error"] == "KeyboardInterrupt" and summary["steps_recorded"] >= 19


@pytest.mark.parametrize("transport", ["shm", "ray"])
@pytest.mark.slow
def test_ctrl_c_on_ray_exits_130_and_leaves_no_shared_memory(tiny, tmp_path, transport):
    """An interrupted run on an embedded Ray: its rows kept, its shm segment and its channels' semaphores gone."""
    run = tmp_path / "interrupted"
    proc = subprocess.Popen([SGD_DIST, "train", "--config", str(tiny), "--out", str(run),
                             f"cluster.transport={transport}", "train.steps=1e7", "train.log_every=0",
                             "train.eval_every=0", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_user_env(),
                            start_new_session=True, preexec_fn=_default_sigint)
    try:
        _wait_for_rows(run, 200, proc, timeout=120)
        made = shm_entries_of(proc.pid)  # by name, while the run's processes (whose pids name them) are alive
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    summary = _assert_rows_up_to_the_summary(run, "interrupted")
    assert summary["error"] == "KeyboardInterrupt" and summary["steps_recorded"] >= 199
    if transport == "shm":
        assert len(made) == 1 and next(iter(made)).startswith(PREFIX), made
    else:
        assert made and all(name.startswith("sem.") for name in made), made
    assert not {name for name in made if (SHM_DIR / name).exists()}


@pytest.mark.slow
def test_plot_redraws_a_killed_run(tiny, tmp_path):
    run = tmp_path / "killed"
    proc = subprocess.Popen([SGD_DIST, "train", "--config", str(tiny), "--out", str(run), "--backend", "serial",
                             "train.steps=1e7", "train.log_every=0", "train.eval_every=1000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_user_env())
    try:
        _wait_for_rows(run, 2000, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL and not (run / "summary.json").exists()
    plot = sgd_dist("plot", str(run))
    assert plot.returncode == 0, plot.stderr
    assert plot.stdout.split() == [str(run / "loss.png")]  # no summary, so no fitted weights to draw
    assert_png(run / "loss.png")


def test_version_names_the_package():
    import sgd_dist as package

    proc = sgd_dist("--version")
    assert proc.returncode == 0 and proc.stdout == f"sgd-dist {package.__version__}\n"


def _one_line_exit_2(proc: subprocess.CompletedProcess, message: str) -> None:
    """Exit 2, one line on stderr matching ``message``, and nothing else: no Ray started (its token warning would
    be a line of its own), no ANSI codes, no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and re.fullmatch(rf"sgd-dist: error: {message}\n", proc.stderr), proc.stderr
    assert "\x1b" not in proc.stderr


def test_a_config_that_is_not_utf8_exits_2_in_one_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("# r\u00e9glages\n".encode("latin-1") + yaml.safe_dump(TINY).encode())
    proc = sgd_dist("train", "--config", str(path), "--out", str(tmp_path / "never"))
    _one_line_exit_2(proc, r"config file '.*latin1\.yaml' is not UTF-8 text \(byte 0xe9 at offset 3\); "
                           r"save it as UTF-8")
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("args, message", [
    (["--out", ""], r"--out needs a directory \(got an empty one\); leave --out out for the default"),
    (["--out", "  "], r"--out needs a directory .*"),
    (["output.name=../..", "--backend", "serial"], r"output\.name: must be a plain name .*"),
    (["train.steps=5", "train.steps=6"], r"train\.steps is given twice .*"),
    (["--out", "a", "output.dir=b"], r"output\.dir is given twice \('output\.dir=b' and 'output\.dir=a'; --out sets "
                                     r"output\.dir\): give it once"),
])
def test_silently_ambiguous_arguments_exit_2(tiny, tmp_path, args, message):
    proc = sgd_dist("train", "--config", str(tiny), *args, cwd=tmp_path)
    _one_line_exit_2(proc, message)
    assert list(tmp_path.iterdir()) == [tiny]  # nothing written: no runs/, no directory above the cwd


def test_out_pointing_at_a_file_says_it_is_a_file(tiny, tmp_path):
    (tmp_path / "a-file").write_text("")
    proc = sgd_dist("train", "--config", str(tiny), "--out", str(tmp_path / "a-file"), "--backend", "serial")
    _one_line_exit_2(proc, r"output directory '.*a-file' is a file, not a directory; choose another --out")


@pytest.mark.parametrize("args, message", [
    (["--address", "garbage!!"], r"cluster\.address: must be 'auto', HOST:PORT or ray://HOST:PORT \(got 'garbage!!'\)"),
    (["--out", "/proc/sgd-dist-run"], r"output directory '/proc/sgd-dist-run' cannot be created in '/proc': .*"),
    (["cluster.device=cuda"], r"cluster\.device=cuda, but this machine has no CUDA device \(torch sees none\); use "
                              r"cpu or auto"),
])
def test_config_errors_are_found_before_ray_starts(tiny, tmp_path, args, message):
    import torch

    if "cluster.device=cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    start = time.monotonic()
    out = ["--out", str(tmp_path / "never")] if "--out" not in args else []
    proc = sgd_dist("train", "--config", str(tiny), *out, *args)
    _one_line_exit_2(proc, message)
    assert time.monotonic() - start < 30  # the command's imports, not a Ray start-up and its teardown
    assert not (tmp_path / "never").exists()


def test_more_workers_than_this_machine_can_hold_are_refused_up_front(tmp_path):
    # the command: 1000 workers on the embedded Ray would fork a thousand torch processes
    proc = sgd_dist("train", "--config", str(ROOT / "configs" / "default.yaml"), "--out", str(tmp_path / "never"),
                    "cluster.num_workers=1000", "train.batch_size=8", "train.steps=200", "data.n_samples=20000")
    _one_line_exit_2(proc, r"cluster\.num_workers=1000 needs about \d+ GB on this machine \(each worker 310 MB of "
                           r"runtime \+ [\d.]+ KB of data, plus the server\); it has [\d.]+ GB available of [\d.]+ GB: "
                           r"use fewer workers \(cluster\.num_workers=\d+ fits\), or a cluster \(cluster\.address\), "
                           r"or cluster\.backend=virtual \(every worker in this one process, on a modelled cluster's "
                           r"clock: about \d+ MB\)")
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("backend", ["ray", "serial"])
def test_data_that_cannot_fit_this_machine_is_refused_up_front(tmp_path, backend):
    proc = sgd_dist("train", "--config", str(ROOT / "configs" / "default.yaml"), "--out", str(tmp_path / "never"),
                    "data.n_samples=1e11", "--backend", backend)
    if backend == "ray":
        message = (r"cluster\.num_workers=2 needs about [\d.]+ TB on this machine \(each worker 310 MB of runtime "
                   r"\+ [\d.]+ TB of data, plus the server\); it has .*: lower data\.n_samples or data\.n_features")
    else:
        message = (r"the data needs about [\d.]+ TB in this process \(2 shards of [\d.]+ TB\); this machine has .*: "
                   r"lower data\.n_samples or data\.n_features")
    _one_line_exit_2(proc, message)


@pytest.mark.slow
def test_resume_of_a_completed_run_says_so_and_changes_nothing(tiny, tmp_path):
    run = tmp_path / "done"
    first = sgd_dist("train", "--config", str(tiny), "--out", str(run), "--backend", "serial",
                     "train.checkpoint_every=10")
    assert first.returncode == 0, first.stderr
    assert (run / "checkpoints" / "latest.json").is_file()  # a checkpoint to "resume" from is there

    def snapshot() -> dict:
        return {p.relative_to(run): (p.read_bytes(), p.stat().st_mtime_ns)
                for p in sorted(run.rglob("*")) if p.is_file()}

    before = snapshot()
    proc = sgd_dist("train", "--resume", str(run))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"sgd-dist: {run} is complete (40 steps); nothing to resume\n" and proc.stderr == ""
    assert snapshot() == before


def _session_processes(sid: int) -> list[str]:
    """The processes of session ``sid`` that are still alive (zombies are gone as far as Ray is concerned)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, fields = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(name)
    return found


def _none_left(sid: int, within: float = 20) -> list[str]:
    deadline = time.monotonic() + within
    while (left := _session_processes(sid)) and time.monotonic() < deadline:
        time.sleep(0.25)
    return left


def _assert_interrupted_line(stderr: str, run: Path) -> None:
    """The last line names the run directory, and how to resume it when a checkpoint was written (a loaded machine
    may have run 1000 steps by the time the signal comes)."""
    hint = f" (sgd-dist train --resume {run} goes on from its latest checkpoint)"
    expected = (f"sgd-dist: error: interrupted; {run} keeps the rows recorded so far"
                + (hint if (run / "checkpoints" / "latest.json").is_file() else "") + "\n")
    assert stderr.endswith(expected), stderr


def _start_long_ray_run(tiny: Path, run: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([SGD_DIST, "train", "--config", str(tiny), "--out", str(run), "train.steps=1e7",
                             "train.log_every=0", "train.eval_every=0", "--no-progress", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**_user_env(), "PYTHONUNBUFFERED": "1"}, start_new_session=True,
                            preexec_fn=_default_sigint)


@pytest.mark.parametrize("to", ["the process", "its group"])
@pytest.mark.slow
def test_sigterm_stops_the_run_as_ctrl_c_does_and_exits_143(tiny, tmp_path, to):
    run = tmp_path / "terminated"
    proc = _start_long_ray_run(tiny, run)
    try:
        _wait_for_rows(run, 200, proc, timeout=120)
        assert len(_session_processes(proc.pid)) > 3  # the driver and the Ray it started (GCS, raylet, actors, ...)
        # `kill PID` and a scheduler signal the process; `timeout` signals its whole group, Ray's processes too
        if to == "the process":
            proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    _assert_interrupted_line(stderr, run)
    assert "SIGTERM received" not in stderr  # no stack dump from Ray's C++ core
    summary = _assert_rows_up_to_the_summary(run, "interrupted")
    assert summary["error"] == "SIGTERM" and summary["steps_recorded"] >= 199
    assert _none_left(proc.pid) == []


@pytest.mark.slow
def test_a_double_ctrl_c_exits_130_and_leaves_no_ray_process(tiny, tmp_path):
    run = tmp_path / "twice"
    proc = _start_long_ray_run(tiny, run)
    try:
        _wait_for_rows(run, 200, proc, timeout=120)
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C goes to the whole foreground group
        time.sleep(0.3)  # the second one lands while the first one's cleanup (Ray's shutdown) runs
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    _assert_interrupted_line(stderr, run)
    _assert_rows_up_to_the_summary(run, "interrupted")
    assert _none_left(proc.pid) == []  # no dashboard or runtime-env agent orphaned


def test_ctrl_c_before_the_run_directory_exists_says_nothing_was_written(tiny, tmp_path):
    run = tmp_path / "early"
    proc = _start_long_ray_run(tiny, run)
    try:
        first = proc.stdout.readline()  # printed just before the cluster starts
        assert first.startswith("sgd-dist: ray backend"), first
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert stderr.endswith("sgd-dist: error: interrupted before the run started; nothing was written\n"), stderr
    assert not run.exists()
    assert _none_left(proc.pid) == []


@pytest.mark.slow
def test_the_done_line_the_summary_and_the_metrics_agree_on_the_training_time(tiny, tmp_path):
    run = tmp_path / "timed"
    proc = sgd_dist("train", "--config", str(tiny), "--out", str(run), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["train_time_s"] == last["wall_time_s"]  # the metrics' clock, not the driver's
    assert summary["samples_per_s"] == pytest.approx(last["samples_seen"] / last["wall_time_s"], rel=1e-12)
    done = next(line for line in proc.stdout.splitlines() if line.startswith("done: "))
    assert done.startswith(f"done: 40 steps in {summary['train_time_s']:.3g} s (")
    assert f"{summary['samples_per_s']:,.0f} samples/s" in done


def test_a_sweep_given_a_training_config_says_so(tiny):
    proc = sgd_dist("sweep", "--config", str(tiny))
    _one_line_exit_2(proc, rf"'{re.escape(str(tiny))}' is a training config, not an experiment: run it with sgd-dist "
                           rf"train --config {re.escape(str(tiny))}, or sweep it from an experiment file .*")


def test_model_refuses_zero_cores(tmp_path):
    proc = sgd_dist("model", str(tmp_path), "--cores", "0")
    _one_line_exit_2(proc, r"--cores must be at least 1 \(got 0\); leave it out for the sweep's own")


def test_an_error_line_carries_no_terminal_colour_codes():
    from sgd_dist.errors import one_line

    error = RuntimeError("The actor died in its creation task, \x1b[36mray::_Worker.__init__()\x1b[39m (pid=1)\nmore")
    assert one_line(error) == "RuntimeError: The actor died in its creation task, ray::_Worker.__init__() (pid=1)"


@pytest.mark.slow
def test_replay_exits_0_on_a_bit_equal_run_and_1_naming_the_first_step_that_differs(tiny, tmp_path):
    run = tmp_path / "run"
    trained = sgd_dist("train", "--config", str(tiny), "--out", str(run), "--backend", "serial", "train.mode=async",
                       "output.plots=false", "--no-progress")
    assert trained.returncode == 0, trained.stderr
    same = sgd_dist("replay", str(run), "--out", str(tmp_path / "same"))
    assert same.returncode == 0 and same.stdout.splitlines()[-1] == "replay: bit-equal", same.stdout + same.stderr
    # the run's own record of step 7 changed by one part in 1e12: the replay computes the true value
    metrics = run / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows[7]["loss"] *= 1 + 1e-12
    metrics.write_text("".join(json.dumps(row) + "\n" for row in rows))
    changed = sgd_dist("replay", str(run), "--out", str(tmp_path / "changed"))
    assert changed.returncode == 1, changed.stdout + changed.stderr
    lines = changed.stdout.splitlines()
    assert lines[-1] == "replay: DIFFERENT" and changed.stderr == ""
    assert re.fullmatch(r"final weights bit-equal; losses (\d+) of (\d+) bit-equal \(first difference at step 7\)",
                        lines[-2]), lines
    equal, compared = map(int, re.fullmatch(r".*losses (\d+) of (\d+).*", lines[-2]).groups())
    assert equal == compared - 1
