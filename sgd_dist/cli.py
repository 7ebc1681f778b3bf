"""The ``sgd-dist`` command: a thin layer over ``sgd_dist.run.trainer.train``.

Exit codes: 0 success; 2 invalid config or usage, or a run that cannot fit where it would run (one line
naming the field, nothing written); 1 a run that failed, or a cluster that cannot be reached or cannot host
it (one line; the run directory keeps what was recorded); 130 interrupted by SIGINT (Ctrl-C) and 143 by
SIGTERM (what `timeout` and schedulers send), both keeping the rows and shutting Ray down whole (a second
signal meanwhile is ignored); 141 the reader of stdout went away (``| head``), as for a program stopped by
SIGPIPE.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import NoReturn, Sequence

import sgd_dist
from sgd_dist.config import describe_fields, dump_config, load_config
from sgd_dist.errors import EXIT_OK, EXIT_RUN_FAILED, EXIT_USAGE, SubmitError, UsageError
from sgd_dist.run.outcome import fail, guarded, interrupted_code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser (help, unknown commands) and each command's own parser."""
    parser = _Parser(prog="sgd-dist", description="Distributed mini-batch SGD with a parameter server on Ray.")
    parser.add_argument("--version", action="version", version=f"sgd-dist {sgd_dist.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="run one training and record it in a run directory")
    p.add_argument("--config", help="YAML config file (see configs/); required unless --resume")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="go on with a killed run from its latest checkpoint, with its own config.yaml")
    p.add_argument("--out", help="run directory (new or empty); default runs/<config name>-<timestamp>")
    p.add_argument("--backend", choices=["ray", "serial", "virtual"],
                   help="ray (default), serial (the one-process reference) or virtual (a modelled cluster's clock)")
    p.add_argument("--address", help="join this Ray cluster ('auto' or HOST:PORT) instead of starting a local one")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    p.add_argument("--traceback", action="store_true", help="print the full traceback when a run fails")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=200")

    p = sub.add_parser("replay", help="re-execute a run's recorded schedule in one process; check it is bit-equal")
    p.add_argument("run_dir", help="a completed run directory written by sgd-dist train")
    p.add_argument("--out", help="directory for the replay's run (default RUN_DIR-replay-<time>)")

    p = sub.add_parser("plot", help="redraw a run directory's (or a sweep directory's) figures from its recorded files")
    p.add_argument("run_dir", help="a run directory written by sgd-dist train, or a sweep directory (with results.csv)")

    p = sub.add_parser("sweep", help="run a grid of timed runs one at a time; results.csv and figures; resumes")
    p.add_argument("--config", required=True, help="experiment file (see configs/experiments/)")
    p.add_argument("--out", help="sweep directory (default runs/sweep-<experiment name>); an existing one resumes")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                   help="draw the sweep's figures at the end (default on)")

    p = sub.add_parser("model",
                       help="fit the cost model on a sweep's runs; coefficients, errors, 1 to N workers predicted")
    p.add_argument("sweep_dir", help="a sweep directory (with results.csv and runs/)")
    p.add_argument("--workers-max", type=int, default=1024, help="predict for 1, 2, 4, ... up to this many workers")
    p.add_argument("--cores", type=int, help="cores of the machine the runs were measured on (default: as the sweep "
                   "recorded in cost_model.json, else this machine's)")
    p.add_argument("--latency-us", type=float, help="also predict over a network of this latency (microseconds)")
    p.add_argument("--bandwidth-gbps", type=float, help="... and this bandwidth (Gbit/s; default unlimited)")
    p.add_argument("--profile", metavar="PROFILE", help="predict from this time profile (sgd-dist calibrate's) "
                   "instead of fitting one on the runs")

    p = sub.add_parser("calibrate", help="measure this machine's time profile for virtual runs and the cost model")
    p.add_argument("--out", metavar="PROFILE", help="the profile's JSON file (default "
                   "runs/profile-<host>-<time>.json); a run names it with cluster.virtual.profile=PROFILE")
    p.add_argument("--quick", action="store_true", help="fewer points, repeats and faults: a rougher profile, sooner")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")

    _add_plan_parser(sub)

    p = sub.add_parser("config", help="print the validated config (all defaults filled in) as YAML")
    p.add_argument("--config", help="YAML config file; default: the built-in defaults")
    p.add_argument("--describe", action="store_true", help="list every key with its default and meaning")
    p.add_argument("overrides", nargs="*", metavar="key=value")

    _add_bench_parser(sub)
    _add_cluster_parsers(sub)
    return parser, sub.choices


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line, key=value overrides accepted before, between and after options.

    argparse intermixes positionals and options only in parse_intermixed_args, which refuses a parser with
    subcommands: so the command's own parser reads everything after the command's name.
    """
    parser, commands = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in commands:
        return parser.parse_args(argv)  # help, or an error naming the commands
    args, extra = commands[argv[0]].parse_known_intermixed_args(argv[1:])
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.command = argv[0]
    return args


def _add_plan_parser(sub) -> None:
    p = sub.add_parser("plan", help="find the mode, workers, batch and lr scaling that reach a target soonest (or most "
                                    "cheaply) on a cluster you describe, by virtual runs; plan.csv, plan.png; resumes")
    p.add_argument("--config", required=True, help="the problem: a training config (data, model, optim, train)")
    p.add_argument("--cluster", required=True, help="the cluster description (see configs/clusters/)")
    p.add_argument("--target-gap", type=float, required=True, help="the relative optimality gap to reach, e.g. 1e-3")
    p.add_argument("--objective", choices=["time", "cost"], default="time",
                   help="rank by time to the target (default) or by worker-seconds to it")
    p.add_argument("--out", help="plan directory (default runs/plan-<problem>-<cluster>); an existing one resumes")
    p.add_argument("--budget", help="simulated work allowed: runs=N and/or worker_steps=N (default runs=60, "
                                    "worker_steps=2e6)")
    p.add_argument("--workers", type=_int_list, metavar="K,K,...",
                   help="worker counts to try (default 1, 2, 4, ... up to the cluster's max_workers)")
    p.add_argument("--modes", help="modes to try, e.g. sync,async,backup:1,local_sgd:4 (default all, with parameters "
                                   "chosen per worker count)")
    p.add_argument("--batches", type=_int_list, metavar="B,B,...",
                   help="per-worker batches (default the problem's, a quarter and four times it)")
    p.add_argument("--lr-scaling", default="none,linear", help="lr scalings to try: none, linear or both (default)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of the problem, e.g. "
                                                                    "data.n_features=1000")


def _add_bench_parser(sub) -> None:
    from sgd_dist.bench.options import (  # imported here, as every command's module: keeps `sgd-dist --help` fast
        DEFAULT_DIMS,
        DEFAULT_STARTUP_REPEATS,
        DEFAULT_STARTUP_WORKERS,
        DEFAULT_STEPS,
        DEFAULT_WARMUP,
        DEFAULT_WORKERS,
        SYSTEMS,
    )

    p = sub.add_parser("bench", help="time sgd_dist against its peers on one generated problem (table and figure)")
    p.add_argument("--dims", type=_int_list, default=list(DEFAULT_DIMS), metavar="D,D,...",
                   help="parameter counts (features plus the bias), e.g. 2,1000,1e5 (default)")
    p.add_argument("--workers", type=_int_list, default=list(DEFAULT_WORKERS), metavar="K,K,...",
                   help="worker counts, each with batch 256 per worker (default 1,2,4)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"measured steps per system and size (default {DEFAULT_STEPS}; a tenth at d >= 1e4)")
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                   help=f"steps run before measuring (default {DEFAULT_WARMUP}; a tenth at d >= 1e4)")
    p.add_argument("--systems", type=_name_list, default=list(SYSTEMS), metavar="NAME,...",
                   help=f"which systems, from {','.join(SYSTEMS)} (default all)")
    p.add_argument("--repeats", type=int, default=1, help="measure each system this many times per size, interleaved")
    p.add_argument("--startup-repeats", type=int, default=DEFAULT_STARTUP_REPEATS,
                   help="runs of each start-up program (1-step lesson2 run, bare torch + Ray program); 0 skips")
    p.add_argument("--startup-workers", type=_int_list_or_none, default=list(DEFAULT_STARTUP_WORKERS),
                   metavar="K,K,...", help="worker counts whose setup is timed against a bare program starting as "
                   f"many torch actors (default {','.join(map(str, DEFAULT_STARTUP_WORKERS))}; none skips)")
    p.add_argument("--no-startup-cluster", dest="startup_cluster", action="store_false",
                   help="skip the 1-step run on a running local cluster (--address auto after ray start --head)")
    p.add_argument("--compression", action="store_true",
                   help="also time one run per compression kind on the ray transport across 2 simulated nodes at "
                   "0.1 Gbit/s, at the largest --dims (compression.md; about 2 minutes)")
    p.add_argument("--bandwidth-mib", type=int, default=1024,
                   help="size of the tensor copied to measure the memory bandwidth, in MiB (default 1024)")
    p.add_argument("--out", help="directory for results.csv, results.md and bench.png (default runs/bench-<timestamp>)")


def _int_list(text: str) -> list[int]:
    """'2,1000,1e5' -> [2, 1000, 100000]."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None
    if not values or any(v < 1 or not v.is_integer() for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} must list positive whole numbers")
    return [int(v) for v in values]


