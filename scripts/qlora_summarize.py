"""QLoRA dialogue summarization: Phi-2 on DialogSum (source S001), a hand-written accelerate loop.

Features: 4-bit NF4 base model with double quantization (QLoRA) or 8-bit / bf16 / fp32, LoRA adapters (or a full fine-
tune), one prompt template for training and generation, loss on the summary only (``train_on_prompt: false``), over-
long examples dropped or truncated and counted, dynamic padding, length grouping, gradient accumulation with the loss
normalised by the target tokens of the whole accumulation window on all processes, gradient checkpointing, 8-bit paged
AdamW, atomic checkpoints with exact mid-epoch resume, eval loss + ROUGE during training, and a base-vs-fine-tuned
ROUGE table on test dialogues at the end; ``--predict`` summarizes new text.

    # tiny model, CPU, offline (seconds)
    accelerate launch scripts/qlora_summarize.py --config recipes/tiny/qlora_summarize.yaml
    # Phi-2 on one GPU
    accelerate launch scripts/qlora_summarize.py --config recipes/phi2_qlora_dialogsum.yaml
    # predictions from a trained adapter
    python scripts/qlora_summarize.py --predict --adapter outputs/phi2_dialogsum/final --text "#Person1#: ..."
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from ftkit import (autobatch, checkpoint, cli, data, distributed, loop, losses, metrics, modeling, optim,
                   options, preflight, rundir)
from ftkit.config import ConfigError, opt

logger = logging.getLogger("ftkit")


@dataclass
class SummarizeConfig(options.ModelArguments, options.LoraArguments, options.DataArguments, options.TrainingArguments,
                      options.EvaluationArguments, options.TrackingArguments, options.PreflightArguments):
    """Fine-tune a causal LM (QLoRA by default) to summarize dialogues."""

    load_best_model_at_end: bool = opt(False, "Reload the best adapter by metric_for_best_model before the final "
                                              "evaluation and export (S001 exports the last one).")

    dialogue_column: str = opt("dialogue", "Column holding the dialogue.")
    summary_column: str = opt("summary", "Column holding the reference summary.")
    prompt_intro: str = opt("Below is an instruction that describes a task. Write a response that "
                            "appropriately completes the request.", "First paragraph of the prompt.")
    instruction_key: str = opt("### Instruct: Summarize the below conversation.", "Instruction paragraph.")
    response_key: str = opt("### Output:", "Line after which the summary starts.")
    end_key: str = opt("### End", "Marker after the summary; generation is cut at its first '###'.")
    train_on_prompt: bool = opt(False, "Also learn the prompt tokens (S001 did; off: only the summary).")
    packing: bool = opt(False, "Pack several training examples per row up to max_length; position ids restart "
                                "per example and no token attends across examples.")
    overlong: str = opt("drop", "Examples longer than max_length: drop them, or truncate the dialogue.",
                        choices=["drop", "truncate"])
    cross_entropy_chunk_tokens: int | None = opt(None, "Compute the training and validation loss this many tokens at a "
                                                       "time from the final hidden states, so a batch's logits (x "
                                                       "vocabulary, fp32) are never held whole; none: all at once.",
                                                 min=1)
    num_eval_generate: int = opt(16, "Validation examples summarized for ROUGE at each evaluation (0: none).", min=0)
    num_test_compare: int = opt(50, "Test examples for the final base-vs-fine-tuned ROUGE table.", min=1)
    max_new_tokens: int = opt(100, "Generation limit for summaries.", min=1)
    predict: bool = opt(False, "Summarize --text or --input_file with a trained --adapter instead of training.")
    adapter: str | None = opt(None, "A trained adapter (or whole model: use_peft false, final_merged) for --predict: "
                                    "output_dir/final, or the output_dir.", path=True)
    input_file: str | None = opt(None, "Dialogues to summarize with --predict; ROUGE if summary_column is there.", path=True)
    text: str | None = opt(None, "One dialogue to summarize with --predict.")
    prediction_file: str | None = opt(None, "Write --predict results here as jsonl (default: print).", path=True)

    def check(self):
        scored = ["loss"] + (list(metrics.ROUGE_KEYS) if self.num_eval_generate else [])
        options.check_script(self, "adapter", bool(self.text), "--text TEXT", scored,
                         "" if self.num_eval_generate else " (ROUGE needs num_eval_generate > 0)")


# --- Prompt format: one template for training and generation (S001 used two different ones) -------


def prompt_of(config, dialogue: str) -> str:
    return f"{config.prompt_intro}\n\n{config.instruction_key}\n\n{dialogue}\n\n{config.response_key}\n"


def completion_of(config, summary: str) -> str:
    return f"{summary}\n\n{config.end_key}"


def tokenize_split(ds, tokenizer, config, max_length: int, name: str):
    """Prompt + summary tokens with the prompt masked; over-long examples dropped or truncated (and counted)."""

    def encode(batch):
        dialogues = batch[config.dialogue_column]
        if config.overlong == "truncate":
            dialogues = [fit_dialogue(tokenizer, config, d, s, max_length)
                         for d, s in zip(dialogues, batch[config.summary_column])]
        prompts = [prompt_of(config, d) for d in dialogues]
        completions = [completion_of(config, s) for s in batch[config.summary_column]]
        return {**data.tokenize_prompt_completion(tokenizer, prompts, completions, config.train_on_prompt),
                "truncated": [a != b for a, b in zip(dialogues, batch[config.dialogue_column])]}

    tokenized = ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"tokenize {name}",
                       num_proc=config.preprocessing_num_workers)
    kept = tokenized.filter(lambda n: n < max_length, input_columns="length")  # S001 drops len >= max
    counts = {"dropped": len(tokenized) - len(kept), "truncated": sum(kept["truncated"])}
    if counts["dropped"]:
        logger.warning("%s: dropped %d of %d examples with >= %d tokens (overlong=truncate keeps them)",
                       name, counts["dropped"], len(tokenized), max_length)
    if len(kept) == 0:
        raise ConfigError(f"{name}: no examples left: all {counts['dropped']} have >= max_length={max_length} tokens")
    return kept.remove_columns("truncated"), counts


def fit_dialogue(tokenizer, config, dialogue: str, summary: str, max_length: int) -> str:
    """Cut the dialogue's tail until prompt + summary (+ EOS) stay under max_length tokens."""
    def length(d):
        return len(tokenizer(prompt_of(config, d) + completion_of(config, summary))["input_ids"]) + 1

    return data.fit_text(tokenizer, dialogue, length, max_length - 1)


