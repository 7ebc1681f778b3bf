"""Start-up cost: a 1-step lesson-2 run of ``sgd-dist train``, command start to exit, against a bare program that
does only what any torch + Ray program must; the same run on a running local cluster (``--address auto``); and
``sgd-dist train``'s setup with many workers against a bare program starting as many actors that import torch.

Each program runs as a subprocess, the two of a pair interleaved, so that drift on a busy machine falls on both
alike; the medians are compared. The cluster is a ``ray start --head`` on loopback with token authentication,
in a process group and a temp dir of its own: stopping it (that group) leaves every other Ray on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import sgd_dist
from sgd_dist.config import load_config

# Loopback before Ray is imported, as sgd_dist does; as many logical CPUs as actors, one reserved by each (as
# sgd_dist's embedded Ray and its workers); every actor imports torch and answers once. Prints its setup span.
BARE_PROGRAM = """\
import json
import os
import sys
import time

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
import torch
import ray

workers = int(sys.argv[1])
t0 = time.perf_counter()
ray.init(address="local", num_cpus=max(os.cpu_count() or 1, workers), include_dashboard=False)


@ray.remote(num_cpus=1)
class Actor:
    def __init__(self):
        import torch

    def ping(self):
        return 1


actors = [Actor.remote() for _ in range(workers)]
ray.get([a.ping.remote() for a in actors])
print(json.dumps({"setup_s": time.perf_counter() - t0}))
ray.shutdown()
"""

RUN_TIMEOUT_S = 300
HEAD_TIMEOUT_S = 60
HEAD_STOP_GRACE_S = 5.0
Log = Callable[[str], None]


def default_config() -> Path:
    """configs/lesson2.yaml of the source tree this package was installed from (editable install)."""
    return Path(sgd_dist.__file__).resolve().parents[1] / "configs" / "lesson2.yaml"


def _bin(name: str) -> Path:
    return Path(sys.executable).with_name(name)


def _command() -> list[str]:
    script = _bin("sgd-dist")  # the console script a user runs
    return [str(script)] if script.exists() else [sys.executable, "-m", "sgd_dist.cli"]


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """A user's shell: no Ray of ours to join and no loopback switch (each program sets it for itself)."""
    drop = {"RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **(extra or {})}


def _run(args: list[str], cwd: str, env: dict[str, str] | None = None) -> tuple[float, str]:
    """(seconds from start to exit, stdout); RuntimeError with the last line of stderr if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{' '.join(Path(a).name for a in args[:2])} ... exited {proc.returncode}: {tail[:200]}")
    return elapsed, proc.stdout


def _train(config: Path, out: Path, extra: Sequence[str] = (),
           env: dict[str, str] | None = None) -> tuple[float, float]:
    """One 1-step ``sgd-dist train``: (start to exit, the summary's setup_time_s), in seconds."""
    elapsed, _ = _run([*_command(), "train", "--config", str(config), "--out", str(out), *extra, "train.steps=1"],
                      cwd=str(out.parent), env=env)
    setup = json.loads((out / "summary.json").read_text())["setup_time_s"]
    shutil.rmtree(out, ignore_errors=True)
    return elapsed, setup


def _bare(script: Path, workers: int) -> tuple[float, float]:
    """One bare program: (start to exit, ray.init to every actor's first answer), in seconds."""
    elapsed, stdout = _run([sys.executable, str(script), str(workers)], cwd=str(script.parent))
    return elapsed, json.loads(stdout.strip().splitlines()[-1])["setup_s"]


def _pair(config: Path, workers: int, override: bool, repeats: int, tmp: Path, log: Log) -> dict:
    """``repeats`` interleaved runs of both programs at ``workers`` workers (the config's own, or overridden)."""
    runs: dict[str, list[float]] = {"sgd_dist_s": [], "sgd_dist_setup_s": [], "bare_s": [], "bare_setup_s": []}
    extra = [f"cluster.num_workers={workers}"] if override else []
    for i in range(repeats):
        for (total, setup), prefix in ((_train(config, tmp / f"run-{workers}-{i}", extra), "sgd_dist"),
                                       (_bare(tmp / "bare.py", workers), "bare")):
            runs[f"{prefix}_s"].append(total)
            runs[f"{prefix}_setup_s"].append(setup)
        log(f"start-up {i + 1}/{repeats}, {workers} workers: sgd-dist train {runs['sgd_dist_s'][-1]:.2f} s (setup "
            f"{runs['sgd_dist_setup_s'][-1]:.2f} s), bare program {runs['bare_s'][-1]:.2f} s (setup "
            f"{runs['bare_setup_s'][-1]:.2f} s)")
    medians = {f"{key[:-2]}_median_s": statistics.median(values) for key, values in runs.items()}
    return {"workers": workers, **runs, **medians}


def measure_startup(repeats: int, config: Path | None = None, log: Log = lambda s: None,
                    workers: Sequence[int] = (), cluster: bool = False) -> dict:
    """Median seconds of each start-up program over ``repeats`` runs; a part that fails becomes its note.

    ``lesson2``: the config's own run against the bare program with as many actors, start to exit (the ratio).
    ``cluster``: the same run with ``--address auto`` on a local cluster started for it, start to exit.
    ``workers``: for each K, the config with K workers against K actors; the ratio is of the setup spans (the
    summary's setup_time_s, and the bare program's ray.init to every actor's first answer).
    """
    config = Path(config) if config else default_config()
    if not config.is_file():
        return {"note": f"skipped: {config} not found (run from a source checkout or pass --startup-config)"}
    own = load_config(config).cluster.num_workers
    result: dict = {"config": str(config), "config_name": f"{config.parent.name}/{config.name}"}
    with tempfile.TemporaryDirectory(prefix="sgd-bench-startup-") as tmp:
        Path(tmp, "bare.py").write_text(BARE_PROGRAM)
        parts: list[tuple[str, Callable[[], dict]]] = [
            ("lesson2", lambda: _with_ratio(_pair(config, own, False, repeats, Path(tmp), log), "s"))]
        parts += [(str(k), (lambda k=k: _with_ratio(_pair(config, k, True, repeats, Path(tmp), log), "setup_s")))
                  for k in workers]
        if cluster:
            parts.append(("cluster", lambda: on_local_cluster(config, repeats, Path(tmp), log)))
        for name, part in parts:
            try:
                value = part()
            except (RuntimeError, OSError, subprocess.SubprocessError, KeyError, ValueError) as exc:
                value = {"note": f"no result: {exc}"}
                log(f"start-up, {name}: {value['note']}")
            if name in ("lesson2", "cluster"):
                result[name] = value
            else:
                result.setdefault("workers", {})[name] = value
    return result


def _with_ratio(runs: dict, span: str) -> dict:
    """``runs`` with ``ratio``: sgd_dist's median over the bare program's, of the span ('s' or 'setup_s')."""
    median = "median_s" if span == "s" else "setup_median_s"
    return {**runs, "span": "start to exit" if span == "s" else "setup",
            "ratio": runs[f"sgd_dist_{median}"] / runs[f"bare_{median}"]}


# -- a running local cluster ----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_local_cluster(config: Path, repeats: int, tmp: Path, log: Log) -> dict:
    """``repeats`` 1-step runs with ``--address auto``, start to exit, on a head this function starts and stops."""
    needed = load_config(config).cluster.num_workers
    head = LoopbackHead(num_cpus=max(os.cpu_count() or 1, needed))
    seconds = []
    with head:
        log(f"start-up: a local cluster at {head.address} (ray start --head, token auth), up in {head.up_s:.1f} s")
        for i in range(repeats):
            seconds.append(_train(config, tmp / f"cluster-{i}", ["--address", "auto"], env=head.env)[0])
            log(f"start-up {i + 1}/{repeats}, on the cluster: sgd-dist train --address auto {seconds[-1]:.2f} s")
    return {"sgd_dist_s": seconds, "median_s": statistics.median(seconds), "head_up_s": head.up_s}


class LoopbackHead:
    """``ray start --head --block`` on 127.0.0.1 with free ports, a token of its own and a private RAY_TMPDIR
    (so ``--address auto`` in ``env`` finds this head and no other), in its own process group. Leaving the
    ``with`` block signals that group, SIGTERM then SIGKILL after a grace period, as the README's recipe does."""

    def __init__(self, num_cpus: int) -> None:
        self.num_cpus = num_cpus
        self.work = Path(tempfile.mkdtemp(prefix="sgd-bh-"))  # short: Ray's socket paths stay under 108 bytes
        token = self.work / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        # the README's recipe exports these in the shell both the head and the runs start from
        self.env = _env({"RAY_TMPDIR": str(self.work / "ray"), "RAY_AUTH_MODE": "token",
                         "RAY_AUTH_TOKEN_PATH": str(token), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.up_s = 0.0

    def __enter__(self) -> LoopbackHead:
        ray = str(_bin("ray"))
        args = [ray, "start", "--head", "--block", f"--port={self.port}", f"--dashboard-port={_free_port()}",
                f"--dashboard-agent-listen-port={_free_port()}", f"--ray-client-server-port={_free_port()}",
                f"--num-cpus={self.num_cpus}", "--disable-usage-stats"]
        t0 = time.perf_counter()
        with open(self.work / "head.log", "w") as log:
            self.proc = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait_healthy(ray)
        except BaseException:
            self.__exit__()
            raise
        self.up_s = time.perf_counter() - t0
        return self

    def _wait_healthy(self, ray: str) -> None:
        """Until the head answers and has written its address where ``--address auto`` reads it (RAY_TMPDIR/ray/
        ray_current_cluster, a few seconds after the GCS answers): without that file, auto takes any cluster."""
        deadline = time.monotonic() + HEAD_TIMEOUT_S
        address_file = self.work / "ray" / "ray" / "ray_current_cluster"
        while not (address_file.is_file() and address_file.read_text().strip() == self.address and subprocess.run(
                [ray, "health-check", f"--address={self.address}"], env=self.env, capture_output=True,
                timeout=HEAD_TIMEOUT_S).returncode == 0):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.work / "head.log").read_text(errors="replace").strip().splitlines()[-1:] or ["(no log)"]
                raise RuntimeError(f"ray start --head did not come up within {HEAD_TIMEOUT_S} s: {tail[0][:200]}")
            time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        try:
            if self.proc is not None:
                _stop_group(self.proc)
        finally:
            shutil.rmtree(self.work, ignore_errors=True)


def _stop_group(leader: subprocess.Popen) -> None:
    """SIGTERM to the leader's process group, SIGKILL to what is left of it after the grace period."""
    try:
        os.killpg(leader.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + HEAD_STOP_GRACE_S
    while time.monotonic() < deadline:
        leader.poll()  # reaped, or the exited leader would keep its group alive as a zombie
        try:
            os.killpg(leader.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.killpg(leader.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    leader.wait()
