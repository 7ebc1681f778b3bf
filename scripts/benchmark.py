"""`sgd-dist bench` as a script, with the same options.

    .venv/bin/python scripts/benchmark.py --dims 2,1000 --workers 2 --out bench-results
"""

import sys

from sgd_dist.cli import main

if __name__ == "__main__":  # the guard matters: torch.distributed's spawned processes re-import this file
    sys.exit(main(["bench", *sys.argv[1:]]))
