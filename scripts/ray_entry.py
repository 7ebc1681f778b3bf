"""Entry script for `ray submit`: join the running cluster with address="auto" and train on it.

    ray submit cluster/local.yaml scripts/ray_entry.py -- --config configs/lesson2.yaml [--out DIR] [key=value ...]

Everything after `--` is `sgd-dist train`'s arguments. `ray submit` copies this file alone to the head and runs
it there; the project is on the head at ~/sgd_dist (cluster/local.yaml's file_mounts), and relative paths
(`--config`, `--out`, the default runs/) are taken from there. The run directory stays on the head; bring it
back with `ray rsync-down cluster/local.yaml '~/sgd_dist/runs/NAME/' runs/NAME/`. The workers get the
package through the job's runtime_env, so no node needs sgd_dist installed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def project_dir() -> Path:
    """This checkout when run from one; otherwise the copy that `ray up` put on the head."""
    candidates = [Path(__file__).resolve().parent.parent, Path.home() / "sgd_dist"]
    if os.environ.get("SGD_DIST_PROJECT"):
        candidates.insert(0, Path(os.environ["SGD_DIST_PROJECT"]))
    for candidate in candidates:
        if (candidate / "sgd_dist" / "__init__.py").is_file():
            return candidate
    sys.exit("ray_entry.py: error: no sgd_dist project found in "
             + ", ".join(map(str, candidates)) + " (file-mount it at ~/sgd_dist or set SGD_DIST_PROJECT)")


def main(argv: list[str]) -> int:
    project = project_dir()
    sys.path.insert(0, str(project))
    os.chdir(project)
    # The clusters `ray up` makes from cluster/local.yaml use token authentication (Ray 2.60's default for
    # `ray start`); the token is ~/.ray/auth_token, which `ray up` copied here.
    os.environ.setdefault("RAY_AUTH_MODE", "token")

    import logging

    import ray

    from sgd_dist.cli import main as sgd_dist_main

    ray.init(address="auto", runtime_env={"py_modules": [str(project / "sgd_dist")]}, logging_level=logging.WARNING)
    try:
        return sgd_dist_main(["train", *argv])  # train() uses the Ray this process joined and leaves it
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
