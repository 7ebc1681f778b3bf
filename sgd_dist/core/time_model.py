"""The one model of time: the coefficients of a machine (``TimeProfile``) and one formula per event.

A virtual cluster's clock and the cost model's predictions both read these, so they cannot disagree. The
coefficients mean what the cost model's do (``grad_s`` + ``grad_s_per_elem`` x rows x parameters, ...), plus a
local SGD step's, a worker replacement's and a server restart's. Every time is in seconds, every size in bytes,
bandwidth in bits per second. Pure arithmetic: no Ray, no I/O (``to_dict``/``from_dict`` give the JSON shape).
"""

from __future__ import annotations

import datetime
import math
from dataclasses import asdict, dataclass, fields

PROFILE_FIELD = "cluster.virtual.profile"  # where a profile comes from in the config: the prefix of its errors
KINDS = ("gradient", "local", "evaluate")  # the command kinds compute_s knows (a LOCAL command: one local step each)


@dataclass(frozen=True, kw_only=True)
class TimeProfile:
    """What one machine's events cost, and where the numbers came from."""

    grad_s: float
    """A GRADIENT command's fixed cost on a worker, in seconds."""
    grad_s_per_elem: float
    """A GRADIENT command's cost per row x parameter of its batch, in seconds."""
    local_s: float
    """One local SGD step's fixed cost on a worker (a LOCAL command of H steps costs H of them), in seconds."""
    local_s_per_elem: float
    """One local SGD step's cost per row x parameter of its batch, in seconds."""
    eval_s: float
    """An EVALUATE command's fixed cost on a worker, in seconds."""
    eval_s_per_elem: float
    """An EVALUATE command's cost per shard row x parameter, in seconds."""
    apply_s: float
    """The server's fixed cost per update (averaging, the optimiser step, publishing), in seconds."""
    apply_s_per_param: float
    """The server's cost per update per parameter, in seconds."""
    message_s: float
    """The server's fixed cost per answer it handles (the transport's work, not the network's), in seconds."""
    message_s_per_byte: float
    """The server's cost per answer per byte of the answer, in seconds."""
    replacement_s: float
    """From a lost worker's notice until its replacement can be sent the lost command, in seconds."""
    restart_s: float
    """From a lost server until its replacement resumes from the last checkpoint, in seconds."""
    cores: int
    """Cores of the machine the coefficients were measured on."""
    source: str
    """Where the numbers came from: free text (the command that measured them, the machine, ...)."""
    date: str
    """When they were measured: an ISO date, YYYY-MM-DD."""
    ray_message_s: float | None = None
    """As ``message_s``, on the ray (channel) transport, which carries messages between nodes; None: not measured."""
    ray_message_s_per_byte: float | None = None
    """As ``message_s_per_byte``, on the ray (channel) transport; None: not measured."""

    def __post_init__(self) -> None:
        problem = _problem(asdict(self))
        if problem:
            raise ValueError(f"{PROFILE_FIELD}: {problem}")


COEFFICIENTS = tuple(f.name for f in fields(TimeProfile) if f.type.startswith("float"))
OPTIONAL = tuple(f.name for f in fields(TimeProfile) if f.type == "float | None")  # a profile file may leave out
TRANSPORTS = ("shm", "ray")  # the transports whose per-answer costs a profile holds


def _problem(values: dict) -> str | None:
    """What is wrong with a profile's ``values`` (one line naming the field), or None."""
    for name in COEFFICIENTS:
        value = values.get(name)
        if value is None and name in OPTIONAL:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{name} must be a number of seconds (got {value!r})"
        if not (math.isfinite(value) and value >= 0):
            return f"{name} must be >= 0 (got {value!r})"
    cores = values["cores"]
    if isinstance(cores, bool) or not isinstance(cores, int) or cores < 1:
        return f"cores must be a whole number >= 1 (got {cores!r})"
    if not isinstance(values["source"], str) or not values["source"].strip():
        return f"source must say where the numbers came from (got {values['source']!r})"
    try:
        datetime.date.fromisoformat(values["date"])
    except (TypeError, ValueError):
        return f"date must be an ISO date YYYY-MM-DD (got {values['date']!r})"
    return None


def to_dict(profile: TimeProfile) -> dict:
    """The profile as plain JSON values."""
    return asdict(profile)


