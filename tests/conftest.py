"""Shared fixtures: one embedded Ray per test session (ray.init costs 2-4 s here), tiny configs."""

from __future__ import annotations

import os

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


@pytest.fixture(scope="session")
def ray_session():
    """The one Ray of this test session, local and bound to loopback."""
    from sgd_dist.backends.ray_backend import init_ray

    import ray

    started = init_ray(num_cpus=SESSION_CPUS)
    yield ray
    if started:
        ray.shutdown()
