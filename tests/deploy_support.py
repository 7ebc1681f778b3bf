"""Helpers for the deployment tests: compose's variable syntax, free ports, tools that CI must have, and
process groups started and stopped by the tests themselves (never `ray stop`: it stops every Ray process
of the user on the machine)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

_VARIABLE = re.compile(r"\$(?:\$|\{(\w+)(?::?-([^}]*))?\}|(\w+))")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's substitution: ${NAME}, $NAME, ${NAME:-default} (unset or empty), ${NAME-default} (unset),
    $$ for a literal $. tests/test_deploy.py checks it against docker-compose's own output."""

    def one(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(3)
        default = match.group(2)
        value = env.get(name)
        if default is not None and (value is None or (value == "" and ":-" in match.group(0))):
            return default
        return value or ""

    return _VARIABLE.sub(one, text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require(ok: bool, what: str) -> None:
    """Skip when a tool is missing locally; fail in CI (CI=true), where .ci/run installs it."""
    if ok:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} (.ci/run installs it)")
    pytest.skip(what)


def require_tools(*tools: str) -> None:
    missing = [t for t in tools if not (shutil.which(t) or Path(t).is_file())]
    require(not missing, f"missing: {', '.join(missing)}")


def loopback_name() -> str:
    """A name of 127.0.0.1 that Ray does not rewrite: this host's name, or another alias of 127.0.0.1 in
    /etc/hosts. Ray turns "127.0.0.1" and "localhost" in a worker's --address into this machine's external
    address (where a loopback head does not listen), and a head on loopback needs
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which `ray start` refuses for a worker node."""
    names = [socket.gethostname()]
    try:
        for line in Path("/etc/hosts").read_text().splitlines():
            fields = line.split("#")[0].split()
            if fields and fields[0] == "127.0.0.1":
                names += [name for name in fields[1:] if not name.startswith("localhost")]
    except OSError:
        pass
    for name in names:
        try:
            if socket.gethostbyname(name) == "127.0.0.1":
                return name
        except OSError:
            continue
    require(False, f"no name of 127.0.0.1 other than localhost (tried {names}) to join a loopback head")
    raise AssertionError  # not reached: require skipped or failed


def user_env(**extra: str) -> dict[str, str]:
    """This shell's environment without the Ray switches this test session set for itself, plus ``extra``;
    the venv's bin first on PATH (as in the image, where ray and sgd-dist are on the PATH)."""
    drop = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
            "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


def start_group(cmd: list[str], *, env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    """Start ``cmd`` in a session of its own, so that stop_groups ends it and everything it started."""
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_groups(*procs: subprocess.Popen, grace: float = 3) -> None:
    """SIGTERM to each whole group, then SIGKILL to what is left after ``grace`` seconds (Ray's processes do
    not all exit on SIGTERM)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        alive = [p for p in procs if _signal_group(p, sig)]
        deadline = time.monotonic() + wait
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = [p for p in alive if _signal_group(p, 0)]
        if not alive:
            return


def _signal_group(proc: subprocess.Popen, sig: int) -> bool:
    proc.poll()  # reap the leader, so that a finished group reads as gone
    try:
        os.killpg(proc.pid, sig)
        return True
    except ProcessLookupError:
        return False


def wait_for(check, what: str, timeout: float = 60, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
            raise AssertionError(f"{what} did not happen\n{tail}")
        time.sleep(0.5)


def dead_cluster_report(procs: dict[str, subprocess.Popen], work: Path, ports: dict[str, int],
                        lines: int = 15) -> str | None:
    """If one of a cluster's `ray start --block` processes has ended or one of its ``ports`` no longer listens (a
    node or its dashboard died mid-session): the tails of the start logs and of the Ray logs under ``work``."""
    dead = {name: f"exit {p.returncode}" for name, p in procs.items() if p.poll() is not None}
    dead.update({name: f"port {port} closed" for name, port in ports.items() if not listening(port)})
    if not dead:
        return None
    parts = [f"=== a cluster node died during the session: {dead} ==="]
    logs = sorted(work.glob("*.log")) + sorted(work.glob("ray/session_*/logs/*"))
    for path in logs:
        if path.is_file() and path.suffix in (".log", ".out", ".err") and path.stat().st_size:
            if path.parent.name == "logs" and not path.name.startswith(("gcs_server", "raylet", "dashboard", "monitor",
                                                                          "job-driver", "log_monitor")):
                continue
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.relative_to(work)} (last {len(tail)} lines) ---\n" + "\n".join(tail))
    return "\n".join(parts)


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False
