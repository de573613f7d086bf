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


@pytest.mark.parametrize("strategy, expected", [("steps", [2, 4, 6, 8]), ("epoch", [3, 6, 9]), ("no", [])])
def test_evaluations_follow_eval_strategy_and_leave_the_last_step_to_the_final_one(strategy, expected):
    config = SimpleNamespace(eval_strategy=strategy, eval_steps=2, save_steps=None, logging_steps=5)
    assert loop.planned(config, total_steps=10, windows_per_epoch=3)["evaluation_steps"] == expected


@pytest.mark.parametrize("strategy, expected", [("steps", [4, 8]), ("epoch", [3, 6, 9])])
def test_checkpoints_follow_save_strategy_and_leave_the_last_step_to_the_end(strategy, expected):
    config = SimpleNamespace(eval_strategy="no", eval_steps=None, save_strategy=strategy, save_steps=4, logging_steps=5)
    assert loop.planned(config, total_steps=10, windows_per_epoch=3)["save_steps"] == expected


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


def test_early_stopping_counts_evaluations_since_the_last_improvement_beyond_the_threshold():
    losses = {"2": 0.5, "4": 0.4, "6": 0.45, "8": 0.41, "10": 0.42}  # steps as trainer_state.json holds them
    assert loop.evaluations_without_improvement(losses, greater=False) == 3  # "10" after "8": numeric order
    assert loop.evaluations_without_improvement({**losses, "12": 0.3}, greater=False) == 0
    creeping = {"1": 0.50, "2": 0.49, "3": 0.48, "4": 0.44}  # each a new best, none by more than 0.05 until step 4
    assert loop.evaluations_without_improvement(creeping, greater=False) == 0
    assert loop.evaluations_without_improvement(dict(list(creeping.items())[:3]), False, threshold=0.05) == 2
    assert loop.evaluations_without_improvement(creeping, False, threshold=0.05) == 0  # 0.44 beats 0.50 by 0.06
    assert loop.evaluations_without_improvement({"1": 0.7, "2": 0.7, "3": 0.9}, greater=True) == 0
    assert loop.evaluations_without_improvement({}, greater=True) == 0
    config = SimpleNamespace(metric_for_best_model="accuracy", greater_is_better=None, early_stopping_threshold=0.0,
                             early_stopping_patience=2)
    assert not loop.early_stop_due(config, {"scores": {"1": 0.7, "2": 0.6}})
    assert loop.early_stop_due(config, {"scores": {"1": 0.7, "2": 0.6, "3": 0.7}})  # equal is no improvement
    config.early_stopping_patience = None
    assert not loop.early_stop_due(config, {"scores": {"1": 0.7, "2": 0.6, "3": 0.7}})


def test_unknown_best_metric_names_the_computed_ones():
    with pytest.raises(ConfigError, match=r"metric_for_best_model: 'bleu' is not computed \(metrics: loss, f1\)"):
        loop.record_eval({"global_step": 1}, {"eval/loss": 1.0, "eval/f1": 0.2}, _config("bleu"))


@pytest.mark.slow
@pytest.mark.parametrize("script, recipe, accumulation", [
    ("qlora_summarize.py", "qlora_summarize.yaml", 1), ("qlora_summarize.py", "qlora_summarize.yaml", 3),
    ("t5_qa.py", "t5_qa.yaml", 2)])
def test_the_loop_makes_two_host_syncs_per_optimizer_step_whatever_the_accumulation(tmp_path, script, recipe,
                                                                                     accumulation):
    # the step's all-reduce of counts (.tolist) and the gradient-norm finiteness check (.item): none per
    # micro-batch; a log event adds the loss and the norm (here only at the last step)
    import json
    import subprocess
    import sys

    from conftest import ROOT, script_env

    extra = ["--num_eval_generate", "0", "--num_test_compare", "2"] if script.startswith("qlora") else \
        ["--max_eval_samples", "2"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "count_host_syncs.py"),
                           os.path.join(ROOT, "scripts", script), "--config", os.path.join(ROOT, "recipes", "tiny", recipe),
                           "--output_dir", str(tmp_path), "--max_steps", "5", "--logging_steps", "100",
                           "--gradient_accumulation_steps", str(accumulation), *extra],
                          cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    syncs = json.loads(proc.stdout.strip().splitlines()[-1])["ours"]
    assert syncs == [2, 2, 2, 2, 4], syncs
