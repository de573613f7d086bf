"""GPU speed and memory at real model sizes, random weights (nothing is downloaded).

1. Phi-2-shaped model (Phi-2's config: 2.7B parameters) under QLoRA as recipes/phi2_qlora_dialogsum.yaml
   sets it up (NF4 + double quantization, bf16 compute, LoRA r 32 on q/k/v/dense, gradient
   checkpointing, paged 8-bit AdamW), at batch 1 x 512 and 4 x 1024 tokens: tokens/s, MFU and peak
   memory. Targets (issue 14): MFU >= 25% and peak <= 4 GiB at 1 x 512; MFU >= 40% and peak <= 6 GiB at 4 x 1024.
2. T5-base-shaped model, full fine-tune as recipes/t5_base_squad.yaml sets it up (float32 weights, as t5-base is
   stored on the hub, under bf16 autocast; AdamW, ``adamw_torch``), batch 32 x (512 in, 128 out): MFU, target >= 35%.
   (Until 2026-12 this row trained bf16 weights with fused AdamW, which is not the recipe's set-up.)

MFU follows the telemetry's convention (``ftkit.tracking.flops_per_token``: 6 x trainable +
4 x frozen parameters + attention; for T5 each token counts the stack it passes through) against
the device's peak dense bf16 FLOP/s. Timed: 10 steps
after 3 warm-up steps, synchronised. Each configuration runs in its own process (with ``--tiny``, all in one).

3. The recipe's speed and memory levers (``LEVERS``: recipe options), each alone over the recipe's
   settings at 4 x 1024, then together those that were faster at no more memory: tokens/s against the
   recipe's in the same invocation, peak memory, and the profile of each; and the T5 recipe's (``T5_LEVERS``)
   over its settings. Their order puts what a cut-off run (one short device call) must not miss first; the
   results are written after every probe.

Without CUDA this prints that it was skipped and exits 0; ``--tiny`` runs the same code on tiny
configs (CPU allowed), which is how the code path is tested without a GPU.

    python benchmarks/gpu.py [--tiny]        # or: make bench
"""

from __future__ import annotations

import os
import subprocess
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
TINY_SHAPES = {"qlora": [(1, 128), (2, 256)], "lever": (2, 256), "t5": (4, 128, 32)}  # --tiny: the code path, fast
TARGETS = {"qlora_mfu_1x512": 0.25, "qlora_mfu_4x1024": 0.40, "qlora_peak_gib_1x512": 4.0, "qlora_peak_gib_4x1024": 6.0,
           "t5_mfu": 0.35}
WARMUP, TIMED = 3, 10
LEVER_SHAPE = (4, 1024)
# each over the recipe's settings; torch_compile last (its compilation is the longest probe)
LEVERS = {"upcast_unquantized_weights false": {"upcast_unquantized_weights": False},
          "cross_entropy_chunk_tokens 1024": {"cross_entropy_chunk_tokens": 1024},
          "optim adamw_torch_fused": {"optim": "adamw_torch_fused"},
          "gradient_checkpointing false": {"gradient_checkpointing": False},
          "torch_compile true": {"torch_compile": True}}
T5_LEVERS = {"optim adamw_torch_fused": {"optim": "adamw_torch_fused"},
             "torch_compile true": {"torch_compile": True}}  # over recipes/t5_base_squad.yaml's settings
MEMORY_LEVERS = {"gradient_checkpointing false"}  # faster by spending memory: not taken into the combination
FASTER = 1.03  # a lever joins the combination when it gives this many times the recipe's tokens/s, peak no higher


def _train(model, optimizer, inputs: dict, device: str, tiny: bool, loss_of=None) -> tuple[int, float, dict]:
    """Warm-up steps, then timed steps (synchronised) of forward/backward/step on ``inputs``;
    returns (timed steps, seconds, a profile of one more step). The peak-memory counter is reset
    first: it then holds the model, its optimizer state and the training steps, not the loading.
    ``loss_of(model, inputs)``: the loss (default: the model's own)."""
    import torch

    loss_of = loss_of or (lambda m, batch: m(**batch).loss)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = loss_of(model, inputs)
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


