"""GPU speed and memory at real model sizes, random weights (nothing is downloaded).

1. Phi-2-shaped model (Phi-2's config: 2.7B parameters) under QLoRA as recipes/phi2_qlora_dialogsum.yaml
   sets it up (NF4 + double quantization, bf16 compute, LoRA r 32 on q/k/v/dense, gradient
   checkpointing, paged 8-bit AdamW), at batch 1 x 512 and 4 x 1024 tokens: tokens/s, MFU and peak
   memory. Targets: MFU >= 30%; peak <= 4 GiB (1 x 512) and <= 6 GiB (4 x 1024).
2. T5-base-shaped model, full fine-tune in bf16 autocast with AdamW, batch 32 x (512 in, 128 out):
   MFU, target >= 35%.

MFU follows the telemetry's convention (``ftkit.tracking.flops_per_token``: 6 x trainable +
4 x frozen parameters + attention; for T5 each token counts the stack it passes through) against
the device's peak dense bf16 FLOP/s. Timed: 10 steps
after 3 warm-up steps, synchronised. Each configuration runs in its own process.

Without CUDA this prints that it was skipped and exits 0; ``--tiny`` runs the same code on tiny
configs (CPU allowed), which is how the code path is tested without a GPU.

    python benchmarks/gpu.py [--tiny]        # or: make bench
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fixtures  # noqa: E402
import harness  # noqa: E402

PHI2 = {"model_type": "phi", "vocab_size": 51200, "hidden_size": 2560, "intermediate_size": 10240,
        "num_hidden_layers": 32, "num_attention_heads": 32, "max_position_embeddings": 2048,
        "partial_rotary_factor": 0.4}
T5_BASE = {"model_type": "t5", "vocab_size": 32128, "d_model": 768, "d_kv": 64, "d_ff": 3072, "num_layers": 12,
           "num_heads": 12}
TINY = {"phi": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "max_position_embeddings": 1024, "partial_rotary_factor": 0.5},
        "t5": {"vocab_size": 512, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4}}
QLORA_SHAPES = [(1, 512), (4, 1024)]
T5_SHAPE = (32, 512, 128)
TARGETS = {"qlora_mfu": 0.30, "qlora_peak_gib_1x512": 4.0, "qlora_peak_gib_4x1024": 6.0, "t5_mfu": 0.35}
WARMUP, TIMED = 3, 10


def _train(model, optimizer, inputs: dict, device: str, tiny: bool) -> tuple[int, float, dict]:
    """Warm-up steps, then timed steps (synchronised) of forward/backward/step on ``inputs``;
    returns (timed steps, seconds, a profile of one more step). The peak-memory counter is reset
    first: it then holds the model, its optimizer state and the training steps, not the loading."""
    import torch

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the recipes' max_grad_norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    warmup, timed = (1, 2) if tiny else (WARMUP, TIMED)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(timed):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return timed, elapsed, _profile(step, device, elapsed / timed)


def _profile(step, device: str, step_s: float) -> dict:
    """One more step under torch.profiler: the share of the step the GPU is busy and the top kernels
    (what limits the MFU: a low busy share means the host, i.e. launches and Python, is the limit)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    averages = prof.key_averages()
    events = [e for e in averages if getattr(e, key) > 0]
    busy_ms = sum(getattr(e, key) for e in events) / 1e3 if cuda else None

    def top(by: str, among) -> list:
        ranked = sorted(among, key=lambda e: -getattr(e, by))[:8]
        return [[e.key[:80], round(getattr(e, by) / 1e3, 2), e.count] for e in ranked]

    runtime = [e for e in averages if e.key.startswith(("cuda", "cu"))]  # CUDA runtime/driver calls made by the host
    return {"step_ms": 1e3 * step_s, "gpu_busy_ms": busy_ms, "top_ops_ms": top(key, events),
            "top_cpu_ops_ms": top("self_cpu_time_total", [e for e in averages if e.self_cpu_time_total > 0]),
            # the fixed per-step cost's suspects: kernel launches and host-device synchronisations in one step
            "kernel_launches": sum(e.count for e in runtime if "Launch" in e.key) if cuda else None,
            "synchronizations": sum(e.count for e in runtime if "Synchronize" in e.key) if cuda else None}


def _mfu(flops_per_s: float) -> float | None:
    from ftkit import tracking

    peak = tracking.peak_tflops(None)  # the device's peak bf16 TFLOP/s (None on a CPU or unknown GPU)
    return flops_per_s / (peak * 1e12) if peak else None


def _peak_gib(device: str) -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")


def qlora_config(model_dir: str, cuda: bool):
    """recipes/phi2_qlora_dialogsum.yaml's model and optimizer settings (bf16 only on a GPU)."""
    return fixtures.script_config("qlora_summarize", "SummarizeConfig", {
        "model_name_or_path": model_dir, "output_dir": os.path.join(model_dir, "unused"), "train_file": "unused.jsonl",
        "load_in_4bit": True, "bnb_4bit_compute_dtype": "bfloat16" if cuda else "float32",
        "lora_r": 32, "lora_alpha": 32, "lora_dropout": 0.05, "gradient_checkpointing": True,
        "optim": "paged_adamw_8bit", "learning_rate": 2e-4, "bf16": cuda})


