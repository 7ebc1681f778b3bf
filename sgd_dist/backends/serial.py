"""The serial reference: the same workers, server and loop as plain objects in this one process, no Ray."""

from __future__ import annotations

from typing import Any, Collection, Sequence

import torch

from sgd_dist.backends.base import Backend, Sink, server_args, worker_args, worker_threads
from sgd_dist.config import Config
from sgd_dist.engine.loop import Loop
from sgd_dist.engine.recovery import LoopHooks
from sgd_dist.engine.server import ParameterServer
from sgd_dist.engine.worker import ShardWorker
from sgd_dist.transports import local


def resolve_local_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("cluster.device=cuda, but torch sees no CUDA device here; use cpu or auto")
    return device


class InProcessBackend(Backend):
    """Workers and server as plain objects in this one process (the serial and the virtual backends): a call to
    one of them is a method call, and its answer is at hand."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.device = resolve_local_device(config.cluster.device)
        # Compute with the Ray workers' thread count, from data generation on: large reductions round
        # differently with different thread counts, and the reference must equal the Ray run bit for bit.
        self._process_threads: int | None = torch.get_num_threads()
        torch.set_num_threads(worker_threads(config))
        try:
            self.workers = self.make_workers(config)
            self.server = ParameterServer(**server_args(config))
            self.info = self.worker_info()
        except BaseException:
            self.close()
            raise

    def make_workers(self, config: Config) -> list[ShardWorker]:
        """Each worker generating its own shard, as a Ray worker does."""
        return [ShardWorker(**args, device=self.device) for args in worker_args(config)]

    def _call(self, target: Any, method: str, *args: Any) -> Any:
        return getattr(target, method)(*args)

    def _get(self, handles: Sequence[Any]) -> list[Any]:
        return list(handles)

    def final_weights(self) -> torch.Tensor:
        return self.server.weights.clone()

    def close(self) -> None:
        """Give this process its own torch thread count back."""
        if self._process_threads is not None:
            torch.set_num_threads(self._process_threads)
            self._process_threads = None


class SerialBackend(InProcessBackend):
    name = "serial"

    def run(self, policy, eval_at: Collection[int], sink: Sink, restore: dict | None = None) -> None:
        hooks = LoopHooks(checkpoint_every=self.config.train.checkpoint_every, on_checkpoint=sink.checkpoint,
                          on_fault=sink.fault)
        loop = Loop(self.server, local.connect(self.workers), policy, self.config.cluster.num_workers, eval_at,
                    sink.rows, staleness_lr=self.config.optim.staleness_lr, hooks=hooks, restore=restore)
        self.loop_stats = loop.run()
