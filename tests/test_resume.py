"""Exact resume for every script: N steps straight == k steps, stop, resume for N - k steps (logged
losses identical and final weights bitwise in one process; within 1e-6 with two)."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, launch, read_jsonl

pytestmark = pytest.mark.slow
TINY = os.path.join(ROOT, "recipes", "tiny")

# Each: recipe args, the final weights file, and where step 3 lands (epoch, micro-batches into it).
SCRIPTS = {
    # 42 examples, batch 8, drop_last: 5 micro-batches an epoch = 2 windows of 2; step 3 is mid-epoch 1
    "classify.py": (["--config", os.path.join(TINY, "spam.yaml"), "--gradient_accumulation_steps", "2",
                     "--eval_strategy", "steps", "--eval_steps", "1000", "--load_best_model_at_end", "false",
                     "--weight_decay", "0.1", "--learning_rate", "1e-3"],
                    "model.safetensors", (1, 2)),
    # 63 questions, batch 8: 8 micro-batches = 4 windows of 2 (AdamW); step 3 is mid-epoch 0
    "t5_qa.py": (["--config", os.path.join(TINY, "t5_qa.yaml"), "--gradient_accumulation_steps", "2",
                  "--eval_steps", "1000", "--max_eval_samples", "2", "--load_best_model_at_end", "false",
                  "--group_by_length", "true"],
                 "model.safetensors", (0, 6)),
}


def _run(script, args, out, steps, processes):
    launch(script, args + ["--output_dir", str(out), "--max_steps", str(steps), "--save_steps", "3",
                           "--logging_steps", "1", "--save_total_limit", "5"], num_processes=processes)


@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_resume_mid_epoch_gives_the_uninterrupted_run(tmp_path, script, processes):
    args, weights_file, position = SCRIPTS[script]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(script, args, straight, 6, processes)
    state = json.load(open(straight / "checkpoints" / "step_3" / "trainer_state.json"))
    files = os.listdir(straight / "checkpoints" / "step_3")
    assert "scheduler.json" in files and not [f for f in files if f.startswith("custom_checkpoint")]
    if processes == 1:
        assert (state["epoch"], state["batches_in_epoch"]) == position
    # a run that stopped after its step-3 checkpoint: its output_dir holds just that checkpoint
    shutil.copytree(straight / "checkpoints" / "step_3", resumed / "checkpoints" / "step_3")
    _run(script, args, resumed, 6, processes)

    def losses(out):
        return {r["step"]: r["train/loss"] for r in read_jsonl(out / "metrics.jsonl") if "train/loss" in r}

    a, b = losses(straight), losses(resumed)
    counted = [json.load(open(out / "metrics.json")) for out in (straight, resumed)]
    assert counted[0]["tokens_seen"] == counted[1]["tokens_seen"] > 0
    assert counted[0]["samples_seen"] == counted[1]["samples_seen"] > state["samples_seen"] > 0
    assert sorted(b) == [4, 5, 6]
    wa, wb = load_file(straight / "final" / weights_file), load_file(resumed / "final" / weights_file)
    if processes == 1:
        assert all(a[s] == b[s] for s in b), (a, b)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    else:
        assert all(abs(a[s] - b[s]) <= 1e-6 * abs(a[s]) for s in b), (a, b)
        scale = max(v.abs().max().item() for v in wa.values())
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6 * scale
