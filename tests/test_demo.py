"""The demo runs end to end (shortened) and prints the table and the tensorboard line."""

import glob
import subprocess
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import lightning_biasprobe as lb
from lightning_biasprobe.cli import main


def test_demo_command_trains_logs_every_probe_and_prints_the_summary(tmp_path, capsys):
    out = tmp_path / "logs"
    assert main(["demo", "--out", str(out), "--epochs", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"tensorboard --logdir {out}" in printed
    assert "biasprobe/gc/logits" in printed and "biasprobe/gc/seconds" in printed
    event_dirs = glob.glob(str(out / "demo" / "version_*"))
    assert len(event_dirs) == 1
    events = EventAccumulator(event_dirs[0])
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for probe in lb.ALL_PROBES:  # every probe that exists is in the demo and logged something
        assert any(t.startswith(f"biasprobe/{probe.name}/") for t in tags), probe.__name__
    steps = [e.step for e in events.Scalars("biasprobe/gc/logits")]
    # start and end always; epoch ends unless GC's default 5% budget thinned them
    assert steps[0] == 0 and steps == sorted(steps) and 2 <= len(steps) <= 3
    # the demo ends with the HTML report of its run, and prints where it is
    page = out / "report" / "index.html"
    assert page.is_file() and f"  {page}" in printed.splitlines()
    assert len(list((out / "report").glob("*.png"))) > 20


def test_python_dash_m_entry_point(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lightning_biasprobe", "demo", "--out", str(tmp_path),
                             "--epochs", "1", "--no-progress", "--no-report"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tensorboard --logdir" in result.stdout and "biasprobe/gc/logits" in result.stdout
    assert not (tmp_path / "report").exists()  # --no-report


def test_the_demo_keeps_the_default_schedules_without_their_budgets():
    from lightning_biasprobe.cli.demo import default_probes

    budgeted = [cls for cls in lb.ALL_PROBES if "max_overhead" in cls.default_cadence]
    assert {cls.__name__ for cls in budgeted} >= {"GeometricComplexity", "FunctionFrequency", "WeightDiffusion"}
    for shown, kept in zip(default_probes(), default_probes(budgets=True)):
        expected = {k: v for k, v in type(shown).default_cadence.items() if k != "max_overhead"}
        assert shown.cadence.max_overhead is None
        assert kept.cadence.max_overhead == type(kept).default_cadence.get("max_overhead")
        for key, value in expected.items():
            assert getattr(shown.cadence, key) == getattr(kept.cadence, key) == value
