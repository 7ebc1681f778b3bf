"""docker-compose.yml's cluster, run for real on loopback without Docker, and the job API on it.

The head and the worker are started with the very `ray start` command lines of the compose file's services
(read from docker-compose.yml, with compose's own ${NAME:-default} substitution; only the knobs the file
declares are set: a name of 127.0.0.1 for the head's host, free ports, loopback for the dashboard), each in
its own process group, and stopped by signalling those groups. Then `sgd-dist submit` (and Ctrl-C on it, which
leaves the job running), `sgd_dist.jobs.client.submit()` from Python, the README's `ray job submit` line, `sgd-dist
jobs`, and requests without the token or to a wrong address.
docker-compose.yml itself is checked by docker-compose 1.29.2's parser (`docker-compose config`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

import pytest
import yaml
from deploy_support import (
    BIN,
    ROOT,
    dead_cluster_report,
    free_port,
    interpolate,
    listening,
    loopback_name,
    require,
    start_group,
    stop_groups,
    user_env,
    wait_for,
)

pytestmark = pytest.mark.deploy

COMPOSE = ROOT / "docker-compose.yml"
SECRET_IN_CONTAINER = "/run/secrets/ray_auth_token"  # where compose mounts the secret `ray_auth_token`
README_JOB_LINE = "ray job submit --address http://127.0.0.1:8265 -- "


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _knobs(head_host: str) -> dict[str, str]:
    """Values for the variables docker-compose.yml declares, for one machine running several nodes."""
    return {
        "RAY_HEAD_HOST": head_host,
        "RAY_GCS_PORT": str(free_port()),
        "RAY_DASHBOARD_HOST": "127.0.0.1",
        "RAY_DASHBOARD_PORT": str(free_port()),
        "RAY_CLIENT_PORT": str(free_port()),
        "RAY_AGENT_PORT": str(free_port()),
        "RAY_OBJECT_STORE_BYTES": str(100 * 1024**2),
    }


def _service_env(service: dict, token_file: Path) -> dict[str, str]:
    env = {k: str(v) for k, v in service["environment"].items()}
    assert env["RAY_AUTH_TOKEN_PATH"] == SECRET_IN_CONTAINER
    env["RAY_AUTH_TOKEN_PATH"] = str(token_file)  # the secret, where it lies on this machine
    return env


def _alive_nodes(url: str, token: str) -> int:
    """Nodes the head reports alive, from the State API (a plain HTTP request with the token: no Ray import)."""
    request = urllib.request.Request(f"{url}/api/v0/nodes?limit=100", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            nodes = json.load(reply)["data"]["result"]["result"]
    except (OSError, ValueError, KeyError):
        return 0
    return sum(node["state"] == "ALIVE" for node in nodes)


def _listen_addresses(pgids: set[int]) -> set[str]:
    """The addresses on which processes of these process groups listen (TCP, from /proc)."""
    inodes: set[str] = set()
    for pid_dir in Path("/proc").glob("[0-9]*"):
        try:
            if int((pid_dir / "stat").read_text().rsplit(")", 1)[1].split()[2]) not in pgids:
                continue
            for fd in (pid_dir / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except (OSError, IndexError, ValueError):
            continue
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.add(fields[1].split(":")[0][-8:] if width == 32 else fields[1].split(":")[0])
    return {".".join(str(int(h[i:i + 2], 16)) for i in (6, 4, 2, 0)) for h in found}


@pytest.fixture(scope="module")
def compose_cluster(request):
    """A head and one worker node from docker-compose.yml's command lines; yields what a client needs."""
    doc = _compose()
    head_service, worker_service = doc["services"]["ray-head"], doc["services"]["worker"]
    knobs = _knobs(loopback_name())
    work = Path(tempfile.mkdtemp(prefix="sgd-compose-"))  # short: Ray's socket paths must stay under 108 bytes
    home = work / "home"  # stands for the image's WORKDIR, /home/ray/sgd_dist, where jobs run
    shutil.copytree(ROOT / "configs", home / "configs")
    token = secrets.token_hex(32)
    (work / "token").write_text(token)
    knobs["RAY_TEMP_DIR"] = str(work / "ray")
    base = user_env(**_service_env(head_service, work / "token"))
    # The head on loopback (Ray binds the external interface without this); the worker must not have it:
    # `ray start` refuses to add a node when it is set, and the worker finds 127.0.0.1 from the head's name.
    head_cmd = shlex.split(interpolate(head_service["command"], knobs))
    head = start_group(head_cmd, env={**base, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}, cwd=home,
                       log=work / "head.log")
    groups = [head]
    try:
        gcs_port, dashboard_port = int(knobs["RAY_GCS_PORT"]), int(knobs["RAY_DASHBOARD_PORT"])
        wait_for(lambda: listening(gcs_port) and listening(dashboard_port), "the head's GCS and dashboard",
                 proc=head, log=work / "head.log")
        healthcheck = [interpolate(part, knobs) for part in head_service["healthcheck"]["test"]]
        assert healthcheck[0] == "CMD"
        wait_for(lambda: subprocess.run(healthcheck[1:], env=base, capture_output=True, timeout=30).returncode == 0,
                 "the head's health check", proc=head, log=work / "head.log")
        worker_knobs = {**knobs, "RAY_AGENT_PORT": str(free_port())}  # in compose each node has its own
        worker_cmd = shlex.split(interpolate(worker_service["command"], worker_knobs))
        worker = start_group(worker_cmd, env=base, cwd=home, log=work / "worker.log")
        groups.append(worker)
        url = f"http://127.0.0.1:{dashboard_port}"
        wait_for(lambda: _alive_nodes(url, token) == 2, "the worker node joining", proc=worker, log=work / "worker.log")
        worker_check = [interpolate(part, worker_knobs) for part in worker_service["healthcheck"]["test"]][1:]
        yield {
            "url": url, "token_file": work / "token", "home": home,
            "groups": groups, "worker_check": worker_check, "env": base,
        }
    finally:
        report = dead_cluster_report(dict(zip(("head", "worker"), groups)), work,
                                     {"gcs": int(knobs["RAY_GCS_PORT"]), "dashboard": int(knobs["RAY_DASHBOARD_PORT"])})
        if report is not None:  # to the terminal, past the output capture: the logs go with the temp dir
            with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
                sys.stderr.write("\n" + report + "\n")
        stop_groups(*groups)
        shutil.rmtree(work, ignore_errors=True)


