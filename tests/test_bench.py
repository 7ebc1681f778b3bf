"""The benchmark runs and its table is well formed; its floor loops do SGD on their batches; its pure table,
floor and target functions. No timing asserts."""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sgd_dist.bench import BenchOptions, compression, floor, peers, report, run_benchmark, runner
from sgd_dist.bench.problem import Problem, floor_ms, measured_intervals, percentile, step_stats
from sgd_dist.cli import _int_list, main
from sgd_dist.core.data import generate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- pure functions --------------------------------------------------------------------------------------

def test_step_statistics_match_numpy():
    stamps = list(np.cumsum([0.0, 5.0, 1.0, 2.0, 3.0, 4.0, 0.5, 9.0]) / 1e3)
    seconds = measured_intervals(stamps, warmup=1)  # the 5 ms first step is warm-up
    assert seconds == pytest.approx([0.001, 0.002, 0.003, 0.004, 0.0005, 0.009])
    med, p90 = step_stats(seconds)
    assert med == pytest.approx(statistics.median(seconds) * 1e3)
    assert p90 == pytest.approx(np.percentile(np.array(seconds) * 1e3, 90))
    assert percentile([1.0, 2.0], 50) == 1.5
    with pytest.raises(ValueError):
        step_stats([])


def test_problem_is_d_minus_one_features_plus_bias_in_whole_batches():
    for dim, k in [(2, 1), (1000, 4), (100_000, 2)]:
        p = Problem(dim, k)
        cfg = p.data_config()
        assert cfg.dim == dim and cfg.n_features == dim - 1 and cfg.bias
        assert p.rows_per_worker % p.batch_size == 0 and p.rows_per_worker >= 2 * p.batch_size
        assert cfg.n_samples == k * p.rows_per_worker and p.global_batch == 256 * k
        assert 0 < p.lr <= 0.1


def test_the_bandwidth_floor_is_the_bytes_a_step_reads_over_the_bandwidth():
    # 2 workers x 256 rows at d = 1000: 512 rows of 1000 features-with-bias plus a target, the weights and the
    # gradient, float32: 4 x (512 x 1001 + 2 x 1000) = 2,058,048 bytes; at 10 GB/s, 0.2058048 ms
    assert Problem(1000, 2).read_bytes == 2_058_048
    assert floor_ms(2_058_048, 10.0) == pytest.approx(0.2058048)
    assert Problem(100_000, 2).read_bytes == 4 * (512 * 100_001 + 200_000)  # 205.6 MB
    row = report.measured_row("x", 1000, 2, 512, 0.5, 0.6, 10, read_mb=2.058048)
    report.fill_ratios([row], bandwidth_gb_s=10.0)
    assert row.floor_ms == pytest.approx(0.2058048) and row.vs_floor == pytest.approx(0.5 / 0.2058048)
    assert report.bandwidth_of([row]) == pytest.approx(10.0)


def test_memory_bandwidth_is_a_positive_figure():
    bw = floor.memory_bandwidth(nbytes=1 << 22, repeats=2)
    assert math.isfinite(bw["gb_s"]) and bw["gb_s"] > 0
    assert bw["copy_bytes"] == 1 << 22 and bw["repeats"] == 2 and bw["threads"] == floor.DEFAULT_THREADS
    assert bw["gb_s"] == pytest.approx(2 * bw["copy_bytes"] / bw["best_s"] / 1e9)


def _plain_sgd(problem: Problem, num_steps: int, shuffle: bool) -> torch.Tensor:
    """The reference: torch.optim.SGD on F.mse_loss, epoch by epoch, batches of the global size in order or
    from one randperm per epoch (one generator seeded once)."""
    X, y = generate(problem.data_config())
    n, B = X.shape[0], problem.global_batch
    w = torch.zeros(problem.dim, requires_grad=True)
    opt = torch.optim.SGD([w], lr=problem.lr)
    g = torch.Generator().manual_seed(problem.seed)
    step = 0
    while step < num_steps:
        order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
        for start in range(0, n - B + 1, B):
            if step == num_steps:
                break
            rows = order[start:start + B]
            opt.zero_grad()
            torch.nn.functional.mse_loss(X[rows] @ w, y[rows]).backward()
            opt.step()
            step += 1
    return w.detach()


