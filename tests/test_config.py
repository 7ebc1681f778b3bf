"""The config tree: defaults, overrides, validation errors that name the field, freezing, round trip."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest
import yaml
from conftest import make_config

from sgd_dist.config import ConfigError, build_config, dump_config, load_config

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
        ("train.mode=hogwild",
         r"^train\.mode: Input should be 'sync', 'async', 'ssp', 'backup' or 'local_sgd' \(got 'hogwild'\)$"),
        ("train.backup_workers=1", r"train\.backup_workers=1 only applies to train\.mode='backup', not 'sync'"),
        ("train.batch_size=[16, 16, 16]",
         r"train\.batch_size lists 3 sizes; it needs one per worker \(cluster\.num_workers=2\)"),
        ("train.batch_size=[16, 300]", r"train\.batch_size\[1\]=300 is larger than worker 1's shard \(256 rows\)"),
        ("optim.staleness_lr=true", r"optim\.staleness_lr applies to train\.mode=async or ssp, not 'sync'"),
        ("cluster.device=tpu", r"^cluster\.device: Input should be 'cpu', 'cuda' or 'auto'"),
        ("train.batch_size=0",
         r"^train\.batch_size: must be a positive integer, 'full' or a list of positive integers \(got 0\)$"),
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
        make_config("train.mode=local_sgd", "train.local_steps=2", "optim.momentum=0.9")
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


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_data_kind_logistic_works_as_an_override_on_every_shipped_config(path):
    # the linear configs set both noise keys: the override that switches the kind drops them
    config = load_config(path, ["data.kind=logistic"])
    assert config.data.kind == "logistic" and not {"noise", "noise_scale"} & config.data.model_fields_set
    assert "noise" not in yaml.safe_load(dump_config(config))["data"]
    # a noise key that the command line sets as well is still refused, naming it
    with pytest.raises(ConfigError, match=r"^data\.noise_scale applies only to data\.kind=linear; drop it"):
        load_config(path, ["data.kind=logistic", "data.noise_scale=0.5"])


def test_the_shipped_logistic_config_is_logistic_and_switches_back_to_linear():
    config = load_config(CONFIGS / "logistic.yaml")
    assert config.data.kind == "logistic" and config.data.n_features > 1 and config.cluster.num_workers == 2
    linear = load_config(CONFIGS / "logistic.yaml", ["data.kind=linear"])
    assert (linear.data.noise, linear.data.noise_scale) == ("uniform", 1.0)  # a linear run's defaults


def test_a_null_noise_key_means_left_out():
    for kind in ("linear", "logistic"):
        config = make_config(f"data.kind={kind}", "data.noise=null", "data.noise_scale=null")
        assert config == make_config(f"data.kind={kind}")
    assert load_config(CONFIGS / "lesson2.yaml", ["data.noise=null", "data.noise_scale=null",
                                                  "data.kind=logistic"]).data.kind == "logistic"


def test_an_override_that_switches_the_mode_drops_the_other_modes_parameter():
    raw = {"train": {"mode": "ssp", "staleness_bound": 2, "steps": 20, "batch_size": 16}}
    assert build_config(raw, ["train.mode=async"]).train.mode == "async"
    assert build_config(raw).train.staleness_bound == 2
    with pytest.raises(ConfigError, match=r"train\.staleness_bound=2 only applies to train\.mode='ssp', not 'async'"):
        build_config({"train": {"mode": "async", "staleness_bound": 2}})  # a file says both: refused as before


@pytest.mark.parametrize("mode, key, neutral", [("ssp", "staleness_bound", 0), ("backup", "backup_workers", 0),
                                                ("local_sgd", "local_steps", 1)])
def test_a_mode_without_its_parameter_is_refused_rather_than_run_as_sync(mode, key, neutral):
    with pytest.raises(ConfigError, match=rf"^train\.mode={mode} needs train\.{key} \(.*\): without it the run "
                                          r"would be sync$"):
        make_config(f"train.mode={mode}")
    # given, even as the value that reduces to sync, it is accepted: that is a choice, not an omission
    assert getattr(make_config(f"train.mode={mode}", f"train.{key}={neutral}").train, key) == neutral
    # a saved sync config leaves the parameter out, so switching its mode asks for it too
    saved = yaml.safe_load(dump_config(make_config()))
    assert key not in saved["train"]
    with pytest.raises(ConfigError, match=rf"needs train\.{key}"):
        build_config(saved, [f"train.mode={mode}"])


def test_an_experiment_file_given_as_a_training_config_says_so():
    with pytest.raises(ConfigError, match=r"is an experiment \(it names a base config\), not a training config: "
                                          r"run it with sgd-dist sweep --config"):
        load_config(CONFIGS / "experiments" / "smoke.yaml")


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


@pytest.mark.parametrize("text", ["", "# only a comment\n", "\n\n"])
def test_an_empty_file_is_refused_rather_than_trained_on_every_default(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"^config file '.*empty\.yaml' is empty: it sets nothing to train"):
        load_config(path)
    path.write_text("{}\n")  # an explicit empty mapping is a choice: every default
    assert load_config(path) == build_config({})


def test_a_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("# r\u00e9glages\ntrain:\n  steps: 5\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"^config file '.*latin1\.yaml' is not UTF-8 text \(byte 0xe9 at "
                                          r"offset 3\); save it as UTF-8$"):
        load_config(path)


@pytest.mark.parametrize("text, key, lines", [
    ("train:\n  steps: 5\n  steps: 6\n", "train.steps", (2, 3)),
    ("train:\n  steps: 5\ntrain:\n  batch_size: 4\n", "train", (1, 3)),
    ("faults:\n  - {kind: delay, kind: kill_worker, step: 1}\n", r"faults\[0\]\.kind", (2, 2)),
])
def test_a_key_set_twice_in_a_file_is_refused(tmp_path, text, key, lines):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"sets {key} twice \(lines {lines[0]} and {lines[1]}\); keep one$"):
        load_config(path)


def test_an_override_given_twice_is_refused():
    with pytest.raises(ConfigError, match=r"^train\.steps is given twice \('train\.steps=5' and 'train\.steps=6'\): "
                                          r"give it once$"):
        make_config("train.steps=5", "train.steps=6")
    with pytest.raises(ConfigError, match=r"output\.dir is given twice .*; --out sets output\.dir\)"):
        make_config("output.dir=a", "output.dir=b")
    assert make_config("train.steps=5").train.steps == 5  # the file's value and one override: the override wins


@pytest.mark.parametrize("override, message", [
    ("output.dir=''", r"^output\.dir: must name a directory"),
    ("output.name=../..", r"^output\.name: must be a plain name .* not a path \(got '\.\./\.\.'\)"),
    ("output.name=a/b", r"^output\.name: must be a plain name"),
    ("output.name=..", r"^output\.name: must be a plain name"),
    ("output.name=''", r"^output\.name: must be a plain name"),
])
def test_output_names_and_directories_that_would_escape_or_vanish_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        make_config(override)
    assert make_config("output.name=my-run_2.b").output.name == "my-run_2.b"


@pytest.mark.parametrize("address", ["garbage!!", "host", "host:port", "1.2.3.4:0", "h:70000", ":6379", "ray://"])
def test_a_malformed_cluster_address_is_a_config_error(address):
    with pytest.raises(ConfigError, match=r"^cluster\.address: must be 'auto', HOST:PORT or ray://HOST:PORT"):
        make_config(f"cluster.address={address!r}")


@pytest.mark.parametrize("address", ["auto", "127.0.0.1:6379", "ray-head:6379", "ray://10.0.0.1:10001", "[::1]:6379",
                                     "node_1.cluster.local:6380"])
def test_well_formed_cluster_addresses_are_accepted(address):
    assert make_config(f"cluster.address={address!r}").cluster.address == address


def test_remove_node_without_a_simulated_cluster_says_what_it_needs():
    fault = "faults=[{kind: remove_node, step: 5, node: 1}]"
    for nodes in ("null", "1"):
        with pytest.raises(ConfigError, match=r"faults\[0\] \(remove_node\): needs a simulated cluster with a node to "
                                              rf"remove: cluster\.simulated_nodes of 2 or more \(it is {nodes};"):
            make_config(fault, f"cluster.simulated_nodes={nodes}")
    assert make_config(fault, "cluster.simulated_nodes=2").faults[0].node == 1


def test_a_run_shorter_than_its_warm_up_gets_the_hint():
    with pytest.raises(ConfigError, match=r"^optim\.warmup_steps=50 is more than train\.steps=20: lower it with the "
                                          r"steps \(e\.g\. optim\.warmup_steps=2, or 0 for none\)$"):
        load_config(CONFIGS / "default.yaml", ["train.steps=20"])
    assert load_config(CONFIGS / "default.yaml", ["train.steps=20", "optim.warmup_steps=2"]).train.steps == 20


def test_checkpoints_are_on_by_default_every_1000_steps():
    assert make_config().train.checkpoint_every == 1000
    assert load_config(CONFIGS / "default.yaml").train.checkpoint_every == 1000
