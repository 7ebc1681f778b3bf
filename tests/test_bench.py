"""The benchmark runs and its table is well formed; its pure table and ratio functions. No timing asserts."""

from __future__ import annotations

import csv
import math
import statistics

import numpy as np
import pytest

from sgd_dist.bench import BenchOptions, peers, report, run_benchmark, runner
from sgd_dist.bench.problem import Problem, measured_intervals, percentile, step_stats
from sgd_dist.cli import _int_list, main

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


def _rows() -> list[report.Row]:
    rows = []
    for d, floor in [(1000, 0.3), (100_000, 14.0)]:
        rows.append(report.measured_row(report.FLOOR, d, 2, 512, floor, floor * 1.2, 100))
        rows.append(report.measured_row(report.DDP, d, 2, 512, 1.2, 1.5, 100))
        rows.append(report.measured_row(report.DOCS_PS, d, 2, 512, 3.0, 3.5, 100))
        rows.append(report.measured_row(report.SGD_SHM, d, 2, 512, 0.36, 0.5, 100, record_ms_per_step=0.01))
        rows.append(report.measured_row(report.SGD_RAY, d, 2, 512, 1.2, 1.4, 100))
    rows.append(report.Row(report.RAY_TRAIN, 1000, 2, 512, note="ray.train is not installed"))
    return report.fill_vs_floor(rows)


def test_ratios_and_targets_come_from_the_medians():
    rows = _rows()
    for r in rows:
        if r.median_ms is not None:
            floor = 0.3 if r.d == 1000 else 14.0
            assert r.vs_floor == pytest.approx(r.median_ms / floor)
            assert r.samples_per_s == pytest.approx(512 / (r.median_ms / 1e3))
        else:
            assert r.vs_floor is None and r.samples_per_s is None
    targets = {(t["target"], t["d"], t["system"]): t for t in report.target_rows(rows, startup_ratio=1.6)}
    shm_floor = targets[("shm vs one process", 1000, report.SGD_SHM)]
    assert shm_floor["ratio"] == pytest.approx(0.36 / 0.3) and shm_floor["verdict"] == "met"
    assert targets[("shm vs torch gloo DDP", 1000, report.SGD_SHM)]["ratio"] == pytest.approx(0.3)
    assert targets[("shm vs torch gloo DDP", 1000, report.SGD_SHM)]["verdict"] == "missed"
    assert targets[("ray transport vs Ray docs PS pattern", 1000, report.SGD_RAY)]["ratio"] == pytest.approx(0.4)
    wide = targets[("shm vs one process (the second core must pay)", 100_000, report.SGD_SHM)]
    assert wide["ratio"] == pytest.approx(0.36 / 14.0)
    assert targets[("metrics recording, share of the step", 1000, report.SGD_SHM)]["ratio"] == pytest.approx(0.01 / 0.36)
    startup = [t for t in targets.values() if t["system"] == "sgd-dist train"][0]
    assert startup["ratio"] == 1.6 and startup["verdict"] == "missed"


def test_without_transports_the_sync_row_stands_for_both_and_missing_sides_say_so():
    rows = report.fill_vs_floor([
        report.measured_row(report.FLOOR, 1000, 2, 512, 0.25, 0.3, 10),
        report.measured_row(report.SGD_SYNC, 1000, 2, 512, 4.75, 5.0, 10),
    ])
    targets = report.target_rows(rows)
    assert {t["system"] for t in targets if t["d"] is not None} == {report.SGD_SYNC}
    first = targets[0]
    assert first["ratio"] == pytest.approx(19.0) and first["verdict"] == "missed"
    assert all(t["verdict"] == "not measured" for t in targets[1:])  # no DDP, docs pattern, d=1e5 or start-up


def test_csv_round_trip_markdown_and_figure(tmp_path):
    rows = _rows()
    path = report.write_csv(rows, tmp_path / "results.csv")
    assert report.read_csv(path) == rows
    with open(path) as f:
        assert next(csv.reader(f)) == report.COLUMNS
    table = report.results_markdown(rows).splitlines()
    assert len(table) == 2 + len(rows) and all(line.count("|") == 10 for line in table)
    assert "| 1e5 |" in table[-2]
    png = report.plot_results(path, tmp_path / "bench.png")
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_record_overhead_is_read_when_the_summary_has_it():
    assert runner.record_overhead_ms({"median_step_ms": 3.0, "steps": 10}) is None
    assert runner.record_overhead_ms({"median_step_ms": 3.0, "record_ms_per_step": 0.02}) == 0.02


