"""1e8 rows x 10 features (4.4 GB of float32 with the bias column) over 2 workers on this 24 GiB machine:
the workers generate their shards where they live and the driver never holds the data (~35 s)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SGD_DIST = str(Path(sys.executable).with_name("sgd-dist"))


@pytest.mark.big
def test_1e8_rows_train_with_a_driver_that_never_holds_them(ray_session, tmp_path):
    out = tmp_path / "big"
    proc = subprocess.run(
        [SGD_DIST, "train", "--config", str(ROOT / "configs" / "default.yaml"), "--out", str(out),
         "--address", ray_session.get_runtime_context().gcs_address, "data.n_samples=1e8", "data.n_features=10",
         "train.steps=20", "train.eval_every=0", "optim.warmup_steps=0", "output.plots=false"],
        capture_output=True, text=True, timeout=600,
        env={k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"},
    )
    assert proc.returncode == 0, proc.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "completed" and s["steps"] == 20
    assert [w["rows"] for w in s["workers"]] == [[0, 50_000_000], [50_000_000, 100_000_000]]
    assert sum(w["data_bytes"] for w in s["workers"]) == 100_000_000 * (11 + 1) * 4
    assert all(w["peak_rss_bytes"] > w["data_bytes"] for w in s["workers"])  # the data lives in the workers
    assert s["driver_peak_rss_bytes"] < 1e9  # and not in the driver (it peaks at ~0.35 GB of runtime)
    assert s["optimality_gap"] >= 0 and len(s["optimal_weights"]) == 11
