"""The cluster a plan is for (``sgd-dist plan --cluster FILE``): a validated description, and the config
overrides that make a virtual run of it at K workers.

A description holds what a user knows about a cluster they may not have: how many workers at most and how many
to a node, the network, how fast each worker computes (factors by worker or by node, or a lognormal spread),
the straggler delays (the ``stragglers:`` keys a run config has), the failure rates, and the machine's time
profile (a file ``sgd-dist calibrate`` wrote, coefficients by hand over the shipped profile, or null: the
shipped one). Every field maps onto ``cluster.virtual``, ``cluster.network`` or ``stragglers``: the virtual run
models exactly what the description says, nothing else. Errors are one line naming the field.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sgd_dist.backends.virtual import SHIPPED_PROFILE, load_profile
from sgd_dist.config import (
    ConfigError,
    Count,
    NetworkConfig,
    StragglersConfig,
    _read_yaml,
    format_validation_error,
)
from sgd_dist.core.time_model import TimeProfile, from_dict, to_dict


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, use_attribute_docstrings=True)


def _factors(value: dict[int, float], what: str) -> dict[int, float]:
    for index, factor in value.items():
        if index < 0 or not (factor > 0 and math.isfinite(factor)):
            raise ValueError(f"needs {what} index >= 0 -> factor > 0 (got {index}: {factor})")
    return value


class SpeedSpec(_Spec):
    workers: dict[int, float] = {}
    """Worker index -> compute-time multiplier (2.0 computes half as fast); unlisted workers 1.0."""
    nodes: dict[int, float] = {}
    """Node index -> compute-time multiplier for every worker on it (node n holds workers n x workers_per_node ..);
    multiplies with the worker's own factor."""
    sigma: float = Field(0.0, ge=0)
    """Each worker's compute time is also multiplied by exp(sigma x N(0, 1)), drawn once per worker (lognormal
    spread of mixed hardware); 0: off."""

    @field_validator("workers")
    @classmethod
    def _workers(cls, value: dict[int, float]) -> dict[int, float]:
        return _factors(value, "worker")

    @field_validator("nodes")
    @classmethod
    def _nodes(cls, value: dict[int, float]) -> dict[int, float]:
        return _factors(value, "node")


class FailureSpec(_Spec):
    worker_mtbf_s: float | None = Field(None, gt=0)
    """Mean time between failures of one worker, in seconds (exponential); null: workers do not fail. A cluster of K
    workers then loses one every worker_mtbf_s / K seconds."""
    server_mtbf_s: float | None = Field(None, gt=0)
    """Mean time between failures of the parameter server, in seconds; each rolls the run back to its last
    checkpoint (train.checkpoint_every) after the profile's restart_s; null: it does not fail."""