@pytest.mark.parametrize("gradient", floor.GRADIENTS)
@pytest.mark.parametrize("sampling", floor.SAMPLINGS)
def test_the_floor_loops_compute_the_weights_of_plain_sgd(sampling, gradient):
    problem = Problem(5, 2, batch_size=1024)  # 16,384 rows, 8 batches an epoch: 20 steps span 3 epochs
    stamps, w = floor.run_loop(problem, 20, sampling, gradient)
    assert len(stamps) == 21 and stamps == sorted(stamps)
    reference = _plain_sgd(problem, 20, shuffle=sampling == "shuffle")
    other = _plain_sgd(problem, 20, shuffle=sampling != "shuffle")
    torch.testing.assert_close(w, reference, rtol=1e-5, atol=1e-6)
    assert (w - other).abs().max() > 1e-3  # the two samplings really differ on this problem
    with pytest.raises(ValueError):
        floor.run_loop(problem, 1, "random", gradient)


def _rows(blocks_note: str = "") -> list[report.Row]:
    rows = []
    for d, best in [(1000, 0.3), (100_000, 14.0)]:
        read_mb = Problem(d, 2).read_bytes / 1e6
        common = dict(read_mb=read_mb)
        rows.append(report.measured_row(report.LOOP_BLOCKS_AUTOGRAD, d, 2, 512, best * 0.8, best, 100,
                                        sampling="blocks", **common))
        rows.append(report.measured_row(report.LOOP_BLOCKS_FORMULA, d, 2, 512, best * 0.5, best, 100,
                                        sampling="blocks", **common))
        rows.append(report.measured_row(report.LOOP_SHUFFLE_AUTOGRAD, d, 2, 512, best * 1.5, best * 2, 100, **common))
        rows.append(report.measured_row(report.LOOP_SHUFFLE_FORMULA, d, 2, 512, best, best * 2, 100, **common))
        rows.append(report.measured_row(report.DDP, d, 2, 512, 1.2, 1.5, 100, **common))
        rows.append(report.measured_row(report.DOCS_PS, d, 2, 512, 3.0, 3.5, 100, **common))
        rows.append(report.measured_row(report.SGD_SHM, d, 2, 512, 0.36 if d == 1000 else 9.0, 0.5, 100,
                                        record_ms_per_step=0.01, **common))
        rows.append(report.measured_row(report.SGD_RAY, d, 2, 512, 1.2, 1.4, 100, **common))
        if blocks_note:
            rows.append(report.Row(report.SGD_SHM_BLOCKS, d, 2, 512, sampling="blocks", note=blocks_note, **common))
        else:
            rows.append(report.measured_row(report.SGD_SHM_BLOCKS, d, 2, 512, 6.0, 7.0, 100, sampling="blocks",
                                            **common))
    rows.append(report.Row(report.RAY_TRAIN, 1000, 2, 512, note="ray.train is not installed"))
    return report.fill_ratios(rows, bandwidth_gb_s=20.0)


def test_every_ratio_is_against_the_strongest_loop_of_the_same_sampling():
    rows = _rows()
    for r in rows:
        if r.median_ms is None:
            assert r.vs_loop is None and r.samples_per_s is None
            continue
        best = 0.3 if r.d == 1000 else 14.0
        strongest = best if r.sampling == "shuffle" else best * 0.5  # the written-out loops are the faster here
        assert r.vs_loop == pytest.approx(r.median_ms / strongest), r
        assert r.samples_per_s == pytest.approx(512 / (r.median_ms / 1e3))
        assert r.floor_ms == pytest.approx(r.read_mb / 20.0) and r.vs_floor == pytest.approx(r.median_ms / r.floor_ms)
        assert (report.STRONGEST in r.note) == (r.system in (report.LOOP_SHUFFLE_FORMULA, report.LOOP_BLOCKS_FORMULA))


