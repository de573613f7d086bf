"""The baselines the speed benchmarks race ftkit's scripts against, one per process run.

    python benchmarks/contenders.py bare    --model DIR --train_file F --steps N --warmup W
    python benchmarks/contenders.py trainer --model DIR --train_file F --steps N --warmup W [--padding max_length]
                                            [--group_by_length]

``bare``: the plainest PyTorch loop on the batches ftkit builds (same tokenization, same seeded
length-grouped sampler, same collator): forward, loss, backward, gradient clipping at the recipes'
``max_grad_norm`` (1.0, as ftkit and the Trainer do; 0 skips it), optimizer step, nothing else.
``trainer``: ``transformers.Trainer`` with the same model, data and batch size, padding to
``max_length`` as S002 does, or with its own best settings (dynamic padding, length grouping).

Both time optimizer steps ``warmup+1 .. steps`` in intervals of ``logging_steps`` (as ftkit's
telemetry does) and print one JSON line: the median interval's steps/s and real (non-pad)
tokens/s, and the padding efficiency of those steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

MAX_LENGTH = 512


def load_rows(train_file: str, tokenizer, padding: bool | str):
    from ftkit import data

    ds = data.load_local_file(train_file)
    enc = tokenizer(list(ds["text"]), truncation=True, max_length=MAX_LENGTH, padding=padding,
                    return_token_type_ids=True)  # as classify.py does for BERT
    return ds, enc


def summary(times: list[float], real: list[int], computed: list[int], warmup: int, interval: int) -> dict:
    """Rates over the steps after ``warmup``, in intervals of ``interval`` steps (as ftkit logs them):
    the median interval's rate, so a passing slow phase of the machine does not decide the result.
    ``times[i]`` is the end of step i."""
    steps_rates, token_rates = [], []
    for start in range(warmup, len(real) - interval + 1, interval):
        elapsed = times[start + interval - 1] - times[start - 1]
        steps_rates.append(interval / elapsed)
        token_rates.append(sum(real[start:start + interval]) / elapsed)
    tokens, padded = sum(real[warmup:]), sum(computed[warmup:])
    return {"steps_per_s": statistics.median(steps_rates), "tokens_per_s": statistics.median(token_rates),
            "padding_efficiency": tokens / padded, "timed_steps": len(real) - warmup, "real_tokens": tokens}


def bare(args) -> dict:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ftkit import data

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ds, enc = load_rows(args.train_file, tokenizer, False)
    rows = [{"input_ids": ids, "attention_mask": m, "token_type_ids": t, "labels": label}
            for ids, m, t, label in zip(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], list(ds["label"]))]
    sampler = data.TrainBatchSampler([len(r["input_ids"]) for r in rows], args.batch_size, args.seed,
                                     group_by_length=True, drop_last=True)
    loader = torch.utils.data.DataLoader(rows, batch_sampler=sampler, collate_fn=data.PadCollator(tokenizer.pad_token_id))
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    times, real, computed = [], [], []
    for step, batch in enumerate(loader):
        if step == args.steps:
            break
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       token_type_ids=batch["token_type_ids"]).logits
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
        loss.backward()
        if args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter())
        real.append(int(batch["attention_mask"].sum()))
        computed.append(batch["attention_mask"].numel())
    return summary(times, real, computed, args.warmup, args.logging_steps)


def trainer(args) -> dict:
    from datasets import Dataset
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pad_to_max = args.padding == "max_length"
    ds, enc = load_rows(args.train_file, tokenizer, "max_length" if pad_to_max else False)
    train = Dataset.from_dict({**enc, "labels": list(ds["label"])})
    real, computed, times = [], [], []
    pad = DataCollatorWithPadding(tokenizer)

    def collate(features):
        batch = pad(features)
        real.append(int(batch["attention_mask"].sum()))
        computed.append(batch["attention_mask"].numel())
        return batch

    class StepTimes(TrainerCallback):
        def on_step_end(self, *_, **__):
            times.append(time.perf_counter())

    training_args = TrainingArguments(
        output_dir=os.path.join(args.workdir, "hf_trainer"), per_device_train_batch_size=args.batch_size,
        max_steps=args.steps, learning_rate=5e-5, logging_steps=args.logging_steps, save_strategy="no",
        eval_strategy="no", report_to=[], seed=args.seed, dataloader_drop_last=True, disable_tqdm=True,
        train_sampling_strategy="group_by_length" if args.group_by_length else "random")
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    Trainer(model=model, args=training_args, train_dataset=train, data_collator=collate,
            callbacks=[StepTimes()]).train()
    return summary(times, real[:len(times)], computed[:len(times)], args.warmup, args.logging_steps)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("contender", choices=["bare", "trainer"])
    p.add_argument("--model", required=True)
    p.add_argument("--train_file", required=True)
    p.add_argument("--workdir", default="/tmp")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--logging_steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--padding", choices=["max_length", "dynamic"], default="dynamic")
    p.add_argument("--group_by_length", action="store_true")
    args = p.parse_args()
    print(json.dumps(bare(args) if args.contender == "bare" else trainer(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
