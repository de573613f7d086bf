"""Memory: full fine-tuning vs LoRA vs QLoRA (4-bit NF4) of one model, with and without gradient
checkpointing, and the optimizer state of 32-bit vs 8-bit (and paged) AdamW.

The model is Phi-shaped (Phi-2's architecture scaled down, random init, built from a config),
loaded the way scripts/qlora_summarize.py loads it (``modeling.load_pretrained`` + ``add_lora``
with the recipe's options, LoRA on q/k/v/dense as S001), then trained for 2 optimizer steps on a
fixed batch. Each configuration runs in its own process; what is reported is the memory that
training needs: the bytes of the prepared model's tensors (parameters and buffers; 4-bit weights as
packed bytes), the bytes of the optimizer's state tensors, and the peak during the training steps,
counted from the point after imports (the libraries' own ~0.5-1 GB is not counted): on a GPU the
peak ``torch.cuda`` allocation, on a CPU the peak resident set, reset after loading (loading has its
own transient peak, which differs by device).

    python benchmarks/memory.py [--repeats 2]        # or: make bench
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fixtures  # noqa: E402
import harness  # noqa: E402

PHI = {"model_type": "phi", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 4,
       "num_attention_heads": 16, "max_position_embeddings": 1024, "partial_rotary_factor": 0.5,
       "vocab_size": 8192, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attention_dropout": 0.0}
BATCH, SEQ, STEPS = 1, 512, 2
METHODS = {"full": {"use_peft": False}, "LoRA": {}, "QLoRA": {"load_in_4bit": True}}


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident set (VmRSS) or its high-water mark since the last reset (VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident set to the current one
        f.write("5")


def probe(model_dir: str, options: dict) -> dict:
    """One configuration, in this process: load, prepare, train STEPS steps, measure."""
    import torch
    from transformers import AutoModelForCausalLM

    from ftkit import modeling, optim

    config = fixtures.script_config("qlora_summarize", "SummarizeConfig", {
        "model_name_or_path": model_dir, "output_dir": os.path.join(model_dir, "unused"), "train_file": "unused.jsonl",
        "load_in_4bit": False, "bnb_4bit_compute_dtype": "float32", "optim": "adamw_torch", "learning_rate": 1e-4,
        "torch_dtype": "float32", **options})
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    batch = torch.randint(0, PHI["vocab_size"], (BATCH, SEQ))
    if cuda:
        batch = batch.cuda()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    model = modeling.load_pretrained(AutoModelForCausalLM, model_dir, config)
    model.config.use_cache = False
    model = modeling.add_lora(model, config, task_type="CAUSAL_LM")
    if cuda:
        model = model.cuda()
    model.train()
    optimizer = optim.build_optimizer(model, config)
    trainable, total = modeling.parameter_counts(model)
    # the model's own tensors (4-bit weights as their packed bytes), then the peak of training alone:
    # loading has its own transient peak (on a CPU, 4-bit weights are quantized from a full copy)
    loaded = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    for _ in range(STEPS):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if isinstance(t, torch.Tensor))
    peak = (torch.cuda.max_memory_allocated() if cuda else rss_bytes("VmHWM")) - base
    return {"model_mib": loaded / 2**20, "peak_mib": peak / 2**20, "optimizer_state_mib": state / 2**20, "trainable_params": trainable,
            "total_params": total, "loss": float(loss)}


def contenders(model_dir: str) -> dict:
    out = {}
    for method, options in METHODS.items():
        for gc in (False, True):
            out[f"{method}, checkpointing {'on' if gc else 'off'}"] = {**options, "gradient_checkpointing": gc}
    for opt in ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"):
        out[f"full, checkpointing on, {opt}"] = {"use_peft": False, "gradient_checkpointing": True, "optim": opt}
    return out


def run_probe(model_dir: str, options: dict) -> dict:
    proc = harness.run([sys.executable, os.path.abspath(__file__), "--probe", model_dir, json.dumps(options)])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build_model(workdir: str) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ftkit import modeling

    path = os.path.join(workdir, "phi")
    text = os.path.join(workdir, "text.txt")
    with open(text, "w") as f:
        f.write(open(os.path.join(harness.ROOT, "data", "dialogsum_sample_train.jsonl")).read())
    tok = modeling.build_tokenizer([text], 1000, path)
    cfg = dict(PHI)
    config = AutoConfig.for_model(cfg.pop("model_type"), pad_token_id=tok.pad_token_id, **cfg)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def main() -> int:
    args = harness.command_line(__doc__, probe)
    if args is None:  # a probe process
        return 0
    with tempfile.TemporaryDirectory() as workdir:
        model_dir = build_model(workdir)
        configs = contenders(model_dir)
        print(f"memory: {len(configs)} configurations x {args.repeats} repeats", flush=True)
        runs = harness.alternate({name: (lambda r, o=o: run_probe(model_dir, o)) for name, o in configs.items()},
                                 args.repeats)
    med = {name: {k: harness.median(r, k) for k in ("model_mib", "peak_mib", "optimizer_state_mib")} | {
        "trainable_params": r[0]["trainable_params"], "total_params": r[0]["total_params"]} for name, r in runs.items()}
    base = med["full, checkpointing off"]["peak_mib"]  # the reference of the "vs full" column
    adam32 = med["full, checkpointing on"]["optimizer_state_mib"]
    gpu = not harness.machine().endswith("no GPU")
    setup = {"model": PHI, "batch": BATCH, "sequence_length": SEQ, "steps": STEPS, "repeats": args.repeats,
             "measure": "CUDA max_memory_allocated" if gpu else "peak RSS minus RSS after imports"}
    harness.write_results("memory", {"setup": setup, "runs": runs, "median": med})
    lines = [f"Phi-shaped model ({PHI['num_hidden_layers']} layers, hidden {PHI['hidden_size']}, "
             f"{med['full, checkpointing off']['total_params'] / 1e6:.0f}M parameters, fp32, random init), batch "
             f"{BATCH} x {SEQ} tokens, {STEPS} optimizer steps, AdamW unless named; memory added by training "
             f"({'peak CUDA allocation' if gpu else 'peak resident set minus the resident set after imports'}), "
             f"median of {args.repeats} runs.", "",
             "| configuration | trainable params | model tensors (MiB) | training peak (MiB) | vs full, no checkpointing | optimizer state (MiB) | vs 32-bit AdamW state |",
             "|---|---|---|---|---|---|---|"]
    for name, m in med.items():
        share = f"{m['optimizer_state_mib'] / adam32:.2f}x" if name.startswith("full") else "-"
        lines.append(f"| {name} | {m['trainable_params'] / 1e6:.1f}M | {m['model_mib']:,.0f} | {m['peak_mib']:,.0f} | "
                     f"{m['peak_mib'] / base:.2f}x | {m['optimizer_state_mib']:,.1f} | {share} |")
    harness.write_table("memory", "Memory: full vs LoRA vs QLoRA, checkpointing, 8-bit optimizers", lines)
    for name, m in med.items():
        print(f"{name:<40} model {m['model_mib']:6.0f} MiB  training peak {m['peak_mib']:6.0f} MiB  "
              f"optimizer state {m['optimizer_state_mib']:6.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
