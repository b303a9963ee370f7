"""The probes attach unchanged to Lightning's demo Transformer; the ones that cannot apply say why."""

import lightning_biasprobe as lb

from helpers import load_example


def test_every_applicable_probe_measures_the_demo_transformer(tmp_path):
    example = load_example("transformer_probes")
    report = example.main(max_steps=6, every_n_steps=3, out=str(tmp_path), quiet=True, width=32)
    names = {cls.__name__ for cls in lb.ALL_PROBES}
    assert report["failed"] == {}
    assert set(report["not_applicable"]) | set(report["measured"]) == names
    assert "GeometricComplexity" in report["not_applicable"]
    assert all("token" in reason or "between two token sequences" in reason
               for reason in report["not_applicable"].values())
    for name, values in report["measured"].items():
        assert any(not k.endswith("seconds") for k in values), name
    rank_keys = report["measured"]["EffectiveRank"]
    assert any("encoder.layers.1-mean/" in k for k in rank_keys)  # sequences mean-pooled, per layer
    assert list(tmp_path.rglob("events.out.tfevents.*"))
