"""From logged tags to the report's sections and panels (no plotting here).

Keys are ``biasprobe/<probe>/<rest>``. Per probe, ``<rest>`` reads as:

- ``<quantity>``: a curve over training steps (one panel; runs overlaid);
- ``<family>_<i>`` for two or more ``i`` (NTK eigenvalues): one panel with a curve per ``i``, and a
  spectrum panel (value against ``i``) at chosen steps;
- ``<q>_std_error`` next to ``<q>``: a band on ``<q>``'s panel;
- ``<a>/<b>``: a quantity per layer, block or group (see ``catalog.NESTED_KEYS``): one panel with a
  curve per member, and, for layers and blocks, a profile over depth at chosen steps;
- ``seconds``, ``val_seconds``: the cost section;
- histograms: a distribution panel at chosen steps.

Counts and settings (``catalog.DETAILS``) and quantities constant over the whole run are drawn
small, under "details". Scalars outside ``biasprobe/`` (losses, accuracies) get a short section of
their own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from . import catalog
from .reading import PREFIX, Run

#: Runs are told apart by colour, in this order (matplotlib's tab10, so the page can show them too).
RUN_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
              "#bcbd22", "#17becf"]

STEP_LABEL = "training step (optimizer steps)"
MAX_OTHER_PANELS = 24
_INDEXED = re.compile(r"^(.+)_(\d+)$")


def run_color(i: int) -> str:
    return RUN_COLORS[i % len(RUN_COLORS)]


@dataclass
class Panel:
    """One figure. ``lines`` are ``(member, tag)``: member ``""`` for a single quantity, else the
    layer, block, group, probe or index that the tag's curve stands for."""

    id: str
    kind: str  # "curve" | "profile" | "spectrum" | "histogram"
    probe: str
    quantity: str
    title: str
    paper: str
    ylabel: str
    xlabel: str = STEP_LABEL
    lines: list[tuple[str, str]] = field(default_factory=list)
    bands: dict[str, str] = field(default_factory=dict)  # tag -> tag of its standard error
    ordered: bool = False  # members have an order (depth, index): colour them on a ramp
    detail: bool = False

    @property
    def tags(self) -> list[str]:
        return [t for _, t in self.lines] + list(self.bands.values())


@dataclass
class Section:
    key: str
    title: str
    citation: str
    panels: list[Panel] = field(default_factory=list)

    @property
    def main(self) -> list[Panel]:
        return [p for p in self.panels if not p.detail]

    @property
    def details(self) -> list[Panel]:
        return [p for p in self.panels if p.detail]


def _ordered_union(lists: Sequence[Sequence[str]]) -> list[str]:
    seen: dict[str, None] = {}
    for items in lists:
        for item in items:
            seen.setdefault(item, None)
    return list(seen)


def _split(tag: str) -> tuple[str, str]:
    parts = tag[len(PREFIX):].split("/", 1)
    return (parts[0], parts[1]) if len(parts) == 2 else (parts[0], parts[0])


def is_cost(rest: str) -> bool:
    return "/" not in rest and rest.endswith("seconds")


def _constant(runs: Sequence[Run], tag: str) -> bool:
    values = [r.scalars[tag].values for r in runs if tag in r.scalars]
    return all(len(v) > 1 and np.ptp(v) == 0 for v in values) and len(values) > 0


class _Ids:
    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, *parts: str) -> str:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(p for p in parts if p)).strip("_.-") or "panel"
        name, i = base, 1
        while name in self.used:
            i += 1
            name = f"{base}-{i}"
        self.used.add(name)
        return name