class ClusterSpec(_Spec):
    name: str | None = None
    """What to call the cluster in the plan's output; null: the file's stem."""
    max_workers: Count = Field(ge=1)
    """The most workers the cluster can give a run; the plan tries worker counts up to it."""
    workers_per_node: Count | None = Field(None, ge=1)
    """Workers to a node: the server is on node 0 with workers 0 .. m-1, whose messages skip the network; null: every
    worker on a node of its own."""
    network: NetworkConfig = NetworkConfig()
    """latency_ms and bandwidth_gbps of each link between a worker and the server; the server's link is shared."""
    cores: Count | None = Field(None, ge=1)
    """Cores shared by every process (a cluster that is one machine, as this one); null: a core for each."""
    speed: SpeedSpec = SpeedSpec()
    """How fast each worker computes: factors by worker or node, and a lognormal spread."""
    stragglers: StragglersConfig = StragglersConfig()
    """Slowdowns and random delays of the workers' answers, the keys of a run config's stragglers section; it replaces
    the problem's own stragglers section when given."""
    failures: FailureSpec = FailureSpec()
    """Random worker and server failures."""
    profile: str | dict[str, Any] | None = None
    """The machine's time profile: a TimeProfile JSON written by sgd-dist calibrate (relative to this file), a
    mapping of coefficients by hand over the shipped profile (e.g. {message_s: 5e-5}), or null: the shipped one."""
    seed: int = Field(0, ge=0)
    """Seeds the speed spread and the random failures (cluster.virtual.seed; the straggler delays have
    stragglers.seed)."""

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty (null: the file's stem)")
        return value

    @model_validator(mode="after")
    def _check(self) -> ClusterSpec:
        top = self.max_workers - 1
        named = [("speed.workers", list(self.speed.workers)), ("stragglers.slowdown", list(self.stragglers.slowdown)),
                 ("stragglers.delay_workers", list(self.stragglers.delay_workers or []))]
        for field, workers in named:
            if workers and max(workers) > top:
                raise ValueError(f"{field} names worker {max(workers)}; workers are 0..{top} (max_workers="
                                 f"{self.max_workers})")
        if self.speed.nodes:
            if self.workers_per_node is None:
                raise ValueError("speed.nodes needs workers_per_node (which workers a node holds)")
            nodes = math.ceil(self.max_workers / self.workers_per_node)
            if max(self.speed.nodes) >= nodes:
                raise ValueError(f"speed.nodes names node {max(self.speed.nodes)}; nodes are 0..{nodes - 1} "
                                 f"(max_workers={self.max_workers}, workers_per_node={self.workers_per_node})")
        if self.stragglers.delay != "none" and self.stragglers.delay_ms == 0:
            raise ValueError(f"stragglers.delay={self.stragglers.delay} needs stragglers.delay_ms > 0")
        return self

    def factor(self, worker: int) -> float:
        """Worker ``worker``'s compute-time multiplier from the worker and node factors (the lognormal spread is
        drawn by the virtual backend)."""
        node = None if self.workers_per_node is None else worker // self.workers_per_node
        return self.speed.workers.get(worker, 1.0) * self.speed.nodes.get(node, 1.0)

    def uneven(self, workers: int) -> bool:
        """Whether ``workers`` workers compute at different speeds (factors or a spread)."""
        return workers > 1 and (self.speed.sigma > 0 or len({self.factor(r) for r in range(workers)}) > 1)


def stragglers_among(stragglers: dict[str, Any], workers: int) -> bool:
    """Whether a stragglers section (as a mapping) slows or delays any of workers 0 .. workers - 1."""
    if any(int(r) < workers for r in (stragglers.get("slowdown") or {})):
        return True
    delayed = stragglers.get("delay_workers")
    return stragglers.get("delay", "none") != "none" and (delayed is None or any(r < workers for r in delayed))


def load_cluster(path: str | Path) -> tuple[ClusterSpec, TimeProfile]:
    """Read and validate a cluster description and its time profile; ConfigError in one line naming the field."""
    path = Path(path)
    where = f"cluster {str(path)!r}"
    raw = _read_yaml(path)
    try:
        spec = ClusterSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {format_validation_error(exc)}") from None
    return spec, resolve_profile(spec.profile, path.parent, where)


def resolve_profile(profile: str | dict | None, root: Path, where: str) -> TimeProfile:
    """The description's profile: a file (relative to ``root``), coefficients over the shipped profile, or the
    shipped one."""
    if profile is None:
        return load_profile(None)
    if isinstance(profile, str):
        file = Path(profile) if Path(profile).is_absolute() else root / profile
        try:
            return load_profile(str(file))
        except ConfigError as exc:
            raise ConfigError(f"{where}: profile: {exc}") from None
    values = {**to_dict(load_profile(None)), **profile}
    if "source" not in profile:
        values["source"] = (f"coefficients by hand ({', '.join(sorted(profile))}) over the shipped "
                            f"{SHIPPED_PROFILE.name}")
    try:
        return from_dict(values, "profile")
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def write_profile(profile: TimeProfile, path: Path) -> Path:
    """The resolved profile as a TimeProfile JSON, for every run of the plan to name."""
    path.write_text(json.dumps(to_dict(profile), indent=2) + "\n")
    return path


def cluster_section(spec: ClusterSpec, profile_path: str) -> dict[str, Any]:
    """The cluster section of a virtual run of this cluster, but the worker count and the speed factors (which
    depend on it: ``speed_factors``)."""
    return {
        "backend": "virtual", "network": spec.network.model_dump(mode="json"),
        "virtual": {"profile": profile_path, "workers_per_node": spec.workers_per_node, "cores": spec.cores,
                    "speed_sigma": spec.speed.sigma, "worker_mtbf_s": spec.failures.worker_mtbf_s,
                    "server_mtbf_s": spec.failures.server_mtbf_s, "seed": spec.seed},
    }


def speed_factors(spec: ClusterSpec, workers: int) -> dict[int, float]:
    """cluster.virtual.speed at ``workers`` workers: the factors other than 1 of workers 0 .. workers - 1."""
    return {r: spec.factor(r) for r in range(workers) if spec.factor(r) != 1.0}


def stragglers_at(stragglers: dict[str, Any], workers: int) -> dict[str, Any]:
    """A stragglers section (as a mapping) at ``workers`` workers: the slowdowns and delay workers beyond it left
    out."""
    out = dict(stragglers)
    out["slowdown"] = {int(r): f for r, f in (stragglers.get("slowdown") or {}).items() if int(r) < workers}
    if stragglers.get("delay_workers") is not None:
        out["delay_workers"] = [r for r in stragglers["delay_workers"] if r < workers]
    return out
