"""One training as a console command: train, then the lines that report it, or the one line that says why it
failed, and the exit status. ``sgd-dist train`` and the job side of ``sgd-dist submit`` both end here."""

from __future__ import annotations

import traceback
from pathlib import Path

from sgd_dist.config import Config
from sgd_dist.engine.delays import describe_stragglers
from sgd_dist.errors import EXIT_OK, EXIT_RUN_FAILED, CheckpointError, ClusterError, ConfigError, UsageError, one_line
from sgd_dist.run.checkpoint import CHECKPOINT_DIR, MANIFEST
from sgd_dist.run.outcome import fail, interrupted_code
from sgd_dist.run.summary import describe_fault, mode_line
from sgd_dist.run.trainer import RunResult, train
from sgd_dist.run.workers import table_lines


def train_and_report(config: Config, *, config_path: str | None = None, progress: bool | None = None,
                     show_traceback: bool = False, resume: str | None = None) -> int:
    """Train; print the report and return 0, or print one line and return the run's exit status. Config and usage
    errors go up to ``outcome.guarded``, as everywhere."""
    try:
        result = train(config, config_path=config_path, progress=progress, resume=resume)
    except CheckpointError as exc:
        return fail(EXIT_RUN_FAILED, f"cannot resume: {exc}")
    except (ConfigError, UsageError):
        raise
    except KeyboardInterrupt as exc:
        return fail(interrupted_code(exc), interrupted(getattr(exc, "run_dir", None)))
    except BrokenPipeError:
        raise  # not a failure of the run: the command stops quietly
    except Exception as exc:
        if show_traceback:
            traceback.print_exc()
        whole_story = isinstance(exc, ClusterError)  # where it failed is not the question
        return fail(EXIT_RUN_FAILED, f"run failed: {one_line(exc)}"
                    + ("" if show_traceback or whole_story else " (--traceback shows where)"))
    report(result)
    return EXIT_OK


def _against(s: dict) -> str:
    """What the relative gap divides by, when it is not f* (f* = 0: the initial gap)."""
    if s.get("gap_scale") in (None, s["optimal_loss"]):
        return ""
    return f" of {s['gap_scale_is'].split(':')[0]}"


def report(result: RunResult) -> None:
    """The finished run's lines: time, loss against the optimum, weights, mode, faults, stragglers, where."""
    s = result.summary
    rel = s["relative_optimality_gap"]
    resumed = s.get("resumed_from")
    virtual = " of virtual time" if s.get("clock") == "virtual" else ""
    print(f"done: {s['steps']} steps in {s['train_time_s']:.3g} s{virtual} ({s['median_step_ms']:.3f} ms/step median, "
          f"{s['samples_per_s']:,.0f} samples/s)"
          + (f", {s['steps'] - resumed} of them after resuming from step {resumed}" if resumed is not None else "")
          + f"; wall {s['wall_time_s']:.1f} s")
    if s["optimality_gap"] is None:
        print(f"final loss {s['final_loss']:.6g}; optimum {s['reference']}")
    else:
        print(f"final loss {s['final_loss']:.6g}, optimum {s['optimal_loss']:.6g}, gap {s['optimality_gap']:.3e}"
              + (f" (relative {rel:.2e}{_against(s)})" if rel is not None else ""))
    print("weights " + ", ".join(f"{v:.5g}" for v in s["weights"][:8]) + (" ..." if len(s["weights"]) > 8 else ""))
    print(mode_line(s))
    for entry in s.get("faults") or []:
        print(f"fault: {describe_fault(entry)}")
    if s.get("per_worker"):
        print("\n".join(table_lines(s["per_worker"], s.get("stragglers", []))))
    for line in describe_stragglers(s.get("stragglers", [])):
        print(f"straggler: {line}")
    print(f"results in {result.run_dir}/")


def interrupted(run_dir: Path | None) -> str:
    """What an interrupted run left: the rows in its directory (and how to go on), or nothing at all."""
    if run_dir is None:
        return "interrupted before the run started; nothing was written"
    resume = (Path(run_dir) / CHECKPOINT_DIR / MANIFEST).is_file()
    return (f"interrupted; {run_dir} keeps the rows recorded so far"
            + (f" (sgd-dist train --resume {run_dir} goes on from its latest checkpoint)" if resume else ""))