def _int_list_or_none(text: str) -> list[int]:
    """'none' -> [], else as _int_list."""
    return [] if text.strip().lower() == "none" else _int_list(text)


def _name_list(text: str) -> list[str]:
    from sgd_dist.bench.options import SYSTEMS  # imported here: keeps `sgd-dist --help` fast

    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in SYSTEMS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown) or '(none given)'}; "
                                         f"choose from {','.join(SYSTEMS)}")
    return names


def _add_cluster_parsers(sub) -> None:
    p = sub.add_parser("submit", help="run one training as a job on a Ray cluster and bring its run directory back")
    p.add_argument("--address", required=True, help="the cluster's job API, http://HOST:PORT (dashboard port, 8265)")
    p.add_argument("--config", required=True, help="YAML config file (see configs/)")
    p.add_argument("--out", help="where the run directory comes back (new or empty); "
                                 "default runs/<config name>-<timestamp>")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=200")

    p = sub.add_parser("jobs", help="list the jobs of a Ray cluster; follow or stop one")
    p.add_argument("--address", required=True, help="the cluster's job API, http://HOST:PORT (dashboard port, 8265)")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--follow", metavar="JOB_ID", help="stream the job's log until it ends")
    action.add_argument("--stop", metavar="JOB_ID", help="stop the job")


