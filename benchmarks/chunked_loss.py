"""Chunked cross-entropy (``cross_entropy_chunk_tokens``) against the loss over the whole batch's logits.

A Phi-shaped model with Phi-2's vocabulary (51,200), LoRA on q/k/v/dense as the recipe, batch 4 x 512
tokens: the batch's fp32 logits alone are 4 x 512 x 51,200 x 4 bytes = 400 MiB, and the loss holds them,
their log-softmax and their gradient. Each setting trains 3 optimizer steps in its own process (after one
warm-up step); reported: the peak memory added by training (CUDA allocation, or the peak resident set on
a CPU), the median step time and the last loss, which must agree between the settings.

    python benchmarks/chunked_loss.py [--repeats 2]        # or: make bench
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fixtures  # noqa: E402
import harness  # noqa: E402
import memory  # noqa: E402
from memory import reset_peak_rss, rss_bytes  # noqa: E402

# memory.py's Phi-shaped model, smaller, with Phi-2's vocabulary: the logits dominate
PHI = {**memory.PHI, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 4,
       "vocab_size": 51200}
BATCH, SEQ, STEPS = 4, 512, 3
SETTINGS = {"whole batch": None, "chunks of 512 tokens": 512}


def probe(model_dir: str, chunk: int | None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from ftkit import losses, modeling, optim

    config = fixtures.script_config("qlora_summarize", "SummarizeConfig", {
        "model_name_or_path": model_dir, "output_dir": os.path.join(model_dir, "unused"), "train_file": "unused.jsonl",
        "load_in_4bit": False, "torch_dtype": "float32", "optim": "adamw_torch", "lora_dropout": 0.0})
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    batch = torch.randint(0, PHI["vocab_size"], (BATCH, SEQ), device="cuda" if cuda else "cpu")
    model = modeling.add_lora(modeling.load_pretrained(AutoModelForCausalLM, model_dir, config), config, "CAUSAL_LM")
    model = model.to(batch.device).train()
    optimizer = optim.build_optimizer(model, config)
    times = []
    for step in range(STEPS + 1):
        if step == 1:  # the warm-up step is not measured
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            else:
                reset_peak_rss()
            base = torch.cuda.memory_allocated() if cuda else rss_bytes()
        start = time.perf_counter()
        loss_sum, count = losses.causal_lm_forward_loss(model, {"input_ids": batch}, batch, chunk)
        loss = loss_sum.sum() / count.sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()  # also waits for the device
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if cuda else rss_bytes("VmHWM")) - base
    return {"peak_mib": peak / 2**20, "step_s": sorted(times[1:])[len(times[1:]) // 2], "loss": value}


def build_model(workdir: str) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = os.path.join(workdir, "phi")
    cfg = dict(PHI)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).save_pretrained(path)
    return path


def main() -> int:
    args = harness.command_line(__doc__, probe)
    if args is None:  # a probe process
        return 0
    with tempfile.TemporaryDirectory() as workdir:
        model_dir = build_model(workdir)
        runs = harness.alternate({name: (lambda r, c=chunk: json.loads(harness.run(
            [sys.executable, os.path.abspath(__file__), "--probe", model_dir, json.dumps(c)]).stdout.splitlines()[-1]))
            for name, chunk in SETTINGS.items()}, args.repeats)
    med = {name: {k: harness.median(r, k) for k in ("peak_mib", "step_s", "loss")} for name, r in runs.items()}
    whole = med["whole batch"]
    setup = {"model": PHI, "batch": BATCH, "sequence_length": SEQ, "steps": STEPS, "repeats": args.repeats}
    harness.write_results("chunked_loss", {"setup": setup, "runs": runs, "median": med})
    lines = [f"Phi-shaped model ({PHI['num_hidden_layers']} layers, hidden {PHI['hidden_size']}, vocabulary "
             f"{PHI['vocab_size']:,}, fp32, LoRA), batch {BATCH} x {SEQ} tokens, {STEPS} steps after a warm-up, "
             f"median of {args.repeats} runs.", "",
             "| loss computed over | training peak (MiB) | vs whole batch | step time (s) | vs whole batch | last loss |",
             "|---|---|---|---|---|---|"]
    for name, m in med.items():
        lines.append(f"| {name} | {m['peak_mib']:,.0f} | {m['peak_mib'] / whole['peak_mib']:.2f}x | {m['step_s']:.3f} | "
                     f"{m['step_s'] / whole['step_s']:.2f}x | {m['loss']:.5f} |")
    harness.write_table("chunked_loss", "Chunked cross-entropy: memory and time of the loss", lines)
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
