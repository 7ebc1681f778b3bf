"""One validated, frozen config tree: a pydantic model per YAML section.

Every field carries a docstring (shown on one line by ``sgd-dist config --describe``). Unknown keys are
rejected, values are range-checked on construction, and the errors name the dotted field path.
"""

from __future__ import annotations

import copy
import ipaddress
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Sequence

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from sgd_dist.errors import ConfigError


def _count(value: Any) -> Any:
    """Accept 1e6 / "1e6" / "1_000_000" for counts, as long as the value is a whole number."""
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)
            except ValueError:
                return value  # pydantic reports it as not an integer
            return int(number) if number.is_integer() else value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Count = Annotated[int, BeforeValidator(_count)]
Weights = tuple[float, ...]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, use_attribute_docstrings=True)


MODES = ("sync", "async", "ssp", "backup", "local_sgd")  # train.mode's values, one policy each (engine/policies.py)


@dataclass(frozen=True)
class ModeParameter:
    """The one train key a mode has of its own."""

    key: str
    sync_value: int  # the value with which the mode runs as sync: the field's default, refused for other modes
    meaning: str  # what to give, for the error that asks for it


MODE_PARAMETERS = {
    "ssp": ModeParameter("staleness_bound", 0,
                         "how many steps a worker may run ahead of the slowest, e.g. 2; 0 is sync"),
    "backup": ModeParameter("backup_workers", 0,
                            "how many of the slowest gradients each step drops, e.g. 1; 0 is sync"),
    "local_sgd": ModeParameter("local_steps", 1, "local SGD steps between two averagings, e.g. 4; 1 is sync"),
}

LINEAR_ONLY = ("noise", "noise_scale")  # data keys that only data.kind=linear uses
# Keys that only one value of a selector uses (or one of a tuple of values): (section, key) -> (selector, value).
# Such a key is left out of a dumped config whose selector has another value, and an override that switches the
# selector drops it.
OWNED_KEYS = {
    **{("data", key): ("kind", "linear") for key in LINEAR_ONLY},
    **{("train", parameter.key): ("mode", mode) for mode, parameter in MODE_PARAMETERS.items()},
    ("train", "outer"): ("mode", "local_sgd"),
    ("compression", "ratio"): ("kind", ("topk", "randk")),
    ("compression", "bucket"): ("kind", "int8"),
}


class DataConfig(_Section):
    kind: Literal["linear", "logistic"] = "linear"
    """linear: y = x @ a + noise, fitted by mean squared error; logistic: y ~ Bernoulli(sigmoid(x @ a)), fitted by
    cross-entropy."""
    n_samples: Count = Field(100_000, ge=1)
    """Rows in the whole dataset, split over the workers as evenly as possible."""
    n_features: Count = Field(1, ge=1)
    """Features per row, the bias column not counted."""
    bias: bool = True
    """Append a constant-1 column to x (the seed's x = [U(-1,1), 1])."""
    x_dist: Literal["uniform", "normal"] = "uniform"
    """Feature distribution: uniform is U(-1, 1), normal is N(0, 1)."""
    noise: Literal["uniform", "normal"] = "uniform"
    """Label noise (linear only): uniform is U(0, noise_scale) as in the seed, normal is N(0, noise_scale^2); null is
    the same as leaving the key out (how a logistic config may say it has no label noise)."""
    noise_scale: float = Field(1.0, ge=0)
    """Scale of the label noise (linear only); 0 gives noiseless labels; null is the same as leaving the key out."""
    true_weights: Weights | None = None
    """The true a, one entry per feature then the bias; null draws it from N(0, 1) with the data seed."""
    seed: int = Field(0, ge=0)
    """Seeds the data, block by block; the same seed gives bitwise the same dataset however it is sharded."""
    dtype: Literal["float32", "float64"] = "float32"
    """Storage and compute dtype of the data and the weights."""

    @property
    def dim(self) -> int:
        """Number of model parameters: the features plus the bias column."""
        return self.n_features + int(self.bias)

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and any(raw.get(key, 0) is None for key in LINEAR_ONLY):
            raw = {k: v for k, v in raw.items() if not (k in LINEAR_ONLY and v is None)}
        return raw

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.true_weights is not None and len(self.true_weights) != self.dim:
            raise ValueError(
                f"data.true_weights has {len(self.true_weights)} entries; it needs {self.dim} "
                f"(data.n_features={self.n_features}{' plus the bias' if self.bias else ''})"
            )
        if self.kind == "logistic":
            extra = [f"data.{key}" for key in LINEAR_ONLY if key in self.model_fields_set]
            if extra:
                raise ValueError(f"{', '.join(extra)} {'applies' if len(extra) == 1 else 'apply'} only to "
                                 f"data.kind=linear; drop {'it' if len(extra) == 1 else 'them'} for data.kind=logistic")
        return self


