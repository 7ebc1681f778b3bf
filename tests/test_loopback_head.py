"""The README's loopback head, run as written: `.venv/bin/ray start --head` with the venv off the PATH.

The README's lines run in one bash script (ports made free, HOME and Ray's temp root made private so that the
token and the session files are this test's), with one `sgd-dist submit` put in before the last line: the job
must run with the head's own interpreter, the venv's, though the head's PATH has no venv on it. The last line
must then stop that cluster, every process of it, and leave the other Ray of this test session running.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from deploy_support import BIN, ROOT, free_port

pytestmark = pytest.mark.deploy


def _recipe() -> list[str]:
    """The README's loopback block: its lines, in order."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"On one machine, on\nloopback.*?```bash\n(.*?)```", readme, flags=re.S)
    assert block, "the README's loopback recipe is gone"
    return block.group(1).strip().splitlines()


def _head_logs(work: Path, lines: int = 15) -> str:
    """The tails of the head's own logs, for a failure's message."""
    parts, own = [], ("dashboard_agent", "raylet", "gcs", "job")
    for path in sorted((work / "ray").glob("ray/session_latest/logs/*")):
        if path.suffix in (".log", ".err", ".out") and path.name.startswith(own):
            parts.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
    return "\n".join(parts)


def _cluster_pids(marker: str) -> list[int]:
    """The live (not zombie) processes whose environment holds ``marker`` (the cluster's private RAY_TMPDIR):
    every process of that cluster, whatever its process group (Ray gives each worker one of its own), the job's
    driver too."""
    found = []
    for pid in Path("/proc").glob("[0-9]*"):
        try:
            if marker.encode() not in (pid / "environ").read_bytes().split(b"\0"):
                continue
            text = (pid / "stat").read_text()
        except OSError:
            continue
        if text[text.rindex(")") + 2:].split()[0] != "Z":
            found.append(int(pid.name))
    return found


def _cmdline(pid: int) -> str:
    try:
        return f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return f"{pid}: gone"


def _cluster_processes(marker: str) -> list[str]:
    """The names of the processes ``_cluster_pids`` finds."""
    names = []
    for pid in _cluster_pids(marker):
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        names.append(text[text.index("(") + 1:text.rindex(")")])
    return names


def test_the_readme_recipe_trains_runs_a_job_with_the_heads_python_and_stops_only_its_cluster(ray_session, tmp_path):
    lines = _recipe()
    assert lines[-1].startswith("kill -- -$!") and "ray stop" not in "\n".join(lines[:-1])
    gcs, dashboard, agent = free_port(), free_port(), free_port()  # the defaults may be another cluster's here
    work = Path(tempfile.mkdtemp(prefix="sgd-head-"))  # short: Ray's socket paths must stay under 108 bytes
    try:
        script = [line.replace("6379", str(gcs)).replace("8265", str(dashboard)).replace("52365", str(agent))
                  .replace("> ray-head.log", f"> {work / 'head.log'}") for line in lines]
        submit = (f".venv/bin/sgd-dist submit --address http://127.0.0.1:{dashboard} --config configs/lesson2.yaml "
                  f"--out {tmp_path / 'job'} train.steps=5 train.eval_every=5 output.plots=false")
        start = next(i for i, line in enumerate(script) if "ray start --head" in line)
        script.insert(start + 1, f'echo "$!" > {work / "head.pgid"}')
        script[-1:-1] = [submit]
        env = {"HOME": str(work / "home"), "PATH": "/usr/bin:/bin", "RAY_TMPDIR": str(work / "ray"), "LANG": "C.UTF-8"}
        (work / "home").mkdir()
        for name in (".venv", "configs"):  # the recipe's relative paths; its runs/ goes here, not into the repo
            (work / name).symlink_to(ROOT / name)
        proc = subprocess.run(["bash", "-e", "-c", "\n".join(script)], cwd=work, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + _head_logs(work)
        # the README's training on the cluster
        assert re.search(r"^done: 2000 steps in ", proc.stdout, flags=re.M), proc.stdout[-3000:]
        # the job ran with the venv's python, found from the head's own process, not the PATH's (which has none
        # with torch)
        job = re.search(r"sgd-dist job: sgd_dist \S+ from \S+ \(python (\S+)\)", proc.stdout)
        assert job and Path(job.group(1)).parent == BIN, proc.stdout[-3000:]
        assert (tmp_path / "job" / "summary.json").is_file()
        # the last line stopped that cluster, all of it, and only it. A worker Ray was starting when the group was
        # killed is in a process group of its own: it exits when it finds no raylet, seconds later on a loaded
        # machine, so the check waits for that (a cluster left running would stay: its raylet and GCS)
        marker, deadline = f"RAY_TMPDIR={work / 'ray'}", time.monotonic() + 30
        while (left := _cluster_processes(marker)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert left == [], [_cmdline(pid) for pid in _cluster_pids(marker)]
        assert ray_session.get(ray_session.put("still here")) == "still here"
    finally:
        if (work / "head.pgid").is_file():  # the script stopped early: stop its head here
            try:
                os.killpg(int((work / "head.pgid").read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(work, ignore_errors=True)
