"""``run_benchmark``: every selected system at every selected size, one after another in one invocation, on
the same generated problem; then the table, the targets, results.csv / results.md and bench.png.

The memory bandwidth is measured first, with nothing else of ours running. One embedded Ray (loopback,
dashboard off) serves the Ray-based systems, unless Ray is already initialised in this process, which is then
used and left running. A system that fails at a size gets a note row with the error instead of numbers, one
that sgd_dist's config cannot express yet a 'not available' row; the run goes on.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import ray

from sgd_dist.backends.ray.cluster import init_ray
from sgd_dist.bench import floor, peers, report
from sgd_dist.bench.compression import compression_markdown, compression_rows
from sgd_dist.bench.options import SAMPLINGS, SYSTEMS, BenchOptions
from sgd_dist.bench.problem import Problem, measured_intervals, step_stats
from sgd_dist.bench.startup import measure_startup
from sgd_dist.config import TrainConfig, build_config
from sgd_dist.errors import ConfigError, one_line
from sgd_dist.run.progress import progress_bar
from sgd_dist.run.rundir import read_metrics
from sgd_dist.run.trainer import train

WIDE_DIM = 10_000  # from here on a step costs milliseconds: a tenth of the steps and of the warm-up
SGD_TRANSPORTS = ("shm", "ray")
SGD_ROWS = {("shm", "shuffle"): report.SGD_SHM, ("ray", "shuffle"): report.SGD_RAY,
            ("shm", "blocks"): report.SGD_SHM_BLOCKS, ("ray", "blocks"): report.SGD_RAY_BLOCKS}
GENERATION_LIMIT_BYTES = 2 << 30
RAY_CPUS = 8  # logical CPUs of the embedded Ray (at least): every worker gets one, on any machine

_PEERS: dict[str, tuple[str, Callable[[Problem, int], list[float]]]] = {
    "docs-ps": (report.DOCS_PS, peers.run_docs_ps),
    "ddp": (report.DDP, peers.run_ddp),
    "ray-train": (report.RAY_TRAIN, peers.run_ray_train),
}
_NO_RAY = {"floor", "ddp"}  # the systems that need no Ray of ours


class NotAvailable(Exception):
    """sgd_dist's config cannot express this variant yet: its row says why, and no run is started."""


@dataclass
class BenchResult:
    rows: list[report.Row]
    targets: list[dict]
    startup: dict | None
    bandwidth: dict | None = None
    files: list[Path] = field(default_factory=list)


def sampling_overrides(sampling: str) -> list[str]:
    """The overrides that make an sgd_dist run sample this way; NotAvailable (why) when its config refuses them."""
    if sampling == "shuffle" and "sampling" not in TrainConfig.model_fields:
        return []  # the one sampling sgd_dist has: the per-epoch permutation
    item = f"train.sampling={sampling}"
    try:
        build_config({}, [item])
    except ConfigError as exc:
        raise NotAvailable(f"sgd_dist's config refuses {item} ({exc})") from None
    return [item]


def steps_for(dim: int, steps: int, warmup: int) -> tuple[int, int]:
    if dim >= WIDE_DIM:
        return max(steps // 10, 5), max(warmup // 10, 2)
    return steps, warmup


def run_sgd_dist(problem: Problem, num_steps: int, transport: str, sampling: str,
                 workdir: Path) -> tuple[list[float], dict]:
    """One ``sgd_dist.run.trainer.train`` run on the Ray backend; the step ends from metrics.jsonl's
    ``wall_time_s`` (the server's clock, one row per step) and the run's summary."""
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))
    raw = {
        "data": problem.data_config().model_dump(mode="json"),
        "optim": {"lr": problem.lr, "schedule": "constant"},
        "cluster": {"backend": "ray", "num_workers": problem.num_workers},
        "train": {"mode": "sync", "steps": num_steps, "batch_size": problem.batch_size, "eval_every": 0,
                  "log_every": 0, "seed": problem.seed},
        "output": {"dir": str(run_dir), "plots": False},
    }
    config = build_config(raw, [f"cluster.transport={transport}", *sampling_overrides(sampling)])
    result = train(config, console=False, progress=False)
    rows = sorted(read_metrics(result.run_dir), key=lambda row: row["step"])
    return [row["wall_time_s"] for row in rows], result.summary