class ModelConfig(_Section):
    init: Literal["zeros"] | Weights = "zeros"
    """Starting weights: 'zeros', or a list with one entry per parameter (the seed starts at [-1, 1])."""

    @field_validator("init", mode="before")
    @classmethod
    def _one_of(cls, value: Any) -> Any:
        if value == "zeros" or isinstance(value, (list, tuple)):
            return value
        raise ValueError(f"must be 'zeros' or a list of numbers (got {value!r})")


class OptimConfig(_Section):
    lr: float = Field(0.1, gt=0)
    """Base learning rate (before warm-up, schedule and linear scaling)."""
    momentum: float = Field(0.0, ge=0, lt=1)
    """Heavy-ball momentum, as torch.optim.SGD (dampening 0)."""
    nesterov: bool = False
    """Nesterov momentum (needs momentum > 0)."""
    weight_decay: float = Field(0.0, ge=0)
    """L2 penalty wd/2 * |w|^2 added to the objective (torch.optim.SGD's weight_decay); the optimum is then the
    penalised one."""
    schedule: Literal["constant", "step", "cosine"] = "constant"
    """Learning-rate schedule after warm-up."""
    warmup_steps: Count = Field(0, ge=0)
    """Linear warm-up: step t < warmup_steps uses lr * (t + 1) / warmup_steps."""
    step_size: Count = Field(100, ge=1)
    """schedule=step: multiply the learning rate by gamma every step_size steps after warm-up."""
    gamma: float = Field(0.1, gt=0, le=1)
    """schedule=step: the decay factor."""
    min_lr: float = Field(0.0, ge=0)
    """schedule=cosine: the floor of the decay, reached one update after the last (torch's CosineAnnealingLR)."""
    lr_scaling: Literal["none", "linear"] = "none"
    """linear: multiply lr by global batch / base_batch_size (Goyal et al.'s linear scaling rule)."""
    base_batch_size: Count = Field(256, ge=1)
    """lr_scaling=linear: the global batch size that optim.lr was tuned for."""
    staleness_lr: bool = False
    """async and ssp: divide each gradient's step by its staleness (updates applied since its weights), as
    Zhang et al. 2016."""

    @model_validator(mode="after")
    def _check(self) -> OptimConfig:
        if self.nesterov and self.momentum == 0:
            raise ValueError("optim.nesterov=true needs optim.momentum > 0")
        return self


class NetworkConfig(_Section):
    latency_ms: float = Field(0.0, ge=0)
    """One-way latency of every message between the server and a worker, in ms: a command and its answer are one message
    each (on any backend, simulated nodes or not)."""
    bandwidth_gbps: float | None = Field(None, gt=0)
    """Bandwidth of each worker's link to the server, in gigabits per second (a message of B bytes takes B * 8 /
    (bandwidth_gbps * 1e9) s more); null: unlimited."""

    @property
    def enabled(self) -> bool:
        """Whether the model delays anything."""
        return self.latency_ms > 0 or self.bandwidth_gbps is not None


_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?)*")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class VirtualConfig(_Section):
    profile: str | None = None
    """A TimeProfile JSON (core/time_model.py's format) whose coefficients the virtual clock uses; null: the
    profile shipped in the package."""
    workers_per_node: Count | None = Field(None, ge=1)
    """Workers per node: the server is on node 0 with workers 0..m-1, whose messages skip the network; null: each worker
    on a node of its own."""
    cores: Count | None = Field(None, ge=1)
    """C cores shared equally by every computing process, the server included (processor sharing); null: a core each."""
    speed: dict[int, float] = {}
    """Worker index -> compute-time multiplier (mixed hardware: 2.0 computes half as fast); unlisted workers 1.0."""
    speed_sigma: float = Field(0.0, ge=0)
    """Each worker's compute time is also multiplied by exp(speed_sigma x N(0, 1)), drawn once per worker, keyed by
    (seed, worker); 0: off."""
    worker_mtbf_s: float | None = Field(None, gt=0)
    """Random worker failures: each worker fails after exponential times of this mean, in virtual seconds from its start
    (a replacement's from when it is up), keyed by (seed, worker, failure); null: none."""
    server_mtbf_s: float | None = Field(None, gt=0)
    """Random server failures: exponential times of this mean between failures, in virtual seconds, keyed by (seed,
    failure); each rolls the run back to the last checkpoint after the profile's restart_s; null: none."""
    seed: int = Field(0, ge=0)
    """Seeds speed_sigma and the random failures."""

    @field_validator("speed")
    @classmethod
    def _factors(cls, value: dict[int, float]) -> dict[int, float]:
        for worker, factor in value.items():
            if worker < 0 or not (factor > 0 and factor != float("inf")):
                raise ValueError(f"needs worker index >= 0 -> factor > 0 (got {worker}: {factor})")
        return value


