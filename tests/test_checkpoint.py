"""Probe state in Lightning checkpoints: saved under ``state_key``, restored into a NEW instance
with the same arguments on ``fit(ckpt_path=...)``, and not given to a probe with other arguments.

Setup: 40 digits examples, batch 8, ``shuffle=True`` -> 5 optimizer steps per epoch. Epoch 1
ends at global step 5, epoch 2 at global step 10.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

import lightning_biasprobe.callbacks.base as probe_base
from lightning_biasprobe import GeometricComplexity

import sklearn  # noqa: F401,E402  (the test extra installs it; the data are its bundled digits)
from lightning_biasprobe.cli.demo import demo_module, digits_tensors  # noqa: E402

NUM_EXAMPLES = 40
BATCH_SIZE = 8
STEPS_PER_EPOCH = NUM_EXAMPLES // BATCH_SIZE   # 5
NUM_SAMPLES = 16                               # a proper subset: the indices mean something
SEED = 0


@pytest.fixture(scope="module")
def dataset() -> TensorDataset:
    train, _ = digits_tensors(SEED)
    return TensorDataset(*train[:NUM_EXAMPLES])


def gc(**kwargs) -> GeometricComplexity:
    kwargs.setdefault("num_samples", NUM_SAMPLES)
    return GeometricComplexity(**kwargs)


def fit(dataset, callbacks: list, max_epochs: int, root: Path, ckpt_path: Optional[Path] = None) -> pl.Trainer:
    pl.seed_everything(SEED, verbose=False)
    has_checkpointing = any(isinstance(cb, ModelCheckpoint) for cb in callbacks)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=max_epochs, callbacks=callbacks, logger=False,
        default_root_dir=root, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=has_checkpointing, num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(demo_module(width=16), DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True),
                ckpt_path=None if ckpt_path is None else str(ckpt_path))
    return trainer


def cadence_steps(every_n_steps: int, after: int, last: int) -> list[int]:
    """Steps a probe measures at in a run resumed at global step ``after`` that ends at ``last``."""
    steps = [s for s in range(after + 1, last + 1) if s % every_n_steps == 0]
    return steps if steps and steps[-1] == last else steps + [last]


def load(path: Path) -> dict:
    # weights_only=True, as Lightning itself loads on resume with torch >= 2.6: the probe state
    # must consist of plain containers, numbers, strings and tensors.
    return torch.load(path, map_location="cpu", weights_only=True)


class LoadSpy:
    """Records the states Lightning hands to a probe's ``load_state_dict``."""

    def __init__(self, probe) -> None:
        self.calls: list[dict] = []
        original = probe.load_state_dict

        def spy(state):
            self.calls.append(state)
            return original(state)

        probe.load_state_dict = spy


@pytest.fixture
def read_spy(monkeypatch):
    """Records the ``indices=`` every probe-set read from a map-style dataset was given."""
    calls: list = []
    original = probe_base.read_map_dataset

    def spy(*args, **kwargs):
        calls.append(kwargs.get("indices"))
        return original(*args, **kwargs)

    monkeypatch.setattr(probe_base, "read_map_dataset", spy)
    return calls


def first_epoch(dataset, root: Path, how: str, callbacks: list) -> tuple[Path, pl.Trainer]:
    """Fit one epoch with ``callbacks``; the checkpoint is written by ModelCheckpoint at the end of
    the training epoch (before ``on_train_end``) or by ``trainer.save_checkpoint`` after fit."""
    if how == "model_checkpoint":
        checkpoint = ModelCheckpoint(dirpath=root / "ckpt", filename="first", save_on_train_epoch_end=True)
        trainer = fit(dataset, callbacks + [checkpoint], 1, root)
        path = root / "ckpt" / "first.ckpt"
    else:
        trainer = fit(dataset, callbacks, 1, root)
        path = root / "after_fit.ckpt"
        trainer.save_checkpoint(path)
    assert trainer.global_step == STEPS_PER_EPOCH
    assert path.is_file()
    return path, trainer


# In the first epoch GeometricComplexity(every_n_steps=3) measures at 0 (at_start) and 3, then at 5
# in on_train_end. ModelCheckpoint saves at the end of the training epoch, before on_train_end;
# trainer.save_checkpoint after fit sees the at_end point too.
SAVED_STEPS = {"model_checkpoint": [0, 3], "save_checkpoint": [0, 3, 5]}


