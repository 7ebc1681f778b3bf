"""``sgd-dist bench``: sgd_dist against its peers on one generated problem (issue 11, point 4).

The systems, one after another in one invocation: one plain PyTorch process (the floor), Ray's documented
parameter-server pattern, torch.distributed gloo DDP, Ray Train's TorchTrainer (when ``ray[train]`` is
installed) and sgd_dist itself on each transport.

| module | one responsibility |
|---|---|
| `options.py` | what can be selected and the defaults (no torch: the CLI imports it) |
| `problem.py` | the one problem every system solves; per-step statistics |
| `peers.py` | the peer systems, plain functions returning the times their steps ended |
| `startup.py` | start-up: a 1-step lesson-2 run against a bare torch + Ray program |
| `runner.py` | `run_benchmark`: the sizes x systems loop, sgd_dist's own rows, the output files |
| `report.py` | the table, the issue's target ratios, results.csv and the figure (pure functions) |
"""

from sgd_dist.bench.options import SYSTEMS, BenchOptions


def run_benchmark(*args, **kwargs):
    """``runner.run_benchmark`` (imported on first use: it needs torch)."""
    from sgd_dist.bench.runner import run_benchmark as run

    return run(*args, **kwargs)


__all__ = ["SYSTEMS", "BenchOptions", "run_benchmark"]