def _check_out(args: argparse.Namespace) -> None:
    """--out '' would silently mean the default directory (or the current one): refuse it."""
    if getattr(args, "out", None) is not None and not args.out.strip():
        raise UsageError("--out needs a directory (got an empty one); leave --out out for the default")


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    pairs = [("output.dir", args.out), ("cluster.backend", args.backend), ("cluster.address", args.address)]
    return [f"{key}={value}" for key, value in pairs if value is not None]


def _train(args: argparse.Namespace) -> int:
    from sgd_dist.run.console import train_and_report  # torch and tqdm once the arguments are good
    from sgd_dist.run.summary import completed_summary  # imported here too: it imports torch

    _check_out(args)
    if args.resume is not None:
        if args.config or args.overrides or _flag_overrides(args):
            raise UsageError("--resume RUN_DIR goes on with the run's own config.yaml: drop --config, --out, "
                             "--backend, --address and the key=value overrides")
        if not (Path(args.resume) / "config.yaml").is_file():
            # a directory that is no run fails to resume as a bad checkpoint does: exit 1
            raise UsageError(f"{args.resume}/config.yaml: not found; --resume needs a run directory", EXIT_RUN_FAILED)
        done = completed_summary(args.resume)
        if done is not None:  # nothing to go on with: leave it as it is, byte for byte
            print(f"sgd-dist: {args.resume} is complete ({done.get('steps')} steps); nothing to resume")
            return EXIT_OK
        config = load_config(Path(args.resume) / "config.yaml")
    elif args.config is None:
        raise UsageError("train needs --config FILE (or --resume RUN_DIR)")
    else:
        config = load_config(args.config, [*args.overrides, *_flag_overrides(args)])
    return train_and_report(config, config_path=args.config, progress=args.progress, show_traceback=args.traceback,
                            resume=args.resume)