def test_the_output_names_the_strongest_loop_of_each_sampling_and_the_floor():
    rows = _rows()
    rows.insert(0, rows.pop(3))  # the order of the rows does not decide which loop is the strongest
    table = report.floors_markdown(rows).splitlines()
    assert table[0].startswith("| d | workers | global batch | strongest loop, shuffle | ms | strongest loop, blocks |")
    floor_1e5 = Problem(100_000, 2).read_bytes / 1e6 / 20.0
    assert table[2:] == [
        f"| 1000 | 2 | 512 | {report.LOOP_SHUFFLE_FORMULA} | 0.3 | {report.LOOP_BLOCKS_FORMULA} | 0.15 | "
        f"{report.fmt_ms(Problem(1000, 2).read_bytes / 1e6 / 20.0)} |",
        f"| 1e5 | 2 | 512 | {report.LOOP_SHUFFLE_FORMULA} | 14 | {report.LOOP_BLOCKS_FORMULA} | 7 | "
        f"{report.fmt_ms(floor_1e5)} |"]
    assert report.floors_markdown(rows) in report.results_markdown(rows)
    no_blocks = report.fill_ratios([report.measured_row(report.LOOP_SHUFFLE_AUTOGRAD, 2, 1, 256, 0.1, 0.2, 10)],
                                   None)
    assert report.floors_markdown(no_blocks).splitlines()[2] == (
        f"| 2 | 1 | 256 | {report.LOOP_SHUFFLE_AUTOGRAD} | 0.1 | not measured | - | - |")
    assert report.floors_markdown([report.Row(report.DDP, 2, 1, 256, note="x")]) == ""


def test_the_targets_say_pass_or_miss_from_the_ratios():
    startup = {"lesson2": {"ratio": 1.6}, "cluster": {"median_s": 2.5},
               "workers": {"16": {"ratio": 1.4}, "8": {"ratio": 1.2}}}
    targets = {(t["target"], t["d"]): t for t in report.target_rows(_rows(), startup)}
    shm = targets[("shm vs the strongest one-process loop", 1000)]
    assert shm["value"] == pytest.approx(0.36 / 0.3) and shm["verdict"] == "MISS"
    assert shm["vs"] == report.LOOP_SHUFFLE_FORMULA
    ddp = targets[("shm vs torch gloo DDP", 1000)]
    assert ddp["value"] == pytest.approx(0.3) and ddp["verdict"] == "MISS"
    assert targets[("ray transport vs Ray docs PS pattern", 1000)]["value"] == pytest.approx(0.4)
    assert targets[("ray transport vs Ray docs PS pattern", 1000)]["verdict"] == "PASS"
    wide = targets[("shm vs the strongest one-process loop (the second core must pay)", 100_000)]
    assert wide["value"] == pytest.approx(9.0 / 14.0) and wide["verdict"] == "PASS"
    floor_ms_1e5 = Problem(100_000, 2).read_bytes / 1e6 / 20.0  # 10.3 ms at 20 GB/s
    bandwidth = targets[("shm vs the bandwidth floor", 100_000)]
    assert bandwidth["value"] == pytest.approx(9.0 / floor_ms_1e5) and bandwidth["verdict"] == "PASS"
    sampling = targets[("shuffle vs blocks, sgd_dist shm", 100_000)]
    assert sampling["value"] == pytest.approx(9.0 / 6.0) and sampling["verdict"] == "MISS"
    assert targets[("metrics recording, share of the step", 1000)]["value"] == pytest.approx(0.01 / 0.36)
    by_name = {t["target"]: t for t in targets.values()}
    assert by_name["1-step lesson2 run vs bare Ray + torch program, start to exit"]["verdict"] == "MISS"
    on_cluster = by_name["1-step lesson2 run on a running local cluster (--address auto), start to exit"]
    assert on_cluster["value"] == 2.5 and on_cluster["unit"] == "s" and on_cluster["verdict"] == "PASS"
    many = [t for t in targets.values() if t["target"].startswith("setup with")]
    assert [(t["target"].split()[2], t["verdict"]) for t in many] == [("8", "PASS"), ("16", "MISS")]


def test_a_missing_side_is_not_measured_and_an_unavailable_sampling_says_why():
    why = f"{report.NOT_AVAILABLE}: sgd_dist's config refuses train.sampling=blocks (train.sampling: unknown key)"
    targets = {t["target"]: t for t in report.target_rows(_rows(blocks_note=why))}
    assert targets["shuffle vs blocks, sgd_dist shm"]["verdict"] == why
    assert targets["shuffle vs blocks, sgd_dist shm"]["value"] is None
    only_loop = report.fill_ratios([report.measured_row(report.LOOP_SHUFFLE_AUTOGRAD, 1000, 2, 512, 0.3, 0.4, 10)],
                                   None)
    for t in report.target_rows(only_loop):
        assert t["verdict"] == "not measured", t
    assert only_loop[0].floor_ms is None and only_loop[0].vs_floor is None


