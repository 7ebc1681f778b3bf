"""`sgd-dist calibrate`: the fits go through the measured points, the quick calibration writes a valid profile that a
virtual run can name, and a bad --out is a one-line error before anything is measured. No timing in any assert:
only that the numbers are there, finite, >= 0, and follow what was measured."""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import math
import os

import pytest
from conftest import make_config

from sgd_dist.bench import calibrate
from sgd_dist.bench.calibrate import QUICK, LineFit, fit_line, measure_compute, one_thread
from sgd_dist.cli import main
from sgd_dist.core.time_model import COEFFICIENTS, OPTIONAL, from_dict
from sgd_dist.errors import EXIT_USAGE
from sgd_dist.run.trainer import train

# -- the fits ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("relative", [True, False])
def test_a_line_through_exact_points_is_recovered(relative):
    points = [(x, 3e-5 + 2e-9 * x) for x in (10, 1e3, 1e5, 1e6)]
    line = fit_line(points, relative=relative)
    assert line.overhead == pytest.approx(3e-5, rel=1e-9) and line.rate == pytest.approx(2e-9, rel=1e-9)
    assert line.points == tuple(points) and "4 points" in line.quality()


def test_the_fit_keeps_both_coefficients_non_negative():
    falling = fit_line([(1.0, 5e-5), (1e6, 4e-5)])  # measured noise that falls with size: no rate, the overhead
    assert falling.rate == 0.0 and 4e-5 < falling.overhead < 5e-5
    through_origin = fit_line([(1e3, 1e-6), (1e6, 1e-3)], relative=False)  # a negative overhead is clamped at 0
    assert through_origin.overhead >= 0 and through_origin.rate > 0
    residuals = fit_line([(1e3, -1e-6), (1e4, -2e-6)], relative=False)  # differences below 0: all clamped
    assert residuals.overhead == 0.0 and residuals.rate == 0.0


def test_the_gradients_rate_comes_from_the_measured_points_on_the_worker_itself():
    """16 x 11 against 256 x 2001 is 290 times the elements: the fitted rate per element is positive, and the line
    goes through (near) the measured medians."""
    ticks: list[str] = []
    with one_thread():
        line = measure_compute("gradient", [(16, 11), (256, 2001)], 5, ticks.append)
    assert ticks == ["gradient 16 x 11", "gradient 256 x 2001"]
    assert [x for x, _ in line.points] == [16 * 11, 256 * 2001]
    assert line.rate > 0 and line.overhead >= 0
    for x, y in line.points:
        assert line.predict(x) == pytest.approx(y, rel=1e-6)  # two points: the line goes through both


# -- the command -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quick_profile(tmp_path_factory, ray_session):
    """One `sgd-dist calibrate --quick` for the tests below (its printed lines, its progress bar and the profile it
    wrote)."""
    path = tmp_path_factory.mktemp("calibrate") / "profiles" / "here.json"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["calibrate", "--quick", "--progress", "--out", str(path)])
    return code, out.getvalue(), path, err.getvalue()


@pytest.mark.slow
def test_calibrate_quick_writes_a_valid_profile_of_this_machine(quick_profile):
    code, printed, path, _ = quick_profile
    assert code == 0 and path.is_file()
    values = json.loads(path.read_text())
    profile = from_dict(values, str(path))
    for name in COEFFICIENTS:
        value = getattr(profile, name)
        assert value is not None, f"{name} was not measured"
        assert math.isfinite(value) and value >= 0, name
    assert set(OPTIONAL) <= set(values)  # the ray transport's cost is measured, not left out
    assert profile.cores == os.cpu_count() and profile.date == datetime.date.today().isoformat()
    assert profile.source.startswith("sgd-dist calibrate --quick") and "load average" in profile.source
    assert profile.replacement_s > 0 and profile.restart_s > 0  # real replacements and restarts take time
    assert profile.grad_s_per_elem > 0  # QUICK's gradient points span 16 x 11 to 256 x 2001
    assert f"profile written to {path}" in printed


def test_calibrate_prints_every_coefficient_with_how_well_it_was_measured(quick_profile):
    _, printed, _, _ = quick_profile
    for label in ("gradient", "local step", "evaluation", "server update", "shm answer", "ray answer", "replacement",
                  "restart"):
        line = next((text for text in printed.splitlines() if text.startswith(label)), None)
        assert line is not None, label
        assert "[" in line and ("points" in line or "median of" in line), line
    assert f"{len(QUICK.gradient)} points" in printed


def test_calibrate_shows_its_progress_over_every_measurement(quick_profile):
    *_, bar = quick_profile
    assert "calibrate" in bar and f"/{QUICK.items()}" in bar and "measurement" in bar
    assert "ray transport d=" in bar  # the postfix names what was measured last


def test_a_virtual_run_names_the_calibrated_profile(quick_profile, tmp_path):
    _, _, path, _ = quick_profile
    config = make_config("cluster.backend=virtual", f"cluster.virtual.profile={path}", f"output.dir={tmp_path / 'v'}")
    summary = train(config, console=False, progress=False).summary
    model = summary["time_model"]
    assert model["profile"] == str(path) and model["source"].startswith("sgd-dist calibrate --quick")
    assert summary["median_step_ms"] > 0


@pytest.mark.parametrize("out, message", [
    ("", "--out needs a file for the profile (got an empty path); leave it out for the default"),
    ("{dir}", "--out {dir}: names a directory; name the profile's file (e.g. {dir}/profile.json)"),
    ("{file}/profile.json", "--out {file}/profile.json: {file} is a file, not a directory"),
    ("/proc/sgd-dist/p.json", "--out /proc/sgd-dist/p.json: cannot write there (No such file or directory)"),
])
def test_a_bad_out_is_a_one_line_error_before_anything_is_measured(tmp_path, capsys, monkeypatch, out, message):
    def measured(*args, **kwargs):
        raise AssertionError("measured before the --out was checked")

    monkeypatch.setattr(calibrate, "calibrate", measured)
    (tmp_path / "file").write_text("x")
    fill = {"dir": str(tmp_path), "file": str(tmp_path / "file")}
    assert main(["calibrate", "--out", out.format(**fill)]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err.endswith(message.format(**fill)) and "\n" not in err


def test_calibrate_refuses_an_unknown_option(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["calibrate", "--fast"])
    assert exited.value.code == EXIT_USAGE
    assert "unrecognized arguments: --fast" in capsys.readouterr().err


def test_without_out_the_profile_goes_under_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = calibrate.profile_path(None)
    assert path.parent == tmp_path.joinpath("runs").relative_to(tmp_path) and path.name.startswith("profile-")
    assert path.suffix == ".json" and not path.exists()


def test_the_fit_quality_gives_the_residuals_and_says_when_two_points_leave_no_check():
    two = LineFit(1.0, 2.0, ((1.0, 3.0), (2.0, 5.0))).quality()
    assert two.startswith("2 points, worst residual 0 us (0.0 %") and "nothing left to check it" in two
    three = LineFit(1.0, 2.0, ((1.0, 3.0), (2.0, 5.0), (3.0, 8.0))).quality()
    assert three == "3 points, worst residual 1e+06 us (12.5 %, median 0.0 %)"
