"""examples/function_frequency_digits.py, shortened: one seed instead of three; the qualitative result holds."""

import pytest
import torch

import sklearn  # noqa: F401  (the test extra installs it; the data are its bundled digits)

from helpers import load_example


@pytest.fixture(scope="module")
def example():
    return load_example("function_frequency_digits")


def test_the_frequency_curves_on_digits_show_the_papers_qualitative_result(example, capsys):
    previous = torch.get_num_threads()
    try:
        result = example.run(steps=1840, seeds=(0,), verbose=True)
    finally:
        torch.set_num_threads(previous)
    printed = capsys.readouterr().out
    assert "## Curves" in printed and "## Qualitative checks" in printed
    for claim, holds, numbers in result["checks"]:
        assert holds, f"{claim}: {numbers}"
    assert len(result["checks"]) == 7
    full = result["full"][0]
    # Log-spaced points from step 0 to the end, and the curve of the between-class frequency rises
    # overall: its last third is above its first third.
    steps = [step for step, _ in full["curve"]]
    assert steps[0] == 0 and steps[-1] == 1840 and len(steps) > 20
    between = [values["different_class/mean_frequency"] for _, values in full["curve"]]
    third = len(between) // 3
    assert min(between[-third:]) > max(between[:third])
