"""Shared fixtures: one embedded Ray per test session (ray.init costs 2-4 s here), tiny configs."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

import pytest

from sgd_dist.config import Config, build_config

SESSION_CPUS = 8  # logical CPUs for the shared Ray: enough for 4 workers plus headroom on a 2-core machine


def make_config(*overrides: str, **sections) -> Config:
    """A tiny valid config: 512 rows x 3 features over 2 workers, 20 steps; override with key=value strings."""
    raw = {
        "data": {"n_samples": 512, "n_features": 3, "seed": 7},
        "optim": {"lr": 0.1},
        "cluster": {"num_workers": 2},
        "train": {"steps": 20, "batch_size": 16, "eval_every": 5, "log_every": 0},
        "output": {"plots": False},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return build_config(raw, overrides)


def assert_png(path) -> None:
    """A real figure: PNG bytes that matplotlib decodes into a sizeable image with something drawn on it."""
    from matplotlib.image import imread

    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert len(data) > 10_000, (path, len(data))
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] >= 300 and image.shape[1] >= 300, image.shape
    assert image[..., :3].std() > 0.05, path  # not one flat colour


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid and pid != ancestor:
        pid = _parent(pid) or 0
    return pid == ancestor


def shm_entries_of(root: int) -> set[str]:
    """The /dev/shm entries that process ``root`` or its descendants (an embedded Ray's raylet and actors) made
    and still hold: sgd_dist's segments, named after the process that created them, and Ray's channel
    semaphores, named after their raylet. Read while the run is going: once it ended, its pids are gone."""
    from sgd_dist.transports.shm import PREFIX, SHM_DIR

    found = set()
    for path in SHM_DIR.iterdir():
        name = path.name
        if name.startswith(PREFIX):
            pid = name[len(PREFIX):].split("-")[0]
        elif name.startswith(("sem.hdr", "sem.obj")):
            pid = name.split("-")[0][len("sem.hdr"):]
        else:
            continue
        if pid.isdigit() and _descends_from(int(pid), root):
            found.add(name)
    return found


@pytest.fixture(scope="session")
def ray_session():
    """The one Ray of this test session, local and bound to loopback."""
    import ray

    from sgd_dist.backends.ray.cluster import init_ray

    started = init_ray(num_cpus=SESSION_CPUS)
    yield ray
    if started:
        ray.shutdown()
        from sgd_dist.transports.channel import sweep_stale_semaphores

        sweep_stale_semaphores()  # Ray leaves its channels' semaphores behind its raylet


def inject_server_failure(ray, monkeypatch, fail_at: int) -> None:
    """Make the Ray backend's server actor fail at update ``fail_at + 1`` (a RuntimeError naming it)."""
    from sgd_dist.backends.ray import actors
    from sgd_dist.engine.server import ParameterServer

    class FailingParameterServer(ParameterServer):  # defined in a function: Ray pickles it by value into the actor
        def update(self, results, **kwargs):
            if self.step == fail_at:
                raise RuntimeError(f"injected failure at update {fail_at + 1}")
            return super().update(results, **kwargs)

    class FailingServer(actors.Server):
        def __init__(self, server_kwargs, *args):
            super().__init__(server_kwargs, *args)
            self.server = FailingParameterServer(**server_kwargs)

    monkeypatch.setattr(actors, "ServerActor", ray.remote(FailingServer))
