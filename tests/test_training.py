"""Whole runs: the seed's checks, the default job's accuracy, and everything a run directory holds."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_png, inject_server_failure, make_config
from plain_sgd import PlainRun, plain_data, plain_sgd

from sgd_dist.config import ConfigError, load_config
from sgd_dist.engine.evaluations import eval_steps
from sgd_dist.engine.server import ParameterServer
from sgd_dist.run.plots import plot_run
from sgd_dist.run.rundir import read_metrics, read_summary
from sgd_dist.run.trainer import train

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.fixture(scope="module")
def default_run(ray_session, tmp_path_factory):
    """configs/default.yaml exactly as shipped, on the Ray backend, figures on."""
    out = tmp_path_factory.mktemp("runs") / "default"
    config = load_config(CONFIGS / "default.yaml", [f"output.dir={out}"])
    return config, train(config, config_path=CONFIGS / "default.yaml", console=False, progress=False)


# The runs compute in float32; the plain reference in float64. Measured: per-step losses agree to 8e-7 relative and
# final weights to 1e-6 over the default job's 2000 steps. 1e-5 is that round-off with headroom; a wrong lr, an
# unweighted average or an off-by-one step is orders of magnitude outside it.
ROUND_OFF = 1e-5


def assert_matches_plain_sgd(config, rows, summary) -> PlainRun:
    """Every step of a recorded run against plain PyTorch SGD: loss, lr, evaluations, final weights, optimum."""
    ref = plain_sgd(config)
    steps = config.train.steps
    assert [r["step"] for r in rows] == list(range(steps + 1))
    assert rows[0]["loss"] is None and rows[0]["lr"] is None
    assert [r["lr"] for r in rows[1:]] == pytest.approx(ref.lrs, rel=1e-12)
    torch.testing.assert_close(torch.tensor([r["loss"] for r in rows[1:]], dtype=torch.float64),
                               torch.tensor(ref.losses, dtype=torch.float64), rtol=ROUND_OFF, atol=0)
    for row in rows:
        if "eval_loss" in row:
            assert row["eval_loss"] == pytest.approx(ref.full_loss(ref.weights[row["step"]]), rel=ROUND_OFF)
    torch.testing.assert_close(torch.tensor(summary["weights"], dtype=torch.float64), ref.weights[-1],
                               rtol=ROUND_OFF, atol=ROUND_OFF)
    w_star = ref.least_squares()  # not sgd_dist's normal equations: a QR least-squares solve on the rows
    torch.testing.assert_close(torch.tensor(summary["optimal_weights"], dtype=torch.float64), w_star,
                               rtol=1e-9, atol=1e-9)
    assert summary["optimal_loss"] == pytest.approx(ref.full_loss(w_star), rel=1e-9)
    return ref


def test_default_job_matches_plain_sgd_at_every_step_and_ends_within_1e_3_of_the_optimum(default_run):
    config, result = default_run
    s = result.summary
    assert s["status"] == "completed" and s["backend"] == "ray" and s["num_workers"] == 2
    ref = assert_matches_plain_sgd(config, read_metrics(result.run_dir), s)
    optimum = ref.full_loss(ref.least_squares())
    assert 0 <= (ref.full_loss(torch.tensor(s["weights"])) - optimum) / optimum < 1e-3


@pytest.mark.parametrize("backend", ["serial", "ray"])
def test_lesson2_matches_plain_sgd_at_every_step(ray_session, tmp_path, backend):
    config = load_config(CONFIGS / "lesson2.yaml", [f"output.dir={tmp_path / 'l2'}", f"cluster.backend={backend}"])
    result = train(config, console=False, progress=False)
    ref = assert_matches_plain_sgd(config, read_metrics(result.run_dir), result.summary)
    assert result.summary["true_weights"] == [3.0, 2.0]
    # the seed's claim: 100 full-batch steps end within 1% of least squares, whose intercept absorbs the
    # U(0, 1) noise's mean 0.5 (so about (3, 2.5), not the true (3, 2))
    w_star = ref.least_squares()
    assert ref.full_loss(ref.weights[-1]) <= 1.01 * ref.full_loss(w_star)
    assert w_star.tolist() == pytest.approx([3.0, 2.5], abs=0.1)


def test_a_blocks_run_matches_plain_sgd_on_its_contiguous_batches(tmp_path):
    config = make_config("cluster.backend=serial", "train.sampling=blocks", "train.batch_size=24", "train.steps=30",
                         "data.n_samples=515", "cluster.num_workers=3", f"output.dir={tmp_path / 'b'}")
    result = train(config, console=False, progress=False)
    assert_matches_plain_sgd(config, read_metrics(result.run_dir), result.summary)


@pytest.mark.parametrize(
    "overrides",
    [
        ("optim.schedule=cosine", "optim.warmup_steps=5", "optim.min_lr=0.01"),
        ("optim.schedule=step", "optim.step_size=7", "optim.gamma=0.5", "optim.warmup_steps=3"),
        ("optim.lr_scaling=linear", "optim.base_batch_size=8", "optim.lr=0.02", "optim.schedule=cosine"),
        ("optim.lr_scaling=linear", "optim.base_batch_size=1024", "train.batch_size=full"),
        ("data.n_samples=515", "cluster.num_workers=3", "train.batch_size=full"),  # shards of 172, 172, 171 rows
    ],
    ids=["warmup-cosine", "warmup-step", "scaled-cosine", "scaled-full-batch", "uneven-shards"],
)
def test_the_lr_column_follows_the_schedule(tmp_path, overrides):
    """The lr column against the schedule computed independently (and each step against plain SGD: with uneven
    shards that checks the average is weighted by rows)."""
    config = make_config("cluster.backend=serial", "train.steps=40", *overrides, f"output.dir={tmp_path / 'r'}",
                         optim={"lr": 0.05})  # in the base: an override may set another lr (one key, given once)
    result = train(config, console=False, progress=False)
    assert_matches_plain_sgd(config, read_metrics(result.run_dir), result.summary)


def test_run_directory_holds_config_metrics_summary_and_figures(default_run):
    config, result = default_run
    run_dir = result.run_dir
    # checkpoints: the default's every 1000 steps (a killed default job can be resumed)
    assert {p.name for p in run_dir.iterdir()} == {"config.yaml", "metrics.jsonl", "schedule.jsonl", "summary.json",
                                                   "loss.png", "checkpoints"}
    assert read_summary(run_dir)["checkpoints"] >= 1
    assert load_config(run_dir / "config.yaml") == config
    rows = read_metrics(run_dir)
    steps = config.train.steps
    assert [r["step"] for r in rows] == list(range(steps + 1))  # every step, in order, once
    for key in ["step", "wall_time_s", "samples_seen", "loss", "lr", "grad_norm"]:
        assert all(key in r for r in rows)
    assert rows[0]["loss"] is None and rows[0]["samples_seen"] == 0 and rows[0]["wall_time_s"] == 0
    assert rows[-1]["samples_seen"] == steps * 512
    evaluated = {r["step"] for r in rows if "eval_loss" in r}
    assert evaluated == set(eval_steps(steps, config.train.eval_every)) == {0, steps, *range(100, steps, 100)}
    assert all("optimality_gap" in r for r in rows if "eval_loss" in r)
    times = [r["wall_time_s"] for r in rows]
    assert times == sorted(times)
    summary = read_summary(run_dir)
    for key in ["final_loss", "optimal_loss", "weights", "optimal_weights", "steps", "num_workers", "backend",
                "mode", "wall_time_s", "train_time_s", "median_step_ms", "samples_per_s"]:
        assert summary[key] is not None, key
    assert summary["final_loss"] == rows[-1]["eval_loss"] and summary["steps"] == steps
    assert_png(run_dir / "loss.png")


def test_fit_figure_for_one_feature_and_plot_redraws(ray_session, tmp_path):
    config = load_config(CONFIGS / "lesson2.yaml", [f"output.dir={tmp_path / 'l2'}", "cluster.backend=serial"])
    run_dir = train(config, console=False, progress=False).run_dir
    for name in ["loss.png", "fit.png"]:
        assert_png(run_dir / name)
        (run_dir / name).unlink()
    assert [p.name for p in plot_run(run_dir)] == ["loss.png", "fit.png"]
    for name in ["loss.png", "fit.png"]:
        assert_png(run_dir / name)


def test_logistic_run_reports_its_reference(tmp_path):
    config = make_config("data.kind=logistic", "data.n_samples=4000", "train.steps=300", "optim.lr=1.0",
                         "cluster.backend=serial", f"output.dir={tmp_path / 'lg'}", "optim.weight_decay=0.001")
    s = train(config, console=False, progress=False).summary
    assert "Newton" in s["reference"] and s["objective"] == "mean logistic loss"
    assert 0 <= s["optimality_gap"] < 0.01


def test_metrics_are_on_disk_before_the_run_ends(tmp_path, monkeypatch):
    """Rows are flushed as written: a reader sees each batch, whole, while the run is still going. The loop hands
    its rows over at every update here (instead of every 0.2 s, which a 400-step serial run finishes within)."""
    import sgd_dist.engine.loop as loop
    import sgd_dist.run.recorder as recorder

    monkeypatch.setattr(loop, "DELIVER_TO_DRIVER_EVERY_S", 0.0)
    seen = []
    original = recorder.Recorder.record

    def spy(self, rows):
        original(self, rows)
        if rows:
            with open(tmp_path / "r" / "metrics.jsonl") as f:  # another reader of the file
                on_disk = [json.loads(line)["step"] for line in f]
            seen.append((rows[-1]["step"], on_disk))

    monkeypatch.setattr(recorder.Recorder, "record", spy)
    train(make_config("cluster.backend=serial", "train.steps=400", f"output.dir={tmp_path / 'r'}"), console=False,
          progress=False)
    mid_run = [last for last, _ in seen if last < 400]
    assert len(mid_run) >= 100, mid_run
    assert all(on_disk == list(range(last + 1)) for last, on_disk in seen)


def test_existing_output_directory_is_refused_before_anything_runs(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        train(make_config("cluster.backend=serial", f"output.dir={tmp_path / 'taken'}"), console=False)
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]


def test_failed_run_keeps_its_rows_and_says_so(tmp_path, monkeypatch):
    from sgd_dist.engine.server import ParameterServer

    original = ParameterServer.update

    def failing(self, results, **kwargs):
        if self.step == 7:
            raise RuntimeError("injected failure at step 8")
        return original(self, results, **kwargs)

    monkeypatch.setattr(ParameterServer, "update", failing)
    config = make_config("cluster.backend=serial", f"output.dir={tmp_path / 'f'}")
    with pytest.raises(RuntimeError, match="injected"):
        train(config, console=False, progress=False)
    summary = read_summary(tmp_path / "f")
    assert summary["status"] == "failed" and "injected failure" in summary["error"]
    assert yaml.safe_load((tmp_path / "f" / "config.yaml").read_text())["train"]["steps"] == 20
    # updates 1..7 finished before the 8th failed: every one of their rows is kept, none twice
    assert [r["step"] for r in read_metrics(tmp_path / "f")] == list(range(8))
    assert summary["steps_recorded"] == 7
    # and its figure redraws from what it recorded (no weights in a failed summary: no fit figure)
    assert [p.name for p in plot_run(tmp_path / "f")] == ["loss.png"]
    assert_png(tmp_path / "f" / "loss.png")


@pytest.mark.parametrize("fail_at", [1, 150])
def test_a_failed_ray_run_keeps_every_row_its_server_computed(ray_session, tmp_path, monkeypatch, fail_at):
    """On Ray, rows come back in batches behind the newest step; a failure must not take the finished ones along."""
    inject_server_failure(ray_session, monkeypatch, fail_at)
    config = make_config("train.steps=400", "train.eval_every=50", f"output.dir={tmp_path / 'f'}")
    with pytest.raises(Exception, match="injected failure"):
        train(config, console=False, progress=False)
    summary = read_summary(tmp_path / "f")
    assert summary["status"] == "failed" and "injected failure" in summary["error"] and summary["diverged"] is False
    rows = read_metrics(tmp_path / "f")
    assert [r["step"] for r in rows] == list(range(fail_at + 1))
    assert summary["steps_recorded"] == fail_at
    assert [r["step"] for r in rows if "eval_loss" in r] == [s for s in range(0, fail_at + 1, 50)]


def test_divergence_stops_the_run_naming_the_step_and_the_learning_rate(tmp_path):
    config = make_config("cluster.backend=serial", "optim.lr=50", "train.steps=200", f"output.dir={tmp_path / 'd'}")
    with pytest.raises(RuntimeError, match=r"the mini-batch loss is (inf|nan) at step \d+: the run diverged; "
                                           r"try a smaller optim\.lr \(step \d+ used lr 50\)"):
        train(config, console=False, progress=False)
    summary = read_summary(tmp_path / "d")
    assert summary["status"] == "failed" and "diverged" in summary["error"] and summary["diverged"] is True
    rows = read_metrics(tmp_path / "d")
    assert rows and rows[-1]["loss"] is None and rows[-1]["step"] == summary["steps_recorded"]


# Two float64 evaluations of the same objective f(w), the rows summed in different orders, agree to a few ulps of
# f(w) (measured: at most 2 over four seeds); a float32 norm in the penalty, or f* taken from X^T X, X^T y and
# y^T y (which cancel), is off by 25 to 1e8 ulps.
GAP_ULPS = 8


@pytest.mark.parametrize("wd", [0.5, 0.0], ids=["ridge", "least-squares"])
def test_the_optimality_gap_is_exact_and_never_negative_near_the_optimum(tmp_path, monkeypatch, wd):
    """Full-batch gradient descent to a float32 fixed point a few ulps above f* (with weight decay: the ridge
    optimum, not least squares). At every evaluated step the recorded gap equals f(w_t) - f(w*) recomputed in
    float64 from the rows in plain torch, and neither is negative beyond rounding."""
    weights = {}  # each version's weights, as the server made them
    update = ParameterServer.update

    def keep_weights(self, results, **kwargs):
        row = update(self, results, **kwargs)
        weights[self.step] = self.weights.clone()
        return row

    monkeypatch.setattr(ParameterServer, "update", keep_weights)
    config = make_config("cluster.backend=serial", f"optim.weight_decay={wd}", "train.batch_size=full",
                         "train.steps=300", "optim.lr=0.3", "train.eval_every=20", f"output.dir={tmp_path / 'r'}")
    result = train(config, console=False, progress=False)
    weights[0] = torch.zeros(config.data.dim)
    X, y = plain_data(config)
    n, d = X.shape

    def objective(w: torch.Tensor) -> float:  # mean squared error + wd/2 |w|^2, in float64
        residual = X @ w.double() - y
        return float(residual @ residual) / n + 0.5 * wd * float(w.double() @ w.double())

    # the ridge optimum as a least-squares problem: |Xw - y|^2 / n + wd/2 |w|^2 = |[X; sI] w - [y; 0]|^2 / n
    A = torch.cat([X, math.sqrt(n * wd / 2) * torch.eye(d, dtype=torch.float64)])
    b = torch.cat([y, torch.zeros(d, dtype=torch.float64)])
    w_star = torch.linalg.lstsq(A, b.unsqueeze(1)).solution.squeeze(1)
    f_star = objective(w_star)
    ulp = math.ulp(f_star)
    evaluated = [r for r in read_metrics(result.run_dir) if "eval_loss" in r]
    assert [r["step"] for r in evaluated] == sorted(eval_steps(300, 20))
    for row in evaluated:
        f = objective(weights[row["step"]])
        gap = f - f_star
        assert abs(row["optimality_gap"] - gap) <= GAP_ULPS * math.ulp(f), (row["step"], row["optimality_gap"], gap)
        assert gap >= -4 * ulp and row["optimality_gap"] >= -4 * ulp, (row["step"], row["optimality_gap"], gap)
    s = result.summary
    assert s["optimality_gap"] == evaluated[-1]["optimality_gap"]
    assert s["relative_optimality_gap"] < 1e-11  # very close: what is left is float32 resolution
    torch.testing.assert_close(torch.tensor(s["optimal_weights"], dtype=torch.float64), w_star, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.tensor(s["weights"]), w_star.float(), rtol=1e-4, atol=1e-5)


def _without_timings(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in rows]


@pytest.mark.parametrize(
    "path, overrides",
    [
        (CONFIGS / "lesson2.yaml", ["cluster.backend=serial"]),
        (CONFIGS / "default.yaml", ["cluster.backend=serial", "train.steps=200"]),
        (None, ["data.kind=logistic", "data.n_samples=2000", "data.n_features=1", "optim.lr=1.0",
                "train.steps=60", "train.batch_size=64", "train.eval_every=20", "cluster.backend=serial"]),
    ],
    ids=["lesson2", "default", "logistic"],
)
def test_a_run_repeats_bit_for_bit_from_its_saved_config(tmp_path, path, overrides):
    # The README's promise: `sgd-dist train --config RUN_DIR/config.yaml --out NEW` repeats the run. The first
    # run draws its figures (which reload config.yaml); the second starts from that file and nothing else.
    first = train(load_config(path, [*overrides, f"output.dir={tmp_path / 'first'}", "output.plots=true"]),
                  console=False, progress=False)
    second = train(load_config(first.run_dir / "config.yaml", [f"output.dir={tmp_path / 'second'}"]),
                   console=False, progress=False)
    assert first.summary["status"] == second.summary["status"] == "completed"
    rows_first, rows_second = read_metrics(first.run_dir), read_metrics(second.run_dir)
    assert len(rows_first) == first.summary["steps"] + 1
    assert _without_timings(rows_second) == _without_timings(rows_first)
    assert second.summary["weights"] == first.summary["weights"]
    assert_png(first.run_dir / "loss.png")


def test_the_shipped_logistic_config_trains_close_to_its_exact_optimum(tmp_path):
    config = load_config(CONFIGS / "logistic.yaml", ["cluster.backend=serial", f"output.dir={tmp_path / 'lg'}",
                                                     "output.plots=false"])
    s = train(config, console=False, progress=False).summary
    assert s["objective"] == "mean logistic loss" and "Newton" in s["reference"]
    assert 0 <= s["relative_optimality_gap"] < 1e-3


def test_data_kind_logistic_as_an_override_trains_a_shipped_linear_config(tmp_path):
    config = load_config(CONFIGS / "lesson2.yaml", ["data.kind=logistic", "cluster.backend=serial",
                                                    f"output.dir={tmp_path / 'l2'}", "output.plots=false"])
    s = train(config, console=False, progress=False).summary
    assert s["objective"] == "mean logistic loss" and s["steps"] == 100


def test_the_training_time_is_the_metrics_clock_in_the_summary_and_the_plot(tmp_path):
    from sgd_dist.run.plots import _title

    result = train(make_config("cluster.backend=serial", f"output.dir={tmp_path / 'r'}"), console=False, progress=False)
    s, rows = result.summary, read_metrics(result.run_dir)
    assert s["train_time_s"] == rows[-1]["wall_time_s"]
    assert s["samples_per_s"] == pytest.approx(rows[-1]["samples_seen"] / rows[-1]["wall_time_s"], rel=1e-12)
    assert f"20 steps in {s['train_time_s']:.3g} s" in _title(s, load_config(result.run_dir / "config.yaml"))


def test_a_resumed_runs_time_covers_the_steps_it_records_once(tmp_path, monkeypatch):
    """After --resume the clock goes on from the checkpoint's: the training time and the samples/s are those of
    the steps metrics.jsonl holds, not this command's share of them over all the steps."""
    from sgd_dist.run.recorder import Recorder

    class Killed(Exception):
        pass

    original = Recorder.checkpoint

    def checkpoint_then_die(self, state):
        original(self, state)
        if state["server"]["step"] >= 30:
            raise Killed

    config = make_config("cluster.backend=serial", "train.steps=60", "train.checkpoint_every=10",
                         f"output.dir={tmp_path / 'cut'}")
    monkeypatch.setattr(Recorder, "checkpoint", checkpoint_then_die)
    with pytest.raises(Killed):
        train(config, console=False, progress=False)
    monkeypatch.setattr(Recorder, "checkpoint", original)
    s = train(config, console=False, progress=False, resume=tmp_path / "cut").summary
    rows = read_metrics(tmp_path / "cut")
    assert [r["step"] for r in rows] == list(range(61)) and s["resumed_from"] >= 30
    times = [r["wall_time_s"] for r in rows]
    assert times == sorted(times) and times[s["resumed_from"] + 1] > times[s["resumed_from"]]
    assert s["train_time_s"] == times[-1]
    assert s["samples_per_s"] == pytest.approx(rows[-1]["samples_seen"] / times[-1], rel=1e-12)