def test_sgd_dist_rows_follow_the_config():
    labels = [label for label, _ in runner.sgd_dist_variants()]
    assert labels == [report.SGD_SHM, report.SGD_RAY]


def test_dims_option_accepts_scientific_counts():
    assert _int_list("2,1000,1e5") == [2, 1000, 100_000]
    for bad in ["", "2,x", "0", "1.5"]:
        with pytest.raises(Exception):
            _int_list(bad)


def test_startup_without_its_config_is_a_note(tmp_path):
    from sgd_dist.bench.startup import measure_startup

    result = measure_startup(1, tmp_path / "missing.yaml")
    assert "not found" in result["note"] and "not found" in report.startup_markdown(result)


# -- the benchmark itself, tiny ----------------------------------------------------------------------------

def test_the_benchmark_runs_and_its_table_is_well_formed(ray_session, tmp_path):
    options = BenchOptions(dims=[2], workers=[1, 2], steps=8, warmup=2,
                           systems=["floor", "docs-ps", "ddp", "sgd-dist"], startup_repeats=0)
    lines: list[str] = []
    result = run_benchmark(options, tmp_path, log=lines.append)

    labels = [report.FLOOR, report.DOCS_PS, report.DDP] + [label for label, _ in runner.sgd_dist_variants()]
    assert [(r.system, r.workers) for r in result.rows] == [(s, k) for k in (1, 2) for s in labels]
    floors = {r.workers: r.median_ms for r in result.rows if r.system == report.FLOOR}
    for r in result.rows:
        assert r.note == "" or r.note.startswith(("transport", "recording")), r.note
        assert r.d == 2 and r.global_batch == 256 * r.workers and r.steps == 8
        for value in (r.median_ms, r.p90_ms, r.samples_per_s, r.vs_floor):
            assert value is not None and math.isfinite(value) and value > 0
        assert r.p90_ms >= r.median_ms
        assert r.vs_floor == pytest.approx(r.median_ms / floors[r.workers])
        assert r.samples_per_s == pytest.approx(r.global_batch / r.median_ms * 1e3)
    assert sum(line.startswith("bench [") for line in lines) == len(result.rows)

    assert report.read_csv(tmp_path / "results.csv") == result.rows
    assert (tmp_path / "bench.png").read_bytes()[:8] == PNG_MAGIC
    md = (tmp_path / "results.md").read_text()
    assert md.count(f"| {report.FLOOR} | 2 |") == 2 and "Issue 11 targets" in md
    with open(tmp_path / "targets.csv") as f:
        assert len(list(csv.DictReader(f))) == len(result.targets)


def test_ray_train_absent_is_a_note_row_and_the_cli_writes_the_files(ray_session, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(peers, "ray_train_available", lambda: False)
    code = main(["bench", "--systems", "floor,ray-train", "--dims", "2", "--workers", "1", "--steps", "5",
                 "--warmup", "1", "--startup-repeats", "0", "--out", str(tmp_path)])
    assert code == 0
    rows = {r.system: r for r in report.read_csv(tmp_path / "results.csv")}
    assert rows[report.FLOOR].median_ms > 0
    assert rows[report.RAY_TRAIN].median_ms is None and "not installed" in rows[report.RAY_TRAIN].note
    out = capsys.readouterr().out
    assert "| one torch process | 2 | 1 |" in out and f"results in {tmp_path}/" in out
    assert (tmp_path / "bench.png").read_bytes()[:8] == PNG_MAGIC


def test_targets_markdown_shows_shares_as_percentages():
    rows = _rows()
    text = report.targets_markdown(report.target_rows(rows, startup_ratio=None))
    assert "| 2.8 % | < 5 % | met |" in text and "| 1.20x | <= 1.3x | met |" in text
    assert text.splitlines()[-1].endswith("| - | <= 1.15x | not measured |")
