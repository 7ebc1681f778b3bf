"""The virtual backend: a modelled cluster in this one process, on the clock the time model advances.

The workers are plain ``ShardWorker`` objects (their shards sliced from the dataset generated once: the same
values as generating each), the server a plain ``ParameterServer``, and the loop the one every backend runs,
over the virtual transport (``transports/virtual.py``): the numbers are the serial reference's, the times,
the order of arrivals and so the staleness are the modelled cluster's. The model's coefficients come from a
time profile (``cluster.virtual.profile``, or the one shipped in ``profiles/default.json``).

Faults happen on the virtual clock: ``kill_worker`` right after its update (its replacement is up the
profile's ``replacement_s`` later), ``kill_server`` right after its update (the run goes on from the last
checkpoint ``restart_s`` later, by the restart protocol every backend shares: ``backends/restarts.py``), and
random failures of each worker and of the server at exponential times keyed by ``cluster.virtual.seed``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Collection, Sequence

import torch

from sgd_dist.backends.base import Sink, server_args, worker_args
from sgd_dist.backends.restarts import ServerRestarts
from sgd_dist.backends.serial import InProcessBackend
from sgd_dist.config import Config, ConfigError, VirtualConfig
from sgd_dist.core.data import generate, generator
from sgd_dist.core.objectives import Float64Chunks
from sgd_dist.core.time_model import COEFFICIENTS, PROFILE_FIELD, TimeProfile, describe, from_dict
from sgd_dist.engine.delays import describe_network
from sgd_dist.engine.loop import Loop
from sgd_dist.engine.recovery import LoopHooks
from sgd_dist.engine.server import ParameterServer
from sgd_dist.engine.worker import ShardWorker
from sgd_dist.transports.virtual import VirtualServerEnd

SHIPPED_PROFILE = Path(__file__).parent / "profiles" / "default.json"
# random streams of their own (data.py uses 0-2, the straggler delays 3)
_STREAM_SPEED, _STREAM_WORKER_FAILURES, _STREAM_SERVER_FAILURES = 4, 5, 6


def load_profile(path: str | None) -> TimeProfile:
    """The time profile at ``path`` (None: the shipped one); ConfigError in one line naming the field."""
    file = SHIPPED_PROFILE if path is None else Path(path)
    where = f"{PROFILE_FIELD}={str(file)!r}"
    try:
        values = json.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{where} does not exist (a TimeProfile JSON; null: the shipped profile)") from None
    except OSError as exc:
        raise ConfigError(f"{where} cannot be read: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"{where} is not JSON: {exc}") from None
    try:
        return from_dict(values, where)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def speed_factors(virtual: VirtualConfig, num_workers: int) -> list[float]:
    """Each worker's compute-time multiplier: its ``speed`` entry times exp(speed_sigma x N(0, 1)) keyed by
    (seed, worker)."""
    factors = []
    for r in range(num_workers):
        factor = virtual.speed.get(r, 1.0)
        if virtual.speed_sigma:
            z = torch.randn((), generator=generator(virtual.seed, _STREAM_SPEED, r), dtype=torch.float64).item()
            factor *= math.exp(virtual.speed_sigma * z)
        factors.append(factor)
    return factors


def failure_after_s(mtbf_s: float, seed: int, stream: int, *key: int) -> float:
    """An exponential time of mean ``mtbf_s``, a pure function of (seed, stream, key)."""
    u = torch.rand((), generator=generator(seed, stream, *key), dtype=torch.float64).item()
    return -mtbf_s * math.log1p(-u)


def sliced_workers(config: Config, device: str) -> list[ShardWorker]:
    """The shard workers, their rows sliced from the dataset generated once, without the waits they would sleep
    (stragglers, the network, delay faults: the virtual transport models those)."""
    X, y = generate(config.data, device=device)
    quiet = {"stragglers": None, "network": None, "delays": None}
    workers = [ShardWorker(**{**args, **quiet}, device=device, shard=(X[args["start"]:args["stop"]],
                                                                      y[args["start"]:args["stop"]]))
               for args in worker_args(config)]
    # one set of float64 chunk buffers per shard size (there are at most two), not one per worker: the workers run
    # one at a time here, and K sets would hold n x d float64 values in all (800 MB at 1,024 rows x 1e5
    # parameters: the dataset twice over)
    chunks: dict[int, Float64Chunks] = {}
    for worker in workers:
        worker.chunks = chunks.setdefault(worker.X.shape[0], Float64Chunks())
    return workers


class _ServerDown(Exception):
    """The server failed at virtual time ``at_s``, after update ``step``."""

    def __init__(self, cause: str, step: int, at_s: float) -> None:
        super().__init__(cause)
        self.step, self.at_s = step, at_s


class VirtualFaults:
    """The run's faults on the virtual clock: the configured kills (each once, also across a server restart) and
    the random failures, drawn in order per worker and for the server (keyed by seed, worker, failure)."""

    def __init__(self, config: Config, profile: TimeProfile) -> None:
        virtual = config.cluster.virtual
        self.kills = [f for f in config.faults if f.kind in ("kill_worker", "kill_server")]
        self.seed, self.worker_mtbf_s, self.server_mtbf_s = virtual.seed, virtual.worker_mtbf_s, virtual.server_mtbf_s
        self.replacement_s = profile.replacement_s
        self.worker_draws = [0] * config.cluster.num_workers  # failures drawn per worker: the next draw's key
        self.server_draws = 0
        self.pending: dict[int, float] = {}  # worker -> when its next loss happens (or happened, unnoticed)
        self.server_fails_s = math.inf
        self.end: VirtualServerEnd | None = None
        self.sink: Sink | None = None

    def attach(self, end: VirtualServerEnd, sink: Sink, start_s: float) -> None:
        """A server starts at ``start_s`` on ``end``: the random failures from then on."""
        self.end, self.sink, self.pending = end, sink, {}
        if self.worker_mtbf_s is not None:
            for worker in range(len(self.worker_draws)):
                self._schedule(worker, start_s)
        if self.server_mtbf_s is not None:
            self.server_fails_s = start_s + failure_after_s(self.server_mtbf_s, self.seed, _STREAM_SERVER_FAILURES,
                                                            self.server_draws)
            self.server_draws += 1

    def _schedule(self, worker: int, from_s: float) -> None:
        at_s = from_s + failure_after_s(self.worker_mtbf_s, self.seed, _STREAM_WORKER_FAILURES, worker,
                                        self.worker_draws[worker])
        self.worker_draws[worker] += 1
        self.pending[worker] = at_s
        self.end.lose(worker, at_s)

    def hooks(self, restarts: ServerRestarts, checkpoint_every: int) -> LoopHooks:
        """The loop's hooks: replacements, checkpoints (kept for a restart), the kills, the faults' records."""
        def on_checkpoint(state: dict) -> None:
            restarts.checkpointed(state)
            self.sink.checkpoint(state)

        due = self.kills or self.server_mtbf_s is not None
        return LoopHooks(recover=self.recover, checkpoint_every=checkpoint_every, on_checkpoint=on_checkpoint,
                         on_update=self.on_update if due else None, on_fault=self.on_fault)

    def recover(self, worker: int):
        """Start replacing ``worker``; its next random failure is drawn from when the replacement is up."""
        ready = self.end.start_replacement(worker)
        if self.worker_mtbf_s is not None and self.pending.get(worker, math.inf) <= self.end.now():
            self._schedule(worker, self.end.now() + self.replacement_s)
        return ready

    def on_fault(self, entry: dict) -> None:
        if entry["fault"] == "worker_lost":
            lost_s = self.pending.get(entry["worker"])
            if lost_s is not None and lost_s <= self.end.now():
                entry.update(lost_at_s=lost_s, noticed_s=self.end.now() - lost_s)
        self.sink.fault(entry)

    def on_update(self, version: int) -> None:
        """The kills due at this update; a random server failure since the last one stops the server (its
        updates after the failure are rolled back with the rest: the same run as stopping it at that time)."""
        now = self.end.now()
        if now >= self.server_fails_s:
            raise _ServerDown(f"random server failure at {self.server_fails_s:.6g} s (virtual; "
                              "cluster.virtual.server_mtbf_s)", version - 1, self.server_fails_s)
        for fault in [f for f in self.kills if f.step == version]:
            self.kills.remove(fault)
            if fault.kind == "kill_worker":
                self.pending[fault.worker] = now
                self.sink.fault({"fault": "kill_worker", "worker": fault.worker, "step": version, "at_s": now})
                self.end.lose(fault.worker)
            else:
                self.sink.fault({"fault": "kill_server", "step": version, "at_s": now})
                raise _ServerDown(f"killed at update {version} (faults: kill_server)", version, now)


class VirtualBackend(InProcessBackend):
    name = "virtual"

    def __init__(self, config: Config) -> None:
        self.profile = load_profile(config.cluster.virtual.profile)
        self.speed_factors = speed_factors(config.cluster.virtual, config.cluster.num_workers)
        self.end_s = 0.0  # the virtual clock when the run ended
        super().__init__(config)
        self.transport = "virtual"

    def make_workers(self, config: Config) -> list[ShardWorker]:
        """Shards sliced from the dataset generated once (the same values as each worker generating its own)."""
        return sliced_workers(config, self.device)

    def worker_info(self) -> list[dict]:
        """Each worker's ``info()``; the process's part of it (host, pid, peak memory: one process holds every
        worker) is read once, not K times (a getrusage and a gethostname each: seconds at 10,000 workers)."""
        first = self.workers[0].info()
        return [first] + [{**first, "rank": w.rank, "rows": [w.start, w.stop], "device": str(w.device),
                           "data_bytes": w.X.nbytes + w.y.nbytes} for w in self.workers[1:]]

    def make_end(self, start_s: float) -> VirtualServerEnd:
        """The virtual transport over this backend's workers, its clock at ``start_s``."""
        config = self.config
        network, stragglers = config.cluster.network, config.stragglers
        delays: dict[int, dict[int, float]] = {}
        for f in config.faults:
            if f.kind == "delay":
                delays.setdefault(f.worker, {})[f.step] = f.seconds
        return VirtualServerEnd(
            self.workers, self.profile, latency_s=network.latency_ms / 1e3,
            bandwidth_bps=None if network.bandwidth_gbps is None else network.bandwidth_gbps * 1e9,
            workers_per_node=config.cluster.virtual.workers_per_node, cores=config.cluster.virtual.cores,
            speed_factors=self.speed_factors, delays=delays, start_s=start_s,
            stragglers=stragglers if stragglers.slowdown or stragglers.delay != "none" else None)

    def run(self, policy, eval_at: Collection[int], sink: Sink, restore: dict | None = None) -> None:
        """Train on the virtual clock; a lost server is restored from the latest checkpoint (or restarted from step
        0 without one) ``restart_s`` virtual seconds later, and the steps since are redone."""
        restarts = ServerRestarts(policy, restore)
        faults = VirtualFaults(self.config, self.profile)
        start_s = 0.0 if restore is None else float(restore["elapsed_s"])
        while True:
            end = self.make_end(start_s)
            faults.attach(end, sink, start_s)
            hooks = faults.hooks(restarts, self.config.train.checkpoint_every)
            try:
                self.loop_stats = self._loop(end, policy, eval_at, sink, hooks, restore, start_s)
                self.end_s = end.now()
                return
            except _ServerDown as down:
                policy, restore, entry = restarts.restart(sink, down.step, str(down))
                start_s = down.at_s + self.profile.restart_s
                sink.fault({**entry, "lost_at_s": down.at_s, "recovery_s": self.profile.restart_s})
                self.server = ParameterServer(**server_args(self.config))
                if restore is not None:  # its rows' times go on from the lost server's, the restart included
                    restore = {**restore, "elapsed_s": start_s}
            finally:
                end.close()

    def _loop(self, end: VirtualServerEnd, policy, eval_at: Collection[int], sink: Sink, hooks: LoopHooks,
              restore: dict | None, elapsed_s: float) -> dict:
        """The server's loop over ``end``, called as every backend calls it."""
        return Loop(self.server, end, policy, self.config.cluster.num_workers, eval_at, sink.rows,
                    staleness_lr=self.config.optim.staleness_lr, hooks=hooks, restore=restore,
                    elapsed_s=elapsed_s).run()

    def clock_summary(self) -> dict:
        return {"clock": "virtual", "time_model": time_model_summary(self.config, self.profile, self.speed_factors,
                                                                     self.end_s)}