def test_resuming_a_completed_run_returns_it_untouched(tmp_path):
    run = tmp_path / "done"
    config = make_config("cluster.backend=serial", "train.checkpoint_every=10", f"output.dir={run}")
    first = train(config, console=False, progress=False)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.rglob("*")) if p.is_file()}
    again = train(config, console=False, progress=False, resume=run)
    assert again.summary == read_summary(run) and again.summary["steps"] == first.summary["steps"] == 20
    assert again.run_dir == run
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.rglob("*")) if p.is_file()} == before


def test_runs_from_python_are_named_after_their_mode_workers_and_backend(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = train(make_config("cluster.backend=serial", "train.mode=async"), console=False, progress=False)
    assert result.run_dir.parent == Path("runs") and result.run_dir.name.startswith("async-2w-serial-")
    named = train(make_config("cluster.backend=serial", "output.name=probe"), console=False, progress=False)
    assert named.run_dir.name.startswith("probe-")


def test_a_short_run_writes_no_checkpoint_and_the_default_job_one_every_1000_steps(tmp_path):
    config = load_config(CONFIGS / "lesson2.yaml", ["train.steps=1", "cluster.backend=serial",
                                                    f"output.dir={tmp_path / 'one'}", "output.plots=false"])
    s = train(config, console=False, progress=False).summary
    assert s["checkpoints"] == 0 and not (tmp_path / "one" / "checkpoints").exists()
    config = make_config("cluster.backend=serial", "train.steps=2000", "train.eval_every=0",
                         f"output.dir={tmp_path / 'long'}")
    s = train(config, console=False, progress=False).summary
    assert s["checkpoints"] == 2 and (tmp_path / "long" / "checkpoints" / "latest.json").is_file()


def test_in_a_notebook_the_bar_is_a_widget_or_one_line_says_why_not(monkeypatch):
    import types

    import tqdm.notebook
    import tqdm.std

    from sgd_dist.run.progress import NotebookTextBar
    from sgd_dist.run.progress import bar_class as progress_bar

    said: list[str] = []
    assert progress_bar(said.append) is tqdm.std.tqdm and said == []  # a terminal: the text bar, nothing said
    monkeypatch.setitem(sys.modules, "ipykernel.zmqshell", types.ModuleType("ipykernel.zmqshell"))  # a kernel
    monkeypatch.setattr(tqdm.notebook, "IProgress", None)  # ipywidgets missing
    monkeypatch.setattr("sgd_dist.run.progress._display", lambda *a, **k: None)  # IPython, as in every kernel
    monkeypatch.setattr("sgd_dist.run.progress._noted", [])
    assert progress_bar(said.append) is NotebookTextBar
    assert said == ["sgd-dist: progress is one line of text here: ipywidgets is not installed "
                    "(pip install ipywidgets for the notebook's bar)"]
    monkeypatch.setattr(tqdm.notebook, "IProgress", object)  # ipywidgets there
    assert progress_bar(said.append) is tqdm.notebook.tqdm and len(said) == 1


def test_the_trainer_imports_no_matplotlib_until_a_run_draws_its_figures():
    # matplotlib is imported on a thread while the cluster starts, not on the command's critical path
    code = ("import sys; import sgd_dist.cli, sgd_dist.run.trainer as t; "
            "print('matplotlib' in sys.modules); f = t._prefetch(t.PLOTS_MODULE); f.result(); "
            "print('matplotlib' in sys.modules, hasattr(f.result(), 'plot_run'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True", "True"]