def _probe_panels(probe: str, scalar_rests: list[str], hist_rests: list[str], runs: Sequence[Run],
                  ids: _Ids) -> list[Panel]:
    tag = (lambda rest: f"{PREFIX}{probe}/{rest}")
    top = [r for r in scalar_rests if "/" not in r and not is_cost(r)]
    nested = [r for r in scalar_rests if "/" in r]
    top_set = set(top)

    # indexed families (eigenvalue_1..k), with aliases such as the Hessian's top_eigenvalue
    families: dict[str, dict[int, str]] = {}
    for rest in top:
        m = _INDEXED.match(rest)
        if m:
            families.setdefault(m.group(1), {})[int(m.group(2))] = rest
    for (p, quantity), (family, index) in catalog.ALIASES.items():
        if p == probe and quantity in top_set and family in families:
            families[family].setdefault(index, quantity)
    families = {f: members for f, members in families.items() if len(members) >= 2}
    in_family = {rest: f for f, members in families.items() for rest in members.values()}
    bands = {r[: -len(catalog.STD_ERROR_SUFFIX)]: r for r in top
             if r.endswith(catalog.STD_ERROR_SUFFIX) and r[: -len(catalog.STD_ERROR_SUFFIX)] in top_set}
    banded = set(bands.values())

    panels: list[Panel] = []
    done_families: set[str] = set()
    for rest in top:
        if rest in banded:
            continue
        if rest in in_family:
            family = in_family[rest]
            if family in done_families:
                continue
            done_families.add(family)
            members = sorted(families[family].items())
            lines = [(str(i), tag(r)) for i, r in members]
            k = members[-1][0]
            panels.append(Panel(ids(probe, family, "curves"), "curve", probe, family,
                                f"{probe}/{family}_i over training (i = {members[0][0]}…{k})",
                                catalog.paper(probe, family), catalog.label(probe, family), lines=lines,
                                ordered=True))
            panels.append(Panel(ids(probe, family, "spectrum"), "spectrum", probe, family,
                                f"{probe}/{family}_i against i", catalog.paper(probe, family),
                                catalog.label(probe, family), xlabel=f"index i of {family}_i", lines=lines,
                                ordered=True))
            continue
        # Constant quantities of probes the catalog does not know are likely settings or counts; a
        # known probe's headline quantity (an effective depth that has not moved yet) stays in view.
        detail = catalog.is_detail(probe, rest) or (probe not in catalog.PROBE_TITLES and _constant(runs, tag(rest)))
        panels.append(Panel(ids(probe, rest), "curve", probe, rest, f"{probe}/{rest}", catalog.paper(probe, rest),
                            catalog.label(probe, rest), lines=[("", tag(rest))],
                            bands={tag(rest): tag(bands[rest])} if rest in bands else {}, detail=detail))

    # per-layer / per-block / per-group quantities
    mode = catalog.nested_keys(probe)
    by_quantity: dict[str, list[tuple[str, str]]] = {}
    member_order: list[str] = []
    for rest in nested:
        if mode == "block":
            quantity, member = rest.split("/", 1)
        else:
            member, quantity = rest.rsplit("/", 1)
        member_order.append(member)
        by_quantity.setdefault(quantity, []).append((member, tag(rest)))
    rank = {m: i for i, m in enumerate(_ordered_union([member_order]))}
    noun = {"layer": "layer", "block": "block"}.get(mode, "group")
    for quantity, lines in by_quantity.items():
        lines = sorted(lines, key=lambda line: rank[line[0]])
        title_q = f"{probe}/{quantity}" if mode != "block" else f"{probe}/{quantity}/<block>"
        panels.append(Panel(ids(probe, quantity, "per", noun), "curve", probe, quantity, f"{title_q} per {noun}",
                            catalog.paper(probe, quantity), catalog.label(probe, quantity), lines=lines,
                            ordered=mode in ("layer", "block")))
        if mode in ("layer", "block") and len(lines) >= 2:
            panels.append(Panel(ids(probe, quantity, "profile"), "profile", probe, quantity,
                                f"{title_q} over depth", catalog.paper(probe, quantity),
                                catalog.label(probe, quantity), xlabel=f"{noun} (in logged order)", lines=lines,
                                ordered=True))

    for rest in hist_rests:
        member, _, quantity = rest.rpartition("/")
        panels.append(Panel(ids(probe, rest, "hist"), "histogram", probe, quantity,
                            f"{probe}/{rest} distribution", catalog.paper(probe, quantity),
                            "fraction of values", xlabel=catalog.label(probe, quantity), lines=[(member, tag(rest))]))
    return panels


def plan_sections(runs: Sequence[Run], max_other: int = MAX_OTHER_PANELS) -> list[Section]:
    """The report's sections: one per probe (known probes in the catalog's order, then others in
    logged order), then ``cost``, then ``other``."""
    ids = _Ids()
    scalar_tags = _ordered_union([list(r.scalars) for r in runs])
    hist_tags = _ordered_union([list(r.histograms) for r in runs])
    logged = _ordered_union([[_split(t)[0] for t in [*scalar_tags, *hist_tags] if t.startswith(PREFIX)]])
    known = list(catalog.PROBE_TITLES)  # the catalog's order for known probes, then the rest as logged
    probes = sorted(logged, key=lambda p: (known.index(p) if p in known else len(known), logged.index(p)))

    sections: list[Section] = []
    cost_lines: list[tuple[str, str]] = []
    for probe in probes:
        scalar_rests = [_split(t)[1] for t in scalar_tags if t.startswith(PREFIX) and _split(t)[0] == probe]
        hist_rests = [_split(t)[1] for t in hist_tags if t.startswith(PREFIX) and _split(t)[0] == probe]
        for rest in scalar_rests:
            if is_cost(rest):
                name = probe if rest == "seconds" else f"{probe} ({rest.replace('_seconds', '').strip('_')})"
                cost_lines.append((name, f"{PREFIX}{probe}/{rest}"))
        panels = _probe_panels(probe, scalar_rests, hist_rests, runs, ids)
        if panels:
            sections.append(Section(probe, catalog.probe_title(probe), catalog.probe_citation(probe), panels))
    if cost_lines:
        cost = Panel(ids("cost", "seconds"), "curve", "cost", "seconds", "seconds per measurement, per probe",
                     "each probe's own wall time", catalog.label("*", "seconds"), lines=cost_lines)
        sections.append(Section("cost", "Cost", "Wall time of each measurement, measured by the probe itself.",
                                [cost]))
    other = [t for t in scalar_tags if not t.startswith(PREFIX) and t not in ("epoch", "hp_metric")]
    if other:
        panels = [Panel(ids("other", t), "curve", "", t, t, "", t, lines=[("", t)]) for t in other[:max_other]]
        sections.append(Section("other", "Other logged scalars", "Not from biasprobe: the training's own "
                                "metrics, for reference." + (f" The first {max_other} of {len(other)} are shown."
                                                            if len(other) > max_other else ""), panels))
    return sections


def choose_steps(available: Sequence[int], requested: Optional[Sequence[int]] = None) -> list[int]:
    """Steps to show in at-a-step panels: the logged steps nearest to each requested one; by
    default the first and last logged steps and the one nearest to half-way between them."""
    steps = sorted(set(int(s) for s in available))
    if not steps:
        return []
    arr = np.asarray(steps)
    if not requested:  # the middle is the logged step nearest to half-way in training time
        requested = [steps[0], (steps[0] + steps[-1]) / 2, steps[-1]]
    return sorted({int(arr[np.argmin(np.abs(arr - r))]) for r in requested})
