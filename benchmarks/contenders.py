"""The baselines the speed benchmarks race ftkit's scripts against, one per process run.

    python benchmarks/contenders.py bare    --model DIR --train_file F --epochs E --warmup W [--optim O]
    python benchmarks/contenders.py trainer --model DIR --train_file F --epochs E --warmup W [--optim O]
                                            [--padding max_length] [--group_by_length]

``bare``: the plainest PyTorch loop on the batches ftkit builds (same tokenization, same seeded
length-grouped sampler, same collator): forward, loss, backward, gradient clipping at the recipes'
``max_grad_norm`` (1.0, as ftkit and the Trainer do; 0 skips it), optimizer step, nothing else.
``trainer``: ``transformers.Trainer`` with the same model, data and batch size, padding to
``max_length`` as S002 does, or with its own best settings (dynamic padding, length grouping).

Both train ``epochs`` epochs over the whole file and time the steps after ``warmup`` (the
benchmark passes the first epoch's steps, so the last epoch is timed: every contender then
trains on the same examples, the same real tokens, whatever its batching). They print one JSON
line: steps/s and real (non-pad) tokens/s of the timed steps (their count and real tokens over
the time they took) and their padding efficiency.
"""

from __future__ import annotations

import argparse
import json
import os
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


def summary(times: list[float], real: list[int], computed: list[int], warmup: int) -> dict:
    """Rates over the steps after ``warmup``: the timed steps and their real tokens over the time they
    took. ``times[i]`` is the end of step i."""
    seconds, tokens, padded = times[-1] - times[warmup - 1], sum(real[warmup:]), sum(computed[warmup:])
    return {"steps_per_s": (len(real) - warmup) / seconds, "tokens_per_s": tokens / seconds,
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
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=args.optim == "adamw_torch_fused")
    times, real, computed = [], [], []
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)  # as ftkit's loop does: the same batches in the same order
        for batch in loader:
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
    return summary(times, real, computed, args.warmup)


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
        num_train_epochs=args.epochs, optim=args.optim, learning_rate=5e-5, logging_steps=args.logging_steps,
        save_strategy="no", eval_strategy="no", report_to=[], seed=args.seed, dataloader_drop_last=True,
        disable_tqdm=True,
        train_sampling_strategy="group_by_length" if args.group_by_length else "random")
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    Trainer(model=model, args=training_args, train_dataset=train, data_collator=collate,
            callbacks=[StepTimes()]).train()
    return summary(times, real[:len(times)], computed[:len(times)], args.warmup)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("contender", choices=["bare", "trainer"])
    p.add_argument("--model", required=True)
    p.add_argument("--train_file", required=True)
    p.add_argument("--workdir", default="/tmp")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--warmup", type=int, default=5, help="untimed first steps")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--logging_steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--optim", choices=["adamw_torch", "adamw_torch_fused"], default="adamw_torch")
    p.add_argument("--padding", choices=["max_length", "dynamic"], default="dynamic")
    p.add_argument("--group_by_length", action="store_true")
    args = p.parse_args()
    print(json.dumps(bare(args) if args.contender == "bare" else trainer(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
