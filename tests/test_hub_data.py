"""The real recipes read their data from the hub (`dataset_name`, `dataset_config_name`, split names): that branch of
data.load_splits, run offline on folders laid out as the hub's parquet datasets are (a README naming each config's
split files), built here from the sample data with the hub datasets' columns and features: GLUE MRPC's ClassLabel
and hidden test labels (-1), IMDB's unlabelled split, SQuAD's answers as {text, answer_start}, DialogSum's ids. Each
real recipe runs with its own data options, its model swapped for its tiny twin's; then again with that model read
from the folder the first run built, as a hub model is read (nothing built into its output_dir)."""

import csv
import json
import os

import pytest
import yaml

from conftest import ROOT, read_jsonl, run_python

pytestmark = pytest.mark.slow
DATA = os.path.join(ROOT, "data")


def hub_folder(path, config: str, splits: dict) -> str:
    """``splits``: name -> datasets.Dataset, written as ``path/data/<config>/<split>-00000-of-00001.parquet``."""
    lines = ["---", "configs:", f"- config_name: {config}", "  data_files:"]
    for split, ds in splits.items():
        name = f"data/{config}/{split}-00000-of-00001.parquet"
        os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
        ds.to_parquet(os.path.join(path, name))
        lines += [f"  - split: {split}", f"    path: {name}"]
    with open(os.path.join(path, "README.md"), "w") as f:
        f.write("\n".join(lines + ["---", ""]))
    return str(path)


