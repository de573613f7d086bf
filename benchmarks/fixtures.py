"""Models and data the speed benchmarks share, built offline in a work directory.

The model is a small BERT built from a config (random init, seeded) with a byte-level BPE
tokenizer trained on the benchmark's own texts, saved like a hub checkpoint: every contender
loads the same files. The data are IMDB reviews (S002's data set) from ../shared/realdata when
present, else the project's sample.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import sys

from harness import REAL, ROOT

# big enough that the step is mostly model compute, small enough for several repeats on 2 CPU cores
BERT = {"model_type": "bert", "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 512, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0}
MAX_LENGTH = 512  # S002 pads every review to 512


def imdb_rows() -> tuple[list[dict], str]:
    real = os.path.join(REAL, "imdb", "validation.csv")
    path = real if os.path.isfile(real) else os.path.join(ROOT, "data", "imdb_sample.csv")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    text = "review" if "review" in rows[0] else "text"
    return [{"text": r[text], "label": int(r["label"])} for r in rows], ("realdata" if path == real else "sample")


def write_csv(path: str, rows: list[dict]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows)
    return path


def imdb_files(workdir: str, n_train: int) -> dict:
    """train.csv (the first ``n_train`` reviews), validation.csv (16 others); and their source."""
    rows, source = imdb_rows()
    while len(rows) < n_train + 16:  # the project's sample is small: repeat it
        rows = rows + rows
    return {"train": write_csv(os.path.join(workdir, "train.csv"), rows[:n_train]),
            "validation": write_csv(os.path.join(workdir, "validation.csv"), rows[n_train:n_train + 16]),
            "source": source}


def small_bert(workdir: str, train_file: str, seed: int = 42) -> str:
    """Save a randomly initialised BERT classifier and its tokenizer to ``workdir/model``."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from ftkit import modeling

    path = os.path.join(workdir, "model")
    tok = modeling.build_tokenizer([train_file], 8000, path, modeling.special_tokens_for("bert"))
    cfg = dict(BERT)
    config = AutoConfig.for_model(cfg.pop("model_type"), vocab_size=len(tok), num_labels=2,
                                  pad_token_id=tok.pad_token_id, **cfg)
    torch.manual_seed(seed)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    return path


def script_config(script: str, class_name: str, options: dict):
    """A script's config class filled from ``options`` (validated as a recipe would be)."""
    from ftkit import config as cfg

    spec = importlib.util.spec_from_file_location(script, os.path.join(ROOT, "scripts", f"{script}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up while the class is built)
    spec.loader.exec_module(module)
    return cfg.build(getattr(module, class_name), options)
