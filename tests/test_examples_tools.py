"""Shortened runs of the seed-paper examples reproduce each qualitative result.

``examples/spectral_bias_hat_vs_relu.py`` (Hong et al. 2022; Yu, Yang, Townsend 2023) and
``examples/simplicity_bias_lms.py`` (Shah et al. 2020) expose ``main(..., quiet=True)``, which
returns the numbers they print.
"""

import pytest

from helpers import load_example as load


@pytest.fixture(scope="module")
def spectral():
    return load("spectral_bias_hat_vs_relu").main(steps=1500, quiet=True)


@pytest.fixture(scope="module")
def simplicity():
    return load("simplicity_bias_lms").main(epochs=8, quiet=True)


def test_relu_learns_low_frequencies_first_and_hat_all_at_once(spectral):
    relu, hat = spectral["runs"]["relu"], spectral["runs"]["hat"]
    # ReLU: k = 1 within a few dozen steps, k = 16 not at all in 1500 steps.
    assert relu["learned_at"][1] is not None and relu["learned_at"][1] < 100
    assert relu["learned_at"][16] is None and relu["final"][16] > 0.5
    # Hat: every frequency learned, the slowest within twice the fastest's steps, and the fit is good.
    steps = [hat["learned_at"][k] for k in (1, 4, 16)]
    assert None not in steps and max(steps) < 2 * min(steps)
    assert hat["mse"] < 1e-2 < relu["mse"]
    for claim in ("relu learns low frequencies first", "hat learns every frequency at a similar pace"):
        ok, detail = spectral["checks"][claim]
        assert ok, detail


def test_sobolev_order_moves_the_high_frequency(spectral):
    runs = spectral["runs"]
    for claim in ("sobolev s=1 speeds up the highest frequency", "sobolev s=-1 slows the higher frequencies"):
        ok, detail = spectral["checks"][claim]
        assert ok, detail
    assert runs["relu_sobolev_s=1"]["final"][16] < runs["relu"]["final"][16] < runs["relu_sobolev_s=-1"]["final"][16]


def test_mlp_on_lms5_relies_on_the_linear_coordinate_only(simplicity):
    final = simplicity["lms"]["final"]
    assert final["accuracy"] > 0.99 and final["sc_randomized_accuracy"] > 0.98
    assert abs(final["s_randomized_accuracy"] - 0.5) < 0.06
    control = simplicity["control"]["final"]
    assert control["accuracy"] > 0.9 and control["s_randomized_accuracy"] > 0.9
    assert abs(control["sc_randomized_accuracy"] - 0.5) < 0.06
    for claim, (ok, detail) in simplicity["checks"].items():
        assert ok, f"{claim}: {detail}"
    # The probe measured from the start (an untrained model is near chance) at log-spaced steps.
    steps = [step for step, _ in simplicity["lms"]["curve"]]
    assert steps[0] == 0 and steps == sorted(steps) and len(steps) > 10
    assert simplicity["lms"]["curve"][0][1]["accuracy"] < 0.8