class ClusterConfig(_Section):
    backend: Literal["ray", "serial", "virtual"] = "ray"
    """ray: worker and server actors on a Ray cluster; serial: the same math in this one process (the reference);
    virtual: the same math in this one process on a modelled cluster's clock (cluster.virtual)."""
    address: str | None = None
    """Ray cluster to join ('auto', 'HOST:PORT' or 'ray://...'); null starts an embedded local Ray bound to 127.0.0.1
    (or uses the one this process is connected to)."""
    num_workers: Count = Field(2, ge=1)
    """Worker actors, each holding one shard of the data."""
    transport: Literal["auto", "shm", "ray"] = "auto"
    """How weights and gradients travel on the ray backend: shm (shared memory, every actor on one node), ray (Ray
    channels, across nodes), auto (shm when the workers share a node)."""
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    """Where each worker keeps its shard and computes: cpu, cuda (one GPU per worker from Ray), or auto (cuda if the
    cluster has GPUs)."""
    cpus_per_worker: float = Field(1.0, ge=0)
    """CPUs Ray reserves for each worker actor; also its torch thread count (at least 1)."""
    gpus_per_worker: float = Field(1.0, gt=0, le=1)
    """GPUs Ray reserves for each worker when it runs on cuda; fractions pack several workers on one GPU."""
    placement_timeout_s: float = Field(60.0, gt=0)
    """Seconds to wait for free CPUs (and GPUs) to place the workers; then the run fails naming what is missing."""
    simulated_nodes: Count | None = Field(None, ge=1)
    """Start a Ray cluster of this many nodes on this machine (Ray's cluster_utils.Cluster, on 127.0.0.1) and put worker
    r on node r mod N (the server on node 0, the head); null: off. Needs backend=ray and address null."""
    network: NetworkConfig = NetworkConfig()
    """A simulated network between the server and each worker: every message is delayed, wall time only."""
    virtual: VirtualConfig = VirtualConfig()
    """backend=virtual: the modelled cluster (time profile, nodes, cores, speeds, random failures)."""

    @field_validator("address")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is None or value == "auto":
            return value
        target = value.removeprefix("ray://")
        host, sep, port = target.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        if not (sep and port.isdigit() and 0 < int(port) < 65536 and (_HOSTNAME.fullmatch(host) or _is_ip(host))):
            raise ValueError(f"must be 'auto', HOST:PORT or ray://HOST:PORT (got {value!r})")
        return value

    @model_validator(mode="after")
    def _check(self) -> ClusterConfig:
        speed = list(self.virtual.speed)
        if any(r >= self.num_workers for r in speed):
            raise ValueError(f"cluster.virtual.speed names worker {max(speed)}; workers are 0..{self.num_workers - 1}")
        nodes = self.simulated_nodes
        if nodes is None:
            return self
        if self.backend != "ray":
            raise ValueError(f"cluster.simulated_nodes={nodes} applies only to cluster.backend=ray (it starts a Ray "
                             "cluster); set it to null for the serial backend")
        if self.address is not None:
            raise ValueError(f"cluster.simulated_nodes={nodes} starts its own Ray cluster on this machine: it needs "
                             f"cluster.address=null (got {self.address!r})")
        spread = min(nodes, self.num_workers)
        if self.transport == "shm" and spread > 1:
            raise ValueError(f"cluster.transport=shm needs every worker on one node; cluster.simulated_nodes={nodes} "
                             f"puts the {self.num_workers} workers on {spread} nodes "
                             "(use cluster.transport=ray or auto)")
        return self


OUTER_OPTIMIZERS = ("sgd", "nesterov")  # train.outer.optimizer's values (core/outer.py applies them)
COMPRESSION_KINDS = ("none", "fp16", "bf16", "int8", "topk", "randk")  # core/compression.py's KINDS


class OuterConfig(_Section):
    optimizer: Literal[OUTER_OPTIMIZERS] = "sgd"
    """How the server applies the workers' averaged model delta (a pseudo-gradient) in local_sgd: sgd (w -= lr x delta;
    lr 1 is plain model averaging, bit for bit) or nesterov (DiLoCo's outer step, torch.optim.SGD with nesterov)."""
    lr: float = Field(1.0, gt=0)
    """The outer learning rate (constant; DiLoCo uses 0.7 with nesterov)."""
    momentum: float = Field(0.0, ge=0, lt=1)
    """optimizer=nesterov: its momentum, in (0, 1) (DiLoCo: 0.9); sgd takes none."""

    @model_validator(mode="after")
    def _check(self) -> OuterConfig:
        if self.optimizer == "nesterov" and self.momentum == 0:
            raise ValueError("train.outer.optimizer=nesterov needs train.outer.momentum in (0, 1), e.g. 0.9")
        if self.optimizer == "sgd" and self.momentum:
            raise ValueError(f"train.outer.momentum={self.momentum} applies to train.outer.optimizer=nesterov; "
                             "sgd takes none (set it to 0)")
        return self


