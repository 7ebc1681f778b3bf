"""Inject every fault into a small run, on each transport and mode, and print the table: time to notice, time to
recover, and whether the result matched the undisturbed run (sync and local SGD: bit-equal to the serial
reference; the modes whose schedule depends on timing: `sgd-dist replay` reproduces the run bit for bit).

    .venv/bin/python scripts/fault_table.py [--out DIR] [--quick]

Every run is a real one on an embedded Ray (one Ray for all of them); the driver-loss rows kill a real
`sgd-dist train` process and resume it with `--resume`. Writes DIR/faults.md and DIR/faults.csv.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from sgd_dist.backends.ray.cluster import init_ray
from sgd_dist.config import build_config
from sgd_dist.run.replay import replay
from sgd_dist.run.rundir import read_metrics, read_summary
from sgd_dist.run.trainer import train

SGD_DIST = str(Path(sys.executable).with_name("sgd-dist"))
MODE_OPTIONS = {"sync": {}, "async": {}, "ssp": {"staleness_bound": 2}, "backup": {"backup_workers": 1},
                "local_sgd": {"local_steps": 4}}


def config_raw(mode: str, workers: int, steps: int, transport: str, faults: list[dict], out: Path,
               simulated_nodes: int | None = None) -> dict:
    return {
        "data": {"n_samples": 20_000, "n_features": 10, "seed": 3},
        "optim": {"lr": 0.05},
        "cluster": {"num_workers": workers, "transport": transport,
                    **({"simulated_nodes": simulated_nodes} if simulated_nodes else {})},
        "train": {"mode": mode, "steps": steps, "batch_size": 64, "eval_every": 50, "log_every": 0,
                  "checkpoint_every": 25, **MODE_OPTIONS[mode]},
        # a few ms per answer, so that a fault lands mid-run (a delay changes wall time, never a number)
        "stragglers": {"delay": "uniform", "delay_ms": 3},
        "faults": faults,
        "output": {"dir": str(out), "plots": False},
    }


def matches(run_dir: Path, raw: dict, mode: str, scratch: Path) -> str:
    """'bit-equal' to the serial run of the same config (sync, local_sgd) or 'replays exactly' (the others)."""
    if mode in ("sync", "local_sgd"):
        serial = {**raw, "cluster": {**raw["cluster"], "backend": "serial", "transport": "auto"}, "faults": [],
                  "output": {"dir": str(scratch / f"serial-{time.monotonic_ns()}"), "plots": False}}
        serial["cluster"].pop("simulated_nodes", None)
        reference = train(build_config(serial), console=False, progress=False)
        same = ([r["loss"] for r in read_metrics(run_dir)] == [r["loss"] for r in read_metrics(reference.run_dir)]
                and read_summary(run_dir)["weights"] == reference.summary["weights"])
        return "bit-equal" if same else "DIFFERENT"
    report = replay(run_dir, scratch / f"replay-{time.monotonic_ns()}")
    return "replays exactly" if report.exact else "replay DIFFERS"


def row_of(fault: str, mode: str, transport: str, summary: dict, kind: str, matched: str) -> dict:
    def first(kind: str) -> dict:
        return next((f for f in summary.get("faults", []) if f["fault"] == kind), {})

    noticed = first(kind)
    # a lost worker's recovery is its own record (worker_replaced), with what the others did meanwhile
    recovered = first("worker_replaced") if kind == "worker_lost" else noticed
    complete = [r["step"] for r in read_metrics(summary["_dir"])] == list(range(summary["steps"] + 1))
    return {"fault": fault, "mode": mode, "transport": transport,
            "noticed_s": noticed.get("noticed_s"), "recovery_s": recovered.get("recovery_s"),
            "updates_meanwhile": recovered["step"] - recovered["lost_step"] if "lost_step" in recovered else None,
            "answers_meanwhile": recovered.get("answers_meanwhile"), "every_step_once": complete,
            "result": matched if noticed else "fault not seen"}


def driver_loss(transport: str, scratch: Path) -> dict:
    """Kill `sgd-dist train` with SIGKILL once a checkpoint is on disk, then `sgd-dist train --resume`."""
    out = scratch / f"driver-{transport}"
    raw = config_raw("sync", 2, 600, transport, [], out)
    config_file = scratch / f"driver-{transport}.json"
    config_file.write_text(json.dumps({**raw, "output": {"plots": False}}))
    proc = subprocess.Popen([SGD_DIST, "train", "--config", str(config_file), "--out", str(out), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / "checkpoints" / "latest.json"
    while proc.poll() is None:
        try:
            if json.loads(manifest.read_text())["step"] >= 150:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    killed = time.perf_counter()
    proc.kill()
    proc.wait()
    subprocess.run([SGD_DIST, "train", "--resume", str(out), "--no-progress"], check=True, capture_output=True)
    recovered = time.perf_counter() - killed
    summary = {**read_summary(out), "_dir": out}
    matched = matches(out, raw, "sync", scratch)
    row = row_of("driver killed, --resume", "sync", transport, summary, "resumed", matched)
    row["noticed_s"] = None  # a person (or a supervisor) notices a dead driver
    row["recovery_s"] = None
    row["note"] = f"resumed from step {summary['resumed_from']}; the resumed command ran {recovered:.1f} s"
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/faults", help="directory for faults.md / faults.csv (and the runs)")
    parser.add_argument("--quick", action="store_true", help="sync and async only")
    parser.add_argument("--nodes", action="store_true", help="also remove a node of a simulated 3-node cluster")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="faults-", dir=out))
    modes = ["sync", "async"] if args.quick else list(MODE_OPTIONS)
    cases = []
    for transport in ("shm", "ray"):
        for mode in modes:
            workers = 3 if mode == "backup" else 2
            cases.append(("worker SIGKILL", mode, transport, workers,
                          [{"kind": "kill_worker", "worker": 1, "step": 40}], "worker_lost", None))
        cases.append(("worker ray.kill", "sync", transport, 2,
                      [{"kind": "kill_worker", "worker": 0, "step": 40, "how": "ray_kill"}], "worker_lost", None))
        for mode in ("sync", "async"):
            cases.append(("server SIGKILL", mode, transport, 2, [{"kind": "kill_server", "step": 60}],
                          "server_lost", None))
    if args.nodes:
        cases.append(("node removed", "sync", "ray", 3, [{"kind": "remove_node", "node": 1, "step": 40}],
                      "worker_lost", 3))
    init_ray(num_cpus=8)
    rows = []
    for fault, mode, transport, workers, faults, kind, nodes in tqdm(cases, desc="faults", unit="run"):
        if nodes:  # a simulated cluster is its own Ray
            import ray

            ray.shutdown()
        run_dir = scratch / f"{fault.replace(' ', '-').replace('.', '')}-{mode}-{transport}"
        raw = config_raw(mode, workers, 200, transport, faults, run_dir, nodes)
        result = train(build_config(raw), console=False, progress=False)
        summary = {**result.summary, "_dir": run_dir}
        rows.append(row_of(fault, mode, transport, summary, kind, matches(run_dir, raw, mode, scratch)))
    for transport in ("shm", "ray"):
        rows.append(driver_loss(transport, scratch))
    columns = ["fault", "mode", "transport", "noticed_s", "recovery_s", "updates_meanwhile", "answers_meanwhile",
               "every_step_once", "result", "note"]
    with open(out / "faults.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)

    def cell(value) -> str:
        return "" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    table = "\n".join(lines)
    (out / "faults.md").write_text(table + "\n")
    print(table)
    print(f"\nwritten: {out / 'faults.md'}, {out / 'faults.csv'}")
    return 0 if all(r["result"] in ("bit-equal", "replays exactly") and r["every_step_once"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
