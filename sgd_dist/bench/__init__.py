"""``sgd-dist bench``: sgd_dist against its peers and its floor on one generated problem.

The systems, one after another in one invocation: the one-process loop a user would write (all cores,
contiguous or shuffled batches, autograd or the written-out gradient: the floor), Ray's documented
parameter-server pattern, torch.distributed gloo DDP, Ray Train's TorchTrainer (when ``ray[train]`` is
installed) and sgd_dist itself on each transport and sampling; beside each, the step's bandwidth floor.

| module | one responsibility |
|---|---|
| `options.py` | what can be selected and the defaults (no torch: the CLI imports it) |
| `problem.py` | the one problem every system solves, the bytes a step must read; per-step statistics |
| `floor.py` | the one-process loops and the memory bandwidth |
| `peers.py` | the distributed peer systems, plain functions returning the times their steps ended |
| `startup.py` | start-up: 1-step lesson-2 runs (local, on a running cluster) and many workers, against bare programs |
| `runner.py` | `run_benchmark`: the sizes x systems loop, sgd_dist's own rows, the output files |
| `report.py` | the table, the targets with PASS or MISS, results.csv and the figure (pure functions) |
"""

from sgd_dist.bench.options import SYSTEMS, BenchOptions


def run_benchmark(*args, **kwargs):
    """``runner.run_benchmark`` (imported on first use: it needs torch)."""
    from sgd_dist.bench.runner import run_benchmark as run

    return run(*args, **kwargs)


__all__ = ["SYSTEMS", "BenchOptions", "run_benchmark"]
