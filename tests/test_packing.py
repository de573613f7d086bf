"""Packing: several examples per row, per-example losses unchanged, no attention across examples."""

import json
import math
import os
import random

import pytest
import torch
from conftest import ROOT, TINY_SUMMARIZE, launch

from ftkit import data, losses


def _examples(n, seed=0, vocab=500, prompt_masked=True):
    rng = random.Random(seed)
    rows = {"input_ids": [], "labels": [], "length": []}
    for _ in range(n):
        length = rng.randint(5, 60)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        cut = rng.randint(1, length - 2) if prompt_masked else 0
        rows["input_ids"].append(ids)
        rows["labels"].append([-100] * cut + ids[cut:])
        rows["length"].append(length)
    return rows


def test_best_fit_rows_hold_every_example_once_within_capacity():
    rng = random.Random(1)
    lengths = [rng.randint(20, 500) for _ in range(2000)]
    rows = data.best_fit_bins(lengths, 512)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    assert sum(lengths) / (512 * len(rows)) >= 0.95  # the packing target, on a wide spread
    assert data.best_fit_bins(lengths, 512) == rows  # deterministic: a resumed run packs the same rows
    with pytest.raises(ValueError, match="more than the row capacity"):
        data.best_fit_bins([10, 600], 512)


def test_packed_rows_restart_positions_and_mask_each_examples_first_label():
    from datasets import Dataset

    raw = _examples(30, prompt_masked=False)
    packed = data.pack(Dataset.from_dict(raw), 128)
    assert sum(packed["examples"]) == 30 and len(packed) < 30
    for ids, labels, positions in zip(packed["input_ids"], packed["labels"], packed["position_ids"]):
        starts = [i for i, p in enumerate(positions) if p == 0]
        assert starts[0] == 0 and len(ids) == len(labels) == len(positions) <= 128
        assert all(labels[s] == -100 for s in starts)  # never predicted from the previous example
        assert all(positions[i] == positions[i - 1] + 1 for i in range(1, len(positions)) if i not in starts)
    # every example's tokens are there, once
    assert sorted(map(tuple, raw["input_ids"])) == sorted(
        tuple(ids[s:e]) for ids, pos in zip(packed["input_ids"], packed["position_ids"])
        for s, e in zip([i for i, p in enumerate(pos) if p == 0], [i for i, p in enumerate(pos) if p == 0][1:] + [len(pos)]))


def _per_example_losses(logits, labels, positions):
    """Summed loss of each example in each row (examples start where positions restart at 0)."""
    token_loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                   reduction="none", ignore_index=-100).view(labels.shape[0], -1)
    out = []
    for row in range(labels.shape[0]):
        starts = (positions[row] == 0).nonzero().flatten().tolist() + [labels.shape[1]]
        for s, e in zip(starts, starts[1:]):
            if (labels[row, s:e] != -100).any():  # pad tail: no targets
                out.append(token_loss[row, max(s - 1, 0):e - 1].sum())
    return torch.stack(out)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_gives_each_examples_unpacked_loss(attn):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PhiConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        PhiConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0),
        attn_implementation=attn).eval()
    raw = _examples(12, seed=2)
    packed = data.pack(Dataset.from_dict(raw), 128)
    batch = data.PadCollator(pad_token_id=0)([packed[i] for i in range(len(packed))])
    with torch.no_grad():
        packed_logits = model(**data.model_inputs(batch)).logits
        unpacked = torch.stack([losses.causal_lm_loss_sum(model(input_ids=torch.tensor([ids])).logits,
                                                          torch.tensor([labels]))[0].sum()
                                for ids, labels in zip(raw["input_ids"], raw["labels"])])
        # the same packed rows with one plain mask (what packing without position ids would do)
        leaky_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    packed_losses = _per_example_losses(packed_logits, batch["labels"], batch["position_ids"])
    leaky = _per_example_losses(leaky_logits, batch["labels"], batch["position_ids"])
    assert len(packed_losses) == 12 and len(packed) < 12  # several examples per row
    a, b = packed_losses.sort().values, unpacked.sort().values  # rows reorder examples: compare as sets
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (a, b)
    # and the check can fail: attention across examples changes the losses
    assert not torch.allclose(leaky.sort().values, b, rtol=1e-4, atol=1e-4)
    # the batch's total is what the loop averages: identical targets, identical sum
    total, count = losses.causal_lm_loss_sum(packed_logits, batch["labels"])
    assert int(count.sum()) == sum(sum(1 for x in lab[1:] if x != -100) for lab in raw["labels"])
    assert abs(total.sum().item() - unpacked.sum().item()) <= 1e-4 * unpacked.sum().item()


def test_summarize_trains_on_packed_rows(tmp_path):
    out = tmp_path / "run"
    proc = launch("qlora_summarize.py", ["--config", TINY_SUMMARIZE, "--packing", "true", "--num_train_epochs", "1",
                                         "--max_steps", "-1", "--per_device_train_batch_size", "1",
                                         "--gradient_accumulation_steps", "1", "--logging_steps", "1",
                                         "--num_test_compare", "2", "--num_eval_generate", "0", "--max_new_tokens", "4",
                                         "--output_dir", str(out)])
    log = proc.stdout + proc.stderr
    assert "packing:" in log and "block-diagonal" in log
    result = json.load(open(out / "metrics.json"))
    train_rows = sum(1 for _ in open(os.path.join(ROOT, "data", "dialogsum_sample_train.jsonl")))
    assert result["samples_seen"] == train_rows  # one epoch: every example once, counted as examples, not rows
    assert result["global_step"] < train_rows  # fewer rows than examples
    assert math.isfinite(result["eval_loss"])
