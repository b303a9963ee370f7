"""Statistics accumulated over a 2-process DDP validation epoch equal one process on all the data.

The fit runs in ``tests/ddp_ncc_fit.py`` (``strategy="ddp"`` re-launches the script per rank), in
its own process group with a timeout, as ``tests/test_ddp.py`` does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_biasprobe.cli.demo import demo_module
from lightning_biasprobe.functional.ncc import ncc_profile
from lightning_biasprobe.functional.rank import layer_spectra, rank_measures

sys.path.insert(0, str(Path(__file__).parent))
import ddp_ncc_fit  # noqa: E402

SCRIPT = Path(__file__).with_name("ddp_ncc_fit.py")
REPO_ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240
_LAUNCHER_VARS = ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                  "MASTER_ADDR", "MASTER_PORT", "PL_GLOBAL_SEED", "PL_TRAINER_GPUS")
_LAUNCHER_PREFIXES = ("SLURM_", "TORCHELASTIC_", "LSB_", "OMPI_", "PMI_", "JSM_")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_ncc")
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS and not k.startswith(_LAUNCHER_PREFIXES)}
    env.update(PYTHONHASHSEED="0", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])))
    with subprocess.Popen([sys.executable, str(SCRIPT), str(out)], cwd=out, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # rank 1 is a grandchild: kill the whole group
            stdout, stderr = proc.communicate()
            pytest.fail(f"the DDP fit did not finish within {TIMEOUT_S} s (a collective out of order?)\n"
                        f"{stdout[-3000:]}\n{stderr[-3000:]}")
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert proc.returncode == 0, f"the DDP fit exited with {proc.returncode}\n{stdout[-3000:]}\n{stderr[-5000:]}"
    reports = {r: json.loads((out / f"rank{r}.json").read_text()) for r in range(2)}
    model = demo_module(width=32)
    model.load_state_dict(torch.load(out / "final.pt"))
    return reports, model.eval()


def test_held_out_ncc_accuracy_over_two_ranks_equals_one_process_on_all_validation_data(ddp_run):
    reports, model = ddp_run
    assert [reports[r]["world_size"] for r in (0, 1)] == [2, 2]
    ncc = reports[0]["probes"]["ncc"]
    assert ncc["failures"] == 0
    # at_start, then the validation at each epoch end (5 steps per epoch per rank).
    assert ncc["measured_steps"] == [0, 5, 10]
    assert reports[1]["probes"]["ncc"]["history"] == []  # rank one accumulates but does not log
    train, val = ddp_ncc_fit.data()
    indices = ncc["indices"]
    x, y = train.tensors[0][indices], train.tensors[1][indices]
    profile = ncc_profile(model, x, y, heldout_inputs=val.tensors[0], heldout_targets=val.tensors[1])
    step, logged = ncc["history"][-1]
    assert step == 10
    for i, layer in enumerate(profile.layers):
        # Accuracies are ratios of counts over 64 examples: exactly equal, not approximately.
        assert logged[f"biasprobe/ncc/{layer}/heldout_acc"] == pytest.approx(profile.heldout_accuracy[i].item(),
                                                                             abs=1e-12)
        assert logged[f"biasprobe/ncc/{layer}/train_acc"] == pytest.approx(profile.train_accuracy[i].item(), abs=1e-12)
    assert logged["biasprobe/ncc/effective_depth"] == profile.effective_depth


def test_rank_statistics_over_two_ranks_equal_one_process_on_all_validation_data(ddp_run):
    reports, model = ddp_run
    rank = reports[0]["probes"]["rank_val"]
    assert rank["failures"] == 0 and rank["measured_steps"] == [5, 10]
    _, val = ddp_ncc_fit.data()
    spectra = layer_spectra(model, val.tensors[0], max_dim=16)
    step, logged = rank["history"][-1]
    assert step == 10
    for layer, spectrum in spectra.items():
        for quantity, value in rank_measures(spectrum.singular_values, spectrum.centered_singular_values).items():
            # float32 features from batches of 8 (two ranks) and of 64 (here): float32 rounding only.
            assert logged[f"biasprobe/rank_val/{layer}/{quantity}"] == pytest.approx(float(value), rel=1e-5)