def _replay(args: argparse.Namespace) -> int:
    from sgd_dist.run.replay import replay  # imported here: torch, once a command needs it

    report = replay(args.run_dir, args.out)
    verdict = "bit-equal" if report.exact else "DIFFERENT"
    print(f"replayed {report.updates} updates of {report.run_dir} in one process into {report.replay_dir}/")
    print(f"final weights {'bit-equal' if report.weights_equal else 'DIFFERENT'}; losses "
          f"{report.losses_equal} of {report.losses_compared} bit-equal"
          + ("" if report.first_mismatch is None else f" (first difference at step {report.first_mismatch})"))
    print(f"replay: {verdict}")
    return EXIT_OK if report.exact else EXIT_RUN_FAILED


def _plot(args: argparse.Namespace) -> int:
    from sgd_dist.run.plots import plot_run  # imported here: matplotlib, once a command needs it

    run_dir = Path(args.run_dir)
    if (run_dir / "plan.csv").is_file():
        from sgd_dist.study.plan_plots import plot_plan  # imported here: matplotlib, once a command needs it

        print(plot_plan(run_dir))
        return EXIT_OK
    if (run_dir / "results.csv").is_file():
        from sgd_dist.study.plots import plot_sweep  # imported here: matplotlib and the cost model

        _print_figures(plot_sweep(run_dir))
        return EXIT_OK
    if not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "config.yaml").is_file():
        raise UsageError(f"{str(run_dir)!r} is not a run directory (it needs config.yaml and metrics.jsonl)")
    for path in plot_run(run_dir):
        print(path)
    return EXIT_OK


def _print_figures(figures) -> None:
    for path in figures.drawn:
        print(path)
    for name, why in figures.skipped:
        print(f"skipped {name}: {why}")


def _sweep(args: argparse.Namespace) -> int:
    from sgd_dist.study.experiment import load_experiment  # imported here: pydantic's models, once needed
    from sgd_dist.study.sweep import run_sweep  # imported here: torch and Ray, once the experiment is valid

    _check_out(args)
    sweep = load_experiment(args.config)  # every run's config validated here: a bad grid runs nothing
    out = Path(args.out) if args.out else Path("runs") / f"sweep-{Path(args.config).stem}"
    try:
        result = run_sweep(sweep, out, plots=args.plots)
    except KeyboardInterrupt as exc:
        return fail(interrupted_code(exc), f"interrupted; run the same command again (--out {out}) to resume")
    print(f"{len(result.rows)} runs: {result.ran} run now, {result.kept} kept from before, {result.failed} failed")
    for line in result.model_lines:
        print(line)
    if result.figures is not None:
        _print_figures(result.figures)
    print(f"results in {out}/results.csv")
    return EXIT_RUN_FAILED if result.failed else EXIT_OK


def _plan(args: argparse.Namespace) -> int:
    from sgd_dist.study import plan as planner  # imported here: torch, once the arguments are good
    from sgd_dist.study.cluster_spec import load_cluster
    from sgd_dist.study.plan_plots import plot_plan
    from sgd_dist.study.plan_results import parse_budget

    _check_out(args)
    if not args.target_gap > 0:
        raise UsageError(f"--target-gap must be > 0 (got {args.target_gap:g})")
    try:
        budget = parse_budget(args.budget)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    problem = planner.load_problem(args.config, args.overrides)
    spec, profile = load_cluster(args.cluster)
    space = planner.space_from(spec, args.workers, args.modes, args.batches, args.lr_scaling)
    out = Path(args.out) if args.out else Path("runs") / f"plan-{Path(args.config).stem}-{Path(args.cluster).stem}"
    plan = planner.Plan(out, Path(args.config).resolve(), problem, spec.model_copy(update={"name": spec.name or Path(
        args.cluster).stem}), profile, args.target_gap, args.objective, budget, space, progress=args.progress)
    try:
        ranked = planner.run_plan(plan)
    except KeyboardInterrupt as exc:
        return fail(interrupted_code(exc), f"interrupted; run the same command again (--out {out}) to resume")
    for line in planner.report(plan, ranked):
        print(line)
    try:
        print(f"figure: {plot_plan(out)}")
    except ValueError as exc:
        print(f"no figure: {exc}")
    print(f"results in {out}/plan.csv")
    return EXIT_OK