class TrainConfig(_Section):
    mode: Literal[MODES] = "sync"
    """Consistency mode. sync: each update averages all workers' gradients of one step; async: each gradient is applied
    as it arrives; ssp: sync averaging, but a worker may run up to staleness_bound steps ahead; backup: each update
    averages the first num_workers - backup_workers gradients; local_sgd: workers take local_steps steps on their own
    copies, then the server averages the models."""
    steps: Count = Field(100, ge=1)
    """Number of parameter updates the server applies (rounds for local_sgd)."""
    batch_size: Count | Literal["full"] | tuple[Count, ...] = 32
    """Rows per worker per step, drawn without replacement per local epoch; 'full' uses each worker's whole shard; a
    list gives each worker its own (uneven hardware), averaged by rows."""
    staleness_bound: Count = Field(MODE_PARAMETERS["ssp"].sync_value, ge=0)
    """mode=ssp, and required with it: how many steps a worker may run ahead of the slowest (0 is sync). No default: the
    useful bound depends on how far the workers' speeds spread, and a default of 0 would silently run sync."""
    backup_workers: Count = Field(MODE_PARAMETERS["backup"].sync_value, ge=0)
    """mode=backup, and required with it: gradients of the slowest this many workers are dropped each step (0 is sync).
    No default: how many stragglers to drop depends on the workers, and a default of 0 would silently run sync."""
    local_steps: Count = Field(MODE_PARAMETERS["local_sgd"].sync_value, ge=1)
    """mode=local_sgd, and required with it: SGD steps each worker takes on its own copy between two averagings (1 is
    sync). No default: H trades rounds against drift on each problem, and a default of 1 would silently run sync."""

    @field_validator("batch_size", mode="before")
    @classmethod
    def _count_or_full(cls, value: Any) -> Any:
        def one(v: Any) -> Any:
            v = _count(v)
            if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
                return v
            raise ValueError(f"must be a positive integer, 'full' or a list of positive integers (got {value!r})")

        if value == "full":
            return value
        if isinstance(value, (list, tuple)):
            return tuple(one(v) for v in value)
        return one(value)
    eval_every: Count = Field(100, ge=0)
    """Evaluate the full-data loss and the optimality gap every this many steps (and at step 0 and the last); 0: only
    those two."""
    log_every: Count = Field(100, ge=0)
    """Print one console line every this many steps (and at the last); 0: none."""
    seed: int = Field(0, ge=0)
    """Seeds the mini-batch order: worker r's batch at step t is a pure function of (seed, r, t)."""
    sampling: Literal["shuffle", "blocks"] = "shuffle"
    """How a worker draws its mini-batches from its shard, each keyed by (seed, worker, local epoch). shuffle: the next
    batch_size rows of a fresh permutation of the shard each epoch, gathered into a kept buffer; blocks: the shard's
    contiguous batch_size-row blocks in an order permuted each epoch, read in place (no gather: cheaper on wide rows,
    but the same rows share a batch every epoch). Ignored with batch_size=full."""
    checkpoint_every: Count = Field(1000, ge=0)
    """Checkpoint the server (weights, optimizer, policy, answers in flight) every this many steps into
    RUN_DIR/checkpoints; a lost server restarts from the latest and `sgd-dist train --resume RUN_DIR` goes on from it.
    0: none (a lost server then restarts from step 0). The default, 1000, makes a long run resumable for a few
    milliseconds per checkpoint, and leaves short runs (and the tests' tiny ones) without any."""
    outer: OuterConfig = OuterConfig()
    """mode=local_sgd: the outer optimizer that applies the averaged model delta (DiLoCo); the default, sgd at lr 1, is
    plain model averaging."""
    gradient_noise_scale: tuple[Annotated[float, Field(gt=0)], ...] = ()
    """Relative gaps at which to measure the gradient noise scale B = tr(Sigma)/|G|^2 exactly over every shard, at the
    point with that gap on the segment from model.init to the optimum (also at the initial and final weights):
    summary.json gradient_noise_scale; empty: not measured."""