def _with_token(cluster) -> dict[str, str]:
    return user_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(cluster["token_file"]))


def _sgd_dist(*args: str, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "sgd-dist"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_the_compose_nodes_are_healthy_and_listen_on_loopback_only(compose_cluster):
    proc = subprocess.run(compose_cluster["worker_check"], env=compose_cluster["env"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    addresses = _listen_addresses({p.pid for p in compose_cluster["groups"]})
    assert addresses and addresses <= {"127.0.0.1"}, addresses


def test_sgd_dist_submit_trains_on_the_cluster_and_brings_the_run_back(compose_cluster, tmp_path):
    out = tmp_path / "run"
    proc = _sgd_dist("submit", "--address", compose_cluster["url"], "--config", str(ROOT / "configs" / "lesson2.yaml"),
                     "--out", str(out), "train.steps=5", "train.eval_every=5", env=_with_token(compose_cluster))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the job imported the sgd_dist that travelled in its runtime_env, not an installed one
    shipped = re.search(r"sgd-dist job: sgd_dist \S+ from (\S+)", proc.stdout)
    assert shipped and "runtime_resources" in shipped.group(1) and str(ROOT) not in shipped.group(1)
    assert "SGD_DIST_RUN_ARCHIVE" not in proc.stdout  # the archive is not shown
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 5 and summary["num_workers"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2, 3, 4, 5]
    assert rows[-1]["eval_loss"] == pytest.approx(summary["final_loss"])
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["train"]["steps"] == 5 and config["data"]["true_weights"] == [3.0, 2.0]
    assert (out / "loss.png").stat().st_size > 0 and (out / "fit.png").stat().st_size > 0
    job_id = re.search(r"submitted job (\S+)", proc.stdout).group(1)

    listed = _sgd_dist("jobs", "--address", compose_cluster["url"], env=_with_token(compose_cluster))
    assert listed.returncode == 0, listed.stderr
    assert re.search(rf"^{re.escape(job_id)}\s+SUCCEEDED\s", listed.stdout, flags=re.M), listed.stdout
    followed = _sgd_dist("jobs", "--address", compose_cluster["url"], "--follow", job_id,
                         env=_with_token(compose_cluster))
    assert followed.returncode == 0, followed.stderr
    assert "step 5/5" in followed.stdout and followed.stdout.strip().endswith(f"job {job_id} succeeded")


def test_a_failed_job_is_one_line_and_exit_1_and_its_run_directory_still_comes_back(compose_cluster, tmp_path):
    out = tmp_path / "run"
    proc = _sgd_dist("submit", "--address", compose_cluster["url"], "--config", str(ROOT / "configs" / "lesson2.yaml"),
                     "--out", str(out), "optim.lr=1e6", "output.plots=false", env=_with_token(compose_cluster))
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"sgd-dist: error: job \S+ failed: run failed: DivergenceError: the mini-batch loss is "
                        rf"\S+ at step \d+: .*; its run directory is in {re.escape(str(out))}", last), last
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"].startswith("DivergenceError")
    assert (out / "config.yaml").is_file() and (out / "metrics.jsonl").is_file()


def test_submit_from_python_trains_on_the_cluster_and_brings_the_run_back(compose_cluster, tmp_path):
    """`sgd_dist.jobs.client.submit(address, config)`, as a notebook calls it (in a fresh process: this session's own
    Ray switches stay out of it): the job's log goes to ``echo``, the run directory comes back, the result says so."""
    out = tmp_path / "run"
    script = f"""
import json
from sgd_dist.config import load_config
from sgd_dist.jobs.client import submit

lines = []
result = submit({compose_cluster["url"]!r}, load_config({str(ROOT / "configs" / "lesson2.yaml")!r},
                ["train.steps=5", "train.eval_every=5", "output.plots=false"]), out={str(out)!r}, echo=lines.append)
print(json.dumps({{"job_id": result.job_id, "status": result.status, "run_dir": str(result.run_dir),
                   "summary": result.summary, "lines": lines}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], env=_with_token(compose_cluster), capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["status"] == "SUCCEEDED" and result["run_dir"] == str(out)
    assert result["lines"][0] == f"sgd-dist: submitted job {result['job_id']} to {compose_cluster['url']}"
    assert any(line.startswith("step 5/5") for line in result["lines"])
    assert not any(line.startswith("SGD_DIST_RUN_ARCHIVE") for line in result["lines"])
    assert result["summary"] == json.loads((out / "summary.json").read_text())
    assert result["summary"]["status"] == "completed" and result["summary"]["steps"] == 5
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == list(range(6))


def test_ctrl_c_on_submit_leaves_the_job_running_to_the_end(compose_cluster, tmp_path):
    """SIGINT (as a terminal sends it) to `sgd-dist submit` once its job trains: exit 130 with one line naming how
    to stop the job, and the job goes on to succeed on the cluster."""
    env = _with_token(compose_cluster)
    proc = subprocess.Popen([str(BIN / "sgd-dist"), "submit", "--address", compose_cluster["url"], "--config",
                             str(ROOT / "configs" / "lesson2.yaml"), "--out", str(tmp_path / "run"), "train.steps=300",
                             "train.eval_every=100", "train.log_every=10", "stragglers.delay=uniform",
                             "stragglers.delay_ms=10", "output.plots=false"],
                            env={**env, "PYTHONUNBUFFERED": "1"},  # its lines as they come, as on a terminal
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any(re.match(r"step +10/300 ", line) for line in lines), "the job's first step lines",
                 timeout=180, proc=proc)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    job_id = re.search(r"submitted job (\S+)", "".join(lines)).group(1)
    assert proc.returncode == 130, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == (
        f"sgd-dist: error: interrupted; the job goes on on the cluster (sgd-dist jobs --address "
        f"{compose_cluster['url']} --stop JOB_ID stops it)")
    assert not any(line.startswith("step 300/300") for line in lines)  # interrupted before the job's end
    followed = _sgd_dist("jobs", "--address", compose_cluster["url"], "--follow", job_id, env=env)
    assert followed.returncode == 0, followed.stdout[-3000:] + followed.stderr[-3000:]
    assert "step 300/300" in followed.stdout and followed.stdout.strip().endswith(f"job {job_id} succeeded")


def test_the_readme_ray_job_submit_line_trains_on_the_cluster(compose_cluster):
    readme = (ROOT / "README.md").read_text()
    lines = [line.strip() for line in readme.splitlines() if line.strip().startswith(README_JOB_LINE)]
    assert len(lines) == 1, lines
    assert lines[0] in COMPOSE.read_text()  # the compose file documents the same line
    cmd = shlex.split(lines[0].replace("http://127.0.0.1:8265", compose_cluster["url"]))
    proc = subprocess.run(cmd, env=_with_token(compose_cluster), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = compose_cluster["home"] / cmd[cmd.index("--out") + 1]  # the job runs in the head's working directory
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 100
    assert summary["relative_optimality_gap"] < 0.01  # lesson 2 lands within 1% of least squares


def test_sgd_dist_jobs_stops_a_running_job(compose_cluster):
    env = _with_token(compose_cluster)
    proc = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", compose_cluster["url"], "--no-wait",
                           "--", "sleep", "120"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job_id = re.search(r"Job '(\S+)' submitted successfully", proc.stdout + proc.stderr).group(1)
    stopped = _sgd_dist("jobs", "--address", compose_cluster["url"], "--stop", job_id, env=env)
    assert stopped.returncode == 0 and stopped.stdout.strip() == f"job {job_id} stopping", stopped.stderr
    followed = _sgd_dist("jobs", "--address", compose_cluster["url"], "--follow", job_id, env=env, timeout=60)
    assert followed.returncode == 1 and followed.stdout.strip().endswith(f"job {job_id} stopped")
    unknown = _sgd_dist("jobs", "--address", compose_cluster["url"], "--follow", "raysubmit_none", env=env)
    assert unknown.returncode == 1 and unknown.stderr.count("\n") == 1, unknown.stderr
    assert unknown.stderr.startswith("sgd-dist: error: ") and "raysubmit_none" in unknown.stderr


def test_requests_without_the_token_are_refused_in_one_line(compose_cluster, tmp_path):
    config = str(ROOT / "configs" / "lesson2.yaml")
    for env in (user_env(), user_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))):
        proc = _sgd_dist("submit", "--address", compose_cluster["url"], "--config", config, "--out",
                         str(tmp_path / "never"), env=env, timeout=60)
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert lines[0].startswith(f"sgd-dist: error: the cluster at {compose_cluster['url']} refused the request: ")
        assert "RAY_AUTH_MODE=token" in lines[0]
        assert not (tmp_path / "never").exists()
    listed = _sgd_dist("jobs", "--address", compose_cluster["url"], env=user_env(), timeout=60)
    assert listed.returncode == 1 and "refused the request" in listed.stderr
    plain = subprocess.run([str(BIN / "ray"), "job", "list", "--address", compose_cluster["url"]], env=user_env(),
                           capture_output=True, text=True, timeout=60)
    assert plain.returncode != 0 and "Unauthorized" in plain.stdout + plain.stderr


def test_a_wrong_address_is_one_line_and_exit_1(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    proc = _sgd_dist("submit", "--address", url, "--config", str(ROOT / "configs" / "lesson2.yaml"), env=user_env(),
                     timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"sgd-dist: error: cannot reach a Ray job API at {url}: " \
                                  f"Failed to connect to Ray at address: {url}."
    assert _sgd_dist("jobs", env=user_env(), timeout=60).returncode == 2  # --address is required


# --- docker-compose.yml through a real compose parser --------------------------------------------------

def _docker_compose() -> str:
    candidates = [os.environ.get("DOCKER_COMPOSE", ""), str(ROOT / ".venv-compose" / "bin" / "docker-compose"),
                  shutil.which("docker-compose") or ""]
    found = next((c for c in candidates if c and Path(c).is_file()), None)
    require(found is not None, "docker-compose 1.29.2 not found (.venv-compose/bin/docker-compose)")
    return found


def _compose_config(env: dict[str, str]) -> dict:
    proc = subprocess.run([_docker_compose(), "--file", str(COMPOSE), "config"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={"PATH": os.environ["PATH"], **env})
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def test_docker_compose_accepts_the_file_and_substitutes_as_the_tests_do():
    resolved = _compose_config({})
    doc = _compose()
    for name in ("ray-head", "worker"):
        assert resolved["services"][name]["command"] == interpolate(doc["services"][name]["command"], {})
    knobs = {**_knobs("127.0.0.1"), "RAY_TEMP_DIR": "/tmp/x"}
    resolved_knobs = _compose_config(knobs)
    for name in ("ray-head", "worker"):
        assert resolved_knobs["services"][name]["command"] == interpolate(doc["services"][name]["command"], knobs)
        assert resolved_knobs["services"][name]["healthcheck"]["test"] == [
            interpolate(part, knobs) for part in doc["services"][name]["healthcheck"]["test"]]


def test_docker_compose_is_secure_by_default():
    resolved = _compose_config({})
    services = resolved["services"]
    assert set(services) == {"ray-head", "worker"}
    assert "ports" not in services["worker"]  # a worker scales (--scale worker=N): nothing published
    assert services["ray-head"]["ports"] == ["127.0.0.1:8265:8265/tcp", "127.0.0.1:6379:6379/tcp"]
    for _name, service in services.items():
        env = service["environment"]
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == SECRET_IN_CONTAINER
        assert "RAY_AUTH_TOKEN" not in env  # the token itself is never in the file
        assert service["secrets"] == [{"source": "ray_auth_token"}]
        assert service["healthcheck"]["test"][:3] == ["CMD", "ray", "health-check"]
        assert service["image"] == "sgd-dist-ray:0.1.0" and service["build"]["dockerfile"] == "docker/Dockerfile"
        # the object store fits in the container's /dev/shm, with room for the shared-memory transport
        store = int(re.search(r"--object-store-memory=(\d+)", service["command"]).group(1))
        assert _bytes(service["shm_size"]) >= 1.5 * store
    assert "--head" in services["ray-head"]["command"] and "--address=ray-head:6379" in services["worker"]["command"]
    assert services["worker"]["depends_on"] == {"ray-head": {"condition": "service_healthy"}}
    assert resolved["secrets"]["ray_auth_token"]["file"] == str(ROOT / "secrets" / "ray_auth_token")
    # the token file is ignored by git, and no file that git tracks holds a token
    check = subprocess.run(["git", "check-ignore", "-q", "secrets/ray_auth_token"], cwd=ROOT)
    assert check.returncode == 0
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert not [path for path in tracked if path.startswith("secrets/")]
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:2\.60\.0-py311-cpu$", dockerfile, flags=re.M)
    assert "torch==2.13.0" in dockerfile and "secrets" in (ROOT / ".dockerignore").read_text()


def _bytes(size: str | int) -> int:
    if isinstance(size, int):
        return size
    number, unit = re.fullmatch(r"(\d+)([kmg]?)b?", str(size).lower()).groups()
    return int(number) * 1024 ** " kmg".index(unit or " ")
