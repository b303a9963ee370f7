"""A seeded fit with every probe at every step ends bit-identical to the same fit without probes."""

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from helpers import BNDropoutNet, blobs, every_probe, loader, trainer


def fit(probes, *, accumulate=1, generator_seed=None, frozen=False, val=False, data=None):
    pl.seed_everything(0, verbose=False)
    model = BNDropoutNet(frozen_eval_layer=frozen)
    train = data if data is not None else loader(blobs(), generator_seed=generator_seed)
    t = trainer(probes, max_epochs=2, accumulate_grad_batches=accumulate,
                limit_val_batches=2 if val else 0, num_sanity_val_steps=0)
    t.fit(model, train, loader(blobs(seed=1), shuffle=False) if val else None)
    optimizer_state = t.optimizers[0].state_dict()
    return model, optimizer_state, torch.get_rng_state()


def assert_identical(a, b):
    model_a, opt_a, rng_a = a
    model_b, opt_b, rng_b = b
    for (name, pa), (_, pb) in zip(model_a.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(pa, pb), f"{name} differs"
    for (na, pa), (_, pb) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert pa.requires_grad == pb.requires_grad, na
    assert [m.training for m in model_a.modules()] == [m.training for m in model_b.modules()]
    for key in opt_a["state"]:
        for field, value in opt_a["state"][key].items():
            assert torch.equal(value, opt_b["state"][key][field]), f"optimizer state {key}.{field} differs"
    assert torch.equal(rng_a, rng_b)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_every_probe_at_every_step_leaves_training_bit_identical(accumulate):
    baseline = fit([], accumulate=accumulate)
    probes = every_probe(every_n_steps=1, num_samples=48)
    probed = fit(probes, accumulate=accumulate)
    assert_identical(baseline, probed)
    steps_per_run = 2 * 6 // accumulate
    for probe in probes:  # the probes did run at every step
        last = steps_per_run if probe.measures_final_weights else steps_per_run - 1
        assert probe.measured_steps == list(range(0, last + 1)), type(probe).__name__
        assert probe.failures == 0


def test_every_probe_at_its_defaults_budgets_included_leaves_training_bit_identical():
    """The default cadences, with the budgets that thin them (points and pre-step copies skipped or
    made depending on measured times), change nothing either."""
    baseline = fit([])
    probes = every_probe(num_samples=48)
    assert any(p.cadence.max_overhead is not None for p in probes)
    assert_identical(baseline, fit(probes))
    assert all(p.measured_steps[0] == 0 and p.measured_steps[-1] >= 11 and p.failures == 0 for p in probes)


def test_capture_from_a_shuffling_loader_with_its_own_generator_and_frozen_modules():
    baseline = fit([], generator_seed=123, frozen=True)
    probes = every_probe(every_n_steps=2)
    assert_identical(baseline, fit(probes, generator_seed=123, frozen=True))
    assert all(p.measured_steps for p in probes)


def test_validation_probe_set_leaves_training_identical():
    baseline = fit([], val=True)
    probes = every_probe(every_n_steps=3, probe_data="val", num_samples=40)
    assert_identical(baseline, fit(probes, val=True))
    assert all(len(p.probe_set) == 40 and p.probe_set.source == "val" for p in probes if p.needs_probe_set)


class Stream(IterableDataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __iter__(self):
        order = torch.randperm(len(self.dataset))  # draws from the global RNG, as streams do
        for i in order:
            yield self.dataset[i]


def test_iterable_dataset_probe_set_comes_from_passing_batches():
    stream = lambda: DataLoader(Stream(blobs()), batch_size=32)  # noqa: E731
    baseline = fit([], data=stream())
    probes = every_probe(every_n_steps=1, num_samples=48)
    assert_identical(baseline, fit(probes, data=stream()))
    for p in probes:
        assert p.failures == 0
        if p.needs_probe_set:
            assert len(p.probe_set) == 48 and p.probe_set.source == "train_batches"
            assert p.measured_steps[0] == 2  # the set fills at the second batch's start, after step 1
