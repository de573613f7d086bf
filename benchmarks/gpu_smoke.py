"""Every real recipe, at its real model size, on a GPU: random weights, nothing downloaded.

For each ``recipes/<name>.yaml`` the run keeps the recipe's model and training settings (4-bit
quantization, LoRA, bf16, batch sizes, accumulation, gradient checkpointing, optimizer, length
grouping) and replaces only what needs the network:

- the hub model by its architecture (the hub config's sizes, written below) with random weights,
  through ``model_config``; its vocabulary is the offline tokenizer's, so the embedding and output
  layers are smaller than the real ones (all the blocks are full size);
- the hub data set by the data and tokenizer settings of its offline twin in ``recipes/tiny/``.

Each recipe runs through ``accelerate launch`` for ``--max_steps`` optimizer steps with an
evaluation and a checkpoint half-way, then resumes from that checkpoint and runs to the end again:
the resumed run must log the same losses. Recorded per recipe: exit code, wall time, the train
losses, tokens/s, MFU and peak GPU memory from ``metrics.jsonl``, the final evaluation, and the
``--preflight`` estimate of the same command (its total against the training steps' peak before the half-way
evaluation). Results go to
``benchmarks/results/gpu_smoke.json`` and a table in ``benchmarks/README.md``.

Without CUDA this prints that it was skipped and exits 0; ``--tiny`` runs the same code with the
tiny recipes' model sizes on whatever device is there (the CPU test of this file).

    python benchmarks/gpu_smoke.py [--tiny] [--only NAME ...] [--max_steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402
from gpu import PHI2, T5_BASE  # noqa: E402

# The hub configs' sizes (bert-base-*, gpt2): what the recipes load with network.
BERT_BASE = {"model_type": "bert", "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
             "num_attention_heads": 12, "max_position_embeddings": 512, "type_vocab_size": 2}
GPT2_SMALL = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024}

# recipe -> (script, offline twin in recipes/tiny/, architecture)
RECIPES = {
    "phi2_qlora_dialogsum": ("qlora_summarize", "qlora_summarize", PHI2),
    "t5_base_squad": ("t5_qa", "t5_qa", T5_BASE),
    "bert_imdb": ("classify", "imdb", BERT_BASE),
    "bert_mrpc": ("classify", "mrpc", BERT_BASE),
    "gpt2_spam": ("classify", "spam", GPT2_SMALL),
}
RESUME_TOLERANCE = 1e-5  # relative: a resumed run repeats the losses of the straight one

# where the data comes from: dropped from the real recipe, taken from the twin
HUB_DATA_KEYS = {"model_name_or_path", "dataset_name", "dataset_config_name", "validation_split", "test_split",
                 "train_file", "file_format", "subset_seed", "max_train_samples"}
TWIN_DATA_KEYS = {"tokenizer_files", "tokenizer_vocab_size", "train_file", "validation_file", "test_file",
                  "val_split", "split_ratios", "split_seed", "column_names", "label_map", "balance",
                  "text_column", "text_pair_column", "label_column", "max_train_samples", "subset_seed"}


def smoke_config(name: str, workdir: str, max_steps: int, tiny: bool) -> dict:
    """The recipe with its hub model and data replaced (see the module's docstring)."""
    script, twin_name, arch = RECIPES[name]
    real = yaml.safe_load(open(os.path.join(harness.ROOT, "recipes", f"{name}.yaml")))
    twin = yaml.safe_load(open(os.path.join(harness.ROOT, "recipes", "tiny", f"{twin_name}.yaml")))
    config = {k: v for k, v in real.items() if k not in HUB_DATA_KEYS}
    config.update({k: twin[k] for k in TWIN_DATA_KEYS if k in twin})
    config["tokenizer_files"] = [os.path.join(harness.ROOT, f) for f in config["tokenizer_files"]]
    for key in ("train_file", "validation_file", "test_file"):
        if key in config:
            config[key] = os.path.join(harness.ROOT, config[key])
    config.update({
        "model_config": twin["model_config"] if tiny else dict(arch),
        "output_dir": os.path.join(workdir, name),
        "max_steps": max_steps, "logging_steps": 1,
        "eval_steps": max_steps // 2, "save_steps": max_steps // 2, "save_total_limit": 2,
        "report_to": "none",
        # generation-based evaluation on a few examples: the point is that it runs
        **({"num_eval_generate": 4, "num_test_compare": 8, "max_new_tokens": 32} if script == "qlora_summarize" else {}),
        **({"max_eval_samples": 16, "generation_num_beams": 2} if script == "t5_qa" else {}),
    })
    if "eval_strategy" in config:  # every epoch -> half-way
        config["eval_strategy"] = "steps"
    if tiny:  # what depends on the architecture follows the tiny one
        for key in ("max_length", "trainable_modules", "lora_target_modules", "bnb_4bit_compute_dtype"):
            config.pop(key, None)
            if key in twin:
                config[key] = twin[key]
    return config


def launch(script: str, config_path: str, extra: list[str], log_path: str) -> tuple[int, float]:
    cmd = [os.path.join(harness.BIN, "accelerate"), "launch", "--num_processes", "1", "--num_machines", "1",
           "--dynamo_backend", "no", os.path.join(harness.ROOT, "scripts", f"{script}.py"), "--config", config_path,
           *extra]
    start = time.perf_counter()
    with open(log_path, "a") as log:
        rc = subprocess.run(cmd, cwd=harness.ROOT, env=harness.env(), stdout=log, stderr=subprocess.STDOUT,
                            timeout=1800).returncode
    return rc, time.perf_counter() - start


def train_losses(output_dir: str) -> dict[int, float]:
    path = os.path.join(output_dir, "metrics.jsonl")
    events = [json.loads(line) for line in open(path)] if os.path.isfile(path) else []
    return {e["step"]: e["train/loss"] for e in events if "train/loss" in e}


def perf(output_dir: str, max_steps: int) -> dict:
    events = [json.loads(line) for line in open(os.path.join(output_dir, "metrics.jsonl"))]
    train = [e for e in events if "train/loss" in e][1:]  # the first step includes warm-up

    def med(key):
        values = [e[key] for e in train if e.get(key) is not None]
        return statistics.median(values) if values else None

    before_evaluation = [e for e in events if "train/loss" in e and e["step"] <= max_steps // 2]
    return {"tokens_per_s": med("perf/tokens_per_s"), "mfu": med("perf/mfu"),
            "peak_memory_gb": max((e.get("perf/peak_memory_gb") or 0.0 for e in events), default=None),
            # each log's peak is its window's: before the half-way evaluation they are training's alone
            "train_peak_gb": max((e.get("perf/peak_memory_gb") or 0.0 for e in before_evaluation), default=None)}


def smoke(name: str, workdir: str, max_steps: int, tiny: bool) -> dict:
    script = RECIPES[name][0]
    config = smoke_config(name, workdir, max_steps, tiny)
    config_path = os.path.join(workdir, f"{name}.yaml")
    with open(config_path, "w") as f:
        yaml.safe_dump(config, f)
    log_path = os.path.join(workdir, f"{name}.log")
    out = config["output_dir"]
    result = {"recipe": name, "script": script}
    # the same command with --preflight first: its estimate, set against the peak the run then reaches
    checked = out + "_preflight"
    launch(script, config_path, ["--preflight", "true", "--output_dir", checked], log_path)
    if os.path.isfile(os.path.join(checked, "preflight.json")):
        memory = json.load(open(os.path.join(checked, "preflight.json")))["memory"]
        result.update(preflight_gb=memory["total_gb"], preflight_peak_gb=memory["peak_gb"],
                      preflight_fits=memory["fits"])
    rc, seconds = launch(script, config_path, [], log_path)
    result.update(rc=rc, seconds=round(seconds, 1))
    if rc != 0:
        result["log_tail"] = open(log_path).read()[-4000:]
        return result
    straight = train_losses(out)
    result.update(perf(out, max_steps), first_loss=straight[min(straight)], last_loss=straight[max(straight)],
                  final=json.load(open(os.path.join(out, "metrics.json"))))
    if not tiny and result.get("preflight_gb") and result.get("train_peak_gb"):  # both GiB of CUDA tensors
        result["preflight_over_peak"] = result["preflight_gb"] / result["train_peak_gb"]
        if result.get("peak_memory_gb"):  # the whole run's, the half-way evaluation's included
            result["preflight_peak_over_peak"] = result["preflight_peak_gb"] / result["peak_memory_gb"]
    # resume from the half-way checkpoint into a fresh log: the second half must repeat itself
    half = os.path.join(out, "checkpoints", f"step_{max_steps // 2}")
    os.rename(os.path.join(out, "metrics.jsonl"), os.path.join(out, "metrics_straight.jsonl"))
    rc, seconds = launch(script, config_path, ["--resume_from_checkpoint", half], log_path)
    resumed = train_losses(out)
    result.update(resume_rc=rc, resume_seconds=round(seconds, 1))
    if rc != 0:
        result["log_tail"] = open(log_path).read()[-4000:]
        return result
    shared = sorted(set(resumed) & set(straight))
    result["resume_steps_compared"] = len(shared)
    result["resume_max_loss_diff"] = max((abs(resumed[s] - straight[s]) for s in shared), default=None)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="the tiny recipes' model sizes, CPU allowed")
    p.add_argument("--only", nargs="*", choices=sorted(RECIPES), help="these recipes only")
    p.add_argument("--max_steps", type=int, default=20)
    p.add_argument("--workdir", help="keep the runs here (default: a temporary folder)")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available() and not args.tiny:
        print("gpu smoke runs: no CUDA device here, skipped (results/gpu_smoke.json is left as it was)")
        return 0
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or tmp
        os.makedirs(workdir, exist_ok=True)
        for name in args.only or RECIPES:
            r = smoke(name, workdir, args.max_steps, args.tiny)
            results.append(r)
            shown = {k: v for k, v in r.items() if k not in ("final", "log_tail")}
            print(f"{name}: {json.dumps(shown)}", flush=True)
            if "log_tail" in r:
                print(r["log_tail"], flush=True)
    failed = [r["recipe"] for r in results if r["rc"] != 0 or r.get("resume_rc") != 0
              or (r.get("resume_max_loss_diff") or 0.0) > RESUME_TOLERANCE * abs(r["last_loss"])]
    if failed:
        print(f"failed: {', '.join(failed)}", flush=True)
    if args.tiny:  # a check of the code path: nothing recorded
        return 1 if failed else 0
    # --only runs update their recipes' rows, the others' stay as recorded
    path = os.path.join(harness.RESULTS, "gpu_smoke.json")
    earlier = json.load(open(path))["results"] if os.path.isfile(path) else []
    fresh = {r["recipe"] for r in results}
    results = sorted([r for r in earlier if r["recipe"] not in fresh] + results, key=lambda r: list(RECIPES).index(r["recipe"]))
    harness.write_results("gpu_smoke", {"max_steps": args.max_steps, "results": results})
    num = (lambda v, f: format(v, f) if v is not None else "n/a")  # noqa: E731
    lines = ["| recipe | exit | s | loss first → last | tokens/s | MFU | peak GiB | preflight GiB (/ training peak) | "
             "resume: max loss diff |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["rc"] != 0:
            lines.append(f"| {r['recipe']} | {r['rc']} | {r['seconds']} | failed | | | | | |")
            continue
        checked = (f"{r['preflight_gb']:.2f} ({r['preflight_over_peak']:.2f})" if r.get("preflight_over_peak")
                   else num(r.get("preflight_gb"), ".2f"))
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        lines.append(f"| {r['recipe']} | {r['rc']} | {r['seconds']} | {r['first_loss']:.3f} → {r['last_loss']:.3f} | "
                     f"{num(r['tokens_per_s'], ',.0f')} | {mfu} | {num(r['peak_memory_gb'], '.2f')} | {checked} | "
                     f"{num(r.get('resume_max_loss_diff'), '.2g')} (exit {r['resume_rc']}) |")
    harness.write_table("gpu_smoke", "GPU: every recipe at real size, random weights", lines)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
