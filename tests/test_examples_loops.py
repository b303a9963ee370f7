"""The plain-PyTorch and Fabric loop examples run and log every probe they attach."""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import load_example


@pytest.mark.parametrize("name, probes", [("plain_loop", {"gc", "hessian", "ntk", "diffusion"}),
                                          ("fabric_loop", {"gc", "noise", "igr", "rank"})])
def test_loop_example_logs_every_probe(name, probes, tmp_path):
    values = load_example(name).main(epochs=1, out=str(tmp_path), quiet=True)
    assert {key.split("/")[1] for key in values} == probes
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    logged = {tag.split("/")[1] for tag in events.Tags()["scalars"]}
    assert logged == probes
    assert len(events.Scalars("biasprobe/gc/logits")) >= 2  # at the start and at its cadence
    if name == "fabric_loop":  # layer names as the user wrote them, not Fabric's wrapper's
        assert not any("_forward_module" in key for key in values)
