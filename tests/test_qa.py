"""scripts/t5_qa.py pieces: SQuAD EM/F1, the three data shapes, cleaning, context-only truncation."""

import json
import os

import pytest

from conftest import ROOT, load_script
from ftkit import config as cfg, data, metrics, modeling
from ftkit.config import ConfigError

qa = load_script("t5_qa")
TINY = os.path.join(ROOT, "recipes", "tiny", "t5_qa.yaml")
SAMPLE = os.path.join(ROOT, "data", "qa_sample.jsonl")


def tiny_config(**overrides):
    return cfg.build(qa.QAConfig, cfg.load_yaml_recipe(TINY), overrides)


@pytest.fixture(scope="module")
def t5_tokenizer(tmp_path_factory):
    return modeling.build_tokenizer([SAMPLE], 500, str(tmp_path_factory.mktemp("t5tok")), modeling.special_tokens_for("t5"))


# ---------------------------------------------------------------------------------------------
# Exact match and F1
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction,gold,em,f1", [
    ("The Eiffel Tower!", "eiffel tower", 1.0, 1.0),           # case, punctuation, article
    ("an apple a day", "apple day", 1.0, 1.0),                  # articles dropped
    ("in 1930", "1930", 0.0, 2 * 0.5 * 1.0 / 1.5),              # precision 1/2, recall 1/1
    ("red big house", "big red barn", 0.0, 2 / 3),              # 2 common of 3 and 3
    ("", "Lisbon", 0.0, 0.0),                                    # empty prediction
    ("Kraków", "Krakow", 0.0, 0.0),                              # accents are not normalised (official)
])
def test_exact_match_and_f1_by_hand(prediction, gold, em, f1):
    assert metrics.exact_match(prediction, gold) == em
    assert metrics.token_f1(prediction, gold) == pytest.approx(f1)


def test_scores_take_the_max_over_gold_answers_and_are_percentages():
    result = metrics.squad(["136", "the North Sea", ""], [["136 kilometres", "136"], ["Red Sea"], ["x"]])
    assert result["exact_match"] == pytest.approx(100 / 3)
    # second: "north sea" vs "red sea": 1 common of 2 and 2 -> 0.5
    assert result["f1"] == pytest.approx(100 * (1.0 + 0.5 + 0.0) / 3)
    assert result["examples"] == 3


# ---------------------------------------------------------------------------------------------
# Data shapes and cleaning
# ---------------------------------------------------------------------------------------------

ROWS = [json.loads(line) for line in open(SAMPLE)][:6]


def _write_squad(path, rows):
    paragraphs = {}
    for r in rows:
        paragraphs.setdefault(r["context"], []).append(
            {"id": r["id"], "question": r["question"],
             "answers": [{"text": a, "answer_start": r["context"].find(a)} for a in r["answers"]]})
    doc = {"version": "1.1", "data": [{"title": "sample", "paragraphs": [
        {"context": c, "qas": qas} for c, qas in paragraphs.items()]}]}
    path.write_text(json.dumps(doc))


def _examples(config, ds):
    rows = qa.standardize(config, ds, "train")
    return sorted((r["id"], r["question"], r["context"], tuple(r["answers"])) for r in rows)


def test_squad_json_flat_table_and_hub_answers_load_to_the_same_examples(tmp_path):
    import datasets

    config = tiny_config()
    expected = _examples(config, datasets.Dataset.from_list(ROWS))
    _write_squad(tmp_path / "squad.json", ROWS)
    assert _examples(config, data.load_local_file(str(tmp_path / "squad.json"))) == expected
    # hub shape: answers = {text: [...], answer_start: [...]}
    hub = datasets.Dataset.from_list([{**r, "answers": {"text": r["answers"], "answer_start": [0] * len(r["answers"])}}
                                      for r in ROWS])
    assert _examples(config, hub) == expected
    # S004's flat table: one answer string in a column named "text" (first gold answer only)
    with open(tmp_path / "flat.csv", "w") as f:
        import csv

        writer = csv.writer(f)
        writer.writerow(["id", "context", "question", "text"])
        writer.writerows([r["id"], r["context"], r["question"], r["answers"][0]] for r in ROWS)
    flat = _examples(tiny_config(answer_column="text"), data.load_local_file(str(tmp_path / "flat.csv")))
    assert flat == [(i, q, c, a[:1]) for i, q, c, a in expected]


def test_missing_values_become_none_and_whitespace_collapses():
    import datasets

    config = tiny_config()
    ds = datasets.Dataset.from_list([{"id": "1", "context": "A  b\n c ", "question": None, "answers": []}])
    row = qa.standardize(config, ds, "train")[0]
    assert (row["context"], row["question"], row["answers"]) == ("A b c", "none", ["none"])


