"""Start-up cost: a 1-step lesson-2 run of ``sgd-dist train``, command start to exit, against a bare program
that does only what any torch + Ray program must (issue 11, point 5's last target).

Each runs as a subprocess with its own embedded Ray, the two interleaved, so that drift on a busy machine
falls on both alike; the medians are compared.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import sgd_dist

# Loopback before Ray is imported, as sgd_dist does; two actors that import torch, each called once.
BARE_PROGRAM = """\
import os
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
import torch
import ray

ray.init(address="local", include_dashboard=False)


@ray.remote
class Actor:
    def __init__(self):
        import torch

    def ping(self):
        return 1


actors = [Actor.remote() for _ in range(2)]
ray.get([a.ping.remote() for a in actors])
ray.shutdown()
"""

RUN_TIMEOUT_S = 300


def default_config() -> Path:
    """configs/lesson2.yaml of the source tree this package was installed from (editable install)."""
    return Path(sgd_dist.__file__).resolve().parents[1] / "configs" / "lesson2.yaml"


def _command() -> list[str]:
    script = Path(sys.executable).with_name("sgd-dist")  # the console script a user runs
    return [str(script)] if script.exists() else [sys.executable, "-m", "sgd_dist.cli"]


def _env() -> dict[str, str]:
    """A user's shell: no Ray of ours to join and no loopback switch (each program sets it for itself)."""
    drop = {"RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def _timed(args: list[str], cwd: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"{' '.join(args[:2])} ... exited {proc.returncode}: {tail}")
    return elapsed


def measure_startup(repeats: int, config: Path | None = None,
                    log: Callable[[str], None] = lambda s: None) -> dict:
    """Median seconds, command start to exit, of both programs over ``repeats`` interleaved runs each."""
    config = Path(config) if config else default_config()
    if not config.is_file():
        return {"note": f"skipped: {config} not found (run from a source checkout or pass --startup-config)"}
    sgd_s, bare_s = [], []
    with tempfile.TemporaryDirectory(prefix="sgd-bench-startup-") as tmp:
        bare = Path(tmp, "bare.py")
        bare.write_text(BARE_PROGRAM)
        for i in range(repeats):
            out = Path(tmp, f"run{i}")
            sgd_s.append(_timed([*_command(), "train", "--config", str(config), "--out", str(out),
                                 "train.steps=1"], cwd=tmp))
            shutil.rmtree(out, ignore_errors=True)
            bare_s.append(_timed([sys.executable, str(bare)], cwd=tmp))
            log(f"start-up {i + 1}/{repeats}: sgd-dist train {sgd_s[-1]:.2f} s, bare program {bare_s[-1]:.2f} s")
    sgd_med, bare_med = statistics.median(sgd_s), statistics.median(bare_s)
    return {"sgd_dist_s": sgd_s, "bare_s": bare_s, "sgd_dist_median_s": sgd_med, "bare_median_s": bare_med,
            "ratio": sgd_med / bare_med}
