"""The cost model without Ray: the fit recovers known coefficients from synthetic timings, the step formulas
against closed forms, the network formula, steps to target, leave-one-point-out, and its step against the virtual
clock's on the same profile. No timing in any assert."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
from conftest import make_config

from sgd_dist.core import time_model
from sgd_dist.core.time_model import TimeProfile, message_s
from sgd_dist.run.trainer import train
from sgd_dist.study.cost_model import (
    CostModel,
    Observation,
    Scenario,
    curve,
    fit,
    leave_one_out,
    predict,
    scenario_of,
    step_s,
    steps_to_target,
    worker_counts,
)

PROFILE = TimeProfile(grad_s=150e-6, grad_s_per_elem=6e-9, local_s=170e-6, local_s_per_elem=7e-9, apply_s=12e-6,
                      apply_s_per_param=2e-9, message_s=35e-6, message_s_per_byte=0.5e-9, eval_s=300e-6,
                      eval_s_per_elem=1e-9, replacement_s=1.5, restart_s=3.0, cores=2, source="tests",
                      date="2026-12-02")
TRUE = CostModel(PROFILE, cores=2)
BASE = replace(PROFILE, local_s=1.0, local_s_per_elem=1.0, replacement_s=9.0, restart_s=8.0, source="base")


def with_(model: CostModel, cores="same", **coefficients) -> CostModel:
    """``model`` with some coefficients (and its cores) changed."""
    return replace(model, profile=replace(model.profile, **coefficients),
                   cores=model.cores if cores == "same" else cores)


def synthetic(model: CostModel, scenario: Scenario, name: str, point=None, target_step: int | None = 50) -> Observation:
    """A run whose every measured number is exactly what ``model`` predicts for it."""
    p = predict(model, scenario)
    local = scenario.mode == "local_sgd"
    answers = tuple(time_model.compute_s(model.profile, "local" if local else "gradient", b, scenario.dim,
                                         scenario.local_steps if local else 1) for b in scenario.worker_batches)
    train = scenario.steps * p.step_s + scenario.num_evaluations() * p.eval_s
    return Observation(
        run=name, point=point or (name,), series=("weak", None, (("mode", scenario.mode),)), scaling="weak",
        scenario=scenario, answer_s=answers, step_s=p.step_s, train_time_s=train,
        samples_per_s=p.samples_per_s(scenario), target_step=target_step,
        target_time_s=None if target_step is None else p.seconds_to(target_step, scenario))


def grid(model: CostModel, dims=(11, 101, 1001), workers=(1, 2, 4, 8), batches=(64, 256), modes=("sync",)):
    return [synthetic(model, Scenario(mode, k, (b,) * k, d, 100_000, steps=200, eval_every=10, cores=model.cores),
                      f"{mode}-K{k}-b{b}-d{d}")
            for mode in modes for d in dims for k in workers for b in batches]


def test_the_fit_recovers_known_coefficients_from_exact_timings():
    fitted = fit(grid(TRUE), cores=2, base=BASE, base_name="the base")
    for name in ("grad_s", "grad_s_per_elem", "apply_s", "apply_s_per_param", "message_s", "message_s_per_byte",
                 "eval_s", "eval_s_per_elem"):
        assert getattr(fitted.profile, name) == pytest.approx(getattr(TRUE.profile, name), rel=1e-6), name
    assert fitted.unidentified == ()
    assert fitted.num_runs == 4 * 2 * 3
    # what sync runs cannot measure is the base profile's, and named
    assert {"local_s", "local_s_per_elem", "replacement_s", "restart_s"} <= set(fitted.from_base)
    assert (fitted.profile.local_s, fitted.profile.restart_s) == (BASE.local_s, BASE.restart_s)
    assert any("from the base" in line and "restart_s" in line for line in fitted.describe())
    assert time_model.from_dict(time_model.to_dict(fitted.profile)) == fitted.profile  # a profile a run can name


def test_local_sgd_runs_fit_a_local_steps_own_coefficients():
    runs = grid(TRUE, modes=("sync", "local_sgd"))
    runs = [replace(o, scenario=replace(o.scenario, local_steps=4)) if o.scenario.mode == "local_sgd" else o
            for o in runs]
    runs = [synthetic(TRUE, o.scenario, o.run) for o in runs]
    fitted = fit(runs, cores=2, base=BASE)
    for name in ("grad_s", "grad_s_per_elem", "local_s", "local_s_per_elem"):
        assert getattr(fitted.profile, name) == pytest.approx(getattr(TRUE.profile, name), rel=1e-6), name
    assert "local_s" not in fitted.from_base


def test_the_fit_recovers_them_from_async_and_sync_runs_together_and_with_a_core_each():
    cluster = replace(TRUE, cores=None)
    fitted = fit(grid(cluster, modes=("sync", "async")), cores=None, base=BASE)
    for name in ("grad_s", "grad_s_per_elem", "apply_s", "message_s", "message_s_per_byte"):
        assert getattr(fitted.profile, name) == pytest.approx(getattr(cluster.profile, name), rel=1e-6), name


def test_coefficients_the_runs_cannot_separate_are_fixed_at_zero_and_named():
    fitted = fit(grid(TRUE, dims=(11,)), cores=2, base=BASE)  # one d: per parameter and per byte look like constants
    assert set(fitted.unidentified) >= {"apply_s_per_param", "message_s_per_byte"}
    assert fitted.profile.apply_s_per_param == 0 and fitted.profile.message_s_per_byte == 0
    assert any("not identifiable" in line for line in fitted.describe())
    # what is left still reproduces those runs' step times
    for o in grid(TRUE, dims=(11,)):
        assert step_s(fitted, o.scenario) == pytest.approx(o.step_s, rel=1e-6)


def test_noisy_timings_fit_within_tolerance():
    noisy = []
    for i, o in enumerate(grid(TRUE)):
        wobble = 1 + 0.05 * math.sin(7.0 * i)  # +-5 %, deterministic
        noisy.append(replace(o, step_s=o.step_s * wobble, answer_s=tuple(a * wobble for a in o.answer_s)))
    fitted = fit(noisy, cores=2, base=BASE)
    assert fitted.profile.grad_s == pytest.approx(TRUE.profile.grad_s, rel=0.1)
    assert fitted.profile.message_s == pytest.approx(TRUE.profile.message_s, rel=0.3)


def test_sync_step_time_never_falls_with_workers_at_a_fixed_batch_per_worker():
    model = replace(TRUE, cores=None)
    times = [step_s(model, Scenario("sync", k, (128,) * k, 1001, 10**6)) for k in worker_counts(1024)]
    assert all(b >= a for a, b in zip(times, times[1:]))
    # once the K serial messages dominate, each doubling adds K x one message
    per_message = PROFILE.message_s + PROFILE.message_s_per_byte * 1001 * 4
    assert times[-1] - times[-2] == pytest.approx(512 * per_message, rel=1e-9)


def test_strong_scaling_peaks_where_the_closed_form_says():
    """step(K) = g0 + g1 G d / K + apply + K m is smallest at K* = sqrt(g1 G d / m)."""
    model = with_(TRUE, cores=None, eval_s=0.0, eval_s_per_elem=0.0)
    d, batch = 1001, 8192
    o = synthetic(model, Scenario("sync", 1, (batch,), d, 10**6, steps=100, eval_every=0), "one")
    o = replace(o, scaling="strong")
    c = curve(model, steps_to_target([o]), o, worker_counts(1024), None)
    per_message = PROFILE.message_s + PROFILE.message_s_per_byte * d * 4
    k_star = math.sqrt(PROFILE.grad_s_per_elem * batch * d / per_message)
    k_peak, _ = c.peak()
    assert k_star / 2 <= k_peak <= k_star * 2
    assert c.basis == "time_to_target" and c.speedup[0] == 1.0
    assert "stops paying" in c.stops_paying()


def test_async_is_bounded_by_the_servers_work_for_one_answer():
    model = replace(TRUE, cores=None)
    s = Scenario("async", 1024, (128,) * 1024, 101, 10**7)
    assert step_s(model, s) == pytest.approx(PROFILE.apply_s + PROFILE.apply_s_per_param * 101
                                             + PROFILE.message_s + PROFILE.message_s_per_byte * 404)
    one = Scenario("async", 1, (128,), 101, 10**7)
    assert step_s(model, one) > step_s(model, replace(one, num_workers=2, worker_batches=(128, 128)))


def test_the_network_adds_latency_on_the_path_and_serialises_the_server_link():
    assert message_s(50e-6, 1e9, 1000) == pytest.approx(50e-6 + 8e-6)
    assert message_s(50e-6, None, 10**9) == 50e-6
    model = replace(TRUE, cores=None)
    base = Scenario("sync", 64, (128,) * 64, 10**5, 10**8)
    nbytes = 4 * 10**5
    slow = replace(base, latency_s=50e-6, bandwidth_bps=1e9)
    # 64 workers' weights out and gradients in, one after another on the server's link, outweigh one path
    assert step_s(model, slow) - step_s(model, base) == pytest.approx(2 * 64 * nbytes * 8 / 1e9)
    one = replace(slow, num_workers=1, worker_batches=(128,))
    assert step_s(model, one) - step_s(model, replace(base, num_workers=1, worker_batches=(128,))) == pytest.approx(
        2 * message_s(50e-6, 1e9, nbytes))


def test_backup_workers_wait_for_the_fastest_k_minus_b_and_a_straggler_slows_sync():
    model = replace(TRUE, cores=None)
    plain = Scenario("sync", 3, (128,) * 3, 11, 10**5)
    straggler = replace(plain, slowdown=(1.0, 1.0, 4.0))
    backup = replace(straggler, mode="backup", backup_workers=1)
    assert step_s(model, straggler) > step_s(model, plain)
    assert step_s(model, backup) == pytest.approx(step_s(model, plain))
    assert backup.rows_per_update() == 256


def test_local_sgd_pays_one_round_of_messages_per_h_steps():
    model = replace(TRUE, cores=None)
    sync = Scenario("sync", 8, (128,) * 8, 101, 10**6)
    local = replace(sync, mode="local_sgd", local_steps=4)
    messages = step_s(model, sync) - (PROFILE.grad_s + PROFILE.grad_s_per_elem * 128 * 101)
    assert step_s(model, local) == pytest.approx(4 * (PROFILE.local_s + PROFILE.local_s_per_elem * 128 * 101)
                                                 + messages)
    assert local.rows_per_update() == 4 * 8 * 128


def test_steps_to_target_are_measured_where_run_and_fitted_elsewhere():
    model = replace(TRUE, cores=None)
    runs = []
    for b in (64, 128, 512):
        s = Scenario("sync", 1, (b,), 11, 10**5)
        runs.append(synthetic(model, s, f"b{b}", target_step=round(40 + 12800 / b)))  # S_min 40, B_noise 320
    eff = steps_to_target(runs)
    assert eff.steps("sync", 128) == 140
    assert eff.steps("sync", 1024) == pytest.approx(40 + 12800 / 1024, rel=1e-6)
    assert eff.steps("async", 128) is None


def test_leave_one_out_predicts_each_point_without_its_own_runs():
    runs = grid(TRUE)
    odd = runs[5]
    runs[5] = replace(odd, step_s=odd.step_s * 10)  # a point measured 10x slower than the model says
    predictions = leave_one_out(runs, cores=2)  # the base: the shipped profile
    assert predictions[odd.run]["step_ms_error_pct"] == pytest.approx(-90.0, abs=5)
    assert predictions[odd.run]["prediction_fit"] == "leave-one-point-out"
    others = [abs(p["step_ms_error_pct"]) for name, p in predictions.items() if name != odd.run]
    assert max(others) > 0  # the odd point pulls their fits a little: they are fits, not echoes
    for name, p in predictions.items():
        measured = next(o for o in runs if o.run == name)
        error = 100 * (p["predicted_step_ms"] / 1e3 - measured.step_s) / measured.step_s
        assert p["step_ms_error_pct"] == pytest.approx(error)


def test_the_repeat_spread_is_the_median_deviation_from_each_points_mean():
    from sgd_dist.study.model_report import repeat_spread

    one = grid(TRUE, dims=(11,), workers=(1,), batches=(64,))[0]
    runs = [replace(one, run="a", step_s=0.9e-3), replace(one, run="b", step_s=1.1e-3),
            replace(one, run="c", point=("other",), step_s=5e-3)]  # a point run once adds nothing
    assert repeat_spread(runs)["step_ms_error_pct"] == pytest.approx(10.0)


def test_steps_to_target_are_kept_apart_per_problem():
    model = replace(TRUE, cores=None)
    s = Scenario("sync", 1, (128,), 11, 10**5)
    small = synthetic(model, s, "small", target_step=100)
    wide = replace(synthetic(model, replace(s, dim=1001), "wide", target_step=300),
                   problem=(("data.n_features", 1000),))
    eff = steps_to_target([small, wide])
    assert eff.steps("sync", 128) == 100
    assert eff.steps("sync", 128, (("data.n_features", 1000),)) == 300


def test_no_extrapolation_to_1024_workers_from_one_worker_count():
    from sgd_dist.study.model_report import extrapolation_caveat

    one_count = grid(TRUE, workers=(2,))
    assert "every run had 2 workers" in extrapolation_caveat(one_count)
    assert extrapolation_caveat(grid(TRUE, workers=(1, 2))) is None


# -- one model of time: the cost model's step is the virtual clock's ------------------------------------------

@pytest.mark.parametrize("workers, network, network_s", [
    (1, (), 0.0),
    (2, (), 0.0),
    # one worker over a link of 2^-10 s latency and 2^17 bit/s: its 16-byte command and answer take 2^-10 s each
    (1, ("cluster.network.latency_ms=0.9765625", "cluster.network.bandwidth_gbps=0.000131072"),
     2 * (2 ** -10 + 2 ** -10)),
])
def test_a_sync_step_predicted_by_the_cost_model_is_the_virtual_clocks_for_the_same_profile(tmp_path, workers, network,
                                                                                            network_s):
    """A virtual run (a core each, equal batches: the answers arrive together) on a profile of dyadic coefficients:
    its median step is the cost model's prediction for the same profile, and both are the hand-computed
    gradient + the command's and the answer's time on the link + K answers + one update."""
    profile = replace(PROFILE, grad_s=2 ** -8, grad_s_per_elem=2 ** -16, apply_s=2 ** -10, apply_s_per_param=2 ** -14,
                      message_s=2 ** -9, message_s_per_byte=2 ** -15)
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(time_model.to_dict(profile)))
    config = make_config("cluster.backend=virtual", f"cluster.virtual.profile={path}", f"cluster.num_workers={workers}",
                         "train.steps=30", "train.eval_every=0", f"output.dir={tmp_path / 'run'}", *network)
    measured = train(config, console=False, progress=False).summary["median_step_ms"] / 1e3
    predicted = step_s(CostModel(profile, None), scenario_of(config, None))
    d, rows = 4, 16  # make_config: 3 features and the bias; 16 rows a step, float32
    by_hand = ((2 ** -8 + 2 ** -16 * rows * d) + network_s + workers * (2 ** -9 + 2 ** -15 * 4 * d)
               + (2 ** -10 + 2 ** -14 * d))
    assert predicted == pytest.approx(by_hand, rel=1e-12)
    assert measured == pytest.approx(predicted, rel=1e-9)  # float sums of the clock's times: rounding only


def test_a_sweep_predicted_from_a_profile_uses_its_coefficients_as_they_are(tmp_path, monkeypatch):
    from sgd_dist.study import cost_model

    runs = grid(TRUE, workers=(1, 2))
    monkeypatch.setattr(cost_model, "load_observations", lambda sweep_dir, cores: runs)
    exact = cost_model.model_sweep(tmp_path, 2, profile=PROFILE, profile_name="p.json")
    assert exact.model.profile == PROFILE and exact.model.num_runs == 0
    for o in runs:
        row = exact.predictions[o.run]
        assert row["prediction_fit"] == "the profile p.json"
        assert row["step_ms_error_pct"] == pytest.approx(0.0, abs=1e-9)  # the runs were timed by this very profile
    slow = cost_model.model_sweep(tmp_path, 2, profile=replace(PROFILE, grad_s=10 * PROFILE.grad_s))
    assert all(row["step_ms_error_pct"] > 0 for row in slow.predictions.values())


def test_sgd_dist_model_refuses_a_bad_profile_in_one_line(tmp_path, capsys):
    from sgd_dist.cli import main

    (tmp_path / "results.csv").write_text("run,status\n")
    assert main(["model", str(tmp_path), "--profile", str(tmp_path / "none.json")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"--profile {tmp_path / 'none.json'}: no such file "
                                                    "(a profile written by sgd-dist calibrate)")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**time_model.to_dict(PROFILE), "apply_s": -1}))
    assert main(["model", str(tmp_path), "--profile", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"--profile {bad}: apply_s must be >= 0 (got -1)") and "\n" not in err
