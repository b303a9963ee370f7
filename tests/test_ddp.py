"""Probes under a real 2-process CPU DDP fit (gloo): rank zero measures and logs, rank one does not.

``strategy="ddp"`` re-launches the script per rank, so the fit runs in ``tests/ddp_fit.py`` in a
subprocess with a timeout: a probe that deadlocks the ranks fails the test instead of hanging CI.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_biasprobe import ALL_PROBES

import sklearn  # noqa: F401,E402  (the test extra installs it; the data are its bundled digits)

SCRIPT = Path(__file__).with_name("ddp_fit.py")
REPO_ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240

# Must agree with ddp_fit.py: 5 steps per epoch per rank, 3 epochs.
TOTAL_STEPS = 15
# Every probe with every_n_steps=2: at_start (step 0), every 2nd global step, at_end (step 15).
EXPECTED_STEPS = [0, 2, 4, 6, 8, 10, 12, 14, 15]



def expected_steps(name: str) -> list[int]:
    """Gradient-read probes have no point at the final weights (see ``measures_final_weights``)."""
    cls = next(c for c in ALL_PROBES if c.name == name)
    return EXPECTED_STEPS if cls.measures_final_weights else [s for s in EXPECTED_STEPS if s < TOTAL_STEPS]


# Variables that would make Lightning believe it runs inside an existing cluster / launcher.
_LAUNCHER_VARS = ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                  "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED", "PL_TRAINER_GPUS")
_LAUNCHER_PREFIXES = ("SLURM_", "TORCHELASTIC_", "LSB_", "OMPI_", "PMI_", "JSM_")


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCHER_VARS and not k.startswith(_LAUNCHER_PREFIXES)}
    env.update(
        PYTHONHASHSEED="0",
        OMP_NUM_THREADS="1",          # two ranks on a small machine: no thread oversubscription
        MKL_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
    )
    return env


def _run_script(out: Path) -> subprocess.CompletedProcess:
    """``subprocess.run(..., timeout=TIMEOUT_S)``, but on a timeout the whole process group is killed:
    Lightning's launcher starts rank 1 as a grandchild, which ``subprocess.run`` alone would leave
    running (stuck in a collective, holding the output pipes open)."""
    args = [sys.executable, str(SCRIPT), str(out)]
    with subprocess.Popen(args, cwd=out, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            pytest.fail(f"the DDP fit did not finish within {TIMEOUT_S} s (deadlock between ranks?)\n"
                        f"--- stdout ---\n{stdout[-4000:]}\n--- stderr ---\n{stderr[-4000:]}")
        except BaseException:  # e.g. KeyboardInterrupt: leave no rank behind
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    proc = _run_script(out)
    log = f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, f"the DDP fit exited with {proc.returncode}\n{log}"
    reports = {}
    for rank in range(2):
        path = out / f"rank{rank}.json"
        assert path.is_file(), f"rank {rank} wrote no report\n{log}"
        reports[rank] = json.loads(path.read_text())
    return out, reports


def test_both_ranks_ran_the_whole_fit(ddp_run):
    _, reports = ddp_run
    assert [reports[r]["global_rank"] for r in (0, 1)] == [0, 1]
    for r in (0, 1):
        assert reports[r]["world_size"] == 2
        assert reports[r]["global_step"] == TOTAL_STEPS
    # The probe's measurement on rank zero must not desynchronise the replicas.
    assert reports[0]["param_checksum"] == pytest.approx(reports[1]["param_checksum"], rel=0, abs=1e-9)


def test_rank_zero_measures_every_probe_on_cadence(ddp_run):
    _, reports = ddp_run
    assert set(reports[0]["probes"]) == {cls.name for cls in ALL_PROBES}
    for name, probe in reports[0]["probes"].items():
        assert probe["failures"] == 0, name
        assert probe["measured_steps"] == expected_steps(name), name
        assert probe["history_steps"] == expected_steps(name), name


def test_other_ranks_measure_nothing(ddp_run):
    _, reports = ddp_run
    for name, probe in reports[1]["probes"].items():
        assert probe["measured_steps"] == [] and probe["history_len"] == 0 and probe["failures"] == 0, name
        # Same configuration on every rank (the checkpoint key must agree across ranks).
        assert probe["state_key"] == reports[0]["probes"][name]["state_key"]


def test_csv_has_rows_exactly_at_rank_zero_steps(ddp_run):
    out, reports = ddp_run
    log_dir = Path(reports[0]["log_dir"])
    assert log_dir.is_relative_to(out)
    metrics_files = sorted(out.rglob("metrics.csv"))
    assert metrics_files == [log_dir / "metrics.csv"], "exactly one CSV log (rank zero's) expected"
    with open(metrics_files[0], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert "biasprobe/gc/logits" in rows[0]
    for name in reports[0]["probes"]:
        prefix = f"biasprobe/{name}/"
        columns = [c for c in rows[0] if c.startswith(prefix)]
        assert prefix + "seconds" in columns and len(columns) >= 2, name
        logged = [row for row in rows if row[prefix + "seconds"] not in ("", None)]
        assert [int(row["step"]) for row in logged] == expected_steps(name), name
        for row in logged:  # every quantity of the probe is logged, once, with a finite value
            for column in columns:
                assert math.isfinite(float(row[column])), (name, column, row)
        assert all(float(row[prefix + "seconds"]) >= 0 for row in logged)
    gc_values = [float(row["biasprobe/gc/logits"]) for row in rows if row["biasprobe/gc/logits"] not in ("", None)]
    assert len(gc_values) == len(EXPECTED_STEPS) and all(v > 0 for v in gc_values)