class CompressionConfig(_Section):
    kind: Literal[COMPRESSION_KINDS] = "none"
    """What each worker's answer (a gradient, or a local_sgd model delta) is compressed to before it travels: none;
    fp16 or bf16 (round to nearest); int8 (QSGD-style unbiased stochastic rounding, a float32 scale per bucket);
    topk (the ratio x d largest magnitudes, with their indices); randk (ratio x d coordinates drawn at random,
    scaled d / k to be unbiased without error feedback). Random draws are keyed by (train.seed, worker, step)."""
    ratio: float | None = None
    """topk and randk, and required with them: the fraction of coordinates sent, in (0, 1] (k = ceil(ratio x d))."""
    error_feedback: bool = False
    """Keep each worker's residual (what compression left out) and add it to its next answer (Seide et al.,
    Karimireddy et al.); randk is then unscaled. A lost worker's residual is reset, and the run records where."""
    bucket: Count = Field(512, ge=1, lt=1 << 16)
    """int8 only: coordinates per float32 scale (QSGD's bucket)."""
    down: bool = False
    """Also compress the server's weights to each worker, as the delta from the weights that worker holds (the server
    keeps a copy of each: the error feeds back by itself); evaluations still get the exact weights."""

    @model_validator(mode="after")
    def _check(self) -> CompressionConfig:
        sparse = self.kind in ("topk", "randk")
        if sparse and self.ratio is None:
            raise ValueError(f"compression.kind={self.kind} needs compression.ratio, the fraction of coordinates sent "
                             "in (0, 1] (e.g. 0.01)")
        if self.ratio is not None and not sparse:
            raise ValueError(f"compression.ratio applies to compression.kind=topk or randk, not {self.kind!r}")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise ValueError(f"compression.ratio must be in (0, 1] (the fraction of coordinates sent), "
                             f"got {self.ratio}")
        if "bucket" in self.model_fields_set and self.kind != "int8":
            raise ValueError(f"compression.bucket applies to compression.kind=int8, not {self.kind!r}")
        if self.error_feedback and self.kind == "none":
            raise ValueError("compression.error_feedback needs a compression.kind other than none (nothing is left "
                             "out to feed back)")
        if self.down and self.kind == "none":
            raise ValueError("compression.down needs a compression.kind other than none (it compresses the weights "
                             "with it)")
        return self

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    @property
    def stateful(self) -> bool:
        """Whether a worker keeps state between commands (a residual, the weights it holds) that it can lose."""
        return self.error_feedback or self.down


class StragglersConfig(_Section):
    slowdown: dict[int, float] = {}
    """Worker index -> factor: that worker's answers take factor x its compute time ({1: 4.0}: worker 1 is 4x
    slower)."""
    delay: Literal["none", "uniform", "exponential"] = "none"
    """A random extra delay per answer: uniform on [0, 2 x delay_ms] or exponential with mean delay_ms."""
    delay_ms: float = Field(0.0, ge=0)
    """Mean of the random delay, in milliseconds."""
    delay_workers: tuple[int, ...] | None = None
    """Workers the random delay applies to; null: every worker."""
    seed: int = Field(0, ge=0)
    """Seeds the delays: worker r's delay at step t is a pure function of (seed, r, t)."""

    @field_validator("slowdown")
    @classmethod
    def _factors(cls, value: dict[int, float]) -> dict[int, float]:
        for worker, factor in value.items():
            if worker < 0 or not factor >= 1:
                raise ValueError(f"needs worker index >= 0 -> factor >= 1 (got {worker}: {factor})")
        return value


class FaultConfig(_Section):
    kind: Literal["kill_worker", "kill_server", "remove_node", "delay"]
    """kill_worker: kill worker `worker`'s process; kill_server: kill the parameter server's process; remove_node:
    remove simulated node `node` (cluster.simulated_nodes); delay: worker `worker` answers `seconds` late, once."""
    step: Count = Field(ge=1)
    """When: right after update `step` is applied (kill_worker, kill_server), once the driver has seen it (remove_node),
    or at the worker's local step `step` (delay)."""
    worker: int | None = Field(None, ge=0)
    """kill_worker and delay: the worker's index."""
    node: int | None = Field(None, ge=1)
    """remove_node: the simulated node's index (1 .. cluster.simulated_nodes - 1; node 0 is the head)."""
    how: Literal["sigkill", "ray_kill"] = "sigkill"
    """kill_worker: SIGKILL the worker's process, or ray.kill its actor."""
    seconds: float = Field(0.0, ge=0)
    """delay: how late."""

    @model_validator(mode="after")
    def _fields(self) -> FaultConfig:
        needs = {"kill_worker": "worker", "delay": "worker", "remove_node": "node"}.get(self.kind)
        if needs and getattr(self, needs) is None:
            raise ValueError(f"a {self.kind} fault needs its {needs}")
        if self.kind == "delay" and self.seconds <= 0:
            raise ValueError("a delay fault needs seconds > 0")
        return self


class MlflowConfig(_Section):
    tracking_uri: str | None = None
    """Where MLflow records the run: an http(s) tracking server, a database URI or file:DIR; null: MLflow's default
    (MLFLOW_TRACKING_URI, else ./mlruns)."""
    experiment: str = "sgd_dist"
    """MLflow experiment to record the run in (created if missing)."""
    run_name: str | None = None
    """Name of the MLflow run; null: the run directory's name."""

    @field_validator("tracking_uri", "experiment", "run_name")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty (null for the default)")
        return value


def _switch(value: Any) -> Any:
    """output.mlflow: true stands for its defaults, false for none."""
    return {} if value is True else None if value is False else value


