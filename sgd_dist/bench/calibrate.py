"""``sgd-dist calibrate``: this machine's time profile (``core.time_model.TimeProfile``), measured on the code
paths a run takes, for virtual runs (``cluster.virtual.profile``) and the cost model.

What is measured, and how each coefficient comes out of it:

- **compute**, in this process on one torch thread (a worker's default): ``ShardWorker.execute`` of a gradient
  command, of a local command (``LOCAL_STEPS`` steps, per step) and of an evaluation, each the median of repeated
  calls at a few (rows, parameters) points; overhead + rate x rows x parameters is fitted by least squares on the
  relative error (so the small points count as much as the large), both kept >= 0;
- **the server's update**: ``ParameterServer.update`` of one answer plus publishing the weights into a
  shared-memory segment (``ShmServerEnd.publish``), at a few parameter counts; fitted the same way;
- **the per-answer cost of a transport** (shm, and ray: the channels): short real runs (``run.trainer.train`` on
  the Ray backend, one worker, sync) at a few parameter counts; a step's median less the worker's own median
  answer time less the server's update fitted above is what handling one answer costs there, and overhead + rate x
  answer bytes is fitted by plain least squares (the differences can be close to 0);
- **a worker replacement and a server restart**: one real run with ``kill_worker`` and ``kill_server`` faults;
  ``replacement_s`` is a ``worker_replaced`` record's ``recovery_s`` (from the notice until the replacement is
  sent the lost command), ``restart_s`` a ``server_lost`` record's ``noticed_s + recovery_s`` (from the kill
  until the rebuilt server resumes from the last checkpoint); the medians over the faults.

The Ray it needs is an embedded loopback one (no dashboard) started here and shut down at the end, or the one
this process is already connected to. The profile is written once every measurement is in (``profile_path``
checks first that its path can be written); its ``source`` names the command, the machine and its load.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import socket
import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import ray
import torch

import sgd_dist
from sgd_dist.backends.ray.cluster import init_ray
from sgd_dist.config import Config, DataConfig, OptimConfig, build_config
from sgd_dist.core.data import generate
from sgd_dist.core.time_model import TimeProfile, from_dict, to_dict
from sgd_dist.engine.messages import EVALUATE, GRADIENT, LOCAL, Arrival, Command
from sgd_dist.engine.server import ParameterServer
from sgd_dist.engine.worker import ShardWorker
from sgd_dist.errors import UsageError
from sgd_dist.run.progress import progress_bar
from sgd_dist.run.rundir import FAULTS_FILE, write_text_atomic
from sgd_dist.run.trainer import train
from sgd_dist.transports.channel import semaphores, sweep_stale_semaphores
from sgd_dist.transports.shm import Layout, ShmServerEnd

LOCAL_STEPS = 4  # steps of each timed local command
ITEMSIZE = 4  # float32, the default dtype: the bytes of one parameter in a message


@dataclass(frozen=True)
class Plan:
    """Where and how often to measure (the full plan, or ``--quick``'s)."""

    gradient: tuple[tuple[int, int], ...]  # (batch rows, parameters)
    evaluate: tuple[tuple[int, int], ...]  # (shard rows, parameters)
    server: tuple[int, ...]  # parameters
    transport: tuple[int, ...]  # parameters of the timed runs
    repeats: int  # timed calls per compute point (evaluations: a quarter)
    transport_steps: int
    kills: int  # worker kills and server kills in the fault run, each
    fault_workers: int  # workers of the fault run (a restart rebuilds every one)

    def items(self) -> int:
        """The measurements, for the progress bar: a point or a run each."""
        return 2 * len(self.gradient) + len(self.evaluate) + len(self.server) + 2 * len(self.transport) + 1


FULL = Plan(gradient=tuple((b, d) for d in (11, 1001, 10001) for b in (16, 64, 256)),
            evaluate=tuple((n, d) for d in (11, 1001, 4001) for n in (1024, 4096)),
            server=(11, 1001, 10001, 100001), transport=(11, 1001, 20001), repeats=40, transport_steps=500, kills=2,
            fault_workers=2)
QUICK = Plan(gradient=((16, 11), (256, 11), (16, 2001), (256, 2001)), evaluate=((512, 11), (2048, 1001)),
             server=(11, 10001), transport=(11, 20001), repeats=8, transport_steps=150, kills=1,
             fault_workers=1)


@dataclass(frozen=True)
class LineFit:
    """overhead + rate x size, fitted to measured (size, seconds) points."""

    overhead: float
    rate: float
    points: tuple[tuple[float, float], ...]

    def predict(self, x: float) -> float:
        return self.overhead + self.rate * x

    def quality(self) -> str:
        """How well the line goes through the points, in words."""
        errors = [abs(self.predict(x) - y) for x, y in self.points]
        relative = [e / y for e, (_, y) in zip(errors, self.points) if y > 0]
        text = f"{len(self.points)} points, worst residual {max(errors) * 1e6:.3g} us"
        if len(relative) == len(errors):
            text += f" ({100 * max(relative):.1f} %, median {100 * statistics.median(relative):.1f} %)"
        if len(self.points) <= 2:
            text += "; a line through 2 points has nothing left to check it"
        return text


def fit_line(points: Sequence[tuple[float, float]], relative: bool = True) -> LineFit:
    """Least squares for ``overhead + rate x size`` over (size, seconds) ``points``, both kept >= 0; ``relative``
    minimises the relative error (every point must be > 0), else the absolute one."""
    x = np.array([p[0] for p in points], float)
    y = np.array([p[1] for p in points], float)
    w = 1 / y if relative else np.ones_like(y)
    a, b = np.linalg.lstsq(np.column_stack([w, x * w]), y * w, rcond=None)[0] if len(set(x)) > 1 else (math.nan, -1)
    if b < 0:  # no growth to fit (or one size): the overhead alone
        a, b = float(np.sum(w * w * y) / np.sum(w * w)), 0.0
    if a < 0:  # through the origin
        a, b = 0.0, float(np.sum(w * w * x * y) / np.sum(w * w * x * x))
    return LineFit(max(0.0, float(a)), max(0.0, float(b)), tuple((float(p), float(q)) for p, q in points))


# ---------------------------------------------------------------------------------------------------------
# Compute and the server, in this process


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread, as a worker with its default one CPU; this process's count back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _worker(rows: int, dim: int, batch: int | str, shards: dict) -> ShardWorker:
    """A shard worker on ``rows`` x ``dim`` generated once per shape (the values are the run's own generator's)."""
    data = DataConfig(n_samples=rows, n_features=dim - 1)
    if (rows, dim) not in shards:
        shards.clear()  # one shape at a time: the wide ones are tens of MB
        shards[(rows, dim)] = generate(data)
    return ShardWorker(data, rank=0, start=0, stop=rows, batch_size=batch, seed=0, optim=OptimConfig(lr=1e-4),
                       total_steps=10**6, global_batch_size=batch if isinstance(batch, int) else rows,
                       shard=shards[(rows, dim)])


def time_command(worker: ShardWorker, command: Callable[[int], Command], weights: torch.Tensor,
                 repeats: int) -> float:
    """The median of the worker's own seconds (``Arrival.seconds``) over ``repeats`` commands, after two untimed."""
    for step in range(2):
        worker.execute(command(step), weights)
    return statistics.median(worker.execute(command(step), weights).seconds for step in range(2, 2 + repeats))


def measure_compute(kind: str, points: Sequence[tuple[int, int]], repeats: int, tick: Callable[[str], None]) -> LineFit:
    """``kind`` (gradient, local, evaluate) timed at each (rows, parameters) point: seconds against rows x
    parameters (per local step for local)."""
    shards: dict = {}
    measured = []
    for rows, dim in points:
        weights = torch.zeros(dim)
        if kind == "evaluate":
            worker = _worker(rows, dim, "full", shards)
            seconds = time_command(worker, lambda s: Command(EVALUATE, s), weights, max(3, repeats // 4))
        else:
            worker = _worker(max(512, 2 * rows), dim, rows, shards)
            steps = LOCAL_STEPS if kind == "local" else 1
            seconds = time_command(worker, _command(kind), weights, repeats) / steps
        measured.append((rows * dim, seconds))
        tick(f"{kind} {rows} x {dim}")
    return fit_line(measured)


def _command(kind: str) -> Callable[[int], Command]:
    """The i-th timed command of ``kind`` (gradient or local), each on its own local steps."""
    if kind == "local":
        return lambda i: Command(LOCAL, i * LOCAL_STEPS, local_steps=LOCAL_STEPS)
    return lambda i: Command(GRADIENT, i)


def measure_server(dims: Sequence[int], repeats: int, tick: Callable[[str], None]) -> LineFit:
    """The server's work per update at each parameter count: ``ParameterServer.update`` of one answer, then the
    weights published into a shared-memory segment."""
    measured = []
    for dim in dims:
        server = ParameterServer(torch.zeros(dim), OptimConfig(lr=1e-4), total_steps=10**6, global_batch_size=64)
        end = ShmServerEnd(Layout(1, dim, "float32"))
        answer = Arrival(0, GRADIENT, 0, 0, torch.full((dim,), 1e-3), 1.0, 64, 0.0)
        try:
            times = []
            for i in range(repeats + 2):
                t0 = time.perf_counter()
                server.update([answer])
                end.publish(server.step, server.weights)
                if i >= 2:
                    times.append(time.perf_counter() - t0)
        finally:
            end.close()
        measured.append((dim, statistics.median(times)))
        tick(f"server update d={dim}")
    return fit_line(measured)


# ---------------------------------------------------------------------------------------------------------
# Transports and faults: real runs on the Ray backend


def run_config(out: Path, dim: int, steps: int, *overrides: str, faults: Sequence[dict] = ()) -> Config:
    """A small sync run of ``dim`` parameters (512 rows: at d > 8192 the exact reference is skipped), with no
    evaluations but the first and the last, no checkpoints, no plots; ``overrides`` on top."""
    raw = {"faults": list(faults), "data": {"n_samples": 512, "n_features": dim - 1, "seed": 0}, "optim": {"lr": 1e-4},
           "cluster": {"backend": "ray", "num_workers": 1},
           "train": {"steps": steps, "batch_size": 64, "eval_every": 0, "log_every": 0, "checkpoint_every": 0},
           "output": {"dir": str(out), "plots": False}}
    return build_config(raw, list(overrides))


def measure_transport(transport: str, dims: Sequence[int], steps: int, server: LineFit, work: Path,
                      tick: Callable[[str], None]) -> LineFit:
    """Per answer on ``transport``: each run's median step less its worker's median answer time less the server's
    update (``server``, the fit of measure_server), against the answer's bytes."""
    measured = []
    for dim in dims:
        config = run_config(work / f"{transport}-{dim}", dim, steps, f"cluster.transport={transport}")
        summary = _completed(train(config, console=False, progress=False).summary, f"the {transport} run")
        if summary.get("transport") != transport:
            raise RuntimeError(f"the {transport} run ran on {summary.get('transport')!r}")
        step_s = summary["median_step_ms"] / 1e3
        answer_s = summary["answer_ms"][0] / 1e3
        measured.append((dim * ITEMSIZE, step_s - answer_s - server.predict(dim)))
        tick(f"{transport} transport d={dim}")
    return fit_line(measured, relative=False)


def _completed(summary: dict, what: str) -> dict:
    if summary.get("status") != "completed":
        raise RuntimeError(f"{what} did not complete: {summary.get('error', summary.get('status'))}")
    return summary


def fault_config(out: Path, kills: int, workers: int) -> Config:
    """``workers`` workers, a checkpoint every 50 updates; ``kills`` worker kills (taking the workers in turn) and
    as many server kills, spread over the run."""
    faults = []
    for i in range(kills):
        base = 100 + 300 * i
        faults += [{"kind": "kill_worker", "step": base, "worker": i % workers},
                   {"kind": "kill_server", "step": base + 150}]
    return run_config(out, 11, 300 * kills + 200, f"cluster.num_workers={workers}", "train.batch_size=16",
                      "train.checkpoint_every=50", faults=faults)


def measure_faults(kills: int, workers: int, work: Path,
                   tick: Callable[[str], None]) -> tuple[list[float], list[tuple[float, float]]]:
    """One run with the kills: each replacement's seconds, and each restart's (notice, rebuild) seconds."""
    out = work / "faults"
    _completed(train(fault_config(out, kills, workers), console=False, progress=False).summary, "the fault run")
    records = [json.loads(line) for line in (out / FAULTS_FILE).read_text().splitlines() if line.strip()]
    replaced = [r["recovery_s"] for r in records if r["fault"] == "worker_replaced"]
    restarted = [(r.get("noticed_s", 0.0), r["recovery_s"]) for r in records if r["fault"] == "server_lost"]
    if not replaced or not restarted:
        raise RuntimeError(f"the fault run recorded {len(replaced)} replacements and {len(restarted)} restarts")
    tick("worker replacement and server restart")
    return replaced, restarted


# ---------------------------------------------------------------------------------------------------------
# The command


@dataclass(frozen=True)
class Calibration:
    """The measured profile and, per coefficient, the lines that say how well it was measured."""

    profile: TimeProfile
    lines: list[str]


def profile_path(out: str | None) -> Path:
    """Where the profile goes: ``out``, or runs/profile-<host>-<time>.json; UsageError (one line) for a path that
    cannot be written, found before anything is measured."""
    if out is not None and not out.strip():
        raise UsageError("--out needs a file for the profile (got an empty path); leave it out for the default")
    path = Path(out) if out is not None else Path("runs") / f"profile-{_host()}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    if path.is_dir() or (out is not None and out.endswith(os.sep)):
        raise UsageError(f"--out {out}: names a directory; name the profile's file (e.g. {path / 'profile.json'})")
    above = next(p for p in path.parents if p.exists())
    if not above.is_dir():
        raise UsageError(f"--out {path}: {above} is a file, not a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".calibrate-"):
            pass
    except OSError as exc:
        raise UsageError(f"--out {path}: cannot write there ({exc.strerror or exc})") from None
    return path


def _host() -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname()) or "host"


def describe_machine(quick: bool) -> str:
    """The profile's ``source``: the command, the machine, the software and its load when it started."""
    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    command = "sgd-dist calibrate" + (" --quick" if quick else "")
    return (f"{command} (sgd_dist {sgd_dist.__version__}) on {socket.gethostname()}: "
            f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, torch {torch.__version__}, "
            f"Ray {ray.__version__}; load average {load} at the start")


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def calibrate(quick: bool = False, progress: bool | None = None) -> Calibration:
    """Measure this machine (see the module docstring); a Ray this starts is shut down before it returns."""
    plan = QUICK if quick else FULL
    t0 = time.perf_counter()
    source = describe_machine(quick)
    bar = progress_bar(plan.items(), "measurement", "calibrate", enabled=progress)

    def tick(label: str) -> None:
        bar.set_postfix_str(label)
        bar.update(1)

    try:
        with one_thread():
            compute = {kind: measure_compute(kind, plan.evaluate if kind == "evaluate" else plan.gradient,
                                             plan.repeats, tick) for kind in ("gradient", "local", "evaluate")}
            server = measure_server(plan.server, plan.repeats * 5, tick)
        with _ray(), tempfile.TemporaryDirectory(prefix="sgd-dist-calibrate-") as work:
            shm = measure_transport("shm", plan.transport, plan.transport_steps, server, Path(work), tick)
            channel = measure_transport("ray", plan.transport, plan.transport_steps, server, Path(work), tick)
            replaced, restarted = measure_faults(plan.kills, plan.fault_workers, Path(work), tick)
    finally:
        bar.close()
    profile = _profile(compute, server, shm, channel, replaced, restarted, source)
    lines = report_lines(profile, compute, server, shm, channel, replaced, restarted)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return Calibration(profile, lines + [f"measured in {time.perf_counter() - t0:.0f} s; load average {load} now"])


@contextmanager
def _ray() -> Iterator[None]:
    """An embedded loopback Ray for the runs (or the one already connected), shut down afterwards if started here;
    the channel semaphores its raylet left are removed then."""
    before = semaphores()
    started = init_ray(None, num_cpus=max(os.cpu_count() or 1, 4))
    try:
        yield
    finally:
        if started:
            ray.shutdown()
            sweep_stale_semaphores(semaphores() - before, wait_s=3.0)


def _profile(compute: dict[str, LineFit], server: LineFit, shm: LineFit, channel: LineFit, replaced: list[float],
             restarted: list[tuple[float, float]], source: str) -> TimeProfile:
    g, loc, ev = compute["gradient"], compute["local"], compute["evaluate"]
    return TimeProfile(
        grad_s=g.overhead, grad_s_per_elem=g.rate, local_s=loc.overhead, local_s_per_elem=loc.rate,
        eval_s=ev.overhead, eval_s_per_elem=ev.rate, apply_s=server.overhead, apply_s_per_param=server.rate,
        message_s=shm.overhead, message_s_per_byte=shm.rate, ray_message_s=channel.overhead,
        ray_message_s_per_byte=channel.rate, replacement_s=statistics.median(replaced),
        restart_s=statistics.median(n + r for n, r in restarted), cores=os.cpu_count() or 1, source=source,
        date=datetime.date.today().isoformat())


def report_lines(profile: TimeProfile, compute: dict[str, LineFit], server: LineFit, shm: LineFit,
                 channel: LineFit, replaced: list[float], restarted: list[tuple[float, float]]) -> list[str]:
    """Each coefficient with how well it was measured."""
    def us(seconds: float) -> str:
        return f"{seconds * 1e6:.4g} us"

    def line(name: str, fit: LineFit, per: str, unit: float = 1e9, rate: str = "ns") -> str:
        return f"{name:<14} {us(fit.overhead)} + {fit.rate * unit:.4g} {rate} x {per}   [{fit.quality()}]"

    return [
        line("gradient", compute["gradient"], "rows x parameters"),
        line("local step", compute["local"], "rows x parameters"),
        line("evaluation", compute["evaluate"], "shard rows x parameters"),
        line("server update", server, "parameters"),
        line("shm answer", shm, "bytes") + " (a step less its answer and update)",
        line("ray answer", channel, "bytes") + " (a step less its answer and update)",
        f"{'replacement':<14} {profile.replacement_s:.3g} s   [median of {len(replaced)}: "
        + ", ".join(f"{s:.3g} s" for s in replaced) + "]",
        f"{'restart':<14} {profile.restart_s:.3g} s   [median of {len(restarted)}, notice + rebuild: "
        + ", ".join(f"{n:.3g} + {r:.3g} s" for n, r in restarted) + "]",
    ]


def write_profile(path: Path, profile: TimeProfile) -> None:
    """The profile as JSON, written whole or not at all; checked by loading it back."""
    text = json.dumps(to_dict(profile), indent=2) + "\n"
    from_dict(json.loads(text), str(path))
    write_text_atomic(path, text)
