"""Stragglers: the injected delays are keyed like every random choice, never change the numbers, and slow
workers are named from their recorded answer times."""

from __future__ import annotations

import statistics

import pytest
from conftest import make_config

from sgd_dist.cli import main
from sgd_dist.config import ConfigError, dump_config
from sgd_dist.engine.delays import describe_stragglers as describe
from sgd_dist.engine.delays import extra_delay_s, find_stragglers
from sgd_dist.run.rundir import read_metrics, read_summary
from sgd_dist.run.trainer import train


def cfg(*overrides):
    return make_config(*overrides).stragglers


def test_a_slowdown_stretches_the_compute_time_by_its_factor():
    c = cfg("stragglers.slowdown={1: 4.0}")
    assert extra_delay_s(c, 1, 7, 0.010) == pytest.approx(0.030)
    assert extra_delay_s(c, 0, 7, 0.010) == 0.0


@pytest.mark.parametrize("dist", ["uniform", "exponential"])
def test_random_delays_are_keyed_by_seed_worker_and_step_with_the_given_mean(dist):
    c = cfg(f"stragglers.delay={dist}", "stragglers.delay_ms=2", "stragglers.seed=5")
    draws = [extra_delay_s(c, 1, step, 0.0) for step in range(20_000)]
    assert draws[:50] == [extra_delay_s(c, 1, step, 0.0) for step in range(50)]  # a pure function
    assert draws[:50] != [extra_delay_s(c, 0, step, 0.0) for step in range(50)]  # another worker, other delays
    assert statistics.fmean(draws) == pytest.approx(0.002, rel=0.03) and min(draws) >= 0
    other_seed = cfg(f"stragglers.delay={dist}", "stragglers.delay_ms=2", "stragglers.seed=6")
    assert extra_delay_s(other_seed, 1, 0, 0.0) != draws[0]


def test_the_random_delay_applies_only_to_the_named_workers():
    c = cfg("stragglers.delay=uniform", "stragglers.delay_ms=1", "stragglers.delay_workers=[1]")
    assert extra_delay_s(c, 0, 3, 0.0) == 0.0 and extra_delay_s(c, 1, 3, 0.0) > 0


def test_a_worker_more_than_twice_the_others_median_is_named():
    slow = find_stragglers({0: 1.0, 1: 4.1, 2: 1.1, 3: 0.9})
    assert [s["worker"] for s in slow] == [1] and slow[0]["ratio"] == pytest.approx(4.1)
    assert describe(slow) == ["worker 1 is 4.1x slower than the median"]
    assert find_stragglers({0: 1.0, 1: 1.9}) == [] and find_stragglers({0: 1.0}) == []


@pytest.mark.parametrize("override, message", [
    ("stragglers.slowdown={5: 2.0}", r"stragglers\.slowdown names worker 5; workers are 0\.\.1"),
    ("stragglers.slowdown={1: 0.5}", r"stragglers\.slowdown: .*factor >= 1"),
    ("stragglers.delay=uniform", r"stragglers\.delay=uniform needs stragglers\.delay_ms > 0"),
])
def test_bad_straggler_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        make_config(override)


@pytest.mark.parametrize("backend", ["serial", "ray"])
def test_stragglers_change_the_wall_time_not_the_numbers(ray_session, tmp_path, backend):
    plain = train(make_config(f"cluster.backend={backend}", f"output.dir={tmp_path / 'p'}"), console=False).summary
    slow = train(make_config(f"cluster.backend={backend}", "stragglers.slowdown={1: 3.0}",
                             "stragglers.delay=exponential", "stragglers.delay_ms=0.5", f"output.dir={tmp_path / 's'}"),
                 console=False).summary

    def strip(rows):
        return [(r["step"], r["loss"], r.get("eval_loss")) for r in rows]

    assert strip(read_metrics(tmp_path / "s")) == strip(read_metrics(tmp_path / "p"))
    assert slow["weights"] == plain["weights"]
    assert set(slow["answer_ms"]) == {0, 1}


# An answer's time is the worker's compute time times its factor (the delay is the factor minus one times the
# compute time just measured), plus the sleep's overshoot. Against the others it also depends on their compute
# times, which a loaded machine stretches unevenly (and a worker computing right after another's sleep starts
# cold): ~1 ms answers, medians over 100 of them, and 0.8 x the factor. Measured at load 6: 0.98-1.47 x.
FACTOR = 4.0


@pytest.mark.parametrize("backend", ["serial", "ray"])
def test_a_slowed_worker_answers_its_factor_slower_and_is_named_in_the_summary_and_on_the_console(
        ray_session, tmp_path, capsys, backend):
    config = tmp_path / "c.yaml"
    config.write_text(dump_config(make_config("cluster.num_workers=3", "data.n_samples=15000", "data.n_features=100",
                                              "train.steps=100", "train.batch_size=4096", "optim.lr=0.01",
                                              f"stragglers.slowdown={{1: {FACTOR}}}")))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "r"), "--backend", backend,
                 "--no-progress"]) == 0
    summary = read_summary(tmp_path / "r")
    ms = summary["answer_ms"]
    others = statistics.median([ms[r] for r in ("0", "2")])
    assert ms["1"] >= 0.8 * FACTOR * others, ms
    assert [s["worker"] for s in summary["stragglers"]] == [1], summary["stragglers"]
    ratio = summary["stragglers"][0]["ratio"]
    assert ratio == pytest.approx(ms["1"] / others)
    out = capsys.readouterr().out
    assert f"straggler: worker 1 is {ratio:.1f}x slower than the median\n" in out, out
    assert out.count("straggler:") == 1
