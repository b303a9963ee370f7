"""``biasprobe report``: an HTML page of PNG panels from the TensorBoard logs of one or more runs.

Reads the event files with TensorBoard's own reader, draws one panel per probe quantity over
training steps (runs overlaid), spectra and distributions at chosen steps, and per-layer profiles
over depth, grouped by probe with each probe's paper; writes ``index.html`` and the PNGs into one
folder (the page refers to them by relative path). Drawing needs matplotlib (the ``plot`` extra).

Cost: reading the event files plus about 50 ms per panel (the 20-epoch demo: ~80 panels).

    from lightning_biasprobe.report import write_report
    report = write_report(["biasprobe_logs"], "biasprobe_report")
    print(report.path)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

from .catalog import PROBE_CITATIONS, PROBE_TITLES
from .layout import Panel, Section, choose_steps, plan_sections
from .plotting import PLOT_EXTRA_HINT, MissingPlotExtra, draw_panel, require_matplotlib
from .reading import ReportError, Run, read_runs

__all__ = ["PROBE_CITATIONS", "PROBE_TITLES", "PLOT_EXTRA_HINT", "MissingPlotExtra", "Panel", "Report",
           "ReportError", "Run", "Section", "choose_steps", "plan_sections", "read_runs", "write_report"]


@dataclass
class Report:
    path: str  # index.html
    sections: list[Section]
    files: dict[str, str]  # panel id -> PNG file name (in the folder of ``path``)
    drawn: dict[str, list[str]]  # panel id -> the curves drawn
    runs: list[Run]
    skipped: list[Run] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def panels(self) -> list[Panel]:
        return [p for s in self.sections for p in s.panels]


def _no_probe_data(runs: Sequence[Run], logdirs: Sequence[str]) -> ReportError:
    tags = sorted({t for r in runs for t in [*r.scalars, *r.histograms]})
    shown = ", ".join(tags[:8]) + (f" and {len(tags) - 8} more" if len(tags) > 8 else "")
    return ReportError(
        f"no biasprobe data in {', '.join(map(repr, logdirs))}: read {len(runs)} run(s) "
        f"({', '.join(r.path for r in runs)}) whose tags are {shown or 'none'}; none starts with 'biasprobe/'. "
        "Attach a probe to the Trainer (e.g. callbacks=[GeometricComplexity()]) with a TensorBoardLogger, and "
        "pass that logger's directory.")


def write_report(logdirs: Iterable[str], out: str, steps: Optional[Sequence[int]] = None,
                 title: str = "biasprobe report") -> Report:
    """Write ``<out>/index.html`` and its PNGs from every run under ``logdirs``.

    ``steps``: global steps for the at-a-step panels (the nearest logged step of each is shown);
    default the first, middle and last logged ones. Runs without ``biasprobe/`` data are listed on
    the page but not drawn; if no run has any, raises :class:`ReportError` and writes nothing.
    Raises :class:`MissingPlotExtra` (an ImportError) without matplotlib.
    """
    started = time.perf_counter()
    require_matplotlib()
    logdirs = [os.fspath(d) for d in ([logdirs] if isinstance(logdirs, (str, os.PathLike)) else logdirs)]
    if not logdirs:
        raise ReportError("no log directory given")
    runs = read_runs(logdirs)
    drawn_runs = [r for r in runs if r.has_probe_data()]
    skipped = [r for r in runs if not r.has_probe_data()]
    if not drawn_runs:
        raise _no_probe_data(runs, logdirs)
    sections = plan_sections(drawn_runs)
    os.makedirs(out, exist_ok=True)
    files: dict[str, str] = {}
    drawn: dict[str, list[str]] = {}
    for section in sections:
        for panel in section.panels:
            files[panel.id] = f"{panel.id}.png"
            drawn[panel.id] = draw_panel(panel, drawn_runs, os.path.join(out, files[panel.id]), steps)
    from .html import write_page

    path = os.path.abspath(os.path.join(out, "index.html"))
    write_page(path, sections, files, drawn_runs, skipped, title=title, steps=steps)
    return Report(path, sections, files, drawn, drawn_runs, skipped, time.perf_counter() - started)
