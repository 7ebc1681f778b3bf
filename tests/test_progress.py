"""Live progress: the run's bar shows samples/s and the optimality gap beside tqdm's ETA, on a terminal and in a
real notebook executed by nbclient, where the bar is one output updated in place rather than a stream of
refreshes."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from conftest import make_config
from deploy_support import require

from sgd_dist.run.progress import RunStats
from sgd_dist.run.trainer import train

TESTS = Path(__file__).resolve().parent


def test_the_runs_bar_shows_samples_per_second_the_gap_and_the_eta(tmp_path, capsys):
    # long enough (a few seconds) that the bar redraws after its first batch of rows, however fast the machine
    train(make_config("cluster.backend=serial", "train.steps=3000", f"output.dir={tmp_path / 'r'}"), console=False,
          progress=True)
    err = capsys.readouterr().err
    assert re.search(r"\d+/3000 \[[\d:]+<[\d:?]+, .*step/s, [\d,]+ samples/s, gap \d\.\d\de[-+]\d\d\]", err), err


def test_the_postfix_rate_is_the_samples_over_the_wall_time_since_the_previous_batch():
    stats = RunStats()
    rows = [{"step": s, "wall_time_s": 0.5 * s, "samples_seen": 32 * s} for s in range(5)]
    assert stats(rows[:3], None) == "64 samples/s"  # 64 samples in 1 s
    assert stats(rows[3:], {"optimality_gap": 1.5e-3}) == "64 samples/s, gap 1.50e-03"  # from step 2's row
    stats.rewind()
    assert stats(rows[4:], None) == ""  # one row and nothing before it: no rate yet


NOTEBOOK_CELLS = [
    # tqdm's widget needs ipywidgets; without it (as here) the bar is one line of text updated in place
    f"import sys\nsys.path.insert(0, {str(TESTS)!r})\nimport sgd_dist.run.progress as progress\n"
    "progress.tqdm_notebook = None  # as without ipywidgets, wherever this runs",
    "from conftest import make_config\nfrom sgd_dist.run.trainer import train\n"
    "result = train(make_config('cluster.backend=serial', 'train.steps=3000', 'train.eval_every=500', "
    "'output.dir={out}'), console=False)",
    "import time\nbar = progress.progress_bar(40, 'item', 'calibrate')\nfor _ in range(40):\n"
    "    time.sleep(0.05)\n    bar.update(1)\nbar.close()",
]


@pytest.mark.slow
def test_a_notebook_shows_one_line_of_progress_updated_in_place(tmp_path):
    for module in ("nbclient", "nbformat", "ipykernel"):
        require(importlib.util.find_spec(module) is not None,
                f"{module} is not installed: pip install -e '.[notebook]'")
    import nbformat
    from nbclient import NotebookClient

    cells = [nbformat.v4.new_code_cell(src.format(out=tmp_path / "run")) for src in NOTEBOOK_CELLS]
    notebook = nbformat.v4.new_notebook(cells=cells)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                   ).execute()
    _, run, bench = notebook.cells
    [shown] = [out for out in run.outputs if out.output_type == "display_data"]  # one output, updated in place
    streams = "".join(out.get("text", "") for out in run.outputs if out.output_type == "stream")
    assert "step/s" not in streams and "samples/s" not in streams, streams  # no refreshes written to the cell
    text = shown.data["text/plain"]
    assert "\n" not in text and "3000/3000" in text, text
    assert re.search(r"[\d,]+ samples/s, gap \d\.\d\de[-+]\d\d", text), text
    [shown] = [out for out in bench.outputs if out.output_type == "display_data"]
    assert shown.data["text/plain"].startswith("calibrate: 100%"), shown
    assert "40/40" in shown.data["text/plain"]
