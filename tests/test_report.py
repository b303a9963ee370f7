"""``biasprobe report``: panels for every logged quantity, PNGs, the HTML page, overlays, axis rules."""

from __future__ import annotations

import os
import re
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

import lightning_biasprobe as lb
from lightning_biasprobe.cli import main
from lightning_biasprobe.cli.demo import run_demo, write_demo_report
from lightning_biasprobe.report import MissingPlotExtra, ReportError, choose_steps, plan_sections, write_report
from lightning_biasprobe.report.plotting import draw_panel, rebin, render_panel, short_names, spans_decades
from lightning_biasprobe.report.reading import Histogram, read_runs, run_labels

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """A short demo run with every probe, and a second, different run with three probes."""
    root = tmp_path_factory.mktemp("report")
    full = run_demo(out=str(root / "full"), epochs=2, progress=False, limit_batches=8)
    probes = [lb.GeometricComplexity(), lb.NTKAlignment(), lb.EffectiveRank()]
    other = run_demo(out=str(root / "other"), epochs=2, seed=1, probes=probes, progress=False, limit_batches=5)
    return root, full["logdir"], other["logdir"]


@pytest.fixture(scope="module")
def one_run_report(demo_runs):
    root, full, _ = demo_runs
    return write_report([full], str(root / "report_one"))


@pytest.fixture(scope="module")
def two_run_report(demo_runs):
    root, full, other = demo_runs
    return write_report([full, other], str(root / "report_two"))


