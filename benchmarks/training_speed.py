"""Training speed: ftkit's classify script against a bare PyTorch loop and against the HF Trainer.

One model (a small BERT, random init), one data set (800 IMDB reviews, S002's task), batch 8, max
length 512, 2 epochs of 100 optimizer steps per run; the first epoch is warm-up, the second is timed,
so every contender is timed on the same examples (the same real tokens), however it batches them.
All use one optimizer (``--optim``, default the HF Trainer's ``adamw_torch_fused``). Contenders,
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

A run's steps/s and real tokens/s are its timed epoch's steps and real tokens over the epoch's time
(ftkit's from its telemetry, logged every 10 steps); the table shows the median over repeats, and
each ratio is the median of the repeats' ratios (a repeat's runs follow one another, so a slow
phase of the machine slows both). Benchmark 1 (loop overhead): ftkit steps/s / bare loop steps/s,
target >= 0.97.
Benchmark 2 (vs the HF Trainer): ftkit real tokens/s / Trainer real tokens/s, targets >= 1.4
(pad to max_length) and >= 1.0 (best settings).

    python benchmarks/training_speed.py [--repeats 6] [--optim adamw_torch]        # or: make bench
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fixtures  # noqa: E402
import harness  # noqa: E402

EPOCH_STEPS, EPOCHS, BATCH, LOGGING = 100, 2, 8, 10
WARMUP = EPOCH_STEPS * (EPOCHS - 1)  # untimed: every contender is timed on the last epoch, the same examples
TARGETS = {"loop_overhead": 0.97, "trainer_pad_to_max": 1.4, "trainer_best": 1.0}


def ftkit_run(files: dict, model: str, workdir: str, repeat: int, optim: str) -> dict:
    out = os.path.join(workdir, f"ftkit_{repeat}")
    harness.accelerate_launch("classify.py", [
        "--model_name_or_path", model, "--train_file", files["train"], "--validation_file", files["validation"],
        "--num_labels", "2", "--max_length", str(fixtures.MAX_LENGTH), "--per_device_train_batch_size", str(BATCH),
        "--num_train_epochs", str(EPOCHS), "--logging_steps", str(LOGGING), "--learning_rate", "5e-5", "--optim", optim,
        "--group_by_length", "true", "--dataloader_drop_last", "true", "--report_to", "none",
        "--load_best_model_at_end", "false", "--seed", "42", "--output_dir", out])
    entries = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    train = [e for e in entries if "perf/tokens_per_s" in e and e["step"] > WARMUP]  # one per LOGGING steps
    seconds = sum(e["perf/step_time_s"] * LOGGING for e in train)
    tokens = sum(e["perf/tokens_per_s"] * e["perf/step_time_s"] * LOGGING for e in train)
    computed = sum(e["perf/tokens_per_s"] * e["perf/step_time_s"] * LOGGING / e["perf/padding_efficiency"]
                   for e in train)
    return {"steps_per_s": LOGGING * len(train) / seconds, "tokens_per_s": tokens / seconds,
            "padding_efficiency": tokens / computed, "timed_steps": LOGGING * len(train), "real_tokens": round(tokens)}


def contender_run(files: dict, model: str, workdir: str, optim: str, kind: str, *extra: str) -> dict:
    proc = harness.run([sys.executable, os.path.join(harness.ROOT, "benchmarks", "contenders.py"), kind,
                        "--model", model, "--train_file", files["train"], "--workdir", workdir,
                        "--epochs", str(EPOCHS), "--warmup", str(WARMUP), "--batch_size", str(BATCH),
                        "--logging_steps", str(LOGGING), "--optim", optim, *extra])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=6)  # even: each order equally often
    p.add_argument("--optim", choices=["adamw_torch", "adamw_torch_fused"], default="adamw_torch_fused",
                   help="every contender's optimizer (the HF Trainer's default)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        files = fixtures.imdb_files(workdir, EPOCH_STEPS * BATCH)
        model = fixtures.small_bert(workdir, files["train"])
        contenders = {
            "ftkit": lambda r: ftkit_run(files, model, workdir, r, args.optim),
            "bare loop": lambda r: contender_run(files, model, workdir, args.optim, "bare"),
            "HF Trainer, pad to max_length": lambda r: contender_run(files, model, workdir, args.optim, "trainer",
                                                                     "--padding", "max_length"),
            "HF Trainer, best": lambda r: contender_run(files, model, workdir, args.optim, "trainer",
                                                        "--group_by_length"),
        }
        print(f"training speed: {len(contenders)} contenders x {args.repeats} repeats, data {files['source']}",
              flush=True)
        runs = harness.alternate(contenders, args.repeats)

    med = {name: {k: harness.median(r, k) for k in ("steps_per_s", "tokens_per_s", "padding_efficiency")}
           for name, r in runs.items()}
    ratios = {"loop_overhead": harness.paired_ratio(runs["ftkit"], runs["bare loop"], "steps_per_s"),
              "trainer_pad_to_max": harness.paired_ratio(runs["ftkit"], runs["HF Trainer, pad to max_length"],
                                                         "tokens_per_s"),
              "trainer_best": harness.paired_ratio(runs["ftkit"], runs["HF Trainer, best"], "tokens_per_s")}
    setup = {"model": fixtures.BERT, "data": f"IMDB ({files['source']}), {EPOCH_STEPS * BATCH} reviews",
             "batch_size": BATCH, "max_length": fixtures.MAX_LENGTH, "epochs": EPOCHS, "steps": EPOCH_STEPS * EPOCHS,
             "untimed_warmup_steps": WARMUP, "optim": args.optim, "repeats": args.repeats}
    harness.write_results("training_speed", {"setup": setup, "runs": runs, "median": med, "ratios": ratios,
                                              "targets": TARGETS})
    desc = (f"Small BERT ({fixtures.BERT['num_hidden_layers']} layers, hidden {fixtures.BERT['hidden_size']}, "
            f"random init), IMDB ({files['source']}), {EPOCH_STEPS * BATCH} reviews, batch {BATCH}, max length "
            f"{fixtures.MAX_LENGTH}, {EPOCHS} epochs of which the last ({EPOCH_STEPS} steps) is timed, so every "
            f"contender trains on the same examples (rates: the epoch's steps and real tokens over its time); "
            f"median of {args.repeats} alternating repeats, one process each (ratios: the median of the repeats' "
            f"ratios); every contender clips gradients (max_grad_norm 1.0) and uses {args.optim}.")
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
