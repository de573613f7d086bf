"""Generative question answering with T5 (source S004), a hand-written accelerate loop.

Features: SQuAD JSON (official nested layout), flat jsonl/csv/tsv tables (S004's ``context``,
``question``, ``text``) or hub datasets with ``answers: {text, answer_start}``, all mapped to
(context, question, answers); S004's cleaning (missing values -> "none", whitespace collapsed) and
80/20 split with seed 101 when one file is given; ``question: ... context: ...`` inputs (or S004's
pair encoding) where only the context is ever truncated and cut-away answers are counted; dynamic
padding with -100 labels; gradient accumulation normalised by target tokens over the whole window
on all processes; eval loss, beam-search answers (4 beams, no repeated bigrams) and SQuAD exact
match / F1 gathered without duplicates (``synced_gpus`` under ZeRO-3); the best checkpoints kept by
``metric_for_best_model``; ``predictions.jsonl`` and ``--predict`` for new questions.

    # tiny T5, CPU, offline (seconds)
    accelerate launch scripts/t5_qa.py --config recipes/tiny/t5_qa.yaml
    # t5-base on SQuAD v1.1, one GPU
    accelerate launch scripts/t5_qa.py --config recipes/t5_base_squad.yaml
    # 8 GPUs with DeepSpeed ZeRO-3
    accelerate launch --config_file launch/accelerate/deepspeed_zero3.yaml scripts/t5_qa.py --config recipes/t5_base_squad.yaml
    # answer a question with a trained model
    python scripts/t5_qa.py --predict --model outputs/t5_base_squad/final --context "..." --question "..."
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
EVAL_METRICS = ("loss", "exact_match", "f1")


@dataclass
class QAConfig(options.ModelArguments, options.DataArguments, options.TrainingArguments,
               options.EvaluationArguments, options.TrackingArguments, options.PreflightArguments):
    """Fine-tune T5 (or any seq2seq LM) to answer questions about a context."""

    context_column: str = opt("context", "Column holding the context passage.")
    question_column: str = opt("question", "Column holding the question.")
    answer_column: str = opt("answers", "Column holding the answer: a string, a list of strings, or "
                                        "{text: [...], answer_start: [...]} (S004's table calls it 'text').")
    id_column: str = opt("id", "Column holding an example id (row numbers when absent).")
    missing_value: str = opt("none", "Replaces missing contexts, questions and answers (S004).")
    val_split: float | None = opt(None, "Fraction of train_file held out for validation when no "
                                        "validation_file is given (S004: 0.2).", min_exclusive=0, max=0.9)
    split_seed: int = opt(101, "Seed of the val_split shuffle (S004: 101).", min=0)
    max_predict_samples: int | None = opt(None, "Use only the first N test examples for the final scores and "
                                                "predictions.jsonl (as run_qa; without a test split the final "
                                                "answers cover the max_eval_samples validation examples).", min=1)
    input_format: str = opt("t5", "'question: Q context: C' (t5), or the tokenizer's pair encoding of (context, "
                                  "question) as S004 (pair).", choices=["t5", "pair"])
    max_target_length: int = opt(128, "Max answer tokens in training labels (S004: 128).", min=1)
    generation_max_length: int | None = opt(None, "Max generated answer tokens (default: max_target_length).", min=1)
    generation_num_beams: int = opt(4, "Beams for answer generation (S004: 4).", min=1)
    no_repeat_ngram_size: int = opt(2, "Forbid repeating n-grams in generated answers (S004: 2; 0 off).", min=0)
    early_stopping: bool = opt(True, "Stop beam search when every beam has finished (S004).")
    predict: bool = opt(False, "Answer --question/--context or --input_file with a trained --model.")
    model: str | None = opt(None, "A trained model for --predict: output_dir/final, or the output_dir.", path=True)
    context: str | None = opt(None, "Context passage for --predict.")
    question: str | None = opt(None, "Question for --predict.")
    input_file: str | None = opt(None, "Questions (+ context) for --predict; EM/F1 if answer_column is there.", path=True)
    prediction_file: str | None = opt(None, "Write --predict results here as jsonl (default: print).", path=True)

    def check(self):
        if not options.check_script(self, "model", bool(self.question and self.context), "--question and --context,",
                                EVAL_METRICS):
            return
        if self.val_split and self.validation_file:
            raise ConfigError("val_split: splits train_file; remove it or validation_file")


# --- Data: three shapes -> (id, context, question, answers); inputs that truncate only the context ---


def clean(config, text) -> str:
    """S004: missing -> "none", whitespace (newlines, runs of spaces) collapsed."""
    if text is None or (isinstance(text, float) and text != text):  # NaN from a csv
        return config.missing_value
    return " ".join(str(text).split()) or config.missing_value


def answers_of(config, value) -> list[str]:
    if isinstance(value, dict):  # hub SQuAD: {"text": [...], "answer_start": [...]}
        value = value.get("text")
    if isinstance(value, (list, tuple)):
        answers = [clean(config, v) for v in value if v is not None and str(v).strip()]
        return answers or [config.missing_value]
    return [clean(config, value)]


def standardize(config, ds, name: str):
    """Rows of ``id, context, question, answers`` from any of the accepted shapes."""
    data.require_columns(ds, {"context_column": config.context_column, "question_column": config.question_column,
                              "answer_column": config.answer_column}, f"the {name} data")
    has_id = config.id_column in ds.column_names

    def convert(row, index):
        return {"id": str(row[config.id_column]) if has_id else f"{name}-{index}",
                "context": clean(config, row[config.context_column]),
                "question": clean(config, row[config.question_column]),
                "answers": answers_of(config, row[config.answer_column])}

    return ds.map(convert, with_indices=True, remove_columns=ds.column_names, desc=f"clean {name}",
                  num_proc=config.preprocessing_num_workers)


def load_qa_splits(config) -> dict:
    splits = data.load_splits(config)
    if "validation" not in splits:
        if not config.val_split:
            raise ConfigError("validation_file: a validation set is needed (or val_split to hold out part of train_file)")
        splits.update(data.split_by_ratios(splits["train"], [1 - config.val_split, config.val_split], config.split_seed))
    splits["train"] = data.take_first(splits["train"], config.max_train_samples, config.subset_seed)
    # every use of a split (loss, answers during training, the final scores and predictions) sees the same rows
    splits["validation"] = data.take_first(splits["validation"], config.max_eval_samples, config.subset_seed)
    if "test" in splits:
        splits["test"] = data.take_first(splits["test"], config.max_predict_samples, config.subset_seed)
    return {name: standardize(config, ds, name) for name, ds in splits.items()}


def encode_source(tokenizer, config, question: str, context: str, max_length: int) -> tuple[list[int], bool, str]:
    """Input ids with the context cut to fit ``max_length`` (the question never is): (ids, truncated,
    kept context). A question too long on its own keeps its length: the caller drops the example."""
    def build(ctx):
        if config.input_format == "t5":
            return tokenizer(f"question: {question} context: {ctx}", add_special_tokens=True)["input_ids"]
        return tokenizer(ctx, question, add_special_tokens=True)["input_ids"]

    kept = data.fit_text(tokenizer, context, lambda ctx: len(build(ctx)), max_length)
    return build(kept), kept != context, kept


def tokenize_split(ds, tokenizer, config, max_length: int, name: str):
    """Model inputs and labels, plus counts of truncated contexts and of answers cut away by it."""

    def encode(row):
        ids, truncated, kept = encode_source(tokenizer, config, row["question"], row["context"], max_length)
        answers = row["answers"]
        return {"input_ids": ids, "length": len(ids), "too_long": len(ids) > max_length, "truncated": truncated,
                "labels": tokenizer(answers[0], truncation=True, max_length=config.max_target_length)["input_ids"],
                "answer_cut": truncated and any(a in row["context"] for a in answers) and not any(a in kept for a in answers)}

    tokenized = ds.map(encode, remove_columns=ds.column_names, desc=f"tokenize {name}", num_proc=config.preprocessing_num_workers)
    counts = {"truncated": sum(tokenized["truncated"]), "answer_cut": sum(tokenized["answer_cut"])}
    kept = tokenized.filter(lambda long: not long, input_columns="too_long")
    counts["dropped_long_question"] = len(tokenized) - len(kept)
    if counts["truncated"]:
        logger.warning("%s: %d of %d contexts truncated to %d tokens; %d answers cut away; %d questions alone too "
                       "long (dropped)", name, counts["truncated"], len(tokenized), max_length, counts["answer_cut"],
                       counts["dropped_long_question"])
    if len(kept) == 0:
        raise ConfigError(f"{name}: no examples left: every question is longer than max_length={max_length} tokens")
    return kept.remove_columns(["truncated", "answer_cut", "too_long"]), counts


# --- Evaluation -----------------------------------------------------------------------------------


def seq2seq_loss(model, batch, decoder_start: int, pad: int):
    decoder_input_ids = modeling.shift_right(batch["labels"], decoder_start, pad)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   decoder_input_ids=decoder_input_ids).logits
    return losses.causal_lm_loss_sum(logits, batch["labels"], shift=False)


def eval_loss(acc, model, eval_dl, decoder_start: int, pad: int) -> float:
    """Token-weighted loss over the validation set (each example counted once, across processes)."""
    return metrics.mean_loss(acc, model, eval_dl, lambda batch: seq2seq_loss(model, batch, decoder_start, pad))


def answer(acc, model, tokenizer, config, questions: list[str], contexts: list[str], max_length: int) -> list[str]:
    """Beam-search answers, sharded over processes and gathered in order (each example once)."""
    collate = data.PadCollator(tokenizer.pad_token_id)
    texts = distributed.generate_in_order(
        acc, model, tokenizer, list(zip(questions, contexts)), config.per_device_eval_batch_size,
        lambda chunk: collate([{"input_ids": encode_source(tokenizer, config, q, c, max_length)[0]} for q, c in chunk]),
        num_beams=config.generation_num_beams, no_repeat_ngram_size=config.no_repeat_ngram_size,
        early_stopping=config.early_stopping, max_new_tokens=config.generation_max_length or config.max_target_length)
    return [t.strip() for t in texts]


def score(acc, model, tokenizer, config, ds, max_length: int) -> tuple[dict, list[str]]:
    predictions = answer(acc, model, tokenizer, config, ds["question"], ds["context"], max_length)
    return metrics.squad(predictions, ds["answers"]), predictions


# --- Training -------------------------------------------------------------------------------------


def main(config):
    from transformers import AutoModelForSeq2SeqLM

    rundir.check_output_dir(config)
    splits = load_qa_splits(config)
    acc = distributed.accelerator(config)
    source = modeling.prepare_source(config, acc, AutoModelForSeq2SeqLM, weights=not config.preflight)
    model_cfg = modeling.load_config(source, config)
    max_length = config.max_length or 512  # T5's relative positions have no hard limit; S004 uses 512
    limit = modeling.max_positions(model_cfg) if hasattr(model_cfg, "max_position_embeddings") else None
    if limit and max_length > limit:
        raise ConfigError(f"max_length: {max_length} exceeds the model's position limit {limit}")
    tokenizer = modeling.load_tokenizer(source, config.trust_remote_code)
    with acc.main_process_first():
        tokenized = {name: tokenize_split(ds, tokenizer, config, max_length, name) for name, ds in splits.items()}
    counts = {name: c for name, (_, c) in tokenized.items()}
    tokenized = {name: ds for name, (ds, _) in tokenized.items()}
    eval_name = "test" if "test" in splits else "validation"

    fingerprints = rundir.check_data(config, tokenized["train"], tokenized["validation"])  # a resume checks the data
    generation = preflight.Generation([tokenized[name]["length"] for name in {"validation", eval_name}],
                                      config.generation_max_length or config.max_target_length,
                                      config.generation_num_beams)  # each evaluation's answers, then the test's
    estimate = preflight.Estimate(acc, config, model_cfg, AutoModelForSeq2SeqLM, modeling.training_setup,
                                  lambda m, b: seq2seq_loss(m, b, 0, 0)[0].sum(), tokenized["train"],
                                  tokenizer.pad_token_id, generation)
    autobatch.auto_batch_size(acc, config, estimate)  # per_device_train_batch_size: auto
    if config.preflight:  # what the run will need, on fake tensors (token ids do not matter): exits 0 (fits) or 3
        preflight.run(acc, config, estimate, tokenized, counts)

    model = modeling.training_setup(modeling.load_pretrained(AutoModelForSeq2SeqLM, source, config, acc), config)
    autobatch.confirm_batch_size(acc, model, config, estimate)  # auto: a real step at the longest batch
    train_dl, sampler, windows_per_epoch, total_steps = loop.plan(acc, config, tokenized["train"], tokenizer.pad_token_id)
    eval_dl = data.eval_loader(tokenized["validation"], tokenizer.pad_token_id, config)
    pad = model.config.pad_token_id
    # transformers 5 keeps it in the generation config; T5 starts decoding from the pad token
    decoder_start = getattr(model.generation_config, "decoder_start_token_id", None)
    decoder_start = pad if decoder_start is None else decoder_start
    logger.info(modeling.describe_parameters(model))

    optimizer, scheduler = optim.build(model, config, total_steps)
    model, optimizer, train_dl, eval_dl = acc.prepare(model, optimizer, train_dl, eval_dl)

    run = loop.begin(acc, config, model, scheduler, total_steps, windows_per_epoch, len(train_dl), fingerprints,
                     truncation=counts)
    ga = config.gradient_accumulation_steps

    def validate() -> dict:  # (the answers logged beside the scores)
        scores, predictions = score(acc, model, tokenizer, config, splits["validation"], max_length)
        return {"eval/loss": eval_loss(acc, model, eval_dl, decoder_start, pad), "eval/exact_match": scores["exact_match"],
                "eval/f1": scores["f1"], "samples": prediction_rows(splits["validation"], predictions)}

    model.train()
    for window in run.windows(train_dl, sampler, validate):  # epoch after epoch, from a resumed checkpoint's position
        # one all-reduce: the step's loss is a mean over every answer token on all processes;
        # also samples, tokens and whether a stop signal (SIGUSR1/SIGTERM) reached any rank
        counts = run.count(window, sum(losses.count_target_tokens(b["labels"], shift=False) for b in window))
        if counts.stop:  # the previous optimizer step is complete: save it and exit
            return run.save_and_stop()
        for batch in window:
            with acc.accumulate(model):
                loss_sum, _ = seq2seq_loss(model, batch, decoder_start, pad)
                run.add_loss(loss_sum.sum())
                # DDP averages gradients over processes and accelerate divides by `ga`: undo both
                acc.backward(loss_sum.sum() * acc.num_processes * ga / counts.units)
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

    # -------- last evaluation (early stopping's, if it ended the loop), best model, answers, export --------
    if run.stop_if_signalled():  # a signal came during the last step: it is saved, and all this is the next run's
        return
    run.finish(run.final_evaluation(validate))
    scores, predictions = score(acc, model, tokenizer, config, splits[eval_name], max_length)
    final_loss = eval_loss(acc, model, eval_dl, decoder_start, pad)
    run.log({f"final_{eval_name}/exact_match": scores["exact_match"], f"final_{eval_name}/f1": scores["f1"],
             "final_validation/loss": final_loss})
    checkpoint.export(acc, model, tokenizer, config)
    if acc.is_main_process:
        print(f"\n{eval_name}: exact match {scores['exact_match']:.2f}  F1 {scores['f1']:.2f}  "
              f"({scores['examples']} questions)  validation loss {final_loss:.4f}")
        per_example = scores.pop("per_example")
        report = {"split": eval_name, **scores, "eval_loss": final_loss, **run.results}
        json.dump(report, open(os.path.join(config.output_dir, "metrics.json"), "w"), indent=2)
        rundir.write_jsonl(os.path.join(config.output_dir, "predictions.jsonl"),
                           prediction_rows(splits[eval_name], predictions, per_example))
    run.close()


def prediction_rows(ds, predictions, per_example=None) -> list[dict]:
    em, f1 = zip(*per_example) if per_example else (None, None)
    return rundir.rows_of({"id": ds["id"], "question": ds["question"], "prediction": predictions,
                           "answers": ds["answers"], "em": em, "f1": f1})


# --- Prediction with a trained model --------------------------------------------------------------


def predict(config):
    import datasets
    from transformers import AutoModelForSeq2SeqLM

    config = checkpoint.with_saved_run(QAConfig, config, "model", "config.json")  # + its run's options
    if config.input_file:
        raw, scored = rundir.predict_input(config, {}, "answer_column")  # answers are optional when predicting
        if config.answer_column not in raw.column_names:
            raw = raw.add_column(config.answer_column, [None] * len(raw))
        ds = standardize(config, raw, "input")
    else:
        ds = standardize(config, datasets.Dataset.from_dict({
            config.context_column: [config.context], config.question_column: [config.question],
            config.answer_column: [None]}), "input")
        scored = False
    config.report_to = "none"
    acc = distributed.accelerator(config)
    tokenizer = modeling.load_tokenizer(config.model)
    model = modeling.load_trained(AutoModelForSeq2SeqLM, config.model, config, acc).to(acc.device)
    scores, predictions = score(acc, model, tokenizer, config, ds, config.max_length or 512)
    if not acc.is_main_process:
        return
    rows = prediction_rows(ds, predictions, scores["per_example"] if scored else None)
    summary = f"exact match {scores['exact_match']:.2f}  F1 {scores['f1']:.2f}  ({scores['examples']} questions)"
    rundir.write_or_print(config.prediction_file, rows, predictions, "answers", summary if scored else None)


if __name__ == "__main__":
    cli.run(QAConfig, main, predict)