# --- The model and its loss: the training loop's and --preflight's --------------------------------


def setup(model, config):
    """The loaded model made ready to train: no KV cache, k-bit preparation, checkpointing, LoRA (add_lora)."""
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    return modeling.add_lora(model, config, task_type="CAUSAL_LM")


def loss_sums(model, batch: dict, config, max_tokens: int | None = None):
    """A batch's token loss sums and counts per example (packed rows: position ids, no mask;
    cross_entropy_chunk_tokens: its logits are never held whole, under ZeRO-3 in as many chunks on every process,
    ``max_tokens`` worth: see causal_lm_forward_loss); training's, evaluation's and --preflight's."""
    return losses.causal_lm_forward_loss(model, data.model_inputs(batch), batch["labels"],
                                         config.cross_entropy_chunk_tokens, max_tokens)


def step_loss(model, batch: dict, config, max_length: int | None = None):
    """A micro-batch's summed token loss: the training loop's and --preflight's."""
    max_tokens = config.per_device_train_batch_size * max_length if max_length else None
    return loss_sums(model, batch, config, max_tokens)[0].sum()


# --- Evaluation -----------------------------------------------------------------------------------


def eval_loss(acc, model, eval_dl, config, max_length: int) -> float:
    """Token-weighted loss over the validation set (each example counted once, across processes), in chunks as in
    training with cross_entropy_chunk_tokens."""
    max_tokens = config.per_device_eval_batch_size * max_length
    return metrics.mean_loss(acc, model, eval_dl, lambda batch: loss_sums(model, batch, config, max_tokens))