def test_csv_round_trip_markdown_and_figure(tmp_path):
    rows = _rows()
    path = report.write_csv(rows, tmp_path / "results.csv")
    assert report.read_csv(path) == rows
    with open(path) as f:
        assert next(csv.reader(f)) == report.COLUMNS
    table = report.results_markdown(rows).split("\n\n")[0].splitlines()
    assert len(table) == 2 + len(rows) and all(line.count("|") == 13 for line in table)
    assert "| 1e5 |" in table[-2]
    assert "20.0 GB/s" in report.results_markdown(rows)
    png = report.plot_results(path, tmp_path / "bench.png")
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_record_overhead_is_read_when_the_summary_has_it():
    assert runner.record_overhead_ms({"median_step_ms": 3.0, "steps": 10}) is None
    assert runner.record_overhead_ms({"median_step_ms": 3.0, "record_ms_per_step": 0.02}) == 0.02


def test_the_blocks_rows_follow_the_config_model(monkeypatch):
    from sgd_dist.config import TrainConfig

    if "sampling" in TrainConfig.model_fields:
        assert runner.sampling_overrides("blocks") == ["train.sampling=blocks"]
    else:
        with pytest.raises(runner.NotAvailable, match="train.sampling"):
            runner.sampling_overrides("blocks")
        assert runner.sampling_overrides("shuffle") == []  # today's one sampling: no key to set
    monkeypatch.setattr(runner, "build_config", lambda raw, overrides=(): None)  # a config that takes the key
    assert runner.sampling_overrides("blocks") == ["train.sampling=blocks"]


def test_dims_option_accepts_scientific_counts():
    assert _int_list("2,1000,1e5") == [2, 1000, 100_000]
    for bad in ["", "2,x", "0", "1.5"]:
        with pytest.raises(argparse.ArgumentTypeError):
            _int_list(bad)


def test_startup_without_its_config_is_a_note(tmp_path):
    from sgd_dist.bench.startup import measure_startup

    result = measure_startup(1, tmp_path / "missing.yaml")
    assert "not found" in result["note"] and "not found" in report.startup_markdown(result)


def test_targets_markdown_shows_ratios_shares_and_seconds():
    startup = {"lesson2": {"ratio": 1.2}, "cluster": {"median_s": 3.5}, "workers": {"8": {"note": "no result: x"}}}
    text = report.targets_markdown(report.target_rows(_rows(), startup))
    assert "| 2.8 % | < 5 % | PASS |" in text and "| 1.20x | <= 1x | MISS |" in text
    assert "| 3.50 s | <= 3 s | MISS |" in text
    assert text.splitlines()[-1].endswith("| - | <= 1.3x | not measured |")


# -- the benchmark itself, tiny ----------------------------------------------------------------------------

def _blocks_available() -> bool:
    try:
        runner.sampling_overrides("blocks")
    except runner.NotAvailable:
        return False
    return True


