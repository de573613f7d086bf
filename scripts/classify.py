"""Sequence classification: BERT on MRPC pairs (S000), BERT on IMDB (S002), GPT-2 SMS spam (S003).

One accelerate loop for any ``AutoModelForSequenceClassification`` (encoders with token type ids, decoders read at
their last non-pad token). Features: hub or local csv/tsv/jsonl/parquet data (TSV unquoted), texts or pairs, int /
string (``label_map``) / ClassLabel labels, undersampling, one file split by ``split_ratios``, seeded subsets, dynamic
padding, length grouping, ``trainable_modules``, accumulation (loss averaged over the window's examples on all
processes), exact resume, evaluation every ``eval_steps`` or epoch (accuracy / F1 / confusion matrix, each example
once), the best checkpoint kept and reloaded, metrics on every split, test predictions, ``--predict`` for new texts.

    # tiny model, CPU, offline (seconds)
    accelerate launch scripts/classify.py --config recipes/tiny/spam.yaml
    # BERT on MRPC, one GPU
    accelerate launch scripts/classify.py --config recipes/bert_mrpc.yaml
    # label a new text with a trained model
    python scripts/classify.py --predict --model outputs/gpt2_spam/final --text "WIN a FREE prize, call now"
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import torch

from ftkit import (autobatch, checkpoint, cli, data, distributed, loop, metrics, modeling, optim,
                   options, preflight, rundir)
from ftkit.config import ConfigError, opt

logger = logging.getLogger("ftkit")
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
EVAL_METRICS = ("loss", "accuracy", "f1")


@dataclass
class ClassifyConfig(options.ModelArguments, options.DataArguments, options.TrainingArguments,
                     options.EvaluationArguments, options.TrackingArguments, options.PreflightArguments):
    """Fine-tune a sequence classifier (BERT, GPT-2, ...) on single texts or text pairs."""

    text_column: str = opt("text", "Column holding the text (the first sentence of a pair).")
    text_pair_column: str | None = opt(None, "Column holding the second sentence of a pair (e.g. MRPC).")
    label_column: str = opt("label", "Column holding the label (int, string or hub ClassLabel).")
    label_map: dict | None = opt(None, "Map from the data's label values to class ids, e.g. {ham: 0, spam: 1}.")
    num_labels: int | None = opt(None, "Number of classes (default: from label_map, the data or ClassLabel).", min=2)
    split_ratios: list[float] | None = opt(None, "Split train_file into train/validation[/test], e.g. [0.7, 0.1, 0.2].")
    balance: str = opt("none", "Balance the classes before splitting (undersample: as many as the rarest).",
                       choices=["none", "undersample"])
    split_seed: int = opt(123, "Seed for balancing and split_ratios (S003: 123).", min=0)
    trainable_modules: list[str] | None = opt(None, "Train only these modules (names, prefixes or globs); default: all.")
    eval_on_train: bool = opt(False, "Also report final metrics on the training split (S003 does).")
    predict: bool = opt(False, "Label --text or --input_file with a trained --model instead of training.")
    model: str | None = opt(None, "A trained model for --predict: output_dir/final, or the output_dir.", path=True)
    text: str | None = opt(None, "One text to label with --predict.")
    text_pair: str | None = opt(None, "Second sentence of the pair to label with --predict.")
    input_file: str | None = opt(None, "Texts to label with --predict (text_column[, text_pair_column]); scored "
                                          "if label_column is there.", path=True)
    prediction_file: str | None = opt(None, "Write --predict results here as jsonl (default: print).", path=True)

    def check(self):
        if not options.check_script(self, "model", bool(self.text), "--text TEXT", EVAL_METRICS):
            return
        if self.split_ratios is not None:
            data.check_split_ratios(self.split_ratios, self.validation_file)
        if self.label_map is not None:
            if flags := [k for k in self.label_map if isinstance(k, bool)]:
                raise ConfigError(f"label_map: key {flags[0]} is YAML's reading of an unquoted yes/no/on/off; "
                                  f"quote the label names ('yes': 1)")
            ids = set(self.label_map.values())
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids) or sorted(ids) != list(range(len(ids))):
                raise ConfigError(f"label_map: class ids must be 0..N-1 integers, got {self.label_map}")


# --- Data: splits, labels, tokens -----------------------------------------------------------------


def load_classification_splits(config) -> dict:
    splits = data.load_splits(config)
    for name, ds in splits.items():  # as read, so that a row named is the file's; a missing text reads as ""
        data.require_columns(ds, {**text_columns(config), "label_column": config.label_column}, f"the {name} data",
                             complete=("label_column",))
    if config.balance == "undersample":  # S003 balances the one file, then splits it
        splits["train"] = data.undersample(splits["train"], config.label_column, config.split_seed)
    if config.split_ratios is not None:
        splits.update(data.split_by_ratios(splits["train"], config.split_ratios, config.split_seed))
    if "validation" not in splits:
        raise ConfigError("validation_file: a validation set is needed (or split_ratios to cut one from train_file)")
    splits["train"] = data.take_first(splits["train"], config.max_train_samples, config.subset_seed)
    splits["validation"] = data.take_first(splits["validation"], config.max_eval_samples, config.subset_seed)
    return splits


def text_columns(config) -> dict:
    """The model's input columns (option -> column): the text, and the pair's second text if any."""
    return {"text_column": config.text_column, **({"text_pair_column": config.text_pair_column}
                                                   if config.text_pair_column else {})}


def label_names(config, train_ds) -> list[str]:
    """Class names in id order: from label_map, a hub ClassLabel, or the training labels."""
    feature = train_ds.features[config.label_column]
    if config.label_map:
        names = [None] * len(set(config.label_map.values()))
        for value, i in config.label_map.items():
            names[i] = names[i] or str(value)
    elif hasattr(feature, "names"):
        names = list(feature.names)
    else:
        values = set(train_ds[config.label_column])
        if all(isinstance(v, int) for v in values):
            names = [str(i) for i in range(max(values) + 1)]
        else:  # strings: sorted, and saved with the model (id2label) so predictions are named
            names = sorted(str(v) for v in values)
            logger.info("label_map inferred from the training labels: %s", {n: i for i, n in enumerate(names)})
    if config.num_labels and config.num_labels < len(names):
        raise ConfigError(f"num_labels: {config.num_labels}, but the labels name {len(names)} classes ({names})")
    return names + [str(i) for i in range(len(names), config.num_labels or len(names))]


def label_ids(config, ds, names: list[str], split: str) -> list[int]:
    """The class id of every example; an unknown or out-of-range label is an error naming its row."""
    lookup = {str(k): v for k, v in config.label_map.items()} if config.label_map else {n: i for i, n in enumerate(names)}
    ids = []
    for row, value in enumerate(ds[config.label_column]):
        if isinstance(value, int) and not isinstance(value, bool) and not config.label_map:
            if not 0 <= value < len(names):
                raise ConfigError(f"label_column: label {value} in the {split} data (row {row + 1}) is outside "
                                  f"0..{len(names) - 1} (num_labels {len(names)})")
            ids.append(value)
        elif str(value) in lookup:
            ids.append(lookup[str(value)])
        else:
            hint = "label_map" if config.label_map else "the training labels (set label_map to name them all)"
            raise ConfigError(f"label_column: label {value!r} in the {split} data (row {row + 1}) is not in {hint}: "
                              f"{', '.join(lookup)}")
    return ids


def tokenize_split(ds, labels: list[int], tokenizer, config, max_length: int, token_types: bool, name: str):
    """Batched tokenization (Arrow-backed, S000); truncation to max_length (marked), padding left to the collator."""

    def encode(batch, indices):
        # a column of numbers is text too; an empty text (a missing one reads as "") is the end-of-text token alone,
        # not a row of no tokens
        def text(t):
            return "" if t is None else t if isinstance(t, str) else str(t)

        texts = [text(t) or tokenizer.eos_token or "" for t in batch[config.text_column]]
        pairs = [text(t) for t in batch[config.text_pair_column]] if config.text_pair_column else None
        enc = tokenizer(texts, pairs, truncation=True, max_length=max_length, return_token_type_ids=token_types)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": [labels[i] for i in indices], "length": [len(x) for x in enc["input_ids"]],
                "truncated": [bool(e.overflowing) for e in enc.encodings],
                **({"token_type_ids": enc["token_type_ids"]} if token_types else {})}

    return ds.map(encode, batched=True, with_indices=True, remove_columns=ds.column_names, desc=f"tokenize {name}",
                  num_proc=config.preprocessing_num_workers)


# --- Evaluation -----------------------------------------------------------------------------------


def model_inputs(batch) -> dict:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def step_loss(model, batch: dict):
    """A micro-batch's summed cross-entropy; the training loop's and --preflight's."""
    logits = model(**model_inputs(batch)).logits.float()
    return torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum")