def summarize(acc, model, tokenizer, config, dialogues: list[str]) -> list[str]:
    """Greedy summaries of ``dialogues``, sharded over processes and gathered in order."""
    max_length = modeling.max_length_of(config, acc.unwrap_model(model).config)
    prompts = generation_prompts(tokenizer, config, dialogues, max_length)
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    texts = distributed.generate_in_order(
        acc, model, tokenizer, prompts, config.per_device_eval_batch_size,
        lambda prompts: tokenizer(prompts, return_tensors="pt", padding=True), max_new_tokens=config.max_new_tokens,
        use_cache=True, pad_token_id=tokenizer.pad_token_id)
    tokenizer.padding_side = "right"
    return [t.split("###")[0].strip() for t in texts]


def generation_prompts(tokenizer, config, dialogues: list[str], max_length: int) -> list[str]:
    """The prompts for ``dialogues``; a dialogue too long for its prompt and ``max_new_tokens`` to fit in ``max_length``
    (past the model's positions generation degrades or fails) loses its tail, said in the log."""
    room, length = max_length - config.max_new_tokens, lambda d: len(tokenizer(prompt_of(config, d))["input_ids"])
    if length("") > room:
        raise ConfigError(f"max_new_tokens: {config.max_new_tokens} leaves {room} of the {max_length} tokens of "
                          f"max_length to the prompt, less than its template alone ({length('')})")
    fitted = [data.fit_text(tokenizer, d, length, room) for d in dialogues]
    if cut := sum(a != b for a, b in zip(fitted, dialogues)):
        logger.warning("%d of %d dialogues cut to fit their prompt and max_new_tokens %d in max_length %d", cut,
                       len(dialogues), config.max_new_tokens, max_length)
    return [prompt_of(config, d) for d in fitted]


def prompt_lengths(tokenizer, config, ds, n: int, max_length: int) -> list[int]:  # as summarize's, for --preflight
    prompts = generation_prompts(tokenizer, config, data.take_first(ds, n)[config.dialogue_column], max_length)
    return [len(ids) for ids in tokenizer(prompts)["input_ids"]] if prompts else []


def rouge_on(acc, model, tokenizer, config, ds, n: int) -> tuple[dict, list[str]]:
    ds = data.take_first(ds, n)
    predictions = summarize(acc, model, tokenizer, config, ds[config.dialogue_column])
    return metrics.rouge(predictions, ds[config.summary_column]), predictions


# --- Training -------------------------------------------------------------------------------------


