"""The example LightningCLI configs run in both namespaces; --help explains every probe argument."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

CLI = Path(__file__).resolve().parents[1] / "examples" / "cli"
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def run(*args, cwd):
    done = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("script, config", [("train.py", "config.yaml"), ("train_lightning.py", "config_lightning.yaml")])
def test_example_config_runs_with_every_configured_probe(script, config, tmp_path):
    run(CLI / script, "fit", "--config", CLI / config, "--trainer.max_epochs=1", "--trainer.limit_train_batches=4",
        f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_checkpointing=false", cwd=tmp_path)
    [event_dir] = {p.parent for p in tmp_path.rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(event_dir))
    events.Reload()
    probes = {tag.split("/")[1] for tag in events.Tags()["scalars"] if tag.startswith("biasprobe/")}
    assert probes == {"gc", "hessian", "ntk", "ncc", "diffusion"}
    assert [e.step for e in events.Scalars("biasprobe/hessian/eigenvalue_3")][0] == 0  # init_args reached the probe
    assert "biasprobe/ncc/effective_depth" in events.Tags()["scalars"]


def test_help_and_print_config_explain_the_probe_arguments(tmp_path):
    text = run(CLI / "train.py", "fit", "--trainer.callbacks.help", "lightning_biasprobe.HessianCurvature", cwd=tmp_path)
    text = text.split("Help for", 1)[1]  # past the usage line
    for argument, words in [("k", "eigenvalues"), ("every_n_steps", "optimizer step"),
                            ("mode", "Literal['eval', 'train']"), ("max_overhead", "fraction"),
                            ("density_runs", "SLQ")]:
        block = text.split(f"--trainer.callbacks.{argument} ")[1].split("--trainer.callbacks.")[0]
        assert words in " ".join(block.split()), (argument, block)


def test_every_probe_argument_is_typed_and_documented_one_per_line():
    # What LightningCLI shows in --help: Google-style "Args:" entries, one per argument.
    import inspect

    import docstring_parser

    import lightning_biasprobe as lb
    from lightning_biasprobe.callbacks.base import ProbeLogic

    shared = {p.arg_name: p.description for p in docstring_parser.parse(ProbeLogic.__doc__).params}
    for cls in lb.ALL_PROBES:
        own = {p.arg_name: p.description for p in docstring_parser.parse(cls.__doc__).params}
        for name, parameter in inspect.signature(cls.__init__).parameters.items():
            if name in ("self", "kwargs"):
                continue
            assert parameter.annotation is not inspect.Parameter.empty, (cls.__name__, name)
            assert (own.get(name) or "").strip(), f"{cls.__name__}({name}=...) has no docstring entry"
        for name in inspect.signature(ProbeLogic.__init__).parameters:
            if name != "self":
                assert (shared.get(name) or "").strip(), f"ProbeLogic({name}=...) has no docstring entry"
