"""A run's metrics in Ray's Prometheus export: a loopback Ray of its own (in a child process, with a metrics
export port and a short report interval) runs a real training with a worker killed and replaced; the test
scrapes the export with prometheus_client's parser and compares it with metrics.jsonl, schedule.jsonl and
faults.jsonl."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from deploy_support import free_port

from sgd_dist.run.rundir import read_metrics

TESTS = Path(__file__).resolve().parent
STEPS = 40

CHILD = textwrap.dedent("""
    import sys, time, urllib.request
    sys.path.insert(0, {tests!r})
    import ray
    from conftest import make_config
    from sgd_dist.run.trainer import train

    ray.init(address="local", num_cpus=6, include_dashboard=False, _metrics_export_port={port})
    config = make_config("cluster.num_workers=3", "train.mode=async", "train.steps={steps}",
                         "output.dir={out}", "faults=[{{kind: kill_worker, step: 10, worker: 1}}]")
    train(config, console=False, progress=False)
    want = 'sgd_dist_step{{'
    deadline = time.monotonic() + 90
    while True:  # the agent reports every RAY_metrics_report_interval_ms: wait for the last step and the fault
        text = urllib.request.urlopen("http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        done = [line for line in text.splitlines() if line.startswith("ray_" + want) and line.endswith(" {steps}.0")]
        if (done and "ray_sgd_dist_faults_survived_total{{" in text) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    open({scrape!r}, "w").write(text)
    ray.shutdown()
""")


def families(text: str) -> dict[str, list]:
    """Each sample of the sgd_dist metrics, by family name (prometheus_client's own parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f.samples for f in text_string_to_metric_families(text) if f.name.startswith("ray_sgd_dist_")}


@pytest.mark.deploy
def test_rays_prometheus_export_has_the_runs_step_staleness_answer_times_and_faults(tmp_path):
    port, out, scrape = free_port(), tmp_path / "run", tmp_path / "metrics.txt"
    env = {**os.environ, "RAY_metrics_report_interval_ms": "500", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_AUTH_MODE": "disabled", "RAY_EXPORT_COUNTER_AS_GAUGE": "0"}
    code = CHILD.format(tests=str(TESTS), port=port, steps=STEPS, out=str(out), scrape=str(scrape))
    child = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                           start_new_session=True)
    assert child.returncode == 0, child.stderr[-3000:]
    metrics = families(scrape.read_text())
    run = {"run": out.name}

    def samples(family: str, suffix: str = "", **labels) -> list:
        return [s for s in metrics[family] if s.name == family + suffix
                and all(s.labels.get(k) == v for k, v in {**run, **labels}.items())]

    [step] = samples("ray_sgd_dist_step")
    assert step.value == STEPS == read_metrics(out)[-1]["step"]
    [rate] = samples("ray_sgd_dist_samples_per_second")
    assert rate.value > 0
    rows = read_metrics(out)
    for direction in ("up", "down"):
        [carried] = samples("ray_sgd_dist_bytes", "_total", direction=direction)
        assert carried.value == sum(r[f"bytes_{direction}"] for r in rows) > 0

    schedule = [json.loads(line) for line in (out / "schedule.jsonl").read_text().splitlines()]
    ages = [line["update"] - 1 - version for line in schedule for _, _, version in line["applied"]]
    [count] = samples("ray_sgd_dist_staleness", "_count")
    assert count.value == len(ages) == STEPS
    for bucket in samples("ray_sgd_dist_staleness", "_bucket"):
        assert bucket.value == sum(age <= float(bucket.labels["le"]) for age in ages), bucket

    per_worker: dict[str, list[float]] = {}
    for line in schedule:
        for (worker, _, _), seconds in zip(line["applied"], line["answer_s"], strict=True):
            per_worker.setdefault(str(worker), []).append(seconds)
    assert sorted(per_worker) == ["0", "1", "2"]
    for worker, times in per_worker.items():
        [n] = samples("ray_sgd_dist_answer_seconds", "_count", worker=worker)
        assert n.value == len(times)
        buckets = samples("ray_sgd_dist_answer_seconds", "_bucket", worker=worker)
        assert buckets  # Ray's _sum is not the exact sum: the buckets are what a dashboard's quantiles read
        for bucket in buckets:
            assert bucket.value == sum(t <= float(bucket.labels["le"]) for t in times), bucket

    faults = [json.loads(line) for line in (out / "faults.jsonl").read_text().splitlines()]
    assert [f["fault"] for f in faults if f["fault"] == "worker_replaced"] == ["worker_replaced"]
    [survived] = samples("ray_sgd_dist_faults_survived", "_total", kind="worker_replaced")
    assert survived.value == 1