def _model(args: argparse.Namespace) -> int:
    from sgd_dist.study import cost_model  # imported here: numpy, once a command needs it
    from sgd_dist.study.model_report import curve_lines, error_lines, extrapolation_caveat, read_profile, saved_cores

    sweep_dir = Path(args.sweep_dir)
    if args.workers_max < 1 or (args.bandwidth_gbps is not None and args.bandwidth_gbps <= 0):
        raise UsageError("--workers-max must be >= 1 and --bandwidth-gbps > 0")
    if args.cores is not None and args.cores < 1:  # 0 would silently mean "the sweep's own"
        raise UsageError(f"--cores must be at least 1 (got {args.cores}); leave it out for the sweep's own")
    if args.latency_us is not None and args.latency_us < 0:
        raise UsageError(f"--latency-us must be at least 0 (got {args.latency_us:g})")
    if not (sweep_dir / "results.csv").is_file():
        raise UsageError(f"{str(sweep_dir)!r} is not a sweep directory (it needs results.csv)")
    cores = args.cores or saved_cores(sweep_dir) or cost_model.machine_cores()
    profile = None if args.profile is None else read_profile(args.profile)
    try:
        result = cost_model.model_sweep(sweep_dir, cores, profile, args.profile or "")
    except (ValueError, OSError, KeyError) as exc:
        return fail(EXIT_RUN_FAILED, f"cost model: {exc}")
    ks = cost_model.worker_counts(args.workers_max)
    found = cost_model.curves(result.observations, result.model, ks, None, network="as measured (no network)")
    if args.latency_us is not None or args.bandwidth_gbps is not None:
        latency = (args.latency_us or 0.0) / 1e6
        bandwidth = args.bandwidth_gbps * 1e9 if args.bandwidth_gbps else None
        words = f"{args.bandwidth_gbps or 'unlimited'} Gbit/s, {args.latency_us or 0:g} us latency"
        found += cost_model.curves(result.observations, result.model, ks, None, latency, bandwidth, words)
    fitted = profile is None
    print("cost model, fitted on every completed run:" if fitted else f"cost model from the profile {args.profile}:")
    for line in result.model.describe():
        print(f"  {line}")
    print("measured against predicted, each run from a fit on the other grid points' runs:" if fitted else
          "measured against predicted from the profile (the steps to the target: each run's own):")
    for line in error_lines(result.observations, result.predictions):
        print(line)
    print("predicted on a cluster (a core per process, the measured transport's costs):")
    caveat = extrapolation_caveat(result.observations)
    for line in [caveat] if caveat else curve_lines(found, table=True):
        print(line)
    return EXIT_OK


def _calibrate(args: argparse.Namespace) -> int:
    from sgd_dist.bench import calibrate  # imported here: torch and Ray, once asked for

    path = calibrate.profile_path(args.out)  # a path that cannot be written is refused before measuring
    try:
        result = calibrate.calibrate(quick=args.quick, progress=args.progress)
    except KeyboardInterrupt as exc:
        return fail(interrupted_code(exc), "interrupted; nothing was written")
    for line in result.lines:
        print(line)
    calibrate.write_profile(path, result.profile)
    print(f"profile written to {path} (use it with cluster.virtual.profile={path})")
    return EXIT_OK


