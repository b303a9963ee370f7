"""Drawing one panel to a PNG with matplotlib's Agg canvas (no pyplot, no global backend change).

Axis rules: a value axis turns logarithmic when every value drawn is positive and they span more
than two decades; the step axis turns symmetric-logarithmic (step 0 stays visible) when the
positive steps span more than two decades and most points lie in the first tenth of the run (the
NTK's log-spaced cadence). Runs are told apart by colour; where a panel also has several curves per
run (layers, eigenvalue indices), those take the colour and runs take the line style.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from .._names import ELLIPSIS, short_names
from .layout import Panel, choose_steps, run_color
from .reading import Histogram, Run

PLOT_EXTRA_HINT = "pip install 'lightning_biasprobe[plot]'"
DPI = 100
SIZE = (4.6, 3.3)
SMALL_SIZE = (3.4, 2.5)
HIST_BINS = 40
MAX_POINTS = 4000  # drawn per curve; longer curves are thinned (the last point always kept)
_RUN_STYLES = ["-", "--", ":", "-."]
_STEP_STYLES = [":", "--", "-"]


class MissingPlotExtra(ImportError):
    pass


def require_matplotlib() -> Any:
    """The matplotlib module, or an ImportError that says which extra installs it."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError as err:
        raise MissingPlotExtra(f"the report is drawn with matplotlib, which is not installed: {PLOT_EXTRA_HINT}"
                               ) from err
    return matplotlib


def spans_decades(values: Sequence[np.ndarray], decades: float = 2.0) -> bool:
    """Every finite value positive and max/min above 10**decades."""
    finite = [v[np.isfinite(v)] for v in values]
    finite = [v for v in finite if v.size]
    if not finite:
        return False
    allv = np.concatenate(finite)
    return bool(allv.min() > 0 and allv.max() / allv.min() > 10 ** decades)


def log_steps(steps: np.ndarray) -> bool:
    positive = steps[steps > 0]
    if positive.size < 3:
        return False
    return bool(positive.max() / positive.min() > 100 and np.median(steps) < 0.1 * steps.max())


def _thin(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(steps) <= MAX_POINTS:
        return steps, values
    idx = np.unique(np.r_[np.linspace(0, len(steps) - 1, MAX_POINTS).astype(int), len(steps) - 1])
    return steps[idx], values[idx]


def _ramp(n: int, cmap: str = "viridis", lo: float = 0.0, hi: float = 0.85) -> list:
    import matplotlib

    colormap = matplotlib.colormaps[cmap]
    if n == 1:
        return [colormap(hi)]
    return [colormap(lo + (hi - lo) * i / (n - 1)) for i in range(n)]


def _member_colors(panel: Panel) -> list:
    n = len(panel.lines)
    if panel.ordered:
        return _ramp(n)
    return [run_color(i) for i in range(n)]


def _labelled(i: int, n: int) -> bool:
    # With many curves (ten eigenvalues), label a handful so the legend stays small.
    return n <= 8 or i in (0, n - 1) or i % max(1, int(np.ceil(n / 5))) == 0


def _new_figure(panel: Panel):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    size = SMALL_SIZE if panel.detail else SIZE
    if _legend_outside(panel):
        size = (size[0] + 1.6, size[1])
    fig = Figure(figsize=size, dpi=DPI)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.17 * SIZE[0] / size[0], right=0.97 if not _legend_outside(panel) else 0.7,
                        bottom=0.16 if panel.kind != "profile" else 0.24, top=0.83)
    small = 7 if panel.detail else 8
    fig.text(0.5, 0.985, panel.title, ha="center", va="top", fontsize=small + 1, fontweight="bold")
    if panel.paper:
        fig.text(0.5, 0.915, panel.paper, ha="center", va="top", fontsize=small, style="italic", color="0.3")
    ax = fig.add_subplot(1, 1, 1)
    ax.tick_params(labelsize=small - 0.5)
    ax.set_xlabel(panel.xlabel, fontsize=small)
    ax.set_ylabel(panel.ylabel, fontsize=small)
    ax.grid(True, color="0.9", linewidth=0.6)
    return fig, ax