def qlora_config(model_dir: str, cuda: bool, overrides: dict | None = None):
    """recipes/phi2_qlora_dialogsum.yaml's model and optimizer settings (bf16 only on a GPU), and ``overrides``."""
    return fixtures.script_config("qlora_summarize", "SummarizeConfig", {
        "model_name_or_path": model_dir, "output_dir": os.path.join(model_dir, "unused"), "train_file": "unused.jsonl",
        "load_in_4bit": True, "bnb_4bit_compute_dtype": "bfloat16" if cuda else "float32",
        "lora_r": 32, "lora_alpha": 32, "lora_dropout": 0.05, "gradient_checkpointing": True,
        "optim": "paged_adamw_8bit", "learning_rate": 2e-4, "bf16": cuda, **(overrides or {})})


def qlora(model_dir: str, batch: int, seq: int, overrides: dict | None = None, tiny: bool = False) -> dict:
    """The recipe's QLoRA set-up (with ``overrides`` of its options) trained on random rows: the model's own loss
    (a bare loop's), or ftkit's chunked loss where ``cross_entropy_chunk_tokens`` asks for it."""
    import torch
    from transformers import AutoModelForCausalLM

    from ftkit import losses, modeling, optim, tracking

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = qlora_config(model_dir, device == "cuda", overrides)
    model = modeling.load_pretrained(AutoModelForCausalLM, model_dir, config, device=device)
    model.config.use_cache = False
    model = modeling.add_lora(model, config, task_type="CAUSAL_LM").to(device)
    optimizer = optim.build_optimizer(model, config)
    trainable, total = modeling.parameter_counts(model)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    model.train()  # gradient checkpointing (and LoRA dropout) act in training mode only
    def chunked_loss(m, batch):  # ftkit's loss, as the recipe computes it with cross_entropy_chunk_tokens
        loss_sum, count = losses.causal_lm_forward_loss(m, {"input_ids": batch["input_ids"]}, batch["labels"],
                                                        config.cross_entropy_chunk_tokens)
        return loss_sum.sum() / count.sum()

    steps, elapsed, profiled = _train(model, optimizer, {"input_ids": ids, "labels": ids}, device, tiny,
                                      chunked_loss if config.cross_entropy_chunk_tokens else None)
    tokens_per_s = batch * seq * steps / elapsed
    flops = tracking.flops_per_token(model.config, trainable, total - trainable, seq)
    return {"tokens_per_s": tokens_per_s, "mfu": _mfu(tokens_per_s * flops), "peak_gib": _peak_gib(device),
            "trainable_params": trainable, "total_params": total, "profile": profiled}


def t5_config(model_dir: str, cuda: bool, overrides: dict | None = None):
    """recipes/t5_base_squad.yaml's model and optimizer settings (bf16 autocast only on a GPU), and ``overrides``."""
    return fixtures.script_config("t5_qa", "QAConfig", {
        "model_name_or_path": model_dir, "output_dir": os.path.join(model_dir, "unused"), "train_file": "unused.jsonl",
        "learning_rate": 1e-4, "weight_decay": 0.0, "bf16": cuda, **(overrides or {})})


def t5_full(model_dir: str, batch: int, source: int, target: int, overrides: dict | None = None,
            tiny: bool = False) -> dict:
    """The T5 recipe's full fine-tune (with ``overrides`` of its options) on random rows, loaded and set up by ftkit
    as scripts/t5_qa.py does (weights in the dtype stored, compiled blocks with ``torch_compile``)."""
    import torch
    from transformers import AutoModelForSeq2SeqLM

    from ftkit import modeling, optim

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = t5_config(model_dir, device == "cuda", overrides)
    model = modeling.training_setup(modeling.load_pretrained(AutoModelForSeq2SeqLM, model_dir, config), config)
    model = model.to(device).train()
    optimizer = optim.build_optimizer(model, config)
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