def _config(args: argparse.Namespace) -> int:
    if args.describe:
        for key, default, text in describe_fields():
            print(f"{key:<24} {default:<10} {text}")
        return EXIT_OK
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return EXIT_OK


def _bench(args: argparse.Namespace) -> int:
    from sgd_dist.bench import BenchOptions, run_benchmark  # imported here: the benchmark's peers, once asked for
    from sgd_dist.bench.report import results_markdown, startup_markdown, targets_markdown
    from sgd_dist.run.rundir import default_run_dir

    _check_out(args)
    if min(args.steps, args.repeats) < 1 or args.warmup < 0 or args.startup_repeats < 0:
        raise UsageError("--steps and --repeats must be at least 1, --warmup and --startup-repeats at least 0")
    if args.bandwidth_mib < 1:
        raise UsageError(f"--bandwidth-mib must be at least 1 (got {args.bandwidth_mib})")
    out = Path(args.out) if args.out else default_run_dir("bench")
    options = BenchOptions(dims=args.dims, workers=args.workers, steps=args.steps, warmup=args.warmup,
                           systems=args.systems, repeats=args.repeats, startup_repeats=args.startup_repeats,
                           startup_workers=args.startup_workers, startup_cluster=args.startup_cluster,
                           bandwidth_bytes=args.bandwidth_mib << 20, compression=args.compression)
    try:
        result = run_benchmark(options, out)
    except KeyboardInterrupt as exc:
        return fail(interrupted_code(exc), f"interrupted; what was measured is in {out}/")
    print(results_markdown(result.rows))
    print()
    print(targets_markdown(result.targets))
    if result.startup is not None:
        print()
        print(startup_markdown(result.startup))
    print(f"results in {out}/")
    return EXIT_OK


def _submit(args: argparse.Namespace) -> int:
    from sgd_dist.jobs.client import submit  # imported here: Ray's job client, once asked for

    _check_out(args)
    config = load_config(args.config, args.overrides)
    try:
        result = submit(args.address, config, out=args.out, config_name=Path(args.config).stem)
    except KeyboardInterrupt as exc:
        return fail(interrupted_code(exc), "interrupted; the job goes on on the cluster "
                                       f"(sgd-dist jobs --address {args.address} --stop JOB_ID stops it)")
    except SubmitError as exc:
        return fail(EXIT_RUN_FAILED, str(exc))
    s = result.summary or {}
    print(f"job {result.job_id} {result.status.lower()}: {s.get('steps')} steps, final loss "
          f"{s.get('final_loss', float('nan')):.6g}, gap {s.get('optimality_gap', float('nan')):.3e}")
    print(f"results in {result.run_dir}/")
    return EXIT_OK


def _jobs(args: argparse.Namespace) -> int:
    from sgd_dist.jobs import client as submit  # imported here: Ray's job client, once asked for

    try:
        if args.follow:
            status = submit.follow(args.address, args.follow)
            print(f"job {args.follow} {status.lower()}")
            return EXIT_OK if status == "SUCCEEDED" else EXIT_RUN_FAILED
        if args.stop:
            stopped = submit.stop(args.address, args.stop)
            print(f"job {args.stop} " + ("stopping" if stopped else "had already ended"))
            return EXIT_OK
        for job in submit.list_jobs(args.address):
            start = job.start_time
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start / 1e3)) if start else "-"
            print(f"{job.submission_id or job.job_id:<28} {str(job.status.value):<10} {started}  {job.entrypoint}")
        return EXIT_OK
    except KeyboardInterrupt as exc:
        return fail(interrupted_code(exc), "interrupted; the job goes on on the cluster")
    except SubmitError as exc:
        return fail(EXIT_RUN_FAILED, str(exc))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    command = {"train": _train, "plot": _plot, "config": _config, "bench": _bench, "replay": _replay,
               "submit": _submit, "jobs": _jobs, "sweep": _sweep, "model": _model,
               "calibrate": _calibrate, "plan": _plan}[args.command]
    return guarded(lambda: command(args))


if __name__ == "__main__":
    sys.exit(main())