def _legend_outside(panel: Panel) -> bool:
    # Many unordered curves (the cost of every probe) need every name: the legend goes to the right.
    return panel.kind == "curve" and not panel.ordered and len(panel.lines) > 5


def _legend(ax, entries: list, panel: Panel) -> None:
    if not entries:
        return
    size = 5.5 if panel.detail else 6.5
    if _legend_outside(panel):
        ax.legend(handles=entries, fontsize=size, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  handlelength=2.6)
    else:
        ax.legend(handles=entries, fontsize=size, ncol=2 if len(entries) > 6 else 1, frameon=False, loc="best",
                  handlelength=2.6)


def _draw_curves(ax, panel: Panel, runs: Sequence[Run]) -> tuple[list[str], list]:
    from matplotlib.lines import Line2D

    multi = len(panel.lines) > 1
    colors = _member_colors(panel)
    drawn, handles, all_values, all_steps = [], [], [], []
    with_data: list[int] = []  # indices of the runs that drew a curve in this panel
    for r, run in enumerate(runs):
        style = _RUN_STYLES[r % len(_RUN_STYLES)] if multi and len(runs) > 1 else "-"
        for m, (member, tag) in enumerate(panel.lines):
            series = run.scalars.get(tag)
            if series is None or not len(series.steps):
                continue
            color = colors[m] if multi else run_color(r)
            steps, values = _thin(series.steps, series.values)
            ax.plot(steps, values, linestyle=style, color=color, linewidth=1.2,
                    marker="o" if len(steps) <= 60 else None, markersize=2.2)
            if tag in panel.bands and panel.bands[tag] in run.scalars:
                err = run.scalars[panel.bands[tag]]
                common, i, j = np.intersect1d(series.steps, err.steps, return_indices=True)
                if len(common):
                    v, e = series.values[i], err.values[j]
                    ax.fill_between(common, v - e, v + e, color=color, alpha=0.2, linewidth=0)
                    all_values.append(v - e)
            all_values.append(values)
            all_steps.append(steps)
            drawn.append(f"{run.label} {member}".strip())
            if not with_data or with_data[-1] != r:
                with_data.append(r)
    # The legend names each run by its own label (and only the runs drawn here), in run order, with
    # the colour or line style its curves were drawn with.
    if multi:
        for m, (member, _) in enumerate(panel.lines):
            if not panel.ordered or _labelled(m, len(panel.lines)):
                handles.append(Line2D([], [], color=colors[m], linewidth=1.4, label=member))
        if len(runs) > 1:
            handles.extend(Line2D([], [], color="0.2", linestyle=_RUN_STYLES[r % len(_RUN_STYLES)],
                                  label=runs[r].label) for r in with_data)
    elif len(runs) > 1:
        handles = [Line2D([], [], color=run_color(r), label=runs[r].label) for r in with_data]
    if spans_decades(all_values):
        ax.set_yscale("log")
    if all_steps and log_steps(np.concatenate(all_steps)):
        ax.set_xscale("symlog", linthresh=1.0, linscale=0.3)
    return drawn, handles


def _value_at(run: Run, tag: str, step: int) -> float:
    series = run.scalars.get(tag)
    if series is None:
        return np.nan
    i = np.searchsorted(series.steps, step)
    return float(series.values[i]) if i < len(series.steps) and series.steps[i] == step else np.nan