@pytest.mark.parametrize("how", ["model_checkpoint", "save_checkpoint"])
def test_resume_continues_measured_steps_and_probe_set(dataset, tmp_path, read_spy, how):
    original = gc(every_n_steps=3)
    path, _ = first_epoch(dataset, tmp_path, how, [original])
    assert original.measured_steps == [0, 3, 5]
    assert original.failures == 0
    first_set = original.probe_set
    assert first_set is not None and first_set.indices is not None and first_set.source == "train"
    assert len(first_set.indices) == NUM_SAMPLES
    assert first_set.indices != list(range(NUM_SAMPLES)), "expected a stratified (non-prefix) choice"
    assert read_spy == [None], "the first run chooses its probe set itself"

    # The state is in the checkpoint under the probe's state_key, and it is loadable with weights_only.
    checkpoint = load(path)
    assert original.state_key in checkpoint["callbacks"]
    state = checkpoint["callbacks"][original.state_key]
    saved = SAVED_STEPS[how]
    assert state["measured_steps"] == saved
    assert state["probe"]["indices"] == first_set.indices
    assert state["probe"]["tensors"] is None, "a map-style probe set is saved as indices, not tensors"

    # A NEW instance with the same arguments resumes for a second epoch.
    resumed = gc(every_n_steps=3)
    assert resumed.state_key == original.state_key
    spy = LoadSpy(resumed)
    trainer = fit(dataset, [resumed], 2, tmp_path, ckpt_path=path)
    assert trainer.global_step == 2 * STEPS_PER_EPOCH
    assert len(spy.calls) == 1 and spy.calls[0]["measured_steps"] == saved

    steps = resumed.measured_steps
    assert steps[:len(saved)] == saved, "the resumed list must start with the checkpointed steps"
    assert len(steps) == len(set(steps)) and steps == sorted(steps), f"duplicate or unordered steps: {steps}"
    new = steps[len(saved):]
    assert new == cadence_steps(3, after=STEPS_PER_EPOCH, last=2 * STEPS_PER_EPOCH) == [6, 9, 10]
    assert resumed.failures == 0
    # What this run logged is the tail of measured_steps (history itself is not checkpointed).
    history_steps = [s for s, _ in resumed.history]
    assert history_steps and steps[-len(history_steps):] == history_steps
    assert set(resumed.last_values) == {"biasprobe/gc/logits", "biasprobe/gc/seconds"}

    # The probe set was re-read from the saved indices and is identical to the original.
    assert read_spy == [None, first_set.indices]
    restored = resumed.probe_set
    assert restored is not None and restored.source == "train"
    assert restored.indices == first_set.indices
    assert torch.equal(restored.inputs, first_set.inputs)
    assert torch.equal(restored.targets, first_set.targets)


@pytest.mark.parametrize("other_kwargs", [
    dict(every_n_steps=4),
    dict(every_n_steps=3, output="probs"),
    dict(every_n_steps=3, num_samples=8),
], ids=["every_n_steps=4", "output=probs", "num_samples=8"])
def test_probe_with_other_arguments_gets_no_state(dataset, tmp_path, other_kwargs):
    original = gc(every_n_steps=3)
    path, _ = first_epoch(dataset, tmp_path, "model_checkpoint", [original])
    assert list(load(path)["callbacks"]).count(original.state_key) == 1

    other = gc(**other_kwargs)
    assert other.state_key != original.state_key
    assert other.state_key not in load(path)["callbacks"]
    spy = LoadSpy(other)
    with pytest.warns(UserWarning, match="callbacks used to create the checkpoint") as caught:
        fit(dataset, [other], 2, tmp_path, ckpt_path=path)
    # Lightning names the unmatched state: the original probe's key.
    assert any(original.state_key in str(w.message) for w in caught)
    assert spy.calls == [], "a probe with other arguments must not receive the saved state"
    # It starts afresh from the resume point: none of the first run's steps, no at_start point.
    every = other_kwargs["every_n_steps"]
    assert other.measured_steps == cadence_steps(every, after=STEPS_PER_EPOCH, last=2 * STEPS_PER_EPOCH)
    assert other.failures == 0
    assert other.probe_set is not None and len(other.probe_set) == other.num_samples


def test_two_probes_have_distinct_keys_and_both_round_trip(dataset, tmp_path):
    every3 = gc(every_n_steps=3)
    every2 = gc(every_n_steps=2, output="probs", name="gc_probs")
    assert every3.state_key != every2.state_key
    path, _ = first_epoch(dataset, tmp_path, "model_checkpoint", [every3, every2])
    states = load(path)["callbacks"]
    assert states[every3.state_key]["measured_steps"] == [0, 3]
    assert states[every2.state_key]["measured_steps"] == [0, 2, 4]

    # New instances, listed in the other order: states are matched by key, not by position.
    new2 = gc(every_n_steps=2, output="probs", name="gc_probs")
    new3 = gc(every_n_steps=3)
    spies = {"every2": LoadSpy(new2), "every3": LoadSpy(new3)}
    fit(dataset, [new2, new3], 2, tmp_path, ckpt_path=path)
    assert [c["measured_steps"] for c in spies["every3"].calls] == [[0, 3]]
    assert [c["measured_steps"] for c in spies["every2"].calls] == [[0, 2, 4]]
    assert new3.measured_steps == [0, 3] + cadence_steps(3, after=5, last=10) == [0, 3, 6, 9, 10]
    assert new2.measured_steps == [0, 2, 4] + cadence_steps(2, after=5, last=10) == [0, 2, 4, 6, 8, 10]
    assert set(new2.last_values) == {"biasprobe/gc_probs/probs", "biasprobe/gc_probs/seconds"}
    assert set(new3.last_values) == {"biasprobe/gc/logits", "biasprobe/gc/seconds"}
    for old, new in ((every3, new3), (every2, new2)):
        assert new.probe_set.indices == old.probe_set.indices
        assert torch.equal(new.probe_set.inputs, old.probe_set.inputs)
