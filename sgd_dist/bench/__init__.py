"""``sgd-dist bench``: sgd_dist against its peers on one generated problem (issue 11, point 4).

The systems, one after another in one invocation: one plain PyTorch process (the floor), Ray's documented
parameter-server pattern, torch.distributed gloo DDP, Ray Train's TorchTrainer (when ``ray[train]`` is
installed) and sgd_dist itself on each transport. See ``runner.run_benchmark``.
"""

from sgd_dist.bench.runner import SYSTEMS, BenchOptions, BenchResult, run_benchmark

__all__ = ["SYSTEMS", "BenchOptions", "BenchResult", "run_benchmark"]
