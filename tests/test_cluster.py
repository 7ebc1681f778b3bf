"""Joining a real `ray start` cluster on loopback with --address, with Ray 2.60's token authentication.

The cluster runs in its own process group (`ray start --block` in a new session) and is stopped by
signalling that group: `ray stop` would stop every Ray process of the user, this session's Ray included.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TINY = ["data.n_samples=400", "data.n_features=1", "train.steps=20", "train.eval_every=10", "output.plots=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _user_env(**extra: str) -> dict[str, str]:
    """A shell's environment: without the switches this test session's own Ray set, plus ``extra``."""
    drop = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ADDRESS"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


@pytest.fixture(scope="module")
def loopback_cluster():
    port, token = _free_port(), secrets.token_hex(32)
    temp_dir = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths must stay under 108 bytes
    env = _user_env(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=4", "--disable-usage-stats",
         "--include-dashboard=false", f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("ray start --head did not come up") from None
                time.sleep(0.5)
        yield f"127.0.0.1:{port}", token
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def _train(address: str, out: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "sgd-dist"), "train", "--config", str(ROOT / "configs" / "lesson2.yaml"), "--out", str(out),
           "--address", address, *TINY]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)


@pytest.mark.slow
def test_train_on_a_ray_start_cluster_with_its_token(loopback_cluster, tmp_path):
    address, token = loopback_cluster
    proc = _train(address, tmp_path / "run", _user_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["backend"] == "ray" and summary["steps"] == 20


@pytest.mark.parametrize("client", ["no token", "a wrong token"])
@pytest.mark.slow
def test_a_client_without_the_token_is_refused_in_one_line_before_rays_retries(loopback_cluster, tmp_path, client):
    address, _ = loopback_cluster
    env = (_user_env() if client == "no token"
           else _user_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32)))
    proc = _train(address, tmp_path / "never", env)
    assert proc.returncode == 1
    # the refusal is found before ray.init: none of the ~20 lines of Ray's "Unauthenticated" retries, only ours
    assert proc.stderr.count("\n") == 1 and "Unauthenticated" not in proc.stderr, proc.stderr
    if client == "no token":
        assert proc.stderr == (f"sgd-dist: error: run failed: ClusterError: the Ray cluster at '{address}' uses token "
                               "authentication and this client sends no token: export RAY_AUTH_MODE=token and the "
                               "cluster's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)\n")
    else:
        assert proc.stderr.startswith(f"sgd-dist: error: run failed: ClusterError: the Ray cluster at '{address}' "
                                      "refused this client's token (RAY_AUTH_MODE=token): use the cluster's own token")
    assert not (tmp_path / "never").exists()