def qlora(model_dir: str, batch: int, seq: int, tiny: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from ftkit import modeling, optim, tracking

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = qlora_config(model_dir, device == "cuda")
    model = modeling.load_pretrained(AutoModelForCausalLM, model_dir, config, device=device)
    model.config.use_cache = False
    model = modeling.add_lora(model, config, task_type="CAUSAL_LM").to(device)
    optimizer = optim.build_optimizer(model, config)
    trainable, total = modeling.parameter_counts(model)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    model.train()  # gradient checkpointing (and LoRA dropout) act in training mode only
    steps, elapsed, profiled = _train(model, optimizer, {"input_ids": ids, "labels": ids}, device, tiny)
    tokens_per_s = batch * seq * steps / elapsed
    flops = tracking.flops_per_token(model.config, trainable, total - trainable, seq)
    return {"tokens_per_s": tokens_per_s, "mfu": _mfu(tokens_per_s * flops), "peak_gib": _peak_gib(device),
            "trainable_params": trainable, "total_params": total, "profile": profiled}


def t5_full(model_dir: str, batch: int, source: int, target: int, tiny: bool) -> dict:
    import torch
    from transformers import AutoModelForSeq2SeqLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    ids = torch.randint(0, model.config.vocab_size, (batch, source), device=device)
    labels = torch.randint(0, model.config.vocab_size, (batch, target), device=device)
    steps, elapsed, profiled = _train(model, optimizer, {"input_ids": ids, "labels": labels}, device, tiny)
    params = sum(p.numel() for p in model.parameters())
    # FLOPs per example: 6 per weight per token through the weights it meets (encoder blocks for the
    # source, decoder blocks and the output projection for the target) + attention scores/values
    blocks = lambda stack: sum(p.numel() for p in stack.block.parameters())  # noqa: E731
    cfg = model.config
    layers, hidden = cfg.num_layers, cfg.num_heads * cfg.d_kv
    flops = (6 * blocks(model.encoder) * source + 6 * (blocks(model.decoder) + cfg.d_model * cfg.vocab_size) * target
             + 12 * layers * hidden * (source * source + target * target + target * source))
    return {"tokens_per_s": batch * (source + target) * steps / elapsed, "mfu": _mfu(flops * batch * steps / elapsed),
            "peak_gib": _peak_gib(device), "total_params": params, "profile": profiled}


def build(workdir: str, kind: str, tiny: bool) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    spec = dict(PHI2 if kind == "phi" else T5_BASE)
    model_type = spec.pop("model_type")
    if tiny:
        spec.update(TINY[kind])
    if model_type == "t5":
        spec.update(decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)  # as t5-base
    config = AutoConfig.for_model(model_type, **spec)
    torch.manual_seed(0)
    cls = AutoModelForCausalLM if kind == "phi" else AutoModelForSeq2SeqLM
    path = os.path.join(workdir, kind)
    cls.from_config(config, dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32).save_pretrained(path)
    return path


def main() -> int:
    args = harness.probe_cli(__doc__, "tiny configs, CPU allowed: a smoke run of the code path",
                             {"qlora": qlora, "t5": t5_full})
    import torch

    if not torch.cuda.is_available() and not args.tiny:
        print("gpu benchmarks: no CUDA device here, skipped (results/gpu.json is left as it was)")
        return 0
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        phi = build(workdir, "phi", args.tiny)
        for batch, seq in QLORA_SHAPES:
            results[f"qlora {batch}x{seq}"] = harness.probe(__file__, "qlora", [phi, batch, seq], args.tiny)
            print(f"Phi-2-shaped QLoRA {batch}x{seq}: {results[f'qlora {batch}x{seq}']}", flush=True)
        t5 = build(workdir, "t5", args.tiny)
        results["t5-base full"] = harness.probe(__file__, "t5", [t5, *T5_SHAPE], args.tiny)
        print(f"T5-base-shaped full fine-tune {T5_SHAPE}: {results['t5-base full']}", flush=True)
    if args.tiny:  # a smoke run: nothing to record
        return 0
    harness.write_results("gpu", {"results": results, "targets": TARGETS, "timed_steps": TIMED, "warmup": WARMUP,
                                  "qlora_train_mode": True})  # checkpointing and dropout on (preflight.py reads it)
    fmt = (lambda v: f"{100 * v:.1f}%" if v is not None else "n/a")
    lines = ["| model | batch | tokens/s | MFU | peak memory (GiB) | step: ms, GPU busy, kernel launches, syncs | "
             "targets |", "|---|---|---|---|---|---|---|"]

    def step_profile(r: dict) -> str:
        p = r["profile"]
        return (f"{p['step_ms']:.0f}, {100 * p['gpu_busy_ms'] / p['step_ms']:.0f}%, {p['kernel_launches']:,}, "
                f"{p['synchronizations']:,}")

    for (batch, seq) in QLORA_SHAPES:
        r = results[f"qlora {batch}x{seq}"]
        lines.append(f"| Phi-2-shaped, QLoRA | {batch} x {seq} | {r['tokens_per_s']:,.0f} | {fmt(r['mfu'])} | "
                     f"{r['peak_gib']:.2f} | {step_profile(r)} | MFU >= 30%, peak <= "
                     f"{TARGETS[f'qlora_peak_gib_{batch}x{seq}']:.0f} GiB |")
    r = results["t5-base full"]
    lines.append(f"| T5-base-shaped, full | {T5_SHAPE[0]} x ({T5_SHAPE[1]} + {T5_SHAPE[2]}) | {r['tokens_per_s']:,.0f} | "
                 f"{fmt(r['mfu'])} | {r['peak_gib']:.2f} | {step_profile(r)} | MFU >= 35% |")
    harness.write_table("gpu", "GPU: real model sizes, random weights", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