@pytest.mark.parametrize("doc,message", [
    ({"data": [{"title": "t"}]}, r"data\[0\] has no 'paragraphs' list"),
    ({"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "1", "question": "q"}]}]}]},
     r"data\[0\].paragraphs\[0\].qas\[0\] has no 'answers' list"),
    ({"version": "1.1", "data": []}, "holds no questions"),
])
def test_malformed_squad_json_names_the_file_and_what_is_missing(tmp_path, doc, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=f"{path}: .*{message}"):
        data.load_local_file(str(path))


def test_a_missing_column_lists_the_columns_there_are():
    import datasets

    ds = datasets.Dataset.from_list([{"context": "c", "query": "q", "answers": ["a"]}])
    with pytest.raises(ConfigError, match=r"question_column: column 'question' not in the train data \(columns: context, query, answers\)"):
        qa.standardize(tiny_config(), ds, "train")


def test_val_split_holds_out_20_percent_with_seed_101():
    splits = qa.load_qa_splits(tiny_config())
    assert (len(splits["train"]), len(splits["validation"])) == (63, 16)  # as sklearn: ceil(0.2 x 79) held out
    assert not set(splits["train"]["id"]) & set(splits["validation"]["id"])


# ---------------------------------------------------------------------------------------------
# Tokenization: the question is never cut, padding labels are -100
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("input_format", ["t5", "pair"])
def test_truncation_cuts_only_the_context(t5_tokenizer, input_format):
    config = tiny_config(input_format=input_format)
    question = "In which year was Mara Velt born?"
    context = " ".join(["Mara Velt was born in Lisbon in 1931."] * 20)
    ids, truncated, kept = qa.encode_source(t5_tokenizer, config, question, context, 48)
    assert truncated and len(ids) <= 48 and context.startswith(kept) and len(kept) < len(context)
    text = t5_tokenizer.decode(ids, skip_special_tokens=True)
    assert question in text
    if input_format == "t5":
        assert text.startswith(f"question: {question} context: ")
    full, cut, _ = qa.encode_source(t5_tokenizer, config, question, "Mara Velt was born in Lisbon.", 48)
    assert not cut and full[-1] == t5_tokenizer.eos_token_id


def test_answers_cut_away_by_truncation_are_counted(t5_tokenizer):
    import datasets

    config = tiny_config()
    filler = " ".join(["The river is long."] * 30)
    ds = datasets.Dataset.from_list([
        {"id": "early", "question": "Where?", "context": f"It is in Ghent. {filler}", "answers": ["Ghent"]},
        {"id": "late", "question": "Where?", "context": f"{filler} It is in Ghent.", "answers": ["Ghent"]},
        {"id": "short", "question": "Where?", "context": "It is in Ghent.", "answers": ["Ghent"]},
    ])
    tokenized, counts = qa.tokenize_split(ds, t5_tokenizer, config, 40, "train")
    assert counts == {"truncated": 2, "answer_cut": 1, "dropped_long_question": 0}
    assert max(tokenized["length"]) <= 40


def test_labels_are_minus_100_exactly_on_padding(t5_tokenizer):
    import datasets

    ds = datasets.Dataset.from_list([
        {"id": "a", "question": "Q?", "context": "c", "answers": ["a very long answer indeed"]},
        {"id": "b", "question": "Q?", "context": "c", "answers": ["x"]}])
    tokenized, _ = qa.tokenize_split(ds, t5_tokenizer, tiny_config(), 64, "train")
    batch = data.PadCollator(t5_tokenizer.pad_token_id)([tokenized[0], tokenized[1]])
    long, short = len(tokenized[0]["labels"]), len(tokenized[1]["labels"])
    assert batch["labels"].shape[1] == long  # padded to the longest label, not to the input length
    assert batch["labels"][1, :short].tolist() == tokenized[1]["labels"]
    assert (batch["labels"][1, short:] == -100).all() and (batch["labels"][0] != -100).all()


def test_shift_right_starts_with_the_start_token_and_has_no_minus_100():
    import torch

    labels = torch.tensor([[5, 6, 1], [7, 1, -100]])
    shifted = modeling.shift_right(labels, decoder_start_token_id=0, pad_token_id=0)
    assert shifted.tolist() == [[0, 5, 6], [0, 7, 1]]


REAL_SQUAD = os.path.join(ROOT, "..", "shared", "realdata", "squad", "dev-v1.1.json")


@pytest.mark.skipif(not os.path.isfile(REAL_SQUAD), reason="../shared/realdata absent")
def test_the_official_squad_dev_file_loads_every_question_with_its_gold_answers():
    ds = data.load_local_file(REAL_SQUAD, "validation_file")
    assert len(ds) == 10570
    assert all(len(a) >= 1 for a in ds["answers"])
    # each gold answer is a span of its context at answer_start, as the official file promises
    first = ds[0]
    assert all(first["context"][s:s + len(t)] == t for t, s in zip(first["answers"], first["answer_start"]))
