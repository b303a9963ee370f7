"""The report page: one HTML file that shows the PNGs next to it by relative path.

The output folder is the unit to copy or archive (``index.html`` plus its PNGs); the page needs
nothing else, no script and no network.
"""

from __future__ import annotations

import datetime
from html import escape
from typing import Optional, Sequence

import numpy as np

from .layout import Panel, Section, run_color
from .reading import PREFIX, Run

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em auto;max-width:1500px;
  padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.meta,.cite{color:#555;font-size:.92em} .cite{font-style:italic;margin-top:-.4em}
code{background:#f4f4f4;padding:0 .25em;border-radius:3px;font-size:.9em}
table{border-collapse:collapse;font-size:.9em} td,th{border-bottom:1px solid #e5e5e5;padding:.25em .7em;
  text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums}
.swatch{display:inline-block;width:1.6em;height:.7em;border-radius:2px;vertical-align:middle}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(470px,1fr));gap:.8em}
.grid.small{grid-template-columns:repeat(auto-fill,minmax(350px,1fr))}
figure{margin:0;border:1px solid #eee;border-radius:4px;padding:.3em;background:#fff}
figure img{width:100%;height:auto;display:block}
figcaption{font-size:.75em;color:#666;word-break:break-all}
nav a{margin-right:.9em;white-space:nowrap} details{margin-top:.8em} summary{cursor:pointer;color:#444}
"""


def _figure(panel: Panel, files: dict[str, str]) -> str:
    tags = ", ".join(f"<code>{escape(t)}</code>" for t in panel.tags[:12])
    if len(panel.tags) > 12:
        tags += f" and {len(panel.tags) - 12} more"
    if panel.kind == "profile":  # the axis may show shortened layer names: the full ones, in order
        tags += "<br>x axis: " + ", ".join(f"{i}&nbsp;<code>{escape(m)}</code>"
                                           for i, (m, _) in enumerate(panel.lines, 1))
    src = escape(files[panel.id])
    return (f'<figure id="{escape(panel.id)}"><a href="{src}"><img src="{src}" alt="{escape(panel.title)}" '
            f'loading="lazy"></a><figcaption>{tags}</figcaption></figure>')


def _grid(panels: Sequence[Panel], files: dict[str, str], small: bool = False) -> str:
    cls = "grid small" if small else "grid"
    return f'<div class="{cls}">' + "".join(_figure(p, files) for p in panels) + "</div>"


def _runs_table(runs: Sequence[Run], skipped: Sequence[Run]) -> str:
    rows = []
    for i, run in enumerate(runs):
        first, last = run.step_range()
        probes = sorted({t[len(PREFIX):].split("/")[0] for t in run.probe_tags()})
        rows.append(f'<tr><td><span class="swatch" style="background:{run_color(i)}"></span></td>'
                    f"<td><b>{escape(run.label)}</b></td><td><code>{escape(run.path)}</code></td>"
                    f'<td class="num">{first}–{last}</td><td>{escape(", ".join(probes))}</td></tr>')
    html = ("<table><tr><th></th><th>run</th><th>event files in</th><th>steps</th><th>probes</th></tr>"
            + "".join(rows) + "</table>")
    if skipped:
        html += ("<p class=meta>Read but not drawn (no <code>biasprobe/</code> data): "
                 + ", ".join(f"<code>{escape(r.path)}</code>" for r in skipped) + "</p>")
    return html


def _cost_table(runs: Sequence[Run], cost: Optional[Section]) -> str:
    if cost is None:
        return ""
    rows = []
    for run in runs:
        for name, tag in cost.panels[0].lines:
            series = run.scalars.get(tag)
            if series is None or not len(series.values):
                continue
            v = series.values
            rows.append(f"<tr><td>{escape(run.label)}</td><td>{escape(name)}</td><td class=num>{len(v)}</td>"
                        f"<td class=num>{v.sum():.3g}</td><td class=num>{np.median(v):.3g}</td>"
                        f"<td class=num>{v.max():.3g}</td></tr>")
    return ("<table><tr><th>run</th><th>probe</th><th>measurements</th><th>total s</th><th>median s</th>"
            "<th>max s</th></tr>" + "".join(rows) + "</table>")


def write_page(path: str, sections: Sequence[Section], files: dict[str, str], runs: Sequence[Run],
               skipped: Sequence[Run] = (), title: str = "biasprobe report", steps: Optional[Sequence[int]] = None
               ) -> None:
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    chosen = (f"the logged steps nearest to {', '.join(str(s) for s in steps)}" if steps
              else "the first and last logged steps of each run and the one nearest half-way")
    nav = "".join(f'<a href="#{escape(s.key)}">{escape(s.title)}</a>' for s in sections)
    body = [f"<h1>{escape(title)}</h1>",
            f"<p class=meta>{len(runs)} run{'s' if len(runs) != 1 else ''}, written {when}. The horizontal axis of "
            f"curves is Lightning's global step (a point at step s was measured after s optimizer steps). "
            f"Profiles over depth, spectra and distributions show {escape(chosen)}. Value axes are logarithmic "
            f"where every value is positive and they span more than two decades. Click a panel for its PNG.</p>",
            "<h2 id=runs>Runs</h2>", _runs_table(runs, skipped), f"<nav>{nav}</nav>"]
    cost = next((s for s in sections if s.key == "cost"), None)
    for section in sections:
        tag = f" <code>biasprobe/{escape(section.key)}</code>" if section.key not in ("cost", "other") else ""
        body.append(f'<h2 id="{escape(section.key)}">{escape(section.title)}{tag}</h2>')
        if section.citation:
            body.append(f"<p class=cite>{escape(section.citation)}</p>")
        body.append(_grid(section.main, files))
        if section is cost:
            body.append(_cost_table(runs, cost))
        if section.details:
            body.append(f"<details><summary>details: counts, settings and constant quantities "
                        f"({len(section.details)})</summary>{_grid(section.details, files, small=True)}</details>")
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>'
            f"<body>\n" + "\n".join(body) + "\n</body></html>\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
