"""Backends run the same workers and server over different transports: ``serial`` (one process, the
reference), ``virtual`` (one process, on a modelled cluster's clock) and ``ray`` (actors on a Ray cluster)."""

from __future__ import annotations

from sgd_dist.backends.base import Backend
from sgd_dist.backends.ray.backend import RayBackend
from sgd_dist.backends.serial import SerialBackend
from sgd_dist.backends.virtual import VirtualBackend
from sgd_dist.config import Config


def make_backend(config: Config) -> Backend:
    if config.cluster.backend == "virtual":
        return VirtualBackend(config)
    return SerialBackend(config) if config.cluster.backend == "serial" else RayBackend(config)