class OutputConfig(_Section):
    dir: str | None = None
    """Run directory; null makes runs/<name>-<timestamp>. It must not exist yet or be empty."""
    name: str | None = None
    """Run name used for the default directory runs/<name>-<timestamp>: a plain name (letters, digits, . _ + -), not a
    path; null uses the config file's stem (from Python without a file: <mode>-<workers>w-<backend>)."""

    @field_validator("dir")
    @classmethod
    def _dir(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must name a directory (null makes runs/<name>-<timestamp>)")
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and (not re.fullmatch(r"[A-Za-z0-9._+-]+", value) or set(value) == {"."}):
            raise ValueError(f"must be a plain name (letters, digits, . _ + -), not a path (got {value!r}); "
                             "output.dir takes a path")
        return value
    plots: bool = True
    """Draw loss.png (and fit.png for one-feature problems) at the end of the run."""
    tensorboard: bool | str = False
    """TensorBoard event files: true writes them under the run directory (tensorboard/), a directory path writes them to
    <path>/<run directory's name> (point `tensorboard --logdir` at it to overlay runs); needs the tensorboard extra."""
    mlflow: Annotated[MlflowConfig | None, BeforeValidator(_switch)] = None
    """Record the run in MLflow ({tracking_uri, experiment, run_name}; true: the defaults); null: not at all; needs the
    mlflow extra."""
    ray_metrics: bool = True
    """On the ray backend, export the run's step, samples/s, staleness, answer times and faults through Ray's metrics
    (Prometheus, the dashboard), labelled by run."""

    @field_validator("tensorboard")
    @classmethod
    def _tensorboard(cls, value: bool | str) -> bool | str:
        if isinstance(value, str) and not value.strip():
            raise ValueError("must be true, false or a directory path")
        return value


class Config(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    cluster: ClusterConfig = ClusterConfig()
    train: TrainConfig = TrainConfig()
    stragglers: StragglersConfig = StragglersConfig()
    compression: CompressionConfig = CompressionConfig()
    """Compression of the workers' answers, with optional error feedback (docs/compression.md)."""
    faults: tuple[FaultConfig, ...] = ()
    """Faults to inject (experiments, tests): a list of {kind, step, worker | node, how, seconds}."""
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _check(self) -> Config:
        if isinstance(self.model.init, tuple) and len(self.model.init) != self.data.dim:
            raise ValueError(
                f"model.init has {len(self.model.init)} entries; it needs {self.data.dim} (one per parameter)"
            )
        self._check_shards()
        if self.cluster.backend != "ray" and self.cluster.address is not None:
            raise ValueError(f"cluster.address applies only to cluster.backend=ray (the {self.cluster.backend} "
                             "backend uses no cluster)")
        self._check_mode()
        self._check_stragglers()
        self._check_faults()
        if self.optim.warmup_steps > self.train.steps:
            raise ValueError(
                f"optim.warmup_steps={self.optim.warmup_steps} is more than train.steps={self.train.steps}: lower it "
                f"with the steps (e.g. optim.warmup_steps={max(0, self.train.steps // 10)}, or 0 for none)"
            )
        return self

    def _check_shards(self) -> None:
        """Every worker has a row, and every batch fits its worker's shard."""
        data, train, cluster = self.data, self.train, self.cluster
        if cluster.num_workers > data.n_samples:
            raise ValueError(
                f"cluster.num_workers={cluster.num_workers} is more than data.n_samples={data.n_samples}: "
                "every worker needs at least one row"
            )
        smallest_shard = data.n_samples // cluster.num_workers
        if isinstance(train.batch_size, tuple):
            if len(train.batch_size) != cluster.num_workers:
                raise ValueError(f"train.batch_size lists {len(train.batch_size)} sizes; it needs one per worker "
                                 f"(cluster.num_workers={cluster.num_workers})")
            base, extra = divmod(data.n_samples, cluster.num_workers)  # data.shard_bounds' sizes
            for rank, size in enumerate(train.batch_size):
                rows = base + (rank < extra)
                if size > rows:
                    raise ValueError(f"train.batch_size[{rank}]={size} is larger than worker {rank}'s shard "
                                     f"({rows} rows)")
        elif train.batch_size != "full" and train.batch_size > smallest_shard:
            raise ValueError(
                f"train.batch_size={train.batch_size} is larger than the smallest shard ({smallest_shard} rows "
                f"= data.n_samples/cluster.num_workers); use at most {smallest_shard} or 'full'"
            )

    def _check_mode(self) -> None:
        """The mode's own parameter is given and fits the workers; no other mode's is set (it would be ignored)."""
        train = self.train
        if train.backup_workers >= self.cluster.num_workers:
            raise ValueError(f"train.backup_workers={train.backup_workers} must be less than "
                             f"cluster.num_workers={self.cluster.num_workers}")
        for owner, parameter in MODE_PARAMETERS.items():
            value = getattr(train, parameter.key)
            if value != parameter.sync_value and train.mode != owner:
                raise ValueError(f"train.{parameter.key}={value} only applies to train.mode='{owner}', "
                                 f"not {train.mode!r}")
        needed = MODE_PARAMETERS.get(train.mode)
        if needed and needed.key not in train.model_fields_set:
            raise ValueError(f"train.mode={train.mode} needs train.{needed.key} ({needed.meaning}): without it the run "
                             "would be sync")
        if train.mode == "local_sgd" and (self.optim.momentum or self.optim.nesterov):
            raise ValueError("train.mode=local_sgd takes plain SGD steps on the workers: set optim.momentum=0")
        if "outer" in train.model_fields_set and train.mode != "local_sgd":
            raise ValueError(f"train.outer applies to train.mode=local_sgd (it applies the averaged model delta), "
                             f"not {train.mode!r}")
        if self.optim.staleness_lr and train.mode not in ("async", "ssp"):
            raise ValueError(f"optim.staleness_lr applies to train.mode=async or ssp, not {train.mode!r}")

    def _check_stragglers(self) -> None:
        workers = self.cluster.num_workers
        for name, named in [("slowdown", list(self.stragglers.slowdown)),
                            ("delay_workers", list(self.stragglers.delay_workers or []))]:
            if any(r >= workers for r in named):
                raise ValueError(f"stragglers.{name} names worker {max(named)}; workers are 0..{workers - 1}")
        if self.stragglers.delay != "none" and self.stragglers.delay_ms == 0:
            raise ValueError(f"stragglers.delay={self.stragglers.delay} needs stragglers.delay_ms > 0")

    def _check_faults(self) -> None:
        cluster = self.cluster
        for i, fault in enumerate(self.faults):
            where = f"faults[{i}] ({fault.kind})"
            if fault.step > self.train.steps:
                raise ValueError(f"{where}: step {fault.step} is after the last step (train.steps={self.train.steps})")
            if fault.worker is not None and fault.worker >= cluster.num_workers:
                raise ValueError(f"{where}: worker {fault.worker}; workers are 0..{cluster.num_workers - 1}")
            if fault.kind in ("kill_worker", "kill_server") and cluster.backend == "serial":
                raise ValueError(f"{where}: kills need cluster.backend=ray or virtual (the serial backend is one "
                                 "process)")
            if fault.kind == "remove_node":
                nodes = cluster.simulated_nodes
                if not nodes or nodes < 2:
                    given = "null" if nodes is None else nodes
                    raise ValueError(f"{where}: needs a simulated cluster with a node to remove: "
                                     f"cluster.simulated_nodes of 2 or more (it is {given}; node 0, the head, stays)")
                if fault.node >= nodes:
                    raise ValueError(f"{where}: node {fault.node}; removable simulated nodes are 1..{nodes - 1} "
                                     f"(cluster.simulated_nodes={nodes})")

    def worker_batch_sizes(self) -> list[int | Literal["full"]]:
        """Each worker's rows per step."""
        size = self.train.batch_size
        return list(size) if isinstance(size, tuple) else [size] * self.cluster.num_workers

    def global_batch_size(self) -> int:
        """Rows per update summed over the workers (per round of one local step each, for local_sgd)."""
        if self.train.batch_size == "full":
            return self.data.n_samples
        return sum(self.worker_batch_sizes())


def format_validation_error(error: ValidationError) -> str:
    """One line naming each bad field, what was given and what is allowed."""
    parts = []
    for item in error.errors():
        loc = ".".join(str(p) for p in item["loc"])
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            msg = "unknown key"
        elif "input" in item and item["type"] not in {"value_error", "assertion_error"}:
            given = item["input"]
            if not isinstance(given, dict):
                msg = f"{msg} (got {given!r})"
        # a section's own check already names its dotted fields ("data.noise ..."): no "data: " in front
        parts.append(f"{loc}: {msg}" if loc and not msg.startswith((f"{loc}.", f"{loc} ", f"{loc}[")) else msg)
    return "; ".join(parts)


def _read_yaml(path: Path) -> dict[str, Any]:
    """A YAML file's mapping; ConfigError in one line for a file that is missing, unreadable, not UTF-8, not
    YAML, empty, not a mapping, or that sets a key twice (YAML's last one would silently win)."""
    where = f"config file {str(path)!r}"
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{where} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{where} cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                          "save it as UTF-8") from None
    try:
        twice = _key_set_twice(yaml.compose(text, Loader=yaml.SafeLoader))
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "cannot be parsed"
        raise ConfigError(f"{where} is not valid YAML{at}: {problem}") from None
    if twice is not None:
        key, first, second = twice
        raise ConfigError(f"{where} sets {key} twice (lines {first} and {second}); keep one")
    if raw is None:
        raise ConfigError(f"{where} is empty: it sets nothing to train (start from configs/default.yaml)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must hold a mapping of sections, not a {type(raw).__name__}")
    return raw


def _key_set_twice(node: yaml.Node | None, path: str = "") -> tuple[str, int, int] | None:
    """The first (dotted key, line, line) that a YAML mapping of the document sets twice, else None."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            dotted, line = f"{path}{key}", key_node.start_mark.line + 1
            if key in seen:
                return dotted, seen[key], line
            seen[key] = line
            found = _key_set_twice(value_node, f"{dotted}.")
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found = _key_set_twice(item, f"{path.removesuffix('.')}[{i}].")
            if found:
                return found
    return None


def apply_override(raw: dict[str, Any], item: str) -> str:
    """Apply one ``section.key=value`` override in place (the value is parsed as YAML); return the dotted key."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.steps=200)")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    try:
        set_dotted(raw, key, value)
    except ConfigError as exc:
        raise ConfigError(f"override {item!r}: {exc}") from None
    return key


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """``raw[a][b][c] = value`` for the key ``a.b.c``, making the sections on the way; ConfigError where a value
    stands in the way."""
    path = key.split(".")
    node = raw
    for depth, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path[: depth + 1])} is a value, not a section")
        node = child
    node[path[-1]] = value


