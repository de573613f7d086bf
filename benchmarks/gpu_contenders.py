"""Phi-2 QLoRA on a GPU: ftkit's script against a bare PyTorch loop and the HF Trainer, same model and settings.

The model is Phi-2's architecture with random weights (``gpu.PHI2``), set up as
recipes/phi2_qlora_dialogsum.yaml sets it up: NF4 + double quantization, bf16 compute, LoRA r 32 on
q/k/v/dense, gradient checkpointing, paged 8-bit AdamW, lr 2e-4, clipping at 1.0. Per shape
(micro-batch x tokens), each contender in its own process:

- ``ftkit``: ``accelerate launch scripts/qlora_summarize.py`` with the recipe (hub model and data
  replaced as in gpu_smoke.py, the training sample repeated so that one epoch covers the run),
  ``packing: true`` so that rows are up to ``tokens`` long, accumulation 1; its tokens/s from its own
  telemetry (median over the logged steps after the first): real tokens / padding efficiency, i.e. the
  tokens it computed, as the others compute full rows (its real tokens/s is kept beside).
- ``bare loop``: forward, loss, backward, clip, step on random rows of that shape (gpu.py's probe).
- ``HF Trainer``: ``transformers.Trainer`` on the same model set up by ``ftkit.modeling`` and random
  rows of that shape, ``optim="paged_adamw_8bit"``, bf16; tokens/s from its step times.

All three train the model the ftkit run built and saved (``base_model/``: Phi-2's blocks, the offline
tokenizer's vocabulary), so they do the same arithmetic per token.

Targets (ratios of tokens/s, measured in the same invocation): ftkit / bare >= 0.97, ftkit / Trainer
>= 1.2. Without CUDA this says it skipped; ``--tiny`` runs the same code on the tiny recipe's model
(CPU allowed), which is how it is checked without a GPU.

    python benchmarks/gpu_contenders.py [--tiny]        # or: make bench-gpu
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu  # noqa: E402
import gpu_smoke  # noqa: E402
import harness  # noqa: E402

SHAPES = [(1, 512), (4, 1024)]
TINY_SHAPES = [(2, 256)]  # at 128 tokens most of the sample's summaries alone do not fit
STEPS, LOGGING = 25, 5  # timed: steps 6-25 (ftkit: its 5-step log intervals; the others: their step times)
TARGETS = {"vs_bare": 0.97, "vs_trainer": 1.2}


def repeated_train_file(config: dict, workdir: str, batch: int, seq: int) -> str:
    """The twin's training sample repeated until its packed rows fill every timed step (counting 1 token per 8 bytes
    of the file, a quarter of what the offline tokenizer makes of it, or less): one epoch covers the run, so no epoch boundary falls among the timed steps, and no batch is
    short (the 36-example sample alone packs into a few rows: at 4 x 1024 an epoch would be a step or two)."""
    text = open(config["train_file"], encoding="utf-8").read()
    copies = -(-batch * seq * (STEPS + 2) * 8 // len(text.encode()))
    path = os.path.join(workdir, f"train_{batch}x{seq}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text * copies)
    return path


def ftkit_run(workdir: str, batch: int, seq: int, tiny: bool) -> dict:
    import torch

    config = gpu_smoke.smoke_config("phi2_qlora_dialogsum", workdir, STEPS, tiny)
    config.update({"bf16": torch.cuda.is_available(),  # as gpu.qlora_config: bf16 autocast on a GPU only
                   "train_file": repeated_train_file(config, workdir, batch, seq), "dataloader_drop_last": True,
                   "packing": True, "max_length": seq, "overlong": "truncate", "per_device_train_batch_size": batch,
                   "gradient_accumulation_steps": 1, "eval_steps": None, "save_steps": None, "logging_steps": LOGGING,
                   "num_eval_generate": 0, "num_test_compare": 1, "max_new_tokens": 8,
                   "output_dir": os.path.join(workdir, f"ftkit_{batch}x{seq}"),
                   # the recipe's LoRA (the tiny twin adapts more modules), as gpu.qlora_config sets it
                   "lora_r": 32, "lora_alpha": 32, "lora_target_modules": ["q_proj", "k_proj", "v_proj", "dense"]})
    path = os.path.join(workdir, f"ftkit_{batch}x{seq}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    rc, _ = gpu_smoke.launch("qlora_summarize", path, [], os.path.join(workdir, "ftkit.log"))
    if rc != 0:
        raise RuntimeError(f"ftkit run failed ({rc}): see {os.path.join(workdir, 'ftkit.log')}")
    events = [json.loads(line) for line in open(os.path.join(config["output_dir"], "metrics.jsonl"))]
    timed = [e for e in events if "perf/tokens_per_s" in e][1:]
    if timed[-1]["train/epoch"] > 1:
        raise RuntimeError(f"ftkit run: an epoch boundary among the timed steps (epoch {timed[-1]['train/epoch']})")
    real = statistics.median(e["perf/tokens_per_s"] for e in timed)
    efficiency = statistics.median(e["perf/padding_efficiency"] for e in timed)
    # the ratios compare tokens computed (packed rows' padding included), as the other two compute full rows
    return {"tokens_per_s": real / efficiency, "real_tokens_per_s": real, "padding_efficiency": efficiency,
            "base_model": os.path.join(config["output_dir"], "base_model")}


def trainer_probe(model_dir: str, batch: int, seq: int, tiny: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from ftkit import modeling

    cuda = torch.cuda.is_available()
    config = gpu.qlora_config(model_dir, cuda)
    model = modeling.load_pretrained(AutoModelForCausalLM, model_dir, config, device="cuda" if cuda else "cpu")
    model.config.use_cache = False
    model = modeling.add_lora(model, config, task_type="CAUSAL_LM")
    torch.manual_seed(0)
    rows = torch.randint(0, model.config.vocab_size, (batch * STEPS, seq)).tolist()
    ds = Dataset.from_dict({"input_ids": rows, "labels": rows})
    times = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter())

    args = TrainingArguments(output_dir=os.path.join(model_dir, "trainer"), per_device_train_batch_size=batch,
                             max_steps=STEPS, learning_rate=2e-4, optim="paged_adamw_8bit", bf16=cuda,
                             max_grad_norm=1.0, logging_steps=STEPS, save_strategy="no", report_to=[],
                             use_cpu=not cuda, dataloader_drop_last=True)
    Trainer(model=model, args=args, train_dataset=ds, callbacks=[StepTimes()]).train()
    intervals = [b - a for a, b in zip(times[LOGGING - 1:], times[LOGGING:])]
    return {"tokens_per_s": batch * seq / statistics.median(intervals)}


def main() -> int:
    args = harness.probe_cli(__doc__, "the tiny recipe's model, CPU allowed: a check of the code path",
                             {"trainer": trainer_probe, "bare": gpu.qlora})
    import torch

    if not torch.cuda.is_available() and not args.tiny:
        print("gpu contenders: no CUDA device here, skipped")
        return 0
    results, ratios = {}, {}
    with tempfile.TemporaryDirectory() as workdir:
        for batch, seq in TINY_SHAPES if args.tiny else SHAPES:
            shape = f"{batch}x{seq}"
            ftkit = ftkit_run(workdir, batch, seq, args.tiny)
            model_dir = ftkit.pop("base_model")  # the very model ftkit trained (random init, offline vocabulary)
            results[shape] = {"ftkit": ftkit,
                              "bare loop": harness.probe(__file__, "bare", [model_dir, batch, seq], args.tiny),
                              "HF Trainer": harness.probe(__file__, "trainer", [model_dir, batch, seq], args.tiny)}
            tps = {name: r["tokens_per_s"] for name, r in results[shape].items()}
            ratios[shape] = {"vs_bare": tps["ftkit"] / tps["bare loop"], "vs_trainer": tps["ftkit"] / tps["HF Trainer"]}
            print(f"{shape}: tokens/s {tps}; ftkit / bare {ratios[shape]['vs_bare']:.3f} "
                  f"(target {TARGETS['vs_bare']}), ftkit / Trainer {ratios[shape]['vs_trainer']:.3f} "
                  f"(target {TARGETS['vs_trainer']})", flush=True)
    if args.tiny:  # a check of the code path: nothing to record
        return 0
    harness.write_results("gpu_contenders", {"results": results, "ratios": ratios, "targets": TARGETS, "steps": STEPS})
    lines = ["| shape | ftkit tokens/s | bare loop | HF Trainer | ftkit / bare (>= 0.97) | ftkit / Trainer (>= 1.2) |",
             "|---|---|---|---|---|---|"]
    for shape, r in results.items():
        lines.append(f"| {shape} | {r['ftkit']['tokens_per_s']:,.0f} | {r['bare loop']['tokens_per_s']:,.0f} | "
                     f"{r['HF Trainer']['tokens_per_s']:,.0f} | {ratios[shape]['vs_bare']:.3f} | "
                     f"{ratios[shape]['vs_trainer']:.3f} |")
    harness.write_table("gpu_contenders", "GPU: Phi-2 QLoRA, ftkit vs a bare loop vs the HF Trainer", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
