"""The experiment file of ``sgd-dist sweep``: the Experiment model, its base config, and every run it plans (each
run's config built and validated before anything runs)."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sgd_dist.config import (
    ClusterConfig,
    Config,
    ConfigError,
    _read_yaml,
    apply_overrides,
    build_config,
    drop_unused_keys,
    format_validation_error,
    set_dotted,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
RESERVED_KEYS = ("output.", "cluster.address")  # the sweep owns where runs go and which Ray they use
Scaling = Literal["strong", "weak"]


class Experiment(BaseModel):
    """One sweep: every field is one key of the experiment YAML file."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    base: str
    """The base config file, relative to the experiment file, the current directory or the repository."""
    overrides: list[str] = []
    """Dotted key=value overrides applied to every run (after the base, before the grid)."""
    grid: dict[str, list[Any]] = {}
    """Dotted config key -> the values it takes; the runs are the product, in file order. Keys joined by commas
    vary together: "train.mode,train.backup_workers": [[sync, 0], [backup, 1]]."""
    repeats: int = Field(1, ge=1)
    """Each grid point runs this many times (repeat r of every point before repeat r + 1)."""
    target_gap: float = Field(1e-3, gt=0)
    """Relative optimality gap that counts as reaching the target: optimality_gap / gap_scale, the scale being f*
    (the optimal loss) when it is positive, else the initial gap f(w0) - f* (f* = 0: least squares that
    interpolates)."""
    scaling: list[Scaling] = ["weak"]
    """strong: the global batch (global_batch) is split over the workers; weak: train.batch_size per worker; or both."""
    global_batch: list[int] = []
    """Strong scaling: the global batch size(s); each run's per-worker batch is global_batch / num_workers."""

    @field_validator("scaling", "global_batch", mode="before")
    @classmethod
    def _one_or_list(cls, value: Any) -> Any:
        return value if isinstance(value, (list, tuple)) else [value]

    @field_validator("grid")
    @classmethod
    def _grid(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not values:
                raise ValueError(f"grid {key} lists no values")
            parts = key.split(",")
            for part in (p.strip() for p in parts):
                if part.startswith("output."):
                    raise ValueError(f"grid {key}: the sweep sets {part} itself (each run's directory is under "
                                     "--out); it cannot be gridded")
                if part.startswith("cluster.address"):
                    raise ValueError(f"grid {key}: every run of a sweep uses the one Ray the sweep joins; "
                                     "set cluster.address in the base config")
            if len(parts) > 1 and any(not isinstance(v, list) or len(v) != len(parts) for v in values):
                raise ValueError(f"grid {key}: each value must list {len(parts)} values, one per key")
            texts = [value_text(v) for v in values]
            twice = sorted({t for t in texts if texts.count(t) > 1})
            if twice:
                raise ValueError(f"grid {key} lists {', '.join(twice)} more than once")
        return grid

    @model_validator(mode="after")
    def _check(self) -> Experiment:
        if len(set(self.scaling)) != len(self.scaling) or not self.scaling:
            raise ValueError("scaling must be strong, weak or [strong, weak]")
        if "strong" in self.scaling:
            if not self.global_batch:
                raise ValueError("scaling: strong needs global_batch (the global batch split over the workers)")
            if "train.batch_size" in self.grid:
                raise ValueError("grid train.batch_size: under scaling: strong the per-worker batch is "
                                 "global_batch / num_workers; grid global_batch instead")
            if any(b < 1 for b in self.global_batch) or len(set(self.global_batch)) != len(self.global_batch):
                raise ValueError("global_batch must list distinct positive integers")
        elif self.global_batch:
            raise ValueError("global_batch applies to scaling: strong only")
        for item in self.overrides:
            if item.partition("=")[0].strip().startswith(RESERVED_KEYS):
                raise ValueError(f"overrides: {item!r}: the sweep sets output.* "
                                 "and cluster.address comes from the base")
        return self


def value_text(value: Any) -> str:
    """A grid value as it is written in YAML flow style: 4, 0.5, sync, {1: 4.0}, [64, 32]."""
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).removesuffix("\n...\n").strip()


@dataclass(frozen=True)
class RunPlan:
    """One run of the sweep: its place, its grid point, its repeat and its validated config."""

    index: int
    name: str  # the run directory's name under runs/
    scaling: Scaling
    global_batch: int | None  # strong scaling only: the global batch the point fixes
    point: tuple[tuple[str, Any], ...]  # (grid key, value) in grid order
    repeat: int
    config: Config

    def label(self, with_scaling: bool) -> str:
        parts = [self.scaling] if with_scaling else []
        if self.global_batch is not None:
            parts.append(f"global_batch={self.global_batch}")
        parts += [f"{key}={value_text(value)}" for key, value in self.point]
        return " ".join(parts + [f"r{self.repeat}"])