def _logged_tags(logdir: str) -> tuple[set[str], set[str]]:
    events = EventAccumulator(logdir, size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    return ({t for t in tags["scalars"] if t.startswith("biasprobe/")},
            {t for t in tags["histograms"] if t.startswith("biasprobe/")})


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.headings: list[str] = []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "a" and "href" in attrs:
            self.links.append(attrs["href"])
        self._in_h2 = tag == "h2" or self._in_h2

    def handle_endtag(self, tag):
        if tag == "h2":
            self._in_h2 = False

    def handle_data(self, data):
        if self._in_h2:
            self.headings.append(data)


def test_every_logged_quantity_of_the_demo_has_a_panel_and_a_png(demo_runs, one_run_report):
    _, full, _ = demo_runs
    scalars, histograms = _logged_tags(full)
    assert scalars and histograms
    covered = {t for p in one_run_report.panels for t in p.tags}
    assert scalars | histograms <= covered, sorted((scalars | histograms) - covered)
    # grouped by probe: one section per probe that logged, named after it, in the catalog's order
    keys = [s.key for s in one_run_report.sections]
    assert set(keys) >= {cls.name for cls in lb.ALL_PROBES} and keys[-2:] == ["cost", "other"]
    for section in one_run_report.sections:
        for panel in section.panels:
            assert panel.probe in (section.key, "") or section.key == "cost"
    out = os.path.dirname(one_run_report.path)
    for panel in one_run_report.panels:
        path = os.path.join(out, one_run_report.files[panel.id])
        with open(path, "rb") as f:
            head = f.read(8)
        assert head == PNG_MAGIC and os.path.getsize(path) > 2000, panel.id
        assert one_run_report.drawn[panel.id], f"{panel.id} drew nothing"
    # seconds go to the one cost panel, not to the probes' sections
    for section in one_run_report.sections:
        if section.key != "cost":
            assert not any(t.endswith("/seconds") for p in section.panels for t in p.tags), section.key
    cost = next(s for s in one_run_report.sections if s.key == "cost")
    assert {t for t in scalars if t.endswith("seconds")} == set(cost.panels[0].tags)


def test_layers_make_profiles_and_eigenvalues_make_a_spectrum(one_run_report):
    by_id = {p.id: p for p in one_run_report.panels}
    profile = by_id["rank-erank_features-profile"]
    assert profile.kind == "profile" and [m for m, _ in profile.lines] == ["net.1", "net.3"]  # logged order
    # default steps: first, middle, last of the run (the rank probe measures at start and every epoch)
    drawn = one_run_report.drawn[profile.id]
    steps = [int(re.search(r"step (\d+)", d).group(1)) for d in drawn]
    rank_steps = one_run_report.runs[0].scalars["biasprobe/rank/net.1/erank_features"].steps
    assert steps == choose_steps(rank_steps) and steps[0] == 0 and steps[-1] == rank_steps[-1] and len(steps) == 3
    spectrum = by_id["ntk-eigenvalue-spectrum"]
    assert spectrum.kind == "spectrum" and [m for m, _ in spectrum.lines] == [str(i) for i in range(1, 11)]
    assert "Xiao" in spectrum.paper
    ncc = by_id["ncc-heldout_acc-profile"]
    assert ncc.kind == "profile" and "Galanti" in ncc.paper


def test_html_page_shows_every_panel_and_its_images_exist(one_run_report):
    with open(one_run_report.path, encoding="utf-8") as f:
        page = f.read()
    parser = _Images()
    parser.feed(page)
    out = os.path.dirname(one_run_report.path)
    assert parser.images, "no images on the page"
    for src in parser.images:
        assert not os.path.isabs(src) and os.path.isfile(os.path.join(out, src)), src
    assert sorted(parser.images) == sorted(one_run_report.files.values())
    for link in parser.links:  # every link is an in-page anchor or a PNG next to the page
        assert link.startswith("#") or os.path.isfile(os.path.join(out, link)), link
    # sections carry the probe's title and paper; the run legend names the run and its path
    headings = " ".join(parser.headings)
    for title in ("Neural tangent kernel", "Geometric complexity", "Effective rank", "Cost"):
        assert title in headings
    for paper in ("Baratin", "Dherin", "Huh", "Galanti", "Kunin", "Yao", "Barrett", "Şimşekli"):
        assert paper in page
    assert one_run_report.runs[0].path in page and one_run_report.runs[0].label in page


def test_two_runs_overlay_in_one_panel(two_run_report):
    full, other = two_run_report.runs
    assert full.label != other.label
    by_id = {p.id: p for p in two_run_report.panels}
    assert len(two_run_report.files) == len(two_run_report.panels)  # one PNG per panel, not per run
    gc = two_run_report.drawn["gc-logits"]
    assert gc == [full.label, other.label]
    # per-layer curves: every (run, layer); profiles: each run's own chosen steps
    drawn = two_run_report.drawn["rank-erank_features-per-layer"]
    assert sorted(drawn) == sorted(f"{r.label} {layer}" for r in (full, other) for layer in ("net.1", "net.3"))
    profile = two_run_report.drawn["rank-erank_features-profile"]
    assert {d.split(", step")[0] for d in profile} == {full.label, other.label}
    # a probe only the first run has is drawn for it alone
    assert two_run_report.drawn["hessian-top_eigenvalue"] == [full.label]
    assert by_id["hessian-trace"].bands  # trace ± its standard error
    # both runs in the legend of the page
    with open(two_run_report.path, encoding="utf-8") as f:
        page = f.read()
    assert full.path in page and other.path in page
    # and each in the legend of a single-quantity panel, under its own label
    fig, _ = render_panel(by_id["gc-logits"], two_run_report.runs)
    assert _legend_texts(fig) == [full.label, other.label]


def _legend_texts(fig) -> list[str]:
    legend = fig.axes[0].get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend is not None else []


def _write_run(logdir, scalars: dict, histograms: dict = ()):  # tag -> [(step, value)] / [(step, array)]
    writer = SummaryWriter(str(logdir))
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    for tag, points in dict(histograms).items():
        for step, values in points:
            writer.add_histogram(tag, np.asarray(values), step)
    writer.close()
    return str(logdir)


def test_unknown_probes_and_quantities_get_generic_panels(tmp_path):
    steps = range(0, 50, 10)
    logdir = _write_run(tmp_path / "run", {
        "biasprobe/freq/same_class/mean_frequency": [(s, 1.0 + s) for s in steps],
        "biasprobe/freq/different_class/mean_frequency": [(s, 2.0 + s) for s in steps],
        "biasprobe/newprobe/score": [(s, 0.5 * s) for s in steps],
        "biasprobe/newprobe/window": [(s, 8.0) for s in steps],
        "biasprobe/newprobe/seconds": [(s, 0.01) for s in steps],
        "biasprobe/newprobe/block/a/quantity": [(s, 1.0) for s in steps],
    }, {"biasprobe/newprobe/weights": [(s, np.random.default_rng(s).normal(size=200)) for s in steps]})
    report = write_report([logdir], str(tmp_path / "out"))
    sections = {s.key: s for s in report.sections}
    assert list(sections) == ["freq", "newprobe", "cost"]  # known probes first (catalog), then as logged
    freq = sections["freq"].panels
    # <group>/<quantity>: one panel with a curve per group, and no profile over depth
    assert [(p.kind, p.quantity) for p in freq] == [("curve", "mean_frequency")]
    assert [m for m, _ in freq[0].lines] == ["same_class", "different_class"] and "Fridovich-Keil" in freq[0].paper
    new = sections["newprobe"]
    assert new.title == "biasprobe/newprobe" and all(p.paper == "" for p in new.panels)
    assert [p.quantity for p in new.main] == ["score", "quantity", "weights"]
    assert [p.quantity for p in new.details] == ["window"]  # constant: drawn small
    assert [m for m, _ in new.main[1].lines] == ["block/a"]
    assert sections["cost"].panels[0].lines == [("newprobe", "biasprobe/newprobe/seconds")]
    covered = {t for p in report.panels for t in p.tags}
    assert len(covered) == 7


def test_log_axes_only_for_positive_quantities_spanning_decades(tmp_path):
    steps = list(range(0, 500, 25))
    logdir = _write_run(tmp_path / "run", {
        "biasprobe/toy/decaying": [(s, 10.0 ** (-s / 100)) for s in steps],  # 1 … 1e-4.75
        "biasprobe/toy/narrow": [(s, 1.0 + s / 500) for s in steps],  # 1 … 2
        "biasprobe/toy/signed": [(s, (s - 250) * 10.0) for s in steps],  # crosses zero
        "biasprobe/ntk/eigenvalue_1": [(s, 1e3) for s in steps],
        "biasprobe/ntk/eigenvalue_2": [(s, 1.0) for s in steps],
        "biasprobe/ntk/eigenvalue_3": [(s, 1e-2) for s in steps],
    })
    runs = read_runs([logdir])
    panels = {p.id: p for s in plan_sections(runs) for p in s.panels}
    scale = {pid: render_panel(panels[pid], runs)[0].axes[0].get_yscale() for pid in panels}
    assert scale["toy-decaying"] == "log" and scale["toy-narrow"] == "linear" and scale["toy-signed"] == "linear"
    assert scale["ntk-eigenvalue-spectrum"] == "log"
    # the NTK's log-spaced cadence: steps on a symlog axis that keeps step 0
    log_spaced = sorted({0} | {int(5 * 1.15 ** k) for k in range(40)})
    logdir2 = _write_run(tmp_path / "ntk", {"biasprobe/ntk/alignment": [(s, 0.1) for s in log_spaced]})
    runs2 = read_runs([logdir2])
    panel = plan_sections(runs2)[0].panels[0]
    assert render_panel(panel, runs2)[0].axes[0].get_xscale() == "symlog"
    assert spans_decades([np.array([1.0, 1e3])]) and not spans_decades([np.array([0.0, 1e3])])


def test_rebinned_histogram_keeps_its_mass_where_it_was():
    # buckets [0, 1] x2 and [1, 3] x2 onto unit bins: half in the first, a quarter in each other
    h = Histogram(0, np.array([0.0, 1.0, 3.0]), np.array([2.0, 2.0]))
    np.testing.assert_allclose(rebin(h, np.array([0.0, 1.0, 2.0, 3.0])), [0.5, 0.25, 0.25])
    # a zero-width bucket (all values equal) lands in one bin
    point = Histogram(0, np.array([2.5, 2.5]), np.array([7.0]))
    np.testing.assert_allclose(rebin(point, np.array([0.0, 1.0, 2.0, 3.0])), [0.0, 0.0, 1.0])


def test_histogram_read_back_from_tensorboard_matches_the_values(tmp_path):
    values = np.random.default_rng(0).exponential(size=5000)
    logdir = _write_run(tmp_path / "run", {"biasprobe/toy/x": [(0, 1.0)]}, {"biasprobe/toy/h": [(3, values)]})
    (h,) = read_runs([logdir])[0].histograms["biasprobe/toy/h"]
    assert h.step == 3 and h.total == 5000
    assert h.edges[0] == pytest.approx(values.min()) and h.edges[-1] == pytest.approx(values.max())
    grid = np.linspace(values.min(), values.max(), 11)
    expected = np.histogram(values, grid)[0] / len(values)
    np.testing.assert_allclose(rebin(h, grid), expected, atol=0.02)  # TensorBoard's buckets are ~10% wide


def test_steps_option_picks_the_nearest_logged_steps(tmp_path, capsys):
    assert choose_steps([0, 10, 20, 30, 100]) == [0, 30, 100]  # middle: nearest to half-way (50)
    assert choose_steps([0, 10, 20, 30, 100], [12, 14, 99]) == [10, 100]
    assert choose_steps([]) == []
    logdir = _write_run(tmp_path / "run", {f"biasprobe/rank/l{i}/erank": [(s, s + i) for s in (0, 10, 20, 30)]
                                           for i in range(3)})
    out = tmp_path / "out"
    assert main(["report", logdir, "--out", str(out), "--steps", "9,29"]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'index.html'}" in printed
    report = write_report([logdir], str(tmp_path / "out2"), steps=[9, 29])
    assert report.drawn["rank-erank-profile"] == ["step 10", "step 30"]
    with pytest.raises(SystemExit):
        main(["report", logdir, "--steps", "a,b"])
    assert "--steps" in capsys.readouterr().err


def test_no_probe_data_is_a_clear_message_not_an_empty_page(tmp_path, capsys):
    logdir = _write_run(tmp_path / "plain", {"train/loss": [(s, 1.0 / (s + 1)) for s in range(5)]})
    out = tmp_path / "out"
    with pytest.raises(ReportError, match="no biasprobe data.*train/loss.*Attach a probe"):
        write_report([logdir], str(out))
    assert not out.exists()
    assert main(["report", logdir, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no biasprobe data" in err and not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty), "--out", str(out)]) == 2
    assert "no TensorBoard event files" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_a_run_without_probe_data_beside_one_with_is_listed_not_drawn(tmp_path):
    plain = _write_run(tmp_path / "plain", {"train/loss": [(s, 1.0) for s in range(3)]})
    probed = _write_run(tmp_path / "probed", {"biasprobe/gc/logits": [(s, 1.0 + s) for s in range(3)]})
    report = write_report([plain, probed], str(tmp_path / "out"))
    assert [r.label for r in report.runs] == ["probed"] and [r.label for r in report.skipped] == ["plain"]
    with open(report.path, encoding="utf-8") as f:
        assert "no <code>biasprobe/</code> data" in f.read()


def test_every_probe_has_a_title_and_paper_in_the_catalog():
    from lightning_biasprobe.report.catalog import PROBE_CITATIONS, PROBE_TITLES

    for cls in lb.ALL_PROBES:  # a new probe adds its row to report/catalog.py (the report falls back without)
        assert cls.name in PROBE_TITLES and cls.name in PROBE_CITATIONS, cls.__name__
        title, paper = PROBE_TITLES[cls.name]
        assert title and paper and paper.split()[0] in PROBE_CITATIONS[cls.name]


def test_curve_panel_legend_names_every_run_by_its_own_label(tmp_path):
    # The runs of the bug report: four versions in one log directory and one in another. The legend
    # of a single-quantity panel used to repeat the last run's label for every curve.
    runs_dirs = [tmp_path / "tr" / f"version_{v}" for v in range(4)] + [tmp_path / "tr2" / "version_0"]
    for i, path in enumerate(runs_dirs):
        scalars = {"biasprobe/hessian/top_eigenvalue": [(s, 10.0 * (i + 1) + s) for s in (0, 5, 10)],
                   "biasprobe/rank/net.1/erank_features": [(s, 1.0 + i) for s in (0, 5, 10)],
                   "biasprobe/rank/net.3/erank_features": [(s, 2.0 + i) for s in (0, 5, 10)]}
        if i == 1:  # a run without a quantity is left out of that quantity's legend
            scalars["biasprobe/gc/logits"] = [(0, 1.0), (5, 2.0)]
        _write_run(path, scalars)
    runs = read_runs([str(tmp_path / "tr"), str(tmp_path / "tr2")])
    labels = [r.label for r in runs]
    assert labels == ["tr/version_0", "tr/version_1", "tr/version_2", "tr/version_3", "tr2/version_0"]
    panels = {p.id: p for s in plan_sections(runs) for p in s.panels}

    fig, drawn = render_panel(panels["hessian-top_eigenvalue"], runs)
    texts = _legend_texts(fig)
    assert texts == labels and len(set(texts)) == len(runs) and drawn == labels
    # each entry has the colour of its run's curve (the curves differ: 10, 20, ... at step 0)
    legend_colors = [h.get_color() for h in fig.axes[0].get_legend().legend_handles]
    by_start = {line.get_ydata()[0]: line.get_color() for line in fig.axes[0].get_lines()}
    assert legend_colors == [by_start[10.0 * (i + 1)] for i in range(len(runs))]

    fig, drawn = render_panel(panels["gc-logits"], runs)
    assert _legend_texts(fig) == drawn == ["tr/version_1"]
    # per-layer curves: layers by colour, then every run by its own label (line style)
    fig, _ = render_panel(panels["rank-erank_features-per-layer"], runs)
    assert _legend_texts(fig) == ["net.1", "net.3"] + labels


def test_profile_panels_fit_long_layer_names_inside_the_png(tmp_path):
    layers = [f"model.transformer.encoder.layers.{i}-mean" for i in range(3)] + ["model.head"]
    logdir = _write_run(tmp_path / "run", {f"biasprobe/rank/{layer}/erank_features": [(s, 1.0 + i + s)
                                                                                     for s in (0, 10, 20)]
                                           for i, layer in enumerate(layers)})
    report = write_report([logdir], str(tmp_path / "out"))
    panel = next(p for p in report.panels if p.kind == "profile")
    fig, _ = render_panel(panel, report.runs)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    ticks = [t for t in ax.get_xticklabels() if t.get_text()]
    assert len(ticks) == len(layers)
    for artist in [*ticks, *ax.get_yticklabels(), ax.xaxis.label, ax.yaxis.label]:
        box = artist.get_window_extent(renderer)
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height, \
            (artist.get_text(), box)
    # the labels are distinct, short, and say what was cut; the page's caption has the full names
    texts = [t.get_text() for t in ticks]
    assert len(set(texts)) == len(layers) and max(map(len, texts)) <= 23
    assert texts[-1] == "head" and texts[0].endswith("layers.0-mean")
    assert "'model.' removed" in ax.get_xlabel()
    with open(report.path, encoding="utf-8") as f:
        page = f.read()
    assert all(f"<code>{layer}</code>" in page for layer in layers)
    # the PNG on disk is drawn the same way and keeps the panel size
    path = tmp_path / "profile.png"
    draw_panel(panel, report.runs, str(path))
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_short_layer_names():
    assert short_names(["net.1", "net.3"]) == (["net.1", "net.3"], "")  # short names are kept
    names = ["model.transformer.encoder.layers.0-mean", "model.transformer.encoder.layers.1-mean"]
    assert short_names(names) == (["0-mean", "1-mean"], "model.transformer.encoder.layers.")
    short, prefix = short_names(["model.encoder.block.very_long_name_a.0", "model.decoder.block.very_long_name_a.0"])
    assert prefix == "model." and len(set(short)) == 2 and all(s.startswith("…") for s in short)
    assert short_names(["a" * 30]) == (["…" + "a" * 21], "")


def test_run_labels_keep_what_differs():
    assert run_labels(["/x/a/demo/version_0", "/x/b/demo/version_0"]) == ["a", "b"]
    assert run_labels(["/x/demo/version_0", "/x/demo/version_1"]) == ["version_0", "version_1"]
    assert run_labels(["/logs/demo/version_3"]) == ["demo/version_3"]
    assert run_labels(["/x/a", "/x/a"]) == ["a (1)", "a (2)"]


def test_without_matplotlib_the_report_names_the_plot_extra(tmp_path, monkeypatch, capsys):
    logdir = _write_run(tmp_path / "run", {"biasprobe/gc/logits": [(0, 1.0), (1, 2.0)]})
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingPlotExtra, match=r"lightning_biasprobe\[plot\]"):
        write_report([logdir], str(tmp_path / "out"))
    assert main(["report", logdir, "--out", str(tmp_path / "out")]) == 2
    assert "[plot]" in capsys.readouterr().err
    # the demo prints how to get the report instead of failing
    assert write_demo_report({"root": str(tmp_path), "logdir": logdir}) is None
    printed = capsys.readouterr().out
    assert "[plot]" in printed and f"biasprobe report {logdir} --out {tmp_path / 'report'}" in printed
    assert not (tmp_path / "out").exists() and not (tmp_path / "report").exists()


def test_docs_have_a_section_and_pictures_for_every_probe():
    # docs/probes.md: one section per probe, headed "## <Callback> (`<log name>`)", whose pictures
    # exist in docs/img (regenerated by docs/make_figures.py) and stay small.
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
    with open(os.path.join(root, "probes.md"), encoding="utf-8") as f:
        text = f.read()
    sections = dict(re.findall(r"^## (\w+) \(`(\w+)`\)$", text, flags=re.M))
    for cls in lb.ALL_PROBES:
        assert sections.get(cls.__name__) == cls.name, f"docs/probes.md has no section for {cls.__name__}"
    images = re.findall(r"!\[[^\]]*\]\((img/[^)]+\.png)\)", text)
    assert len(images) >= len(sections)
    for image in images:
        with open(os.path.join(root, image), "rb") as f:
            assert f.read(8) == PNG_MAGIC, image
    total = sum(os.path.getsize(os.path.join(root, "img", n)) for n in os.listdir(os.path.join(root, "img")))
    assert total < 1.5 * 2**20