PROBES = {"qlora": qlora, "t5": t5_full}


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
    cuda = torch.cuda.is_available()
    # t5-base is stored in float32, which the T5 recipe trains; Phi-2 loads in 4-bit (bf16 beside), whatever is stored
    dtype = torch.bfloat16 if cuda and kind == "phi" else torch.float32
    with torch.device("cuda" if cuda else "cpu"):  # random init of 2.7B weights: seconds on a GPU, minutes on a CPU
        cls.from_config(config, dtype=dtype).save_pretrained(path)
    if cuda:
        torch.cuda.empty_cache()
    return path


def main() -> int:
    args = harness.probe_cli(__doc__, "tiny configs, CPU allowed: a smoke run of the code path (in one process)",
                             PROBES)
    import torch

    if not torch.cuda.is_available() and not args.tiny:
        print("gpu benchmarks: no CUDA device here, skipped (results/gpu.json is left as it was)")
        return 0
    results, levers, t5_levers = {}, {}, {}
    shapes = TINY_SHAPES if args.tiny else {"qlora": QLORA_SHAPES, "lever": LEVER_SHAPE, "t5": T5_SHAPE}
    lever_shape = f"{shapes['lever'][0]}x{shapes['lever'][1]}"

    def record(name: str, into: dict, kind: str, probe_args: list) -> None:
        """One probe in its own process (with --tiny, in this one); its result (or its failure: the sweep goes on)
        written at once, so that a run cut short keeps what it measured."""
        try:
            into[name] = harness.probe(__file__, kind, probe_args, args.tiny, PROBES if args.tiny else None)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            into[name] = {"error": str(e).strip().splitlines()[-1][:300]}
        print(f"{name}: {into[name]}", flush=True)
        if not args.tiny:  # a smoke run records nothing
            write(results, levers, t5_levers, shapes)

    with tempfile.TemporaryDirectory() as workdir:
        phi = build(workdir, "phi", args.tiny)
        for batch, seq in sorted(shapes["qlora"], key=lambda shape: shape != shapes["lever"]):  # the levers' baseline first
            record(f"qlora {batch}x{seq}", results, "qlora", [phi, batch, seq])
        levers["recipe"] = results[f"qlora {lever_shape}"]
        for name, overrides in LEVERS.items():
            if name == "torch_compile true":  # T5 and its quick lever before the longest probes
                t5 = build(workdir, "t5", args.tiny)
                record("t5-base full", results, "t5", [t5, *shapes["t5"]])
                t5_levers["recipe"] = results["t5-base full"]
                fused = "optim adamw_torch_fused"
                record(fused, t5_levers, "t5", [t5, *shapes["t5"], T5_LEVERS[fused]])
            record(name, levers, "qlora", [phi, *shapes["lever"], overrides])
        helped = faster_levers(levers)
        if len(helped) > 1:
            record(" + ".join(helped), levers, "qlora",
                   [phi, *shapes["lever"], {k: v for name in helped for k, v in LEVERS[name].items()}])
        record("torch_compile true", t5_levers, "t5", [t5, *shapes["t5"], T5_LEVERS["torch_compile true"]])
    if args.tiny:  # the tables a GPU run writes, printed
        print("\n".join(table(results, levers, t5_levers, shapes)))
    print(f"levers faster than the recipe at no more memory: {faster_levers(levers) or 'none'}", flush=True)
    return 0


def faster_levers(levers: dict) -> list[str]:
    """The single levers that gave >= FASTER x the recipe's tokens/s with a peak no higher (memory levers aside)."""
    base = levers["recipe"]
    if "error" in base:
        return []
    return [name for name in LEVERS if name in levers and name not in MEMORY_LEVERS and "error" not in levers[name]
            and levers[name]["tokens_per_s"] >= FASTER * base["tokens_per_s"]
            and not levers[name]["peak_gib"] > base["peak_gib"]]