def _slug(text: str) -> str:
    """A value as a file name's part: characters other than letters, digits and ._+- become _."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "empty"


def resolve_base(base: str, experiment_path: Path) -> Path:
    """The base config: beside the experiment file, else from the current directory, else from the repo."""
    for root in (experiment_path.parent, Path.cwd(), REPO_ROOT):
        path = root / base
        if path.is_file():
            return path.resolve()
    raise ConfigError(f"experiment {str(experiment_path)!r}: base config {base!r} not found beside the experiment "
                      "file, in the current directory or in the repository")


@dataclass(frozen=True)
class Sweep:
    """A validated experiment, its resolved base and every run, in order."""

    path: Path
    experiment: Experiment
    base_path: Path
    base_raw: dict
    runs: list[RunPlan]

    def resolved(self) -> dict:
        """What experiment.yaml records: the experiment as given, and the base config it resolved to."""
        return {"experiment": self.experiment.model_dump(mode="python"),
                "base_config": yaml.safe_load(yaml.safe_dump(self.base_raw)),
                "num_runs": len(self.runs)}


def load_experiment(path: str | Path) -> Sweep:
    """Read and validate an experiment file and build every run's config; ConfigError in one line if not."""
    path = Path(path)
    raw = _read_yaml(path)
    where = f"experiment {str(path)!r}"
    if "base" not in raw and set(raw) & set(Config.model_fields):
        raise ConfigError(f"{str(path)!r} is a training config, not an experiment: run it with sgd-dist train "
                          f"--config {path}, or sweep it from an experiment file that names it as its base "
                          "(see configs/experiments/)")
    try:
        experiment = Experiment.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {format_validation_error(exc)}") from None
    base_path = resolve_base(experiment.base, path)
    base_raw = _read_yaml(base_path)
    try:
        apply_overrides(base_raw, experiment.overrides)
    except ConfigError as exc:
        raise ConfigError(f"{where}: overrides: {exc}") from None
    base_raw.setdefault("output", {}).setdefault("plots", False)  # the sweep draws its own figures
    return Sweep(path, experiment, base_path, base_raw, plan_runs(experiment, base_raw, where))


def plan_runs(experiment: Experiment, base_raw: dict, where: str = "experiment") -> list[RunPlan]:
    """Every run in order: repeats outermost (noise spreads over the repeats), then scaling, global batch,
    then the grid's product in file order (last key fastest). Each config is built and validated here."""
    keys = list(experiment.grid)
    points = list(itertools.product(*(experiment.grid[k] for k in keys)))
    runs: list[RunPlan] = []
    names: set[str] = set()
    validated: dict[tuple, Config] = {}
    with_scaling = len(experiment.scaling) > 1
    for repeat in range(experiment.repeats):
        for scaling in experiment.scaling:
            for global_batch in (experiment.global_batch if scaling == "strong" else [None]):
                for values in points:
                    point = tuple(zip(keys, values))
                    cache_key = (scaling, global_batch, tuple(value_text(v) for v in values))
                    if cache_key not in validated:
                        validated[cache_key] = _point_config(base_raw, point, global_batch, where)
                    config = validated[cache_key]
                    parts = ([scaling] if with_scaling else []) + (
                        [f"global_batch={global_batch}"] if global_batch is not None else []) + [
                        f"{k}={_slug(value_text(v))}" for k, v in point]
                    stem = ",".join(parts) if parts else "base"
                    name, n = f"{stem}-r{repeat}", 2
                    while name in names:  # two values that slug alike
                        name, n = f"{stem}~{n}-r{repeat}", n + 1
                    names.add(name)
                    runs.append(RunPlan(len(runs), name, scaling, global_batch, point, repeat, config))
    return runs


def _point_config(base_raw: dict, point, global_batch: int | None, where: str) -> Config:
    raw = yaml.safe_load(yaml.safe_dump(base_raw))  # a deep copy
    label = " ".join(f"{k}={value_text(v)}" for k, v in point) or "the base"
    try:
        explicit = set()
        for key, value in point:
            for part, one in zip(key.split(","), value) if "," in key else [(key, value)]:
                set_dotted(raw, part.strip(), one)
                explicit.add(part.strip())
        drop_unused_keys(raw, explicit)  # a grid over data.kind or train.mode, as an override switching them
        if global_batch is not None:
            try:
                workers = ClusterConfig.model_validate(
                    {k: v for k, v in raw.get("cluster", {}).items() if k == "num_workers"}).num_workers
            except ValidationError:
                return build_config(raw)  # reports the bad cluster.num_workers with its dotted name
            if global_batch % workers:
                raise ConfigError(f"global_batch={global_batch} does not split evenly over "
                                  f"cluster.num_workers={workers} (strong scaling)")
            set_dotted(raw, "train.batch_size", global_batch // workers)
        return build_config(raw)
    except (ConfigError, ValidationError) as exc:
        message = format_validation_error(exc) if isinstance(exc, ValidationError) else str(exc)
        batch = f" global_batch={global_batch}" if global_batch is not None else ""
        raise ConfigError(f"{where}: grid point {label}{batch}: {message}") from None