def record_overhead_ms(summary: dict) -> float | None:
    """The run's own per-step recording cost, if the summary reports one (e.g. ``record_ms_per_step``)."""
    for key in sorted(summary):
        value = summary[key]
        if "record" in key and "ms" in key and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def generation_fits(problem: Problem, limit_bytes: int | None = None) -> str | None:
    """None if ``sgd_dist.core.data.generate`` can make one row at this d in bounded memory, else why not.

    Tried in a child process under an address-space limit (torch's own runtime is ~0.7 GB of it), so a
    generator that draws a whole block at once (65,536 rows x d: 26 GB at d = 1e5) fails there, instead of in
    K processes at once on this machine.
    """
    limit = limit_bytes or GENERATION_LIMIT_BYTES
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (%d, %d)); "
            "from sgd_dist.config import DataConfig; from sgd_dist.core.data import generate; "
            "generate(DataConfig.model_validate_json(sys.argv[1]), 0, 1)") % (limit, limit)
    proc = subprocess.run([sys.executable, "-c", code, problem.data_config().model_dump_json()],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode == 0:
        return None
    asked = re.search(r"allocate (\d+) bytes", proc.stderr)
    why = f"asks for {int(asked.group(1)) / 1e9:.1f} GB at once" if asked else (
        proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:120]
    return f"sgd_dist.core.data.generate cannot make a row at d={problem.dim} within {limit / 2**30:.1f} GiB: {why}"


def run_benchmark(options: BenchOptions, out: Path, log: Callable[[str], None] | None = None) -> BenchResult:
    """Measure, write results.csv, results.md, targets.csv and bench.png under ``out``, return the rows."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    unknown = set(options.systems) - set(SYSTEMS)
    if unknown:
        raise ValueError(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", peers.RAY_TRAIN_HEALTH_CHECK_INTERVAL_S)
    peers._loopback_gloo()  # before Ray starts, so that Ray Train's workers inherit it

    bandwidth = floor.memory_bandwidth(options.bandwidth_bytes)  # first: nothing else of ours runs yet
    log(f"bench: memory bandwidth {bandwidth['gb_s']:.1f} GB/s (copy of {bandwidth['copy_bytes'] / 2**30:.2g} GiB at "
        f"{bandwidth['threads']} threads, best of {bandwidth['repeats']})")
    startup = None
    if options.startup_repeats > 0:  # while no Ray of ours is running
        startup = measure_startup(options.startup_repeats, options.startup_config, log,
                                  workers=options.startup_workers, cluster=options.startup_cluster)

    compressed = _compression(options, out, log) if options.compression else None  # clusters of their own: no Ray yet
    plan = _plan(options)
    m = _Measurements()
    started_ray = _start_ray(plan, max(options.workers))
    t_bench = time.perf_counter()
    interrupted = False
    try:
        _measure_all(options, plan, m, log)
    except KeyboardInterrupt:
        interrupted = True  # write what was measured, then stop as asked
    finally:
        if started_ray:
            ray.shutdown()
    log(f"bench: measured in {time.perf_counter() - t_bench:.0f} s" + (" (interrupted)" if interrupted else ""))

    rows = report.fill_ratios(_rows(options, plan, m), bandwidth["gb_s"])
    targets = report.target_rows(rows, startup)
    files = write_outputs(out, rows, targets, startup, bandwidth)
    if compressed is not None:
        files.append(compressed)
    if interrupted:
        raise KeyboardInterrupt
    return BenchResult(rows, targets, startup, bandwidth, files)


Key = tuple[str, int, int]  # (row label, d, workers)
Runner = Callable[[Problem, int, Path], tuple[list[float], dict]]


@dataclass(frozen=True)
class Planned:
    label: str
    sampling: str
    run: Runner
    needs_ray: bool


@dataclass
class _Measurements:
    seconds: dict[Key, list[float]] = field(default_factory=dict)
    notes: dict[Key, str] = field(default_factory=dict)
    extra: dict[Key, dict] = field(default_factory=dict)


def _measure_all(options: BenchOptions, plan: list[Planned], m: _Measurements, log: Callable[[str], None]) -> None:
    """Every size, every repeat, every system in turn; a failure becomes the row's note."""
    total = len(plan) * len(options.dims) * len(options.workers) * options.repeats
    bar = progress_bar(total, "run", "bench", enabled=options.progress)
    try:
        _measure_sizes(options, plan, m, _through(bar, log), bar)
    finally:
        bar.close()


def _compression(options: BenchOptions, out: Path, log: Callable[[str], None]) -> Path:
    """One run per compression kind at the largest d asked (ray transport, 2 simulated nodes, 0.1 Gbit/s);
    the table goes to compression.md and the log."""
    log(f"bench: compression rows at d={max(options.dims)}, 2 workers on 2 simulated nodes, 0.1 Gbit/s")
    table = compression_markdown(compression_rows(d=max(options.dims)))
    path = out / "compression.md"
    path.write_text("# Compression on the ray transport across simulated nodes\n\n" + table + "\n")
    log(table)
    return path


def _through(bar, log: Callable[[str], None]) -> Callable[[str], None]:
    """``log``, around the bar: the bar is cleared for the line and drawn again below it."""
    if bar.disable:
        return log

    def say(line: str) -> None:
        with bar.external_write_mode(file=sys.stderr):
            log(line)

    return say


def _measure_sizes(options: BenchOptions, plan: list[Planned], m: _Measurements, log: Callable[[str], None],
                   bar) -> None:
    total = bar.total
    done = 0
    with tempfile.TemporaryDirectory(prefix="sgd-bench-") as workdir:
        for dim in options.dims:
            gate = None
            if dim >= WIDE_DIM:
                gate = generation_fits(Problem(dim, max(options.workers), options.batch_size))
                if gate:
                    log(f"bench: skipping d={dim}: {gate}")
            num_steps, warmup = steps_for(dim, options.steps, options.warmup)
            for k in options.workers:
                problem = Problem(dim, k, options.batch_size)
                for rep in range(options.repeats):
                    for p in plan:
                        done += 1
                        key = (p.label, dim, k)
                        if gate or key in m.notes:  # a system that failed once at a size is not retried
                            m.notes.setdefault(key, gate or "")
                            bar.update(1)
                            continue
                        where = f"bench [{done}/{total}] d={dim} workers={k} {p.label}"
                        _measure_one(p.run, problem, warmup, num_steps, Path(workdir), key, m, log,
                                     f"{where} (run {rep + 1}/{options.repeats})")
                        bar.update(1)
                        if key in m.seconds:
                            bar.set_postfix_str(f"d={dim} K={k} {p.label}: {step_stats(m.seconds[key])[0]:.3f} ms")


def _measure_one(run: Runner, problem: Problem, warmup: int, num_steps: int, workdir: Path, key: Key,
                 m: _Measurements, log: Callable[[str], None], where: str) -> None:
    t0 = time.perf_counter()
    try:
        stamps, info = run(problem, warmup + num_steps, workdir)
        seconds = measured_intervals(stamps, warmup)
        if not seconds:
            raise RuntimeError(f"only {len(stamps)} step times came back")
    except NotAvailable as exc:
        m.notes[key] = f"{report.NOT_AVAILABLE}: {exc}"
        log(f"{where}: {m.notes[key]}")
        return
    except Exception as exc:
        m.notes[key] = one_line(exc)
        log(f"{where}: no result: {m.notes[key]}")
        return
    m.seconds.setdefault(key, []).extend(seconds)
    m.extra.setdefault(key, {}).update(info)
    med, p90 = step_stats(seconds)
    log(f"{where}: median {med:.3f} ms, p90 {p90:.3f} ms over {len(seconds)} steps "
        f"({time.perf_counter() - t0:.1f} s)")


def _plan(options: BenchOptions) -> list[Planned]:
    """The rows to measure, in the order of SYSTEMS; Ray Train becomes a note row when it is not installed."""
    plan: list[Planned] = []
    for system in SYSTEMS:
        if system not in options.systems:
            continue
        if system == "floor":
            plan += [Planned(label, sampling, _loop_runner(sampling, gradient), False)
                     for label, (sampling, gradient) in report.LOOPS.items()]
        elif system == "sgd-dist":
            plan += [Planned(SGD_ROWS[t, s], s, _sgd_runner(t, s), True)
                     for s in SAMPLINGS for t in SGD_TRANSPORTS]
        elif system == "ray-train" and not peers.ray_train_available():
            plan.append(Planned(report.RAY_TRAIN, "shuffle", _missing_ray_train, False))
        else:
            label, fn = _PEERS[system]
            plan.append(Planned(label, "shuffle", _peer_runner(fn), system not in _NO_RAY))
    return plan


def _loop_runner(sampling: str, gradient: str) -> Runner:
    def run(problem: Problem, num_steps: int, workdir: Path) -> tuple[list[float], dict]:
        stamps, _ = floor.run_loop(problem, num_steps, sampling, gradient)
        return stamps, {"threads": floor.DEFAULT_THREADS}
    return run


def _peer_runner(fn: Callable[[Problem, int], list[float]]) -> Runner:
    return lambda problem, num_steps, workdir: (fn(problem, num_steps), {})


def _sgd_runner(transport: str, sampling: str) -> Runner:
    def run(problem: Problem, num_steps: int, workdir: Path) -> tuple[list[float], dict]:
        stamps, summary = run_sgd_dist(problem, num_steps, transport, sampling, workdir)
        info = {"record_ms_per_step": record_overhead_ms(summary)}
        if summary.get("transport"):
            info["transport"] = summary["transport"]
        return stamps, info
    return run


def _missing_ray_train(problem: Problem, num_steps: int, workdir: Path) -> tuple[list[float], dict]:
    raise ModuleNotFoundError('ray.train is not installed (pip install "ray[train]==2.60.0", or ".[bench]")')


def _start_ray(plan: list[Planned], max_workers: int) -> bool:
    """One embedded Ray for every system that uses one; none when Ray is already up or nothing needs it."""
    if not any(p.needs_ray for p in plan):
        return False
    return init_ray(num_cpus=max(RAY_CPUS, 2 * max_workers))


def _rows(options: BenchOptions, plan: list[Planned], m: _Measurements) -> list[report.Row]:
    rows = []
    for dim in options.dims:
        for k in options.workers:
            problem = Problem(dim, k, options.batch_size)
            for p in plan:
                key = (p.label, dim, k)
                shape = dict(sampling=p.sampling, read_mb=problem.read_bytes / 1e6)
                if key not in m.seconds:
                    rows.append(report.Row(p.label, dim, k, problem.global_batch, note=m.notes.get(key) or "not run",
                                           **shape))
                    continue
                med, p90 = step_stats(m.seconds[key])
                info = m.extra.get(key, {})
                record = info.get("record_ms_per_step")
                note = "; ".join(filter(None, [
                    f"{info['threads']} threads" if info.get("threads") else "",
                    f"transport {info['transport']}" if info.get("transport") else "",
                    f"recording {record:.3g} ms/step" if record is not None else "", m.notes.get(key, "")]))
                rows.append(report.measured_row(p.label, dim, k, problem.global_batch, med, p90, len(m.seconds[key]),
                                                record_ms_per_step=record, note=note, **shape))
    return rows


def write_outputs(out: Path, rows: list[report.Row], targets: list[dict], startup: dict | None,
                  bandwidth: dict | None = None) -> list[Path]:
    csv_path = report.write_csv(rows, out / "results.csv")
    targets_path = report.write_targets_csv(targets, out / "targets.csv")
    text = ["# sgd-dist bench", "", report.results_markdown(rows), "",
            f"## Targets (this run's medians, {report.TARGET_WORKERS} workers)", "",
            report.targets_markdown(targets), ""]
    if startup is not None:
        text += ["## Start-up", "", report.startup_markdown(startup), ""]
    md_path = out / "results.md"
    md_path.write_text("\n".join(text))
    files = [csv_path, md_path, targets_path]
    extra = {"startup.json": startup, "bandwidth.json": bandwidth}
    for name, value in extra.items():
        if value is not None:
            files.append(out / name)
            files[-1].write_text(json.dumps(value, indent=2) + "\n")
    files.append(report.plot_results(csv_path, out / "bench.png"))
    return files