def glue_mrpc(path):
    from datasets import ClassLabel, Dataset, Features, Value

    rows = list(csv.DictReader(open(os.path.join(DATA, "mrpc_sample.tsv")), delimiter="\t", quoting=csv.QUOTE_NONE))
    features = Features({"sentence1": Value("string"), "sentence2": Value("string"),
                         "label": ClassLabel(names=["not_equivalent", "equivalent"]), "idx": Value("int32")})

    def split(part, hidden=False):
        return Dataset.from_dict({"sentence1": [r["#1 String"] for r in part], "sentence2": [r["#2 String"] for r in part],
                                  "label": [-1 if hidden else int(r["Quality"]) for r in part],
                                  "idx": list(range(len(part)))}, features=features)

    n = len(rows)
    return hub_folder(path, "mrpc", {"train": split(rows[:n * 6 // 10]), "validation": split(rows[n * 6 // 10:n * 8 // 10]),
                                     "test": split(rows[n * 8 // 10:], hidden=True)})


def imdb(path):
    from datasets import ClassLabel, Dataset, Features, Value

    rows = list(csv.DictReader(open(os.path.join(DATA, "imdb_sample.csv"))))
    features = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})

    def split(part, unlabelled=False):
        return Dataset.from_dict({"text": [r["text"] for r in part],
                                  "label": [-1 if unlabelled else int(r["label"]) for r in part]}, features=features)

    half = len(rows) // 2
    return hub_folder(path, "plain_text", {"train": split(rows[:half]), "test": split(rows[half:]),
                                           "unsupervised": split(rows[:10], unlabelled=True)})


def squad(path):
    from datasets import Dataset, Features, Sequence, Value

    rows = read_jsonl(os.path.join(DATA, "qa_sample.jsonl"))
    features = Features({"id": Value("string"), "title": Value("string"), "context": Value("string"),
                         "question": Value("string"),
                         "answers": Sequence({"text": Value("string"), "answer_start": Value("int32")})})

    def split(part):
        return Dataset.from_dict({
            "id": [r["id"] for r in part], "title": ["sample"] * len(part), "context": [r["context"] for r in part],
            "question": [r["question"] for r in part],
            "answers": [{"text": r["answers"], "answer_start": [r["context"].find(a) for a in r["answers"]]}
                        for r in part]}, features=features)

    n = len(rows) * 8 // 10
    return hub_folder(path, "plain_text", {"train": split(rows[:n]), "validation": split(rows[n:])})


def dialogsum(path):
    from datasets import Dataset

    def split(name):
        rows = read_jsonl(os.path.join(DATA, f"dialogsum_sample_{name}.jsonl"))
        return Dataset.from_dict({"id": [f"{name}_{i}" for i in range(len(rows))],
                                  "dialogue": [r["dialogue"] for r in rows], "summary": [r["summary"] for r in rows],
                                  "topic": ["sample"] * len(rows)})

    return hub_folder(path, "default", {name: split(name) for name in ("train", "validation", "test")})


# recipe: (script, its tiny twin, the hub folder's builder, short-run options)
RECIPES = {
    "bert_mrpc": ("classify.py", "mrpc", glue_mrpc, {"num_train_epochs": 2}),
    "bert_imdb": ("classify.py", "imdb", imdb, {"num_train_epochs": 1, "eval_steps": 3, "save_steps": 3,
                                                "max_length": 128}),
    "t5_base_squad": ("t5_qa.py", "t5_qa", squad, {"num_train_epochs": 1, "eval_steps": 4, "save_steps": 4,
                                                   "max_length": 128, "max_eval_samples": 8, "max_target_length": 16}),
    "phi2_qlora_dialogsum": ("qlora_summarize.py", "qlora_summarize", dialogsum, {
        "max_steps": 4, "eval_steps": 2, "save_steps": 2, "num_eval_generate": 2, "num_test_compare": 4,
        "max_eval_samples": 6, "max_new_tokens": 8, "bnb_4bit_compute_dtype": "float32"}),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_a_real_recipe_reads_its_hub_dataset(name, tmp_path):
    script, twin, build, short = RECIPES[name]
    real = yaml.safe_load(open(os.path.join(ROOT, "recipes", f"{name}.yaml")))
    tiny = yaml.safe_load(open(os.path.join(ROOT, "recipes", "tiny", f"{twin}.yaml")))
    folder = build(tmp_path / os.path.basename(real["dataset_name"]))
    overlay = {key: tiny[key] for key in ("model_config", "tokenizer_files", "tokenizer_vocab_size")}
    overlay.update(model_name_or_path=None, dataset_name=folder, report_to="none", bf16=False, logging_steps=1, **short)
    with open(tmp_path / "overlay.yaml", "w") as f:
        yaml.safe_dump(overlay, f)
    out = tmp_path / "run"
    proc = run_python(script, ["--config", os.path.join(ROOT, "recipes", f"{name}.yaml"), "--config",
                               str(tmp_path / "overlay.yaml"), "--output_dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.load(open(out / "metrics.json"))
    if name == "bert_mrpc":  # the ClassLabel's names; GLUE's hidden test labels are not read (test_split: null)
        assert result["label_names"] == ["not_equivalent", "equivalent"] and "test" not in result
        assert result["validation"]["examples"] == 20 and not os.path.exists(out / "predictions_test.jsonl")
        assert {r["label"] for r in read_jsonl(out / "predictions_validation.jsonl")} <= {"not_equivalent", "equivalent"}
    elif name == "bert_imdb":  # validation_split: test; the unlabelled split is not read
        assert result["label_names"] == ["neg", "pos"] and result["validation"]["examples"] == 50
    elif name == "t5_base_squad":  # the validation split is also the test split, scored in full at the end
        rows = read_jsonl(out / "predictions.jsonl")
        assert result["examples"] == len(rows) == 16 and rows[0]["id"] == "qa_63"
        assert rows[0]["answers"] == read_jsonl(os.path.join(DATA, "qa_sample.jsonl"))[63]["answers"]
    else:  # DialogSum's ids carried to the predictions
        assert result["num_test_examples"] == 4 and result["global_step"] == 4
        assert [r["id"] for r in read_jsonl(out / "predictions_test.jsonl")] == [f"test_{i}" for i in range(4)]

    # the model as a hub model: a folder of weights and tokenizer, into an output_dir not made yet (the summarizer
    # wrote its base model's scores there before it existed)
    hub_out = tmp_path / "outputs" / name
    proc = run_python(script, ["--config", os.path.join(ROOT, "recipes", f"{name}.yaml"), "--config",
                               str(tmp_path / "overlay.yaml"), "--model_config", "null", "--model_name_or_path",
                               str(out / "base_model"), "--output_dir", str(hub_out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.isfile(hub_out / "metrics.json") and not os.path.exists(hub_out / "base_model")