def write(results: dict, levers: dict, t5_levers: dict, shapes: dict) -> None:
    """results/gpu.json and the README tables, from what has been measured so far."""
    harness.write_results("gpu", {"results": results, "levers": levers, "lever_shape": list(shapes["lever"]),
                                  "t5_levers": t5_levers, "targets": TARGETS, "timed_steps": TIMED, "warmup": WARMUP,
                                  # what preflight.py re-estimates: checkpointing and dropout on, T5's recipe set-up
                                  "qlora_train_mode": True, "t5_recipe_setup": True})
    harness.write_table("gpu", "GPU: real model sizes, random weights", table(results, levers, t5_levers, shapes))


def table(results: dict, levers: dict, t5_levers: dict, shapes: dict) -> list[str]:
    fmt = (lambda v: f"{100 * v:.1f}%" if v is not None else "n/a")
    count = (lambda n: f"{n:,}" if n is not None else "n/a")  # (a CPU has no GPU-busy time, launches or syncs)

    def cells(r: dict, base: float | None = None) -> str:  # tokens/s [| vs recipe] | MFU | peak | step profile
        if "error" in r:
            return " | ".join([f"failed: {r['error']}"] + ["-"] * (3 if base is None else 4))
        p = r["profile"]
        busy = f"{100 * p['gpu_busy_ms'] / p['step_ms']:.0f}%" if p["gpu_busy_ms"] is not None else "n/a"
        ratio = [] if base is None else [f"{r['tokens_per_s'] / base:.3f}" if base else "n/a"]
        return " | ".join([f"{r['tokens_per_s']:,.0f}", *ratio, fmt(r["mfu"]), f"{r['peak_gib']:.2f}",
                           f"{p['step_ms']:.0f}, {busy}, {count(p['kernel_launches'])}, {count(p['synchronizations'])}"])

    lines = ["| model | batch | tokens/s | MFU | peak memory (GiB) | step: ms, GPU busy, kernel launches, syncs | "
             "targets |", "|---|---|---|---|---|---|---|"]
    for (batch, seq) in shapes["qlora"]:
        if (r := results.get(f"qlora {batch}x{seq}")) is not None:
            mfu, peak = TARGETS.get(f"qlora_mfu_{batch}x{seq}"), TARGETS.get(f"qlora_peak_gib_{batch}x{seq}")
            lines.append(f"| Phi-2-shaped, QLoRA | {batch} x {seq} | {cells(r)} | "
                         + (f"MFU >= {100 * mfu:.0f}%" if mfu else "-")
                         + (f", peak <= {peak:.0f} GiB |" if peak else " |"))
    if (r := results.get("t5-base full")) is not None:
        lines.append(f"| T5-base-shaped, full | {shapes['t5'][0]} x ({shapes['t5'][1]} + {shapes['t5'][2]}) | "
                     f"{cells(r)} | MFU >= 35% |")
    for sweep, title in ((levers, f"The recipe's levers, Phi-2-shaped QLoRA at {shapes['lever'][0]} x "
                                  f"{shapes['lever'][1]}, each alone over the recipe's settings (the last row: those "
                                  "faster at no more memory, together):"),
                         (t5_levers, "The T5 recipe's levers, T5-base-shaped full fine-tune at the shape above, each "
                                     "alone over the recipe's settings:")):
        if "recipe" not in sweep:
            continue
        base = sweep["recipe"].get("tokens_per_s", 0.0)
        lines += ["", title, "", "| options | tokens/s | vs recipe | MFU | peak memory (GiB) | "
                  "step: ms, GPU busy, kernel launches, syncs |", "|---|---|---|---|---|---|"]
        lines += [f"| {name} | {cells(r, base)} |" for name, r in sweep.items()]
    return lines


if __name__ == "__main__":
    sys.exit(main())
