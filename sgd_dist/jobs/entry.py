"""The job side of ``sgd-dist submit``: ``python -m sgd_dist.jobs.entry CONFIG``, started on the cluster by the
job's entrypoint script, trains into a temporary run directory (joining the cluster through RAY_ADDRESS, which
Ray sets) and prints that directory at the end of the job's log, where the client finds it."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import sgd_dist
from sgd_dist.config import load_config
from sgd_dist.jobs.client import archive_lines
from sgd_dist.run.console import train_and_report
from sgd_dist.run.outcome import guarded


def run_job(config_path: str) -> int:
    """Train as ``sgd-dist train --config CONFIG --out TMP --no-progress`` would, then print TMP into the log."""
    print(f"sgd-dist job: sgd_dist {sgd_dist.__version__} from {Path(sgd_dist.__file__).resolve().parent} "
          f"(python {sys.executable})", flush=True)
    with tempfile.TemporaryDirectory(prefix="sgd-dist-job-") as tmp:
        run_dir = Path(tmp) / "run"
        code = guarded(lambda: train_and_report(load_config(config_path, [f"output.dir={run_dir}"]),
                                                config_path=config_path, progress=False))
        sys.stderr.flush()
        if run_dir.is_dir():
            for line in archive_lines(run_dir):
                sys.stdout.write(line + "\n")  # one write per line: Ray's log forwarder must not split it
            sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(run_job(sys.argv[1]))
