"""Preflight at real size, on this machine without a GPU or the hub (``--preflight_device cuda``):

1. The preflight of the Phi-2 QLoRA recipe (recipes/phi2_qlora_dialogsum.yaml) for one 80 GB GPU: Phi-2's
   architecture from its published config (2.7B parameters, 32 layers, hidden 2560, vocabulary 51200), a
   byte-level BPE tokenizer of that vocabulary size trained on the DialogSum training set, and DialogSum from
   ../shared/realdata (this part is skipped when that folder is absent). Token counts follow that tokenizer, not
   Phi-2's own; the memory estimate is of Phi-2's shapes.
2. The estimate for the set-ups benchmarks/gpu.py measured on an H100 (results/gpu.json: Phi-2-shaped QLoRA at
   1 x 512 and 4 x 1024 tokens, T5-base-shaped full fine-tune at 32 x (512 + 128)), against those measured
   peaks (torch.cuda.max_memory_allocated). The QLoRA estimate takes gpu.py's settings (gradient checkpointing,
   LoRA dropout 0.05) when results/gpu.json says its QLoRA rows ran in training mode ("qlora_train_mode"); the
   run of 2026-11-22 had the model in eval mode (no checkpointing, no dropout), which the estimate then
   reproduces. Where results/gpu.json also holds gpu.py's lever sweep, each lever's set-up is estimated too,
   against its own measured peak (``torch_compile`` is estimated eager: the fake step does not compile).

Writes results/preflight.json and prints the table and the ratios."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import fixtures
from gpu import LEVERS, PHI2, T5_BASE
from harness import REAL, RESULTS, ROOT, env

PHI2_YAML = "{" + ", ".join(f"{k}: {v}" for k, v in PHI2.items()) + "}"


def recipe_preflight() -> dict | None:
    folder = os.path.join(REAL, "dialogsum")
    if not os.path.isdir(folder):
        print(f"Phi-2 recipe preflight skipped: {folder} is absent")
        return None
    out = os.path.join(ROOT, "outputs", "preflight_phi2")
    shutil.rmtree(out, ignore_errors=True)
    train = os.path.join(folder, "dialogsum.train.jsonl")
    args = ["--config", os.path.join(ROOT, "recipes", "phi2_qlora_dialogsum.yaml"), "--model_name_or_path", "null",
            "--model_config", PHI2_YAML, "--tokenizer_files", train, "--tokenizer_vocab_size", "51200",
            "--train_file", train, "--validation_file", os.path.join(folder, "dialogsum.dev.jsonl"),
            "--report_to", "none", "--output_dir", out, "--preflight", "true", "--preflight_device", "cuda",
            "--device_memory_gb", "80", "--peak_tflops", "989"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "qlora_summarize.py"), *args], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=1800)
    if proc.returncode not in (0, 3):
        raise RuntimeError(f"preflight failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    print(proc.stdout[proc.stdout.index("preflight:"):])
    return json.load(open(os.path.join(out, "preflight.json")))


def against_gpu_measurements() -> dict:
    """Estimates for gpu.py's three set-ups next to the peaks it measured."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from ftkit import fakestep, losses, modeling

    measured = json.load(open(os.path.join(RESULTS, "gpu.json")))
    phi = dict(PHI2)
    phi_cfg = AutoConfig.for_model(phi.pop("model_type"), **phi)
    t5 = dict(T5_BASE)
    t5_cfg = AutoConfig.for_model(t5.pop("model_type"), decoder_start_token_id=0, pad_token_id=0, **t5)
    common = {"output_dir": "unused", "train_file": "unused.jsonl", "bf16": True, "max_grad_norm": 1.0}
    train_mode = measured.get("qlora_train_mode", False)
    qlora = fixtures.script_config("qlora_summarize", "SummarizeConfig", {
        **common, "model_name_or_path": "phi-2-shaped", "load_in_4bit": True, "bnb_4bit_compute_dtype": "bfloat16",
        "lora_r": 32, "lora_alpha": 32, "lora_dropout": 0.05 if train_mode else 0.0,
        "gradient_checkpointing": train_mode, "optim": "paged_adamw_8bit"})
    # gpu.py's T5 row: the recipe's float32 weights under bf16 autocast with adamw_torch since it says so, before
    # that bf16 weights with fused AdamW
    t5_recipe = measured.get("t5_recipe_setup", False)
    full = fixtures.script_config("t5_qa", "QAConfig", {
        **common, "model_name_or_path": "t5-base-shaped", "torch_dtype": "float32" if t5_recipe else "bfloat16",
        "optim": "adamw_torch" if t5_recipe else "adamw_torch_fused"})

    def qlora_setup(model, config):
        model.config.use_cache = False
        return modeling.add_lora(model, config, task_type="CAUSAL_LM")

    def loss(model, batch):
        return model(**batch).loss

    def qlora_loss(config):  # gpu.py's: the model's own, or ftkit's chunked loss where the lever asks for it
        if not config.cross_entropy_chunk_tokens:
            return loss
        return lambda model, batch: losses.causal_lm_forward_loss(
            model, {"input_ids": batch["input_ids"]}, batch["labels"], config.cross_entropy_chunk_tokens)[0].sum()

    def qlora_step(config, batch, seq):
        ids = torch.zeros(batch, seq, dtype=torch.long)
        return fakestep.fake_step(config, phi_cfg, AutoModelForCausalLM, qlora_setup, qlora_loss(config),
                                  {"input_ids": ids, "labels": ids}, "cuda")

    rows, peaks = {}, {}
    ran = {name: r for name, r in measured["results"].items() if "peak_gib" in r}  # (a probe may have failed)
    for batch, seq in ((1, 512), (4, 1024)):
        if f"qlora {batch}x{seq}" in ran:
            rows[f"qlora {batch}x{seq}"] = qlora_step(qlora, batch, seq)
            peaks[f"qlora {batch}x{seq}"] = ran[f"qlora {batch}x{seq}"]["peak_gib"]
    if "t5-base full" in ran:
        ids, labels = torch.zeros(32, 512, dtype=torch.long), torch.zeros(32, 128, dtype=torch.long)
        rows["t5-base full"] = fakestep.fake_step(full, t5_cfg, AutoModelForSeq2SeqLM, modeling.training_setup, loss,
                                                   {"input_ids": ids, "labels": labels}, "cuda")
        peaks["t5-base full"] = ran["t5-base full"]["peak_gib"]
    for name, lever in measured.get("levers", {}).items():  # gpu.py's lever sweep, each at its shape
        if name == "recipe" or "peak_gib" not in lever:
            continue
        overrides = {k: v for part in name.split(" + ") for k, v in LEVERS[part].items()}
        rows[f"lever: {name}"] = qlora_step(dataclasses.replace(qlora, **overrides), *measured["lever_shape"])
        peaks[f"lever: {name}"] = lever["peak_gib"]
    out = {}
    for name, parts in rows.items():
        estimate = sum(parts[k] for k in ("weights", "gradients", "optimizer", "activations")) / 2**30
        out[name] = {"estimate_gib": estimate, "measured_gib": peaks[name], "ratio": estimate / peaks[name]}
        print(f"{name:<48} estimate {estimate:6.2f} GiB  measured {peaks[name]:6.2f} GiB  "
              f"ratio {estimate / peaks[name]:.3f}")
    return {"measured_on": measured["machine"], "measured_when": measured["when"], "rows": out}


def main() -> None:
    report = {"phi2_recipe": recipe_preflight(), "against_gpu_measurements": against_gpu_measurements()}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "preflight.json"), "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