def from_dict(values: dict, where: str = PROFILE_FIELD) -> TimeProfile:
    """A profile from ``values`` (as ``to_dict`` writes it); a bad one raises ValueError naming ``where`` and the
    field."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: a profile is a mapping of its fields (got {type(values).__name__})")
    names = [f.name for f in fields(TimeProfile)]
    unknown = sorted(set(values) - set(names))
    missing = [name for name in names if name not in values and name not in OPTIONAL]
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r}; allowed: {', '.join(names)}")
    if missing:
        raise ValueError(f"{where}: missing field {missing[0]!r}")
    problem = _problem(values)
    if problem:
        raise ValueError(f"{where}: {problem}")
    return TimeProfile(**values)


def compute_s(profile: TimeProfile, kind: str, rows: int, params: int, local_steps: int = 1) -> float:
    """A worker's seconds on one command, on a core of its own: overhead + cost per row x parameter.

    ``rows``: the batch's rows (gradient, and each local step) or the shard's (evaluate); ``params``: the model's
    parameters; ``local_steps``: the steps of a local command (1 for the other kinds).
    """
    if kind == "gradient":
        return profile.grad_s + profile.grad_s_per_elem * rows * params
    if kind == "local":
        return local_steps * (profile.local_s + profile.local_s_per_elem * rows * params)
    if kind == "evaluate":
        return profile.eval_s + profile.eval_s_per_elem * rows * params
    raise ValueError(f"command kind {kind!r} has no compute time; allowed: {', '.join(KINDS)}")


def server_update_s(profile: TimeProfile, params: int) -> float:
    """The server's seconds for one update of ``params`` parameters."""
    return profile.apply_s + profile.apply_s_per_param * params


def server_answer_s(profile: TimeProfile, nbytes: int, transport: str = "shm") -> float:
    """The server's seconds to handle one answer of ``nbytes`` bytes that came on ``transport`` (shm: within a
    node; ray: the channels between nodes). ValueError if the profile has no coefficients for that transport."""
    if transport == "shm":
        return profile.message_s + profile.message_s_per_byte * nbytes
    if transport != "ray":
        raise ValueError(f"transport {transport!r} has no per-answer cost; allowed: {', '.join(TRANSPORTS)}")
    if profile.ray_message_s is None or profile.ray_message_s_per_byte is None:
        raise ValueError(f"{PROFILE_FIELD}: this profile has no ray_message_s and ray_message_s_per_byte "
                         "(sgd-dist calibrate measures them)")
    return profile.ray_message_s + profile.ray_message_s_per_byte * nbytes


def message_s(latency_s: float, bandwidth_bps: float | None, nbytes: int) -> float:
    """One message alone on a link: latency + bytes x 8 / bandwidth (``bandwidth_bps`` None: unlimited)."""
    return latency_s + (0.0 if bandwidth_bps is None else nbytes * 8 / bandwidth_bps)


def describe(profile: TimeProfile) -> list[str]:
    """Every term, for the console and the summary."""

    def us(seconds: float) -> str:
        return f"{seconds * 1e6:.4g} us"

    return [
        f"gradient      {us(profile.grad_s)} + {profile.grad_s_per_elem * 1e9:.4g} ns x rows x parameters",
        f"local step    {us(profile.local_s)} + {profile.local_s_per_elem * 1e9:.4g} ns x rows x parameters",
        f"evaluation    {us(profile.eval_s)} + {profile.eval_s_per_elem * 1e9:.4g} ns x shard rows x parameters",
        f"server update {us(profile.apply_s)} + {profile.apply_s_per_param * 1e9:.4g} ns x parameters",
        f"server answer {us(profile.message_s)} + {profile.message_s_per_byte * 1e9:.4g} ns x bytes (shm)",
        "ray answer    " + ("not measured" if profile.ray_message_s is None or profile.ray_message_s_per_byte is None
                            else f"{us(profile.ray_message_s)} + {profile.ray_message_s_per_byte * 1e9:.4g} ns x "
                                 "bytes (the channels between nodes)"),
        f"replacement   {profile.replacement_s:.4g} s; server restart {profile.restart_s:.4g} s",
        f"measured on {profile.cores} cores, {profile.date}: {profile.source}",
    ]
