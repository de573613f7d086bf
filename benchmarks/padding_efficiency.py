"""Padding efficiency: real tokens / computed tokens of the batches each batching strategy builds.

Strategies: pad every example to max_length (what S002 does), dynamic padding (pad each random
batch to its longest member), length grouping (ftkit's seeded mega-batch sort, the recipes'
``group_by_length``) and packing (``packing: true``: best-fit-decreasing rows of up to max_length
tokens, batched like the other strategies). Data: the real corpora in ../shared/realdata when present (DialogSum, SMS
spam, IMDB, MRPC), else the project's samples. Token counts use a byte-level BPE tokenizer trained
on each corpus (no hub access needed). Deterministic, so one run suffices (no repeats).

    python benchmarks/padding_efficiency.py        # or: make bench
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402  (puts the project root on the path)
from harness import REAL, ROOT  # noqa: E402

from ftkit import data, modeling  # noqa: E402

MAX_LENGTH = 512
TARGETS = {"group_by_length": 0.90, "packing": 0.95}  # issue 8: grouping on the classification sets


def corpora() -> list[dict]:
    """(name, texts, batch size, kind) of each corpus, the real one if present."""
    out = []

    def add(name, path, sample, texts_of, batch, kind):
        real = os.path.isfile(path)
        ds = data.load_local_file(path if real else sample, column_names=texts_of.get("names"),
                                  file_format=texts_of.get("format") if real else None)
        texts = [texts_of["join"](row) for row in ds]
        out.append({"name": name, "source": "realdata" if real else "sample", "texts": texts, "batch": batch,
                    "kind": kind, "file": path if real else sample})

    add("DialogSum train", os.path.join(REAL, "dialogsum", "dialogsum.train.jsonl"),
        os.path.join(ROOT, "data", "dialogsum_sample_train.jsonl"),
        {"join": lambda r: f"{r['dialogue']}\n{r['summary']}"}, 4, "causal LM")
    add("SMS spam", os.path.join(REAL, "sms_spam", "SMSSpamCollection"), os.path.join(ROOT, "data", "spam_sample.tsv"),
        {"join": lambda r: r["text"], "names": ["label", "text"], "format": "tsv"}, 8, "classification")
    add("IMDB", os.path.join(REAL, "imdb", "validation.csv"), os.path.join(ROOT, "data", "imdb_sample.csv"),
        {"join": lambda r: r.get("review") or r.get("text")}, 8, "classification")
    add("MRPC train", os.path.join(REAL, "mrpc", "train.tsv"), os.path.join(ROOT, "data", "mrpc_sample.tsv"),
        {"join": lambda r: f"{r['#1 String']} {r['#2 String']}"}, 8, "classification")
    return out


def efficiency(lengths: list[int], batches: list[list[int]], pad_to: int | None = None) -> float:
    real = sum(lengths[i] for b in batches for i in b)
    computed = sum((pad_to or max(lengths[i] for i in b)) * len(b) for b in batches)
    return real / computed


def measure(corpus: dict, workdir: str) -> dict:
    text_file = os.path.join(workdir, "texts.txt")
    with open(text_file, "w", encoding="utf-8") as f:
        f.write("\n".join(corpus["texts"]))
    tok = modeling.build_tokenizer([text_file], 8000, os.path.join(workdir, "tok"))
    lengths = [min(len(ids), MAX_LENGTH) for ids in tok(corpus["texts"])["input_ids"]]
    b = corpus["batch"]
    random_batches = data.TrainBatchSampler(lengths, b, seed=42).batches()
    grouped = data.TrainBatchSampler(lengths, b, seed=42, group_by_length=True).batches()
    rows = [sum(lengths[i] for i in row) for row in data.best_fit_bins(lengths, MAX_LENGTH)]
    packed = data.TrainBatchSampler(rows, b, seed=42).batches()
    return {"corpus": corpus["name"], "source": corpus["source"], "kind": corpus["kind"], "examples": len(lengths),
            "batch_size": b, "mean_tokens": sum(lengths) / len(lengths), "max_tokens": max(lengths),
            "pad_to_max_length": efficiency(lengths, random_batches, pad_to=MAX_LENGTH),
            "dynamic_padding": efficiency(lengths, random_batches),
            "group_by_length": efficiency(lengths, grouped),
            "packing": efficiency(rows, packed), "packed_rows": len(rows)}


def table(rows: list[dict]) -> list[str]:
    lines = [f"Max length {MAX_LENGTH}; efficiency = real tokens / computed tokens; packing: rows of up to "
             f"{MAX_LENGTH} tokens, batched like the rest.", "",
             "| corpus | source | examples | batch | mean / max tokens | pad to max_length | dynamic padding | "
             "group_by_length | packing (rows) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['corpus']} | {r['source']} | {r['examples']:,} | {r['batch_size']} | "
                     f"{r['mean_tokens']:.0f} / {r['max_tokens']} | {r['pad_to_max_length']:.3f} | "
                     f"{r['dynamic_padding']:.3f} | {r['group_by_length']:.3f} | {r['packing']:.3f} "
                     f"({r['packed_rows']:,}) |")
    return lines


def main() -> int:
    rows = []
    for corpus in corpora():
        with tempfile.TemporaryDirectory() as workdir:
            rows.append(measure(corpus, workdir))
        r = rows[-1]
        print(f"{r['corpus']:<16} {r['source']:<8} pad-to-max {r['pad_to_max_length']:.3f}  dynamic "
              f"{r['dynamic_padding']:.3f}  grouped {r['group_by_length']:.3f}  packed {r['packing']:.3f}", flush=True)
    harness.write_results("padding_efficiency", {"max_length": MAX_LENGTH, "targets": TARGETS, "results": rows})
    harness.write_table("padding_efficiency", "Padding efficiency", table(rows))
    missed = [f"{r['corpus']}: group_by_length {r['group_by_length']:.3f} < {TARGETS['group_by_length']}"
              for r in rows if r["kind"] == "classification" and r["group_by_length"] < TARGETS["group_by_length"]]
    missed += [f"{r['corpus']}: packing {r['packing']:.3f} < {TARGETS['packing']}"
               for r in rows if r["packing"] < TARGETS["packing"]]
    for line in missed:
        print("below target:", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
