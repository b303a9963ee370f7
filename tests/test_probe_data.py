"""Reading the fixed probe set: by index, class-balanced, batched fetch, explicit loaders."""

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_biasprobe.callbacks._data import default_unpack, read_loader, read_map_dataset, stratified_positions


def test_stratified_positions_are_balanced_and_in_data_order():
    targets = torch.tensor([0] * 50 + [1] * 5 + [2] * 30)
    pos = stratified_positions(targets, 12)
    counts = torch.bincount(targets[pos], minlength=3).tolist()
    assert counts == [4, 4, 4] and pos.tolist() == sorted(pos.tolist())
    pos = stratified_positions(targets, 30)  # class 1 runs out: the others fill its place
    assert torch.bincount(targets[pos], minlength=3).tolist() == [13, 5, 12]


class BatchedFetch(Dataset):
    def __init__(self, n=100):
        self.x, self.y = torch.randn(n, 3), torch.arange(n) % 4
        self.single_reads = 0

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        self.single_reads += 1
        return self.x[i], self.y[i]

    def __getitems__(self, ids):
        return [(self.x[i], self.y[i]) for i in ids]


def test_map_dataset_reading_uses_batched_fetch_and_balances_classes():
    data = BatchedFetch()
    probe = read_map_dataset(DataLoader(data, batch_size=10, shuffle=True), 20, default_unpack)
    assert data.single_reads == 0
    assert torch.bincount(probe.targets).tolist() == [5, 5, 5, 5]
    assert torch.equal(probe.inputs, data.x[probe.indices])
    again = read_map_dataset(DataLoader(data, batch_size=10), 20, default_unpack, indices=probe.indices)
    assert torch.equal(again.inputs, probe.inputs) and torch.equal(again.targets, probe.targets)


def test_first_examples_without_stratification_and_from_an_explicit_loader():
    data = TensorDataset(torch.arange(30.0).unsqueeze(1), torch.arange(30) % 3)
    probe = read_map_dataset(DataLoader(data, batch_size=4), 7, default_unpack, stratify=False)
    assert probe.indices == list(range(7)) and probe.inputs.flatten().tolist() == list(range(7))
    from_loader = read_loader(DataLoader(data, batch_size=4), 10, default_unpack)
    assert len(from_loader) == 10 and from_loader.inputs.flatten().tolist() == list(range(10))


def test_tensor_dataset_fast_path_equals_collating_examples():
    data = TensorDataset(torch.randn(60, 4), torch.arange(60) % 5)
    fast = read_map_dataset(DataLoader(data, batch_size=8), 20, default_unpack)
    slow = read_map_dataset(DataLoader(data, batch_size=8, collate_fn=lambda b: torch.utils.data.default_collate(b)),
                            20, default_unpack)
    assert fast.indices == slow.indices
    assert torch.equal(fast.inputs, slow.inputs) and torch.equal(fast.targets, slow.targets)
    assert torch.bincount(fast.targets).tolist() == [4, 4, 4, 4, 4]