def main(config):
    from transformers import AutoModelForCausalLM

    rundir.check_output_dir(config)
    splits = data.load_splits(config)
    for name, ds in splits.items():
        data.require_columns(ds, {"dialogue_column": config.dialogue_column, "summary_column": config.summary_column},
                             f"the {name} data", complete=("dialogue_column", "summary_column"))
    if "validation" not in splits:
        raise ConfigError("validation_file: a validation set is needed for evaluation")
    raw_train = data.take_first(splits["train"], config.max_train_samples, config.subset_seed)
    raw_eval = data.take_first(splits["validation"], config.max_eval_samples, config.subset_seed)
    raw_test = splits.get("test", splits["validation"])

    acc = distributed.accelerator(config)
    source = modeling.prepare_source(config, acc, AutoModelForCausalLM, weights=not config.preflight)
    model_cfg = modeling.load_config(source, config)
    max_length = modeling.max_length_of(config, model_cfg)
    if config.use_peft:
        modeling.check_lora_targets(model_cfg, AutoModelForCausalLM, config.lora_target_modules)
    tokenizer = modeling.load_tokenizer(source, config.trust_remote_code)
    with acc.main_process_first():
        train_ds, train_counts = tokenize_split(raw_train, tokenizer, config, max_length, "train")
        eval_ds, eval_counts = tokenize_split(raw_eval, tokenizer, config, max_length, "validation")
    if config.packing:  # training rows only: evaluation stays one example per row
        examples, train_ds = len(train_ds), data.pack(train_ds, max_length)
        logger.info("packing: %d examples in %d rows of <= %d tokens (%.1f%% real tokens); position ids restart per "
                    "example (a block-diagonal mask; varlen flash_attention_2)", examples, len(train_ds), max_length,
                    100 * sum(train_ds["length"]) / (len(train_ds) * max_length))

    fingerprints = rundir.check_data(config, train_ds, eval_ds)  # a resume checks the training and validation data
    generation = preflight.Generation([prompt_lengths(tokenizer, config, ds, n, max_length) for ds, n in (
        (raw_eval, config.num_eval_generate), (raw_test, config.num_test_compare))], config.max_new_tokens)
    estimate = preflight.Estimate(acc, config, model_cfg, AutoModelForCausalLM, setup,
                                  lambda m, b: step_loss(m, b, config), train_ds, tokenizer.pad_token_id, generation)
    autobatch.auto_batch_size(acc, config, estimate)  # per_device_train_batch_size: auto
    if config.preflight:  # what the run will need, on fake tensors: exits 0 (fits) or 3
        preflight.run(acc, config, estimate, {"train": train_ds, "validation": eval_ds},
                      {"train": train_counts, "validation": eval_counts})

    model = setup(modeling.load_pretrained(AutoModelForCausalLM, source, config, acc), config)
    logger.info(modeling.describe_parameters(model))
    autobatch.confirm_batch_size(acc, model, config, estimate)  # auto: a real step at the longest batch
    train_dl, sampler, windows_per_epoch, total_steps = loop.plan(acc, config, train_ds, tokenizer.pad_token_id)
    eval_dl = data.eval_loader(eval_ds, tokenizer.pad_token_id, config)
    rundir.lock(config, acc.is_main_process)  # output_dir made (a hub model builds no base_model/ there), one run in it
    base_file = os.path.join(config.output_dir, "base_eval.json")
    if os.path.isfile(base_file) and not config.overwrite_output_dir:  # a resume: scored before training began
        base_scores = json.load(open(base_file))
        base_predictions = base_scores.pop("predictions", None)  # (none in a base_eval.json of an earlier ftkit)
    else:
        with modeling.gathered(model):  # ZeRO-3 partitions an unquantized model as it loads
            base_scores, base_predictions = rouge_on(acc, model, tokenizer, config, raw_test, config.num_test_compare)
        if acc.is_main_process:
            json.dump({**base_scores, "predictions": base_predictions}, open(base_file, "w"))

    optimizer, scheduler = optim.build(model, config, total_steps)
    model, optimizer, train_dl, eval_dl = acc.prepare(model, optimizer, train_dl, eval_dl)

    def validate() -> dict:  # validation loss, and ROUGE of num_eval_generate summaries (logged beside them)
        entry = {"eval/loss": eval_loss(acc, model, eval_dl, config, max_length)}
        if config.num_eval_generate:
            scores, predictions = rouge_on(acc, model, tokenizer, config, raw_eval, config.num_eval_generate)
            entry.update({f"eval/{k}": v for k, v in scores.items()})
            entry["samples"] = summary_rows(config, data.take_first(raw_eval, config.num_eval_generate), predictions, True)
        return entry

    run = loop.begin(acc, config, model, scheduler, total_steps, windows_per_epoch, len(train_dl), fingerprints,
                     dropped_overlong=train_counts["dropped"])
    ga = config.gradient_accumulation_steps
    model.train()
    for window in run.windows(train_dl, sampler, validate):  # epoch after epoch, from a resumed checkpoint's position
        # one all-reduce: the step's loss is a mean over every target token on all processes;
        # also samples, tokens and whether a stop signal (SIGUSR1/SIGTERM) reached any rank
        counts = run.count(window, sum(losses.count_target_tokens(b["labels"]) for b in window))
        if counts.stop:  # the previous optimizer step is complete: save it and exit
            return run.save_and_stop()
        for batch in window:
            with acc.accumulate(model):
                loss_sum = step_loss(model, batch, config, max_length)
                run.add_loss(loss_sum)
                # DDP averages gradients over processes and accelerate divides by `ga`: undo both
                acc.backward(loss_sum * acc.num_processes * ga / counts.units)
                if acc.sync_gradients:  # the norm is also the step's finiteness check
                    grad_norm = acc.clip_grad_norm_(model.parameters(), config.max_grad_norm or float("inf"))
                    if run.finite(grad_norm):  # a non-finite step is skipped; too many in a row stop the run
                        optimizer.step()
                optimizer.zero_grad()
        scheduler.step()
        run.advance(window, counts)

        if run.log_due():
            run.log_train(scheduler)
        if run.evaluation_due() and not run.evaluate(validate):  # logged and ranked: a new best is saved, early
            return  # stopping may end the loop; a stop signal during it saved the step, to be evaluated by the next run
        if run.save_due():
            run.save()

    # -------- final evaluation (early stopping's, if it ended the loop), best adapter, S001's table, export --------
    if run.stop_if_signalled():  # a signal came during the last step: it is saved, and all this is the next run's
        return
    final_eval = run.final_evaluation(validate)
    if run.finish(final_eval):  # load_best_model_at_end reloaded an earlier adapter: the exported one's loss
        final_eval = {"eval/loss": eval_loss(acc, model, eval_dl, config, max_length)}
    tuned, predictions = rouge_on(acc, model, tokenizer, config, raw_test, config.num_test_compare)
    run.log({f"test/{k}": v for k, v in tuned.items()})
    # the vocabulary is never resized, so the base's embeddings need no copy in the adapter
    final = checkpoint.export(acc, model, tokenizer, config, **({"save_embedding_layers": False} if config.use_peft else {}))
    if acc.is_main_process and config.merge_adapter and config.use_peft:
        modeling.merge_adapter(AutoModelForCausalLM, final, os.path.join(config.output_dir, "final_merged"), config)
    if acc.is_main_process:
        table = metrics.comparison_table(base_scores, tuned)
        print(f"\nROUGE on {min(len(raw_test), config.num_test_compare)} test dialogues, base vs fine-tuned:\n{table}")
        result = {"eval_loss": final_eval["eval/loss"], "base": base_scores, "tuned": tuned,
                  "delta": {k: tuned[k] - base_scores[k] for k in tuned},
                  "num_test_examples": min(len(raw_test), config.num_test_compare), **run.results}
        json.dump(result, open(os.path.join(config.output_dir, "metrics.json"), "w"), indent=2)
        rundir.write_jsonl(os.path.join(config.output_dir, "predictions_test.jsonl"), summary_rows(
            config, data.take_first(raw_test, config.num_test_compare), predictions, True, base_predictions))
    run.close()


