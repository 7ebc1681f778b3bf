"""The ``sgd-dist`` command: a thin layer over ``sgd_dist.trainer.train``.

Exit codes: 0 success; 2 invalid config or usage (one line naming the field, nothing written);
1 a run that failed (one line; the run directory keeps what was recorded); 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path
from typing import NoReturn, Sequence

from sgd_dist.config import ConfigError, describe_fields, dump_config, load_config

EXIT_OK, EXIT_RUN_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sgd-dist", description="Distributed mini-batch SGD with a parameter server on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="run one training and record it in a run directory")
    p.add_argument("--config", required=True, help="YAML config file (see configs/)")
    p.add_argument("--out", help="run directory (new or empty); default runs/<config name>-<timestamp>")
    p.add_argument("--backend", choices=["ray", "serial"], help="ray (default) or serial: the one-process reference")
    p.add_argument("--address", help="join this Ray cluster ('auto' or HOST:PORT) instead of starting a local one")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")
    p.add_argument("--traceback", action="store_true", help="print the full traceback when a run fails")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=200")

    p = sub.add_parser("plot", help="redraw a run directory's figures from its recorded files")
    p.add_argument("run_dir", help="a run directory written by sgd-dist train")

    p = sub.add_parser("config", help="print the validated config (all defaults filled in) as YAML")
    p.add_argument("--config", help="YAML config file; default: the built-in defaults")
    p.add_argument("--describe", action="store_true", help="list every key with its default and meaning")
    p.add_argument("overrides", nargs="*", metavar="key=value")

    _add_cluster_parsers(sub)
    return parser


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


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    pairs = [("output.dir", args.out), ("cluster.backend", args.backend), ("cluster.address", args.address)]
    return [f"{key}={value}" for key, value in pairs if value is not None]


def _fail(code: int, message: str) -> int:
    print(f"sgd-dist: error: {message}", file=sys.stderr)
    return code


def _train(args: argparse.Namespace) -> int:
    from sgd_dist.trainer import one_line, train  # torch and tqdm only once the arguments are good

    config = load_config(args.config, [*args.overrides, *_flag_overrides(args)])
    try:
        result = train(config, config_path=args.config, progress=args.progress)
    except ConfigError:
        raise
    except KeyboardInterrupt:
        return _fail(EXIT_INTERRUPTED, "interrupted; the run directory keeps the rows recorded so far")
    except Exception as exc:
        if args.traceback:
            traceback.print_exc()
        return _fail(EXIT_RUN_FAILED, f"run failed: {one_line(exc)}"
                     + ("" if args.traceback else " (--traceback shows where)"))
    s = result.summary
    rel = s["relative_optimality_gap"]
    print(f"done: {s['steps']} steps in {s['train_time_s']:.2f} s ({s['median_step_ms']:.3f} ms/step median, "
          f"{s['samples_per_s']:,.0f} samples/s); wall {s['wall_time_s']:.1f} s")
    print(f"final loss {s['final_loss']:.6g}, optimum {s['optimal_loss']:.6g}, gap {s['optimality_gap']:.3e}"
          + (f" (relative {rel:.2e})" if rel is not None else ""))
    print("weights " + ", ".join(f"{v:.5g}" for v in s["weights"][:8]) + (" ..." if len(s["weights"]) > 8 else ""))
    print(f"results in {result.run_dir}/")
    return EXIT_OK


def _plot(args: argparse.Namespace) -> int:
    from sgd_dist.plots import plot_run

    run_dir = Path(args.run_dir)
    if not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "config.yaml").is_file():
        return _fail(EXIT_USAGE, f"{str(run_dir)!r} is not a run directory (it needs config.yaml and metrics.jsonl)")
    for path in plot_run(run_dir):
        print(path)
    return EXIT_OK


def _config(args: argparse.Namespace) -> int:
    if args.describe:
        for key, default, text in describe_fields():
            print(f"{key:<24} {default:<10} {text}")
        return EXIT_OK
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return EXIT_OK


def _submit(args: argparse.Namespace) -> int:
    from sgd_dist.submit import SubmitError, submit

    config = load_config(args.config, args.overrides)
    try:
        result = submit(args.address, config, out=args.out, config_name=Path(args.config).stem)
    except KeyboardInterrupt:
        return _fail(EXIT_INTERRUPTED, "interrupted; the job goes on on the cluster "
                                       f"(sgd-dist jobs --address {args.address} --stop JOB_ID stops it)")
    except SubmitError as exc:
        return _fail(EXIT_RUN_FAILED, str(exc))
    s = result.summary or {}
    print(f"job {result.job_id} {result.status.lower()}: {s.get('steps')} steps, final loss "
          f"{s.get('final_loss', float('nan')):.6g}, gap {s.get('optimality_gap', float('nan')):.3e}")
    print(f"results in {result.run_dir}/")
    return EXIT_OK


def _jobs(args: argparse.Namespace) -> int:
    from sgd_dist import submit

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
    except KeyboardInterrupt:
        return _fail(EXIT_INTERRUPTED, "interrupted; the job goes on on the cluster")
    except submit.SubmitError as exc:
        return _fail(EXIT_RUN_FAILED, str(exc))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"train": _train, "plot": _plot, "config": _config, "submit": _submit, "jobs": _jobs}[args.command](args)
    except ConfigError as exc:
        return _fail(EXIT_USAGE, str(exc))


if __name__ == "__main__":
    sys.exit(main())