@pytest.mark.slow
def test_the_benchmark_runs_and_its_table_is_well_formed(ray_session, tmp_path):
    options = BenchOptions(dims=[2], workers=[1, 2], steps=8, warmup=2,
                           systems=["floor", "docs-ps", "ddp", "sgd-dist"], startup_repeats=0, bandwidth_bytes=1 << 24)
    lines: list[str] = []
    result = run_benchmark(options, tmp_path, log=lines.append)

    labels = [*report.LOOPS, report.DOCS_PS, report.DDP, report.SGD_SHM, report.SGD_RAY, report.SGD_SHM_BLOCKS,
              report.SGD_RAY_BLOCKS]
    assert [(r.system, r.workers) for r in result.rows] == [(s, k) for k in (1, 2) for s in labels]
    assert result.bandwidth["gb_s"] > 0 and result.bandwidth["copy_bytes"] == 1 << 24
    blocks_available = _blocks_available()
    for r in result.rows:
        assert r.d == 2 and r.global_batch == 256 * r.workers
        assert r.sampling == ("blocks" if r.system in (report.LOOP_BLOCKS_AUTOGRAD, report.LOOP_BLOCKS_FORMULA,
                                                       report.SGD_SHM_BLOCKS, report.SGD_RAY_BLOCKS) else "shuffle")
        assert r.read_mb == pytest.approx(4 * (r.global_batch * 3 + 4) / 1e6)
        assert r.floor_ms == pytest.approx(r.read_mb / result.bandwidth["gb_s"])
        if r.note.startswith(report.NOT_AVAILABLE):
            assert r.system in (report.SGD_SHM_BLOCKS, report.SGD_RAY_BLOCKS) and not blocks_available
            assert "train.sampling" in r.note and r.median_ms is None and r.vs_loop is None
            continue
        for value in (r.median_ms, r.p90_ms, r.samples_per_s, r.vs_loop, r.vs_floor):
            assert value is not None and math.isfinite(value) and value > 0, r
        assert r.steps == 8 and r.p90_ms >= r.median_ms
        loops = [x.median_ms for x in result.rows
                 if x.system in report.LOOPS and (x.sampling, x.workers) == (r.sampling, r.workers)]
        assert r.vs_loop == pytest.approx(r.median_ms / min(loops))
        assert r.samples_per_s == pytest.approx(r.global_batch / r.median_ms * 1e3)
    for k in (1, 2):
        for sampling in floor.SAMPLINGS:
            marked = [r for r in result.rows if (r.workers, r.sampling) == (k, sampling) and report.STRONGEST in r.note]
            assert len(marked) == 1 and marked[0].system in report.LOOPS and marked[0].vs_loop == 1.0
    floors = report.floors_markdown(result.rows).splitlines()[2:]
    assert len(floors) == 2  # one line per size, naming the strongest loop of each sampling
    for k, line in zip((1, 2), floors, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        for i, sampling in enumerate(floor.SAMPLINGS):
            strongest = min((r for r in result.rows if r.system in report.LOOPS and (r.workers, r.sampling)
                             == (k, sampling)), key=lambda r: r.median_ms)
            assert cells[3 + 2 * i] == strongest.system
    assert sum(line.startswith("bench [") for line in lines) == len(result.rows)
    assert any(line.startswith("bench: memory bandwidth") for line in lines)

    assert report.read_csv(tmp_path / "results.csv") == result.rows
    assert (tmp_path / "bench.png").read_bytes()[:8] == PNG_MAGIC
    md = (tmp_path / "results.md").read_text()
    assert md.count(f"| {report.LOOP_SHUFFLE_AUTOGRAD} | shuffle | 2 |") == 2 and "## Targets" in md
    assert "issue" not in md.lower()
    with open(tmp_path / "targets.csv") as f:
        assert len(list(csv.DictReader(f))) == len(result.targets)


def test_ray_train_absent_is_a_note_row_and_the_cli_writes_the_files(ray_session, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(peers, "ray_train_available", lambda: False)
    measure = floor.memory_bandwidth
    monkeypatch.setattr(floor, "memory_bandwidth", lambda nbytes, repeats=2: measure(1 << 24, repeats))
    code = main(["bench", "--systems", "floor,ray-train", "--dims", "2", "--workers", "1", "--steps", "5",
                 "--warmup", "1", "--startup-repeats", "0", "--out", str(tmp_path)])
    assert code == 0
    rows = {r.system: r for r in report.read_csv(tmp_path / "results.csv")}
    assert rows[report.LOOP_BLOCKS_AUTOGRAD].median_ms > 0
    assert rows[report.RAY_TRAIN].median_ms is None and "not installed" in rows[report.RAY_TRAIN].note
    out = capsys.readouterr().out
    assert f"| {report.LOOP_BLOCKS_AUTOGRAD} | blocks | 2 | 1 |" in out and f"results in {tmp_path}/" in out
    assert "GB/s" in out and "| target |" in out and "issue" not in out.lower()
    assert (tmp_path / "bench.png").read_bytes()[:8] == PNG_MAGIC



def test_the_bar_counts_every_measurement_and_shows_the_last_median(monkeypatch, tmp_path, capsys):
    options = BenchOptions(dims=[2], workers=[1], steps=5, warmup=1, systems=["floor"], startup_repeats=0,
                           bandwidth_bytes=1 << 24, progress=True)
    lines: list[str] = []
    result = run_benchmark(options, tmp_path, log=lines.append)
    err = capsys.readouterr().err
    total = len(report.LOOPS)  # one measurement per loop at the one size
    assert len(result.rows) == total and f"{total}/{total}" in err and "bench" in err
    last = [r for r in result.rows if r.median_ms is not None][-1]
    assert f"{last.system}: {last.median_ms:.3f} ms" in err
    assert sum(line.startswith("bench [") for line in lines) == total  # the log lines still come, around the bar


def test_the_startup_and_bandwidth_options_reach_the_benchmark(monkeypatch, tmp_path):
    seen = {}

    def fake_run(options, out):
        seen["options"] = options
        raise KeyboardInterrupt

    monkeypatch.setattr("sgd_dist.bench.run_benchmark", fake_run)
    main(["bench", "--startup-workers", "none", "--no-startup-cluster", "--bandwidth-mib", "64",
          "--out", str(tmp_path)])
    options = seen["options"]
    assert list(options.startup_workers) == [] and options.startup_cluster is False
    assert options.bandwidth_bytes == 64 << 20
    main(["bench", "--startup-workers", "4,32", "--out", str(tmp_path)])
    assert list(seen["options"].startup_workers) == [4, 32] and seen["options"].startup_cluster is True
    assert seen["options"].compression is False
    main(["bench", "--compression", "--out", str(tmp_path)])
    assert seen["options"].compression is True


def test_the_compression_rows_run_before_any_ray_and_their_table_is_written(monkeypatch, tmp_path):
    # The order of events, not whether a Ray is up: the suite's shared Ray may already be running.
    events: list = []
    start_ray = runner._start_ray

    def fake_rows(d):
        events.append(("compression", d))
        return [compression.CompressionRow("none", d, 2, 2, 0.1, 800_000.0, 70.0),
                compression.CompressionRow("int8", d, 2, 2, 0.1, 200_000.0, 20.0, 4.0, 3.5)]

    def recording_start_ray(*args, **kwargs):
        events.append("start_ray")
        return start_ray(*args, **kwargs)

    monkeypatch.setattr(runner, "compression_rows", fake_rows)
    monkeypatch.setattr(runner, "_start_ray", recording_start_ray)
    options = BenchOptions(dims=[2, 1000], workers=[1], steps=3, warmup=1, systems=["floor"], startup_repeats=0,
                           bandwidth_bytes=1 << 24, compression=True)
    lines: list[str] = []
    result = run_benchmark(options, tmp_path, log=lines.append)
    assert events == [("compression", 1000), "start_ray"]
    text = (tmp_path / "compression.md").read_text()
    assert "| int8 | 1,000 | 2 / 2 | 0.1 Gb/s | 200,000 | 20.0 | 4.0x | 3.50x |" in text
    assert tmp_path / "compression.md" in result.files and any("| int8 |" in line for line in lines)


def test_a_bandwidth_below_one_mib_is_a_one_line_error(tmp_path, capsys):
    assert main(["bench", "--bandwidth-mib", "0", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--bandwidth-mib must be at least 1" in err[0]
    assert not (tmp_path / "b").exists()

# -- the local cluster of the start-up measurement -----------------------------------------------------------

def _processes_with(marker: str) -> list[int]:
    """Live processes whose environment holds ``marker``: every process of a cluster with that RAY_TMPDIR."""
    found = []
    for pid in Path("/proc").glob("[0-9]*"):
        try:
            if marker.encode() in (pid / "environ").read_bytes().split(b"\0"):
                stat = (pid / "stat").read_text()
                if stat[stat.rindex(")") + 2:].split()[0] != "Z":
                    found.append(int(pid.name))
        except OSError:
            continue
    return found


@pytest.mark.deploy
def test_the_loopback_head_answers_then_stops_all_of_itself_and_nothing_else(ray_session):
    from sgd_dist.bench.startup import LoopbackHead, _bin

    head = LoopbackHead(num_cpus=2)
    marker = f"RAY_TMPDIR={head.env['RAY_TMPDIR']}"
    with head:
        assert head.address.startswith("127.0.0.1:")
        health = subprocess.run([str(_bin("ray")), "health-check", "--address", head.address], env=head.env,
                                capture_output=True, timeout=60)
        assert health.returncode == 0
        auto = subprocess.run([sys.executable, "-c", "from ray._private.services import canonicalize_bootstrap_address "
                               "as c; print(c('auto'))"], env=head.env, capture_output=True, text=True, timeout=60)
        assert auto.stdout.strip() == head.address  # what `--address auto` joins: this head, whatever else runs
        assert len(_processes_with(marker)) >= 2  # the GCS and the raylet at least
        assert os.getpgid(head.proc.pid) == head.proc.pid
    assert _processes_with(marker) == []
    assert not Path(head.work).exists()
    assert ray_session.get(ray_session.put("still here")) == "still here"
