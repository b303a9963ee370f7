"""EarlyStopping and ModelCheckpoint watch probe values: the example stops for the right reason."""

from pathlib import Path

from helpers import load_example


def test_training_stops_at_the_first_epoch_whose_sharpness_passes_the_threshold(tmp_path):
    from pytorch_lightning.callbacks.early_stopping import EarlyStoppingReason

    example = load_example("early_stopping_on_sharpness")
    result = example.main(threshold=5.0, max_epochs=12, out=str(tmp_path), quiet=True)
    history = result["sharpness_history"]
    epoch_end_values = history[1:]  # step 0 is the at_start point; then one point per epoch end
    first_above = next(i for i, (_, value) in enumerate(epoch_end_values) if value > 5.0)
    assert all(value <= 5.0 for _, value in epoch_end_values[:first_above])
    assert result["stopped_epoch"] == first_above < 11  # stopped early, at that very epoch
    assert "biasprobe/hessian/top_eigenvalue" in result["reason"] and "5.0" in result["reason"]
    # the threshold stopped it, not patience or a missing metric
    assert result["reason_code"] == EarlyStoppingReason.DIVERGENCE_THRESHOLD.value
    assert Path(result["best_checkpoint"]).exists() and result["best_gc"] > 0
