"""HessianCurvature and GradientRegularization in the shared 2-process CPU DDP fit (``tests/ddp_fit.py``).

The fit has 15 optimizer steps and every probe measures with ``every_n_steps=2``. HessianCurvature
measures weights: at_start (step 0), every 2nd step, at_end (the final weights, step 15).
GradientRegularization reads the gradient of each optimizer step, taken at the weights of global
steps 0 .. 14; the final weights (step 15) have no training gradient, so its points are
0, 2, ..., 14 (the last optimizer step, 14, is already on the cadence).
"""

import csv
import math
from pathlib import Path

import pytest

from ddp_fit import LR
from test_ddp import _run_script

EXPECTED = {"hessian": [0, 2, 4, 6, 8, 10, 12, 14, 15], "igr": [0, 2, 4, 6, 8, 10, 12, 14]}


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    import json

    out = tmp_path_factory.mktemp("ddp_curvature")
    proc = _run_script(out)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return out, {r: json.loads((out / f"rank{r}.json").read_text()) for r in range(2)}


def test_rank_zero_measures_on_cadence_and_rank_one_measures_nothing(ddp_run):
    _, reports = ddp_run
    assert reports[0]["param_checksum"] == pytest.approx(reports[1]["param_checksum"], rel=0, abs=1e-9)
    for name, steps in EXPECTED.items():
        probe = reports[0]["probes"][name]
        assert probe["failures"] == 0, name
        assert probe["measured_steps"] == steps and probe["history_steps"] == steps, name
        other = reports[1]["probes"][name]
        assert other["measured_steps"] == [] and other["history_len"] == 0 and other["failures"] == 0, name
        assert other["state_key"] == probe["state_key"]


def test_csv_rows_are_at_those_steps_with_finite_values(ddp_run):
    out, reports = ddp_run
    with open(Path(reports[0]["log_dir"]) / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for name, steps in EXPECTED.items():
        prefix = f"biasprobe/{name}/"
        columns = [c for c in rows[0] if c.startswith(prefix)]
        logged = [row for row in rows if row[prefix + "seconds"] not in ("", None)]
        assert [int(row["step"]) for row in logged] == steps, name
        for row in logged:
            assert all(math.isfinite(float(row[c])) for c in columns), (name, row)
    igr = [row for row in rows if row["biasprobe/igr/seconds"] not in ("", None)]
    # plain SGD at lr LR in the demo module: igr_term = (LR / 4) * grad_norm_sq
    for row in igr:
        assert float(row["biasprobe/igr/lr"]) == pytest.approx(LR)
        norm_sq = float(row["biasprobe/igr/grad_norm_sq"])
        assert float(row["biasprobe/igr/igr_term"]) == pytest.approx(LR / 4 * norm_sq, rel=1e-9)
    hessian = [row for row in rows if row["biasprobe/hessian/seconds"] not in ("", None)]
    assert all(float(row["biasprobe/hessian/top_eigenvalue"]) > 0 for row in hessian)