def apply_overrides(raw: dict[str, Any], items: Sequence[str]) -> set[str]:
    """Apply dotted overrides in place; return the keys they set.

    A key given twice is refused (the last would silently win). An override that switches data.kind or
    train.mode drops the keys that only the other kind or mode uses, as the file set them (data.noise and
    data.noise_scale for linear; train.staleness_bound, backup_workers, local_steps for ssp, backup, local_sgd),
    unless an override sets them too: `data.kind=logistic` works on a linear config.
    """
    given: dict[str, str] = {}
    for item in items:
        key = apply_override(raw, item)
        if key in given:
            flag = {"output.dir": "--out", "cluster.backend": "--backend", "cluster.address": "--address"}.get(key)
            raise ConfigError(f"{key} is given twice ({given[key]!r} and {item!r}"
                              + (f"; {flag} sets {key}" if flag else "") + "): give it once")
        given[key] = item
    drop_unused_keys(raw, set(given))
    return set(given)


def _owned_by(owner: str | tuple[str, ...], value: Any) -> bool:
    """Whether a selector's ``value`` is the owner (or one of the owners) of a key."""
    return value in owner if isinstance(owner, tuple) else value == owner


def drop_unused_keys(raw: dict[str, Any], explicit: set[str]) -> None:
    """Drop the keys whose selector (data.kind, train.mode) an override in ``explicit`` switched away from their
    owner, unless ``explicit`` names them too."""
    for (section, key), (selector, owner) in OWNED_KEYS.items():
        values = raw.get(section)
        if (f"{section}.{selector}" in explicit and f"{section}.{key}" not in explicit and isinstance(values, dict)
                and not _owned_by(owner, values.get(selector))):
            values.pop(key, None)


