"""Training speed: ftkit's classify script against a bare PyTorch loop and against the HF Trainer.

One model (a small BERT, random init), one data set (IMDB reviews, S002's task), batch 8, max
length 512, 100 optimizer steps per run of which the first 10 are warm-up and not timed. Contenders,
alternated over several repeats, each in its own process:

- ``ftkit``: ``accelerate launch scripts/classify.py`` with ``group_by_length`` (the recipes'
  setting); its rates come from the script's own telemetry (``metrics.jsonl``, every 10 steps),
  which times the whole loop: accumulation context, the step's counts, finiteness check, scheduler,
  progress bar, logging.
- ``bare loop``: forward, loss, backward, gradient clipping (the recipes' max_grad_norm 1.0, which
  ftkit and the Trainer apply too), optimizer step on the same batches (same tokenization, same seeded
  length-grouped sampler, same collator) and nothing else.
- ``HF Trainer, pad to max_length``: ``transformers.Trainer`` as S002 configures it.
- ``HF Trainer, best``: the Trainer with dynamic padding and length grouping.

Each run's rate is the median of its 10-step intervals (steps 11-100); the table shows the median
over repeats. Benchmark 1 (loop overhead): ftkit steps/s / bare loop steps/s, target >= 0.97.
Benchmark 2 (vs the HF Trainer): ftkit real tokens/s / Trainer real tokens/s, targets >= 1.4
(pad to max_length) and >= 1.0 (best settings).

    python benchmarks/training_speed.py [--repeats 3]        # or: make bench
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fixtures  # noqa: E402
import harness  # noqa: E402

STEPS, WARMUP, BATCH, LOGGING = 100, 10, 8, 10
TARGETS = {"loop_overhead": 0.97, "trainer_pad_to_max": 1.4, "trainer_best": 1.0}


def ftkit_run(files: dict, model: str, workdir: str, repeat: int) -> dict:
    out = os.path.join(workdir, f"ftkit_{repeat}")
    harness.accelerate_launch("classify.py", [
        "--model_name_or_path", model, "--train_file", files["train"], "--validation_file", files["validation"],
        "--num_labels", "2", "--max_length", str(fixtures.MAX_LENGTH), "--per_device_train_batch_size", str(BATCH),
        "--max_steps", str(STEPS), "--logging_steps", str(LOGGING), "--learning_rate", "5e-5",
        "--group_by_length", "true", "--dataloader_drop_last", "true", "--report_to", "none",
        "--load_best_model_at_end", "false", "--seed", "42", "--output_dir", out])
    entries = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    train = [e for e in entries if "perf/tokens_per_s" in e and e["step"] > WARMUP]  # one per LOGGING steps
    tokens = sum(e["perf/tokens_per_s"] * e["perf/step_time_s"] * LOGGING for e in train)
    computed = sum(e["perf/tokens_per_s"] * e["perf/step_time_s"] * LOGGING / e["perf/padding_efficiency"]
                   for e in train)
    return {"steps_per_s": statistics.median(1 / e["perf/step_time_s"] for e in train),
            "tokens_per_s": statistics.median(e["perf/tokens_per_s"] for e in train),
            "padding_efficiency": tokens / computed, "timed_steps": LOGGING * len(train), "real_tokens": round(tokens)}


def contender_run(files: dict, model: str, workdir: str, kind: str, *extra: str) -> dict:
    proc = harness.run([sys.executable, os.path.join(harness.ROOT, "benchmarks", "contenders.py"), kind,
                        "--model", model, "--train_file", files["train"], "--workdir", workdir,
                        "--steps", str(STEPS), "--warmup", str(WARMUP), "--batch_size", str(BATCH),
                        "--logging_steps", str(LOGGING), *extra])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        files = fixtures.imdb_files(workdir, STEPS * BATCH)
        model = fixtures.small_bert(workdir, files["train"])
        contenders = {
            "ftkit": lambda r: ftkit_run(files, model, workdir, r),
            "bare loop": lambda r: contender_run(files, model, workdir, "bare"),
            "HF Trainer, pad to max_length": lambda r: contender_run(files, model, workdir, "trainer",
                                                                     "--padding", "max_length"),
            "HF Trainer, best": lambda r: contender_run(files, model, workdir, "trainer", "--group_by_length"),
        }
        print(f"training speed: {len(contenders)} contenders x {args.repeats} repeats, data {files['source']}",
              flush=True)
        runs = harness.alternate(contenders, args.repeats)

    med = {name: {k: harness.median(r, k) for k in ("steps_per_s", "tokens_per_s", "padding_efficiency")}
           for name, r in runs.items()}
    ratios = {"loop_overhead": med["ftkit"]["steps_per_s"] / med["bare loop"]["steps_per_s"],
              "trainer_pad_to_max": med["ftkit"]["tokens_per_s"] / med["HF Trainer, pad to max_length"]["tokens_per_s"],
              "trainer_best": med["ftkit"]["tokens_per_s"] / med["HF Trainer, best"]["tokens_per_s"]}
    setup = {"model": fixtures.BERT, "data": f"IMDB ({files['source']}), {STEPS * BATCH} reviews",
             "batch_size": BATCH, "max_length": fixtures.MAX_LENGTH, "steps": STEPS, "untimed_warmup_steps": WARMUP,
             "repeats": args.repeats}
    harness.write_results("training_speed", {"setup": setup, "runs": runs, "median": med, "ratios": ratios,
                                              "targets": TARGETS})
    desc = (f"Small BERT ({fixtures.BERT['num_hidden_layers']} layers, hidden {fixtures.BERT['hidden_size']}, "
            f"random init), IMDB ({files['source']}), batch {BATCH}, max length {fixtures.MAX_LENGTH}, steps "
            f"{WARMUP + 1}-{STEPS} timed in 10-step intervals (a run's rate: its median interval), median of "
            f"{args.repeats} alternating repeats, one process each; every contender clips gradients (max_grad_norm 1.0).")
    lines = [desc, "", "| contender | steps/s | real tokens/s | padding efficiency | ftkit / contender | target |",
             "|---|---|---|---|---|---|"]
    for name, key, target in [("ftkit", None, None), ("bare loop", "loop_overhead", "steps/s >= 0.97"),
                              ("HF Trainer, pad to max_length", "trainer_pad_to_max", "tokens/s >= 1.4"),
                              ("HF Trainer, best", "trainer_best", "tokens/s >= 1.0")]:
        m = med[name]
        ratio = f"{ratios[key]:.3f} ({harness.verdict(ratios[key], TARGETS[key])})" if key else "-"
        lines.append(f"| {name} | {m['steps_per_s']:.2f} | {m['tokens_per_s']:,.0f} | {m['padding_efficiency']:.3f} | "
                     f"{ratio} | {target or '-'} |")
    harness.write_table("training_speed", "Training speed: loop overhead and the HF Trainer", lines)
    for key, value in ratios.items():
        print(f"{key}: {value:.3f} (target {TARGETS[key]}: {harness.verdict(value, TARGETS[key])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
