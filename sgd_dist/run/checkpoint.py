"""Checkpoints of the parameter server's loop: written atomically, checked by checksum, loaded without unpickling.

A checkpoint is everything ``engine.loop.Loop`` needs to go on from update v as if it had never stopped: the
server's state (weights, optimizer buffers, step, samples seen), the consistency policy's state, the answers
that had arrived but were not yet applied, the commands in flight (re-sent on restore), and the loop's
statistics. It is one ``torch.save`` file of tensors and plain values, read back with
``torch.load(weights_only=True)`` (no code runs on load), plus a small JSON manifest naming the file, its
SHA-256, the step and the config it belongs to.

Writing: the file goes to a temporary name, is fsynced and renamed, then the manifest likewise (and the
directory fsynced): a reader sees the previous checkpoint or the whole new one, never half of one. The
driver writes a checkpoint only after every metrics row up to its step is on disk, so a run resumed from it
loses no row.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import torch

import sgd_dist
from sgd_dist.config import Config, dump_config
from sgd_dist.errors import CheckpointError
from sgd_dist.run.rundir import write_bytes_atomic

CHECKPOINT_DIR = "checkpoints"
MANIFEST = "latest.json"
FORMAT = 1
KEEP = 2  # checkpoint files kept: the latest, and the one before it while the latest is being written


def config_digest(config: Config) -> str:
    """Identifies the run a checkpoint belongs to: the SHA-256 of the saved config, without its output section
    (a resumed run may be written to the same directory under another name)."""
    text = dump_config(config.model_copy(update={"output": type(config.output)()}))
    return hashlib.sha256(text.encode()).hexdigest()


def write_checkpoint(run_dir: str | Path, state: dict, config: Config) -> Path:
    """Write ``state`` (from the server's loop: ``engine.state.encode``) as the run's latest
    checkpoint; return the file's path."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    folder.mkdir(exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    step = int(state["server"]["step"])
    path = folder / f"step-{step:08d}.pt"
    write_bytes_atomic(path, data, sync_dir=True)
    manifest = {"format": FORMAT, "file": path.name, "step": step, "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(), "config_sha256": config_digest(config),
                "sgd_dist": sgd_dist.__version__}
    write_bytes_atomic(folder / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode(), sync_dir=True)
    for old in sorted(folder.glob("step-*.pt"))[:-KEEP]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(run_dir: str | Path, config: Config) -> tuple[dict, dict]:
    """The latest checkpoint of ``run_dir`` and its manifest, checked against ``config`` and this sgd_dist.

    Raises CheckpointError with one line naming the file and what is wrong with it.
    """
    folder = Path(run_dir) / CHECKPOINT_DIR
    manifest_path = folder / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        name, digest, step = manifest["file"], manifest["sha256"], int(manifest["step"])
    except FileNotFoundError:
        raise CheckpointError(f"{manifest_path}: no checkpoint (the run wrote none: set train.checkpoint_every "
                              "to a number of steps)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{manifest_path}: not a checkpoint manifest ({type(exc).__name__})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path}: checkpoint format {manifest.get('format')!r}, this sgd_dist reads "
                              f"format {FORMAT}")
    if manifest.get("sgd_dist") != sgd_dist.__version__:  # other code may compute other numbers from the same state
        raise CheckpointError(f"{manifest_path}: written by sgd_dist {manifest.get('sgd_dist')}, this is sgd_dist "
                              f"{sgd_dist.__version__}: resume with the version that wrote it")
    if manifest.get("config_sha256") != config_digest(config):
        raise CheckpointError(f"{manifest_path}: the checkpoint belongs to another config than {run_dir}/config.yaml")
    path = folder / name
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror})") from None
    if len(data) != manifest.get("bytes") or hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(f"{path}: corrupt or truncated ({len(data)} bytes, checksum does not match the "
                              "manifest)")
    try:
        state = torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:  # the checksum matched, so this is a file from an incompatible writer
        raise CheckpointError(f"{path}: cannot be loaded ({type(exc).__name__})") from None
    if int(state["server"]["step"]) != step or step > config.train.steps:
        raise CheckpointError(f"{path}: step {state['server']['step']} "
                              f"does not fit a run of {config.train.steps} steps")
    return state, manifest