def build_config(raw: dict[str, Any], overrides: Sequence[str] = ()) -> Config:
    """Validate a raw mapping plus dotted overrides; raise ConfigError with a one-line message."""
    raw = copy.deepcopy(raw)
    apply_overrides(raw, overrides)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (or start from the defaults), apply overrides and validate."""
    raw = {} if path is None else _read_yaml(Path(path))
    if path is not None and "base" in raw and not set(raw) & set(Config.model_fields):
        raise ConfigError(f"{str(path)!r} is an experiment (it names a base config), not a training config: "
                          f"run it with sgd-dist sweep --config {path}")
    return build_config(raw, overrides)


def dump_config(config: Config) -> str:
    """The config as YAML, every field it uses written out, so that loading it gives the same config.

    A key that only another data.kind or train.mode uses is left out (the linear-only noise keys of a logistic
    config, ssp's staleness_bound in a sync one): its default means nothing there, a file that set it would
    be refused on reload, and a copy whose mode is switched must be given the new mode's own parameter.
    """
    exclude: dict[str, set[str]] = {}
    for (section, key), (selector, owner) in OWNED_KEYS.items():
        if not _owned_by(owner, getattr(getattr(config, section), selector)):
            exclude.setdefault(section, set()).add(key)
    return yaml.safe_dump(config.model_dump(mode="json", exclude=exclude), sort_keys=False)


def describe_fields(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every leaf field, for ``sgd-dist config --describe``."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        text = " ".join((field.description or "").split())  # a docstring wrapped in the source reads as one line
        annotation = field.annotation
        items = typing.get_args(annotation) if typing.get_origin(annotation) is tuple else ()
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows.extend(describe_fields(annotation, prefix=f"{key}."))
        elif items and isinstance(items[0], type) and issubclass(items[0], BaseModel):  # a list of sections
            rows.append((key, "[]", text))
            rows.extend(describe_fields(items[0], prefix=f"{key}[]."))
        else:
            default = "(required)" if field.is_required() else "null" if field.default is None else str(field.default)
            rows.append((key, default, text))
    return rows
