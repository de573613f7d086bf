"""ftkit.loop: accumulation windows and best-metric bookkeeping."""

import os
from types import SimpleNamespace

import pytest

from ftkit import loop
from ftkit.config import ConfigError


def test_accumulation_windows_are_complete():
    assert list(loop.accumulation_windows(range(7), 3)) == [[0, 1, 2], [3, 4, 5]]


def _config(metric, greater=None):
    return SimpleNamespace(output_dir="out", metric_for_best_model=metric, greater_is_better=greater)


def test_record_eval_tracks_the_best_by_direction():
    state = {"global_step": 1}
    config = _config("loss")  # lower is better for *loss
    assert loop.record_eval(state, {"eval/loss": 0.5}, config)
    state["global_step"] = 2
    assert not loop.record_eval(state, {"eval/loss": 0.7}, config)
    state["global_step"] = 3
    assert loop.record_eval(state, {"eval/loss": 0.4}, config)
    assert (state["best_metric"], state["best_step"]) == (0.4, 3)
    assert state["best_checkpoint"].endswith(os.path.join("checkpoints", "step_3"))
    up = {"global_step": 1}
    loop.record_eval(up, {"eval/accuracy": 0.5}, _config("accuracy"))
    up["global_step"] = 2
    assert loop.record_eval(up, {"eval/accuracy": 0.6}, _config("accuracy"))


def test_unknown_best_metric_names_the_computed_ones():
    with pytest.raises(ConfigError, match=r"metric_for_best_model: 'bleu' is not computed \(metrics: loss, f1\)"):
        loop.record_eval({"global_step": 1}, {"eval/loss": 1.0, "eval/f1": 0.2}, _config("bleu"))