@torch.no_grad()
def evaluate(acc, model, dl, num_labels: int) -> tuple[dict, list[int], list[float]]:
    """Loss, accuracy, F1 and confusion matrix over ``dl`` (every example once, across processes),
    plus the predicted class and its probability for each example, in the data's order."""
    model.eval()
    parts = []
    for batch in dl:
        distributed.stop_point(acc)  # a stop signal during training ends the evaluation here
        logits = model(**model_inputs(batch)).logits.float()
        loss = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
        best = logits.softmax(-1).max(-1)
        # gather_for_metrics drops the samples a prepared loader repeats to even out the last batch
        parts.append(acc.gather_for_metrics((best.indices, best.values, batch["labels"], loss)))
    model.train()
    preds, probs, labels, losses = (torch.cat(column).tolist() for column in zip(*parts))
    result = metrics.classification(preds, labels, num_labels)
    result["loss"] = sum(losses) / max(len(labels), 1)
    return result, preds, probs


def eval_entry(result: dict, prefix: str = "eval") -> dict:
    return {f"{prefix}/{k}": v for k, v in result.items() if k in EVAL_METRICS}


# --- Training -------------------------------------------------------------------------------------


def main(config):
    from transformers import AutoModelForSequenceClassification as AutoModel

    rundir.check_output_dir(config)
    splits = load_classification_splits(config)
    names = label_names(config, splits["train"])
    labels = {name: label_ids(config, ds, names, name) for name, ds in splits.items()}
    if len(set(labels["train"])) < 2:
        logger.warning("the training set holds a single class (%s): the model can only learn to predict it",
                       names[labels["train"][0]])
    model_kwargs = {"num_labels": len(names), "id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}

    acc = distributed.accelerator(config)
    source = modeling.prepare_source(config, acc, AutoModel, weights=not config.preflight, **model_kwargs)
    model_cfg = modeling.load_config(source, config, **model_kwargs)
    max_length = modeling.max_length_of(config, model_cfg)
    if config.trainable_modules is not None:
        modeling.check_trainable_modules(model_cfg, AutoModel, config.trainable_modules)
    tokenizer = modeling.load_tokenizer(source, config.trust_remote_code)
    token_types = getattr(model_cfg, "type_vocab_size", 0) > 1  # GPT-2 would add them as extra embeddings
    with acc.main_process_first():
        tokenized = {name: tokenize_split(ds, labels[name], tokenizer, config, max_length, token_types, name)
                     for name, ds in splits.items()}
    counts = {name: {"truncated": sum(ds["truncated"])} for name, ds in tokenized.items()}
    tokenized = {name: ds.remove_columns("truncated") for name, ds in tokenized.items()}

    fingerprints = rundir.check_data(config, tokenized["train"], tokenized["validation"])  # a resume checks the data
    setup = functools.partial(modeling.training_setup, pad_token_id=tokenizer.pad_token_id)
    estimate = preflight.Estimate(acc, config, model_cfg, AutoModel, setup, step_loss, tokenized["train"],
                                  tokenizer.pad_token_id)
    autobatch.auto_batch_size(acc, config, estimate)  # per_device_train_batch_size: auto
    if config.preflight:  # what the run will need, on fake tensors: exits 0 (fits) or 3
        preflight.run(acc, config, estimate, tokenized, counts)

    model = setup(modeling.load_pretrained(AutoModel, source, config, acc, **model_kwargs), config)
    logger.info(modeling.describe_parameters(model))
    autobatch.confirm_batch_size(acc, model, config, estimate)  # auto: a real step at the longest batch
    train_dl, sampler, windows_per_epoch, total_steps = loop.plan(acc, config, tokenized["train"], tokenizer.pad_token_id)
    eval_dls = {name: data.eval_loader(ds, tokenizer.pad_token_id, config) for name, ds in tokenized.items()}

    optimizer, scheduler = optim.build(model, config, total_steps)
    model, optimizer, train_dl = acc.prepare(model, optimizer, train_dl)
    eval_dls = {name: acc.prepare(dl) for name, dl in eval_dls.items()}

    run = loop.begin(acc, config, model, scheduler, total_steps, windows_per_epoch, len(train_dl), fingerprints)
    validate = lambda: eval_entry(evaluate(acc, model, eval_dls["validation"], len(names))[0])  # noqa: E731
    ga = config.gradient_accumulation_steps
    model.train()
    for window in run.windows(train_dl, sampler, validate):  # epoch after epoch, from a resumed checkpoint's position
        # one all-reduce: the loss is a mean over every example on all processes; also samples, tokens, stop signals
        counts = run.count(window, sum(len(b["labels"]) for b in window))
        if counts.stop:  # the previous optimizer step is complete: save it and exit
            return run.save_and_stop()
        for batch in window:
            with acc.accumulate(model):
                loss_sum = step_loss(model, batch)
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

    # -------- last evaluation (early stopping's, if it ended the loop), best model, metrics on every split, export --
    if run.stop_if_signalled():  # a signal came during the last step: it is saved, and all this is the next run's
        return
    run.finish(run.final_evaluation(validate))
    report = {"label_names": names, "metric_for_best_model": config.metric_for_best_model, **run.results}
    shown = [n for n in ("train", "validation", "test") if n in eval_dls and (n != "train" or config.eval_on_train)]
    for name in shown:
        report[name], preds, probs = evaluate(acc, model, eval_dls[name], len(names))
        run.log(eval_entry(report[name], f"final_{name}"))
        if name == "test" or (name == "validation" and "test" not in eval_dls):
            predictions = (name, preds, probs)
    checkpoint.export(acc, model, tokenizer, config)
    if acc.is_main_process:
        print("\n" + "\n".join(score_line(n, report[n]) for n in shown))
        json.dump(report, open(os.path.join(config.output_dir, "metrics.json"), "w"), indent=2)
        split, preds, probs = predictions
        rundir.write_jsonl(os.path.join(config.output_dir, f"predictions_{split}.jsonl"),
                           prediction_rows(splits[split], config, names, preds, probs, gold=labels[split]))
    run.close()


def score_line(split: str, result: dict) -> str:
    return (f"{split:<10} accuracy {result['accuracy']:.4f}  f1 {result['f1']:.4f}  loss {result['loss']:.4f}  "
            f"({result['examples']} examples)")


def prediction_rows(ds, config, names, preds, probs, gold=None) -> list[dict]:
    return rundir.rows_of({"id": ds["id"] if "id" in ds.column_names else None,  # the data's own, to join rows back
                           **{key.removesuffix("_column"): ds[column] for key, column in text_columns(config).items()},
                           "prediction": [names[p] for p in preds], "probability": probs,
                           "label": [names[g] for g in gold] if gold else None})


# --- Prediction with a trained model (S003's classify-new-text) -----------------------------------


def predict(config):
    """Label ``--text`` or ``--input_file``; a file with the run's ``label_column`` is scored as a split is in training."""
    import datasets
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = checkpoint.with_saved_run(ClassifyConfig, config, "model", "config.json")  # + its run's options
    model_cfg = AutoConfig.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)  # no weights
    names = [model_cfg.id2label[i] for i in range(model_cfg.num_labels)]
    if config.input_file:  # with labels, every row needs one the model knows
        ds, scored = rundir.predict_input(config, text_columns(config), "label_column", ("label_column",))
        gold = label_ids(config, ds, names, "input") if scored else None
    else:
        rows = {config.text_column: [config.text]}
        if config.text_pair_column or config.text_pair:
            config.text_pair_column = config.text_pair_column or "text_pair"
            rows[config.text_pair_column] = [config.text_pair]
        ds, gold = datasets.Dataset.from_dict(rows), None
    config.report_to = "none"
    acc = distributed.accelerator(config)
    tokenizer = modeling.load_tokenizer(config.model)
    model = modeling.load_trained(AutoModelForSequenceClassification, config.model, config, acc).to(acc.device)
    limit = config.max_length or modeling.max_positions(model_cfg)
    token_types = getattr(model_cfg, "type_vocab_size", 0) > 1
    tokenized = tokenize_split(ds, gold or [0] * len(ds), tokenizer, config, limit, token_types, "input")
    dl = acc.prepare(data.eval_loader(tokenized.remove_columns("truncated"), tokenizer.pad_token_id, config))
    result, preds, probs = evaluate(acc, model, dl, len(names))
    if not acc.is_main_process:
        return
    scores = (f"{score_line('input', result)}\nconfusion (rows: true, columns: predicted; {', '.join(names)}): "
              f"{result['confusion']}") if gold is not None else None
    rundir.write_or_print(config.prediction_file, prediction_rows(ds, config, names, preds, probs, gold),
                          [f"{names[pred]}\t{prob:.4f}" for pred, prob in zip(preds, probs)], "predictions", scores)


if __name__ == "__main__":
    cli.run(ClassifyConfig, main, predict)
