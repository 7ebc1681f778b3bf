"""The config tree: defaults, overrides, validation errors that name the field, freezing, round trip."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
import yaml

from sgd_dist.config import ConfigError, build_config, dump_config, load_config

from conftest import make_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate_and_round_trip(path, tmp_path):
    config = load_config(path)
    copy = tmp_path / "config.yaml"
    copy.write_text(dump_config(config))
    assert load_config(copy) == config


def test_lesson2_is_the_seed():
    c = load_config(CONFIGS / "lesson2.yaml")
    assert (c.data.n_samples, c.data.n_features, c.data.bias) == (100, 1, True)
    assert c.data.true_weights == (3.0, 2.0) and c.model.init == (-1.0, 1.0)
    assert (c.data.x_dist, c.data.noise, c.data.noise_scale) == ("uniform", "uniform", 1.0)
    assert (c.optim.lr, c.train.steps, c.train.batch_size, c.cluster.num_workers) == (0.1, 100, "full", 2)
    assert c.global_batch_size() == 100


def test_default_is_a_real_minibatch_job():
    c = load_config(CONFIGS / "default.yaml")
    assert c.data.n_samples >= 1_000_000 and c.data.n_features > 1 and c.cluster.num_workers == 2
    assert c.train.batch_size != "full" and c.train.batch_size < c.data.n_samples // 2


def test_dotted_overrides_are_typed():
    c = make_config("train.steps=200", "cluster.num_workers=4", "optim.lr=1e-2", "data.n_samples=1e4",
                    "model.init=[0, 0, 0, 1]", "cluster.device=auto", "train.batch_size=full")
    assert c.train.steps == 200 and c.cluster.num_workers == 4 and c.optim.lr == 0.01
    assert c.data.n_samples == 10_000 and c.model.init == (0.0, 0.0, 0.0, 1.0)
    assert c.cluster.device == "auto" and c.train.batch_size == "full"


def test_the_names_scripts_rely_on():
    c = make_config()
    for dotted in ["data.n_samples", "data.n_features", "data.seed", "cluster.num_workers", "cluster.device",
                   "train.steps", "train.batch_size", "train.mode", "train.eval_every", "optim.lr"]:
        section, key = dotted.split(".")
        assert hasattr(getattr(c, section), key), dotted


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stesp=5", r"^train\.stesp: unknown key$"),
        ("trian.steps=5", r"^trian: unknown key$"),
        ("optim.lr=-0.1", r"^optim\.lr: Input should be greater than 0 \(got -0\.1\)$"),
        ("optim.lr=.nan", r"^optim\.lr: Input should be a finite number"),
        ("cluster.num_workers=0", r"^cluster\.num_workers: Input should be greater than or equal to 1 \(got 0\)$"),
        ("train.steps=ten", r"^train\.steps: Input should be a valid integer"),
        ("train.mode=hogwild", r"^train\.mode: Input should be 'sync', 'async', 'ssp', 'backup' or 'local_sgd' \(got 'hogwild'\)$"),
        ("train.backup_workers=1", r"train\.backup_workers=1 only applies to train\.mode='backup', not 'sync'"),
        ("train.batch_size=[16, 16, 16]", r"train\.batch_size lists 3 sizes; it needs one per worker \(cluster\.num_workers=2\)"),
        ("train.batch_size=[16, 300]", r"train\.batch_size\[1\]=300 is larger than worker 1's shard \(256 rows\)"),
        ("optim.staleness_lr=true", r"optim\.staleness_lr applies to train\.mode=async or ssp, not 'sync'"),
        ("cluster.device=tpu", r"^cluster\.device: Input should be 'cpu', 'cuda' or 'auto'"),
        ("train.batch_size=0", r"^train\.batch_size: must be a positive integer, 'full' or a list of positive integers \(got 0\)$"),
        ("train.batch_size=fulll", r"^train\.batch_size: must be a positive integer, 'full' or a list"),
        ("train.batch_size=300", r"train\.batch_size=300 is larger than the smallest shard \(256 rows"),
        ("cluster.num_workers=600", r"cluster\.num_workers=600 is more than data\.n_samples=512"),
        ("model.init=[1, 2]", r"model\.init has 2 entries; it needs 4"),
        ("model.init=ones", r"^model\.init: must be 'zeros' or a list of numbers"),
        ("data.true_weights=[1]", r"data\.true_weights has 1 entries; it needs 4"),
        ("optim.nesterov=true", r"optim\.nesterov=true needs optim\.momentum > 0"),
        ("optim.warmup_steps=50", r"optim\.warmup_steps=50 is more than train\.steps=20"),
        ("train.steps", r"override 'train.steps' must look like section\.key=value"),
        ("train.steps.x=1", r"override 'train\.steps\.x=1': train\.steps is a value, not a section"),
    ],
)
def test_bad_values_give_one_line_naming_the_field(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        make_config(override)
    assert "\n" not in str(info.value)


def test_mode_parameters():
    c = make_config("train.mode=backup", "train.backup_workers=1")
    assert (c.train.mode, c.train.backup_workers) == ("backup", 1)
    with pytest.raises(ConfigError, match=r"train\.backup_workers=2 must be less than cluster\.num_workers=2"):
        make_config("train.mode=backup", "train.backup_workers=2")
    with pytest.raises(ConfigError, match=r"train\.mode=local_sgd takes plain SGD steps on the workers"):
        make_config("train.mode=local_sgd", "optim.momentum=0.9")
    c = make_config("train.batch_size=[8, 24]")
    assert c.worker_batch_sizes() == [8, 24] and c.global_batch_size() == 32


def test_an_address_needs_the_ray_backend():
    assert make_config("cluster.address=auto").cluster.address == "auto"
    with pytest.raises(ConfigError, match=r"cluster\.address applies only to cluster\.backend=ray"):
        make_config("cluster.address=auto", "cluster.backend=serial")


def test_noise_settings_are_refused_for_logistic():
    with pytest.raises(ConfigError, match=r"^data\.noise_scale applies only to data\.kind=linear; drop it for "
                                          r"data\.kind=logistic$"):
        make_config("data.kind=logistic", "data.noise_scale=0.5")
    assert make_config("data.kind=logistic").data.kind == "logistic"


def test_switching_a_linear_config_to_logistic_names_every_key_to_drop():
    # lesson2.yaml sets both noise keys; the override alone cannot remove them, so the message lists them
    with pytest.raises(ConfigError, match=r"^data\.noise, data\.noise_scale apply only to data\.kind=linear; "
                                          r"drop them for data\.kind=logistic$"):
        load_config(CONFIGS / "lesson2.yaml", ["data.kind=logistic"])


def test_a_logistic_config_round_trips_through_its_dump(tmp_path):
    config = make_config("data.kind=logistic", "data.x_dist=normal")
    dumped = yaml.safe_load(dump_config(config))
    assert "noise" not in dumped["data"] and "noise_scale" not in dumped["data"]
    assert dumped["data"]["kind"] == "logistic" and dumped["data"]["x_dist"] == "normal"
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config


def test_config_is_frozen():
    c = make_config()
    with pytest.raises(pydantic.ValidationError):
        c.train.steps = 5


@pytest.mark.parametrize(
    "text, message",
    [
        ("data: [1, 2", r"is not valid YAML at line 1"),
        ("- 1\n- 2\n", r"must hold a mapping of sections, not a list"),
        ("data:\n  n_sample: 10\n", r"^data\.n_sample: unknown key$"),
    ],
)
def test_bad_files(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*nope\.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_empty_file_means_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == build_config({})