def summary_rows(config, ds, predictions: list[str], references: bool, base: list[str] | None = None) -> list[dict]:
    """Rows of predictions: the data's id (if any), dialogue, summary, the base model's, the reference."""
    return rundir.rows_of({"id": ds["id"] if "id" in ds.column_names else None, "dialogue": ds[config.dialogue_column],
                           "prediction": predictions, "base_prediction": base,
                           "reference": ds[config.summary_column] if references else None})


# --- Prediction with a trained adapter ------------------------------------------------------------


def predict(config):
    """Summarize new dialogues with ``--adapter`` (loading the base as the training run did) or a whole model."""
    import datasets
    from transformers import AutoModelForCausalLM

    config = checkpoint.with_saved_run(SummarizeConfig, config, "adapter", ("adapter_config.json", "config.json"))
    if config.input_file:  # with the run's summary_column, the summaries are scored against it
        ds, scored = rundir.predict_input(config, {"dialogue_column": config.dialogue_column}, "summary_column",
                                          ("dialogue_column", "summary_column"))
    else:
        ds, scored = datasets.Dataset.from_dict({config.dialogue_column: [config.text]}), False
    config.report_to = "none"
    acc = distributed.accelerator(config)
    tokenizer = modeling.load_tokenizer(config.adapter)
    model = modeling.load_trained(AutoModelForCausalLM, config.adapter, config, acc).to(acc.device)
    summaries = summarize(acc, model, tokenizer, config, ds[config.dialogue_column])
    if not acc.is_main_process:
        return
    scores = metrics.rouge(summaries, ds[config.summary_column]) if scored else {}
    rundir.write_or_print(config.prediction_file, summary_rows(config, ds, summaries, scored), summaries, "summaries",
                          "  ".join(f"{k} {v:.2f}" for k, v in scores.items()) + f"  ({len(summaries)} dialogues)"
                          if scored else None)


if __name__ == "__main__":
    cli.run(SummarizeConfig, main, predict)