def time_model_summary(config: Config, profile: TimeProfile, factors: Sequence[float], end_s: float) -> dict:
    """Every term of the time model a virtual run used, and where its coefficients came from."""
    virtual, network = config.cluster.virtual, config.cluster.network
    slow = {r: f for r, f in enumerate(factors) if f != 1.0}
    terms = describe(profile) + [
        f"network       {describe_network(network)} per link; the server's link is shared (messages queue on it)",
        "nodes         " + ("each worker on a node of its own" if virtual.workers_per_node is None else
                            f"{virtual.workers_per_node} workers a node; node 0's skip the network"),
        "cores         " + ("a core for every process" if virtual.cores is None else
                            f"{virtual.cores} shared by the computing workers and the server"),
        f"speed         {len(slow)} of {len(factors)} workers compute at other than 1x"
        + (f" (factors {min(factors):.3g} .. {max(factors):.3g})" if slow else ""),
        "stragglers    the stragglers section's slowdowns and keyed delays, waits holding no core",
        f"failures      random: worker MTBF {_seconds(virtual.worker_mtbf_s)}, server MTBF "
        f"{_seconds(virtual.server_mtbf_s)} (virtual, seed {virtual.seed}); the faults section at virtual updates",
    ]
    return {
        "profile": virtual.profile or f"shipped ({SHIPPED_PROFILE.name})",
        "source": profile.source,
        "date": profile.date,
        "measured_on_cores": profile.cores,
        "coefficients": {name: getattr(profile, name) for name in COEFFICIENTS},
        "terms": terms,
        "speed_factors": {int(r): f for r, f in slow.items()},
        "end_s": end_s,
    }


def _seconds(value: float | None) -> str:
    return "none" if value is None else f"{value:g} s"
