"""`ray up`, `ray submit scripts/ray_entry.py`, `ray down` with cluster/local.yaml, for real, on loopback.

The launcher reaches its "head node" through an sshd of this test's own: on 127.0.0.1 only, with its own
host key and authorized_keys, and run in a new PID namespace (`unshare --pid --mount-proc`). That namespace
is what makes `ray down` safe here: it runs `ray stop` on the head, and `ray stop` stops every Ray process
of the user that it can see; inside the namespace it sees only this cluster's. Ending the sshd (the
namespace's init) ends whatever is left in it.

Only the machine-specific parts of cluster/local.yaml are replaced (head_ip, worker_ips, auth, the cluster
name); the node's environment (its login shell's .bashrc, as on a real node) puts the venv's Ray on the PATH,
keeps Ray on loopback and picks free ports through the variables the config's commands read.
"""

from __future__ import annotations

import getpass
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml
from deploy_support import (
    BIN,
    ROOT,
    free_port,
    listening,
    require,
    require_tools,
    start_group,
    stop_groups,
    user_env,
    wait_for,
)

pytestmark = pytest.mark.deploy

SSHD = "/usr/sbin/sshd"


@pytest.fixture
def private_sshd():
    require_tools(SSHD, "ssh", "ssh-keygen", "rsync", "nc", "unshare")
    require(os.geteuid() == 0, "a new PID namespace for the sshd needs root")
    work = Path(tempfile.mkdtemp(prefix="sgd-ssh-"))  # short: Ray's socket paths must stay under 108 bytes
    os.chmod(work, 0o755)
    home, client_home = work / "home", work / "client"
    (client_home / ".ray").mkdir(parents=True)
    home.mkdir()
    for name in ("host_key", "id"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / name)], check=True)
    shutil.copy(work / "id.pub", work / "authorized_keys")
    # The token the launcher ships to the nodes (file_mounts: ~/.ray/auth_token), made on the client.
    (client_home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    port = free_port()
    ports = {name: free_port() for name in ("RAY_GCS_PORT", "RAY_DASHBOARD_PORT", "RAY_CLIENT_PORT", "RAY_AGENT_PORT")}
    (home / ".bashrc").write_text(
        f"export PATH={BIN}:$PATH RAY_TMPDIR={work}/rt RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 "
        + " ".join(f"{k}={v}" for k, v in ports.items()) + "\n")
    (work / "sshd_config").write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {work}/host_key",
        f"AuthorizedKeysFile {work}/authorized_keys", f"PidFile {work}/sshd.pid", "StrictModes no", "UsePAM no",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "PubkeyAuthentication yes",
        "PermitRootLogin prohibit-password", f"SetEnv HOME={home}", "",
    ]))
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    sshd_cmd = [SSHD, "-D", "-e", "-f", str(work / "sshd_config")]
    sshd = start_group(["unshare", "--pid", "--fork", "--mount-proc", *sshd_cmd], env=user_env(), cwd=work,
                       log=work / "sshd.log")
    try:
        wait_for(lambda: listening(port), "the private sshd", timeout=20, proc=sshd, log=work / "sshd.log")
        yield {"work": work, "home": home, "client_home": client_home, "port": port, "ports": ports}
    finally:
        stop_groups(sshd)
        shutil.rmtree(work, ignore_errors=True)


def _ray(*args: str, env: dict[str, str], log: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "ray"), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    log.write_text(proc.stdout + proc.stderr)
    return proc


def test_ray_up_submit_down_on_loopback(private_sshd):
    work, home = private_sshd["work"], private_sshd["home"]
    config = yaml.safe_load((ROOT / "cluster" / "local.yaml").read_text())
    config["cluster_name"] = f"sgd-dist-test-{secrets.token_hex(4)}"
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config["auth"] = {"ssh_user": getpass.getuser(), "ssh_private_key": str(work / "id"),
                      "ssh_proxy_command": f"nc %h {private_sshd['port']}"}  # the launcher has no port key
    launcher = work / "cluster.yaml"
    launcher.write_text(yaml.safe_dump(config))
    env = user_env(HOME=str(private_sshd["client_home"]))
    gcs_port = private_sshd["ports"]["RAY_GCS_PORT"]

    up = _ray("up", str(launcher), "--yes", "--no-config-cache", env=env, log=work / "up.log")
    try:
        assert up.returncode == 0, (up.stdout + up.stderr)[-3000:]
        assert listening(gcs_port)
        # the project and the token travelled with `ray up`
        assert (home / "sgd_dist" / "sgd_dist" / "__init__.py").is_file() and not (home / "sgd_dist" / ".venv").exists()
        token = (private_sshd["client_home"] / ".ray" / "auth_token").read_text()
        assert (home / ".ray" / "auth_token").read_text() == token

        submit = _ray("submit", str(launcher), "--no-config-cache", "scripts/ray_entry.py", "--",
                      "--config", "configs/lesson2.yaml", "--out", "runs/lesson2", "train.steps=5",
                      "train.eval_every=5",
                      env=env, log=work / "submit.log")
        assert submit.returncode == 0, (submit.stdout + submit.stderr)[-3000:]
        run = home / "sgd_dist" / "runs" / "lesson2"  # on the head, in the project copy ray_entry.py runs from
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["steps"] == 5 and summary["backend"] == "ray"
        assert summary["ray_address"] == f"127.0.0.1:{gcs_port}"  # it joined the launched cluster
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [row["step"] for row in rows] == [0, 1, 2, 3, 4, 5]
        assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 5
    finally:
        down = _ray("down", str(launcher), "--yes", env=env, log=work / "down.log")
    assert down.returncode == 0, (down.stdout + down.stderr)[-3000:]
    assert "ray stop" in down.stdout + down.stderr  # what makes the PID namespace necessary
    wait_for(lambda: not listening(gcs_port), "the head stopping", timeout=30)