def _step_colors(run_index: int, n_runs: int, n_steps: int) -> list[tuple[Any, str]]:
    """(colour, line style) for each chosen step of a run: one run ramps colour from early (light)
    to late (dark); several runs keep their colour and go dotted, dashed, solid."""
    if n_runs == 1:
        return [(c, "-") for c in _ramp(n_steps, "plasma_r", 0.25, 0.95)]
    styles = _STEP_STYLES[-n_steps:] if n_steps <= 3 else [_STEP_STYLES[min(2, 3 * i // n_steps)]
                                                           for i in range(n_steps)]
    return [(run_color(run_index), s) for s in styles]


def _draw_at_steps(ax, panel: Panel, runs: Sequence[Run], requested: Optional[Sequence[int]]
                   ) -> tuple[list[str], list]:
    """Profiles and spectra: x is the member (layer or index), one curve per chosen step."""
    from matplotlib.lines import Line2D

    x = np.arange(1, len(panel.lines) + 1)
    drawn, handles, values_all = [], [], []
    for r, run in enumerate(runs):
        available = np.unique(np.concatenate(
            [run.scalars[t].steps for _, t in panel.lines if t in run.scalars] or [np.zeros(0, np.int64)]))
        steps = choose_steps(available, requested)
        for (color, style), step in zip(_step_colors(r, len(runs), len(steps)), steps):
            ys = np.array([_value_at(run, tag, step) for _, tag in panel.lines])
            if not np.isfinite(ys).any():
                continue
            label = f"step {step}" if len(runs) == 1 else f"{run.label}, step {step}"
            ax.plot(x, ys, color=color, linestyle=style, marker="o", markersize=3, linewidth=1.3)
            handles.append(Line2D([], [], color=color, linestyle=style, marker="o", markersize=3, label=label))
            values_all.append(ys)
            drawn.append(label)
    if spans_decades(values_all):
        ax.set_yscale("log")
    names = [m for m, _ in panel.lines]
    if panel.kind == "profile":
        short, prefix = short_names(names)
        rotate = len(names) > 3 or max(len(n) for n in short) > 12
        ax.set_xticks(x)
        ax.set_xticklabels(short, rotation=30 if rotate else 0, ha="right" if rotate else "center",
                           rotation_mode="anchor" if rotate else "default", fontsize=6.5)
        if short != names:
            # The full names are in the page's caption; the axis says what was cut.
            notes = ([f"{prefix!r} removed"] if prefix else []) + (
                [f"{ELLIPSIS} = shortened"] if any(n.startswith(ELLIPSIS) for n in short) else [])
            ax.set_xlabel(f"{panel.xlabel}; {', '.join(notes)}", fontsize=ax.xaxis.label.get_fontsize())
    elif len(x) <= 20:
        ax.set_xticks(x)
        ax.set_xticklabels(names, fontsize=6.5)
    return drawn, handles


def fit_inside(fig, pad: float = 3.0, max_margin: float = 0.45) -> None:
    """Widen the subplot margins until the axes' tick labels, axis labels and legend lie inside the
    figure (long rotated layer names used to run off its left and bottom edges); the figure keeps
    its size, so panels stay the same size on the page. No margin grows beyond ``max_margin``."""
    renderer = fig.canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height
    for _ in range(4):  # moving a margin moves the ticks too: settle in a few passes
        boxes = [ax.get_tightbbox(renderer) for ax in fig.axes]
        boxes = [b for b in boxes if b is not None]
        if not boxes:
            return
        x0, y0 = min(b.x0 for b in boxes), min(b.y0 for b in boxes)
        x1 = max(b.x1 for b in boxes)
        left, bottom = max(0.0, pad - x0) / width, max(0.0, pad - y0) / height
        right = max(0.0, x1 - width + pad) / width
        if left == bottom == right == 0.0:
            return
        sp = fig.subplotpars
        new = dict(left=min(max_margin, sp.left + left), bottom=min(max_margin, sp.bottom + bottom),
                   right=max(1.0 - max_margin, sp.right - right))
        if (new["left"], new["bottom"], new["right"]) == (sp.left, sp.bottom, sp.right):
            return
        fig.subplots_adjust(**new)


def rebin(histogram: Histogram, grid: np.ndarray) -> np.ndarray:
    """Fraction of the histogram's values in each bin of ``grid``, spreading every logged bucket
    uniformly over its width (TensorBoard's buckets are exponential, so they are not drawn as is)."""
    lo, hi = histogram.edges[:-1], histogram.edges[1:]
    a, b = grid[:-1], grid[1:]
    width = hi - lo
    overlap = np.clip(np.minimum(hi[:, None], b[None]) - np.maximum(lo[:, None], a[None]), 0, None)
    frac = overlap / np.where(width > 0, width, 1.0)[:, None]
    point = np.flatnonzero(width <= 0)
    if point.size:
        frac[point] = 0.0
        frac[point, np.clip(np.searchsorted(grid, lo[point], side="right") - 1, 0, len(a) - 1)] = 1.0
    mass = histogram.counts @ frac
    total = histogram.total
    return mass / total if total > 0 else mass


def _draw_histogram(ax, panel: Panel, runs: Sequence[Run], requested: Optional[Sequence[int]]
                    ) -> tuple[list[str], list]:
    from matplotlib.lines import Line2D

    tag = panel.lines[0][1]
    chosen: list[tuple[int, int, Histogram]] = []
    for r, run in enumerate(runs):
        snapshots = {h.step: h for h in run.histograms.get(tag, [])}
        for step in choose_steps(list(snapshots), requested):
            chosen.append((r, step, snapshots[step]))
    if not chosen:
        return [], []
    low = min(h.edges[0] for _, _, h in chosen)
    high = max(h.edges[-1] for _, _, h in chosen)
    log_x = low > 0 and high / low > 100
    if high <= low:
        high = low + max(abs(low), 1.0) * 1e-6
    grid = np.geomspace(low, high, HIST_BINS + 1) if log_x else np.linspace(low, high, HIST_BINS + 1)
    drawn, handles, masses = [], [], []
    per_run: dict[int, list] = {}
    for r, step, h in chosen:
        per_run.setdefault(r, []).append((step, h))
    for r, items in per_run.items():
        for (color, style), (step, h) in zip(_step_colors(r, len(runs), len(items)), items):
            mass = rebin(h, grid)
            ax.stairs(mass, grid, color=color, linestyle=style, linewidth=1.3)
            label = f"step {step}" if len(runs) == 1 else f"{runs[r].label}, step {step}"
            handles.append(Line2D([], [], color=color, linestyle=style, label=label))
            masses.append(mass[mass > 0])
            drawn.append(label)
    if log_x:
        ax.set_xscale("log")
    if spans_decades(masses):
        ax.set_yscale("log")
    return drawn, handles


def render_panel(panel: Panel, runs: Sequence[Run], steps: Optional[Sequence[int]] = None) -> tuple[Any, list[str]]:
    """The matplotlib ``Figure`` of ``panel`` for ``runs``, and the curves drawn, named
    ``"<run label> <member>"`` (curves over training) or ``"<run label>, step <s>"`` (at a step;
    ``"step <s>"`` for a single run)."""
    require_matplotlib()
    fig, ax = _new_figure(panel)
    if panel.kind == "curve":
        drawn, handles = _draw_curves(ax, panel, runs)
    elif panel.kind in ("profile", "spectrum"):
        drawn, handles = _draw_at_steps(ax, panel, runs, steps)
    elif panel.kind == "histogram":
        drawn, handles = _draw_histogram(ax, panel, runs, steps)
    else:
        raise ValueError(f"unknown panel kind {panel.kind!r}")
    if not drawn:
        ax.text(0.5, 0.5, "no data in these runs", ha="center", va="center", transform=ax.transAxes, fontsize=8,
                color="0.4")
    _legend(ax, handles, panel)
    if panel.kind == "profile":
        fit_inside(fig)
    return fig, drawn


def draw_panel(panel: Panel, runs: Sequence[Run], path: str, steps: Optional[Sequence[int]] = None) -> list[str]:
    """Draw ``panel`` for ``runs`` into the PNG ``path``; returns the curves drawn."""
    fig, drawn = render_panel(panel, runs, steps)
    fig.savefig(path, dpi=DPI)
    return drawn
