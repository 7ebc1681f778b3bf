"""Live progress for long work (a run, a sweep, planning, calibration, a benchmark): a tqdm bar with the ETA and
what the work reports (samples/s, the optimality gap), on stderr in a terminal and in place in Jupyter.

In a Jupyter kernel the bar is tqdm's widget when ipywidgets is installed; without it, one text output that is
updated in place (a display handle), at most once a second, so that the cell keeps one line however long the
work, where tqdm's text bar would write every refresh into the cell's stream.
"""

from __future__ import annotations

import io
import sys
from typing import Callable

from tqdm import std as tqdm_std

try:  # the notebook's bar; without a kernel neither is needed
    from IPython.display import display as _display
except ImportError:  # pragma: no cover - IPython comes with every Jupyter kernel
    _display = None
try:
    from tqdm import notebook as tqdm_notebook
except ImportError:  # pragma: no cover
    tqdm_notebook = None

NOTEBOOK_REFRESH_S = 1.0  # the text bar in a notebook redraws at most this often: one message a second


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (where stderr is the cell's output)."""
    return "ipykernel.zmqshell" in sys.modules


class NotebookTextBar(tqdm_std.tqdm):
    """tqdm's text, shown in one notebook output that each refresh replaces (IPython's update_display_data);
    the last state stays when the bar closes, a single line."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs["file"] = io.StringIO()  # tqdm's own printing goes nowhere: display() shows the bar
        kwargs["disable"] = bool(kwargs.get("disable", False))  # stderr is no terminal here, yet the bar is wanted
        kwargs["mininterval"] = max(kwargs.get("mininterval", 0.1), NOTEBOOK_REFRESH_S)
        kwargs.pop("dynamic_ncols", None)
        kwargs.setdefault("ncols", 100)
        self._handle = None
        self._text = ""
        super().__init__(*args, **kwargs)

    def close(self) -> None:
        if not self.disable:
            self.display()  # the final count: refreshes are at most once a NOTEBOOK_REFRESH_S
        super().close()

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        text = self.format_meter(**self.format_dict) if msg is None else msg
        if not text:  # closing without `leave`: keep the last state (one line) rather than an empty output
            return True
        if text != self._text:
            self._text = text
            if self._handle is None:
                self._handle = _display({"text/plain": text}, raw=True, display_id=True)
            else:
                self._handle.update({"text/plain": text}, raw=True)
        return True


def bar_class(say: Callable[[str], None] = print) -> type:
    """The bar for this process: text on stderr outside Jupyter; in a kernel, tqdm's widget when ipywidgets is
    installed, else NotebookTextBar (said once a process, in one line)."""
    if not in_notebook() or _display is None:
        return tqdm_std.tqdm
    if tqdm_notebook is not None and tqdm_notebook.IProgress is not None:
        return tqdm_notebook.tqdm
    if not _noted:
        say("sgd-dist: progress is one line of text here: ipywidgets is not installed (pip install ipywidgets for "
            "the notebook's bar)")
        _noted.append(True)
    return NotebookTextBar


_noted: list[bool] = []  # whether this process was told why its notebook bar is text


def progress_bar(total: int | None, unit: str, desc: str | None = None, *, enabled: bool | None = None,
                 say: Callable[[str], None] = print):
    """A bar for long work of ``total`` units (plan, calibrate, bench, a sweep): ``enabled`` None shows it on a
    terminal or in a notebook only. Call ``update(n)``, ``set_postfix_str(text)``, ``write(line)`` (a line that
    does not break the bar), ``close()``."""
    bar = bar_class(say) if enabled is not False else tqdm_std.tqdm
    return bar(total=total, unit=unit, desc=desc, disable=None if enabled is None else not enabled,
               file=sys.stderr, dynamic_ncols=True, leave=False)


class RunStats:
    """The bar's postfix for a run: samples/s over the rows since the previous call and the latest optimality
    gap, from the Recorder's rows (the ETA is tqdm's own)."""

    def __init__(self) -> None:
        self._previous: dict | None = None

    def __call__(self, rows: list[dict], last_eval: dict | None) -> str:
        parts = []
        first = self._previous if self._previous is not None and self._previous["step"] < rows[0]["step"] else rows[0]
        last = rows[-1]
        if last["wall_time_s"] > first["wall_time_s"]:
            rate = (last["samples_seen"] - first["samples_seen"]) / (last["wall_time_s"] - first["wall_time_s"])
            parts.append(f"{rate:,.0f} samples/s")
        if last_eval is not None and last_eval.get("optimality_gap") is not None:
            parts.append(f"gap {last_eval['optimality_gap']:.2e}")
        self._previous = last
        return ", ".join(parts)

    def rewind(self) -> None:
        self._previous = None
