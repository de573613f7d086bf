"""End to end: `accelerate launch scripts/t5_qa.py` on the tiny recipe, as users run it (the module's trained run;
the tests' own one-process runs are started as `python scripts/t5_qa.py`, see conftest.run_python)."""

import json
import os

import pytest

from conftest import ROOT, launch, read_jsonl, run_python

pytestmark = pytest.mark.slow
TINY = os.path.join(ROOT, "recipes", "tiny", "t5_qa.yaml")
SAMPLE = os.path.join(ROOT, "data", "qa_sample.jsonl")


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """Train on 16 questions and evaluate on the same 16."""
    root = tmp_path_factory.mktemp("qa")
    questions = root / "mem16.jsonl"
    questions.write_text("".join(open(SAMPLE).readlines()[:16]))
    out = root / "run"
    launch("t5_qa.py", ["--config", TINY, "--output_dir", str(out), "--train_file", str(questions),
                        "--validation_file", str(questions), "--val_split", "null", "--max_steps", "120",
                        "--eval_steps", "60", "--save_steps", "60"], launcher=True)
    return out, questions


def test_tiny_recipe_completes_with_its_outputs(tmp_path):
    out = tmp_path / "run"
    launch("t5_qa.py", ["--config", TINY, "--output_dir", str(out), "--num_train_epochs", "2", "--eval_steps", "8"])
    result = json.load(open(out / "metrics.json"))
    assert result["split"] == "validation" and result["examples"] == 16
    assert set(result) >= {"exact_match", "f1", "eval_loss", "truncation", "best_metric", "best_step"}
    rows = read_jsonl(out / "predictions.jsonl")
    assert len(rows) == 16 and set(rows[0]) == {"id", "question", "prediction", "answers", "em", "f1"}
    for name in ("model.safetensors", "config.json", "tokenizer.json", "ftkit_config.yaml"):
        assert os.path.isfile(out / "final" / name), name


def test_early_stopping_ends_training_and_reports_the_best_checkpoint(tmp_path):
    # threshold 100: no F1 gain counts as an improvement, so the evaluation at step 4 ends the run (patience 1)
    out = tmp_path / "run"
    proc = launch("t5_qa.py", ["--config", TINY, "--output_dir", str(out), "--max_steps", "20", "--eval_steps", "2",
                               "--early_stopping_patience", "1", "--early_stopping_threshold", "100",
                               "--max_eval_samples", "4"])
    assert ("[ftkit] early stopping at step 4: eval/f1 has not improved by more than 100 on 0 (step 2) for 1 "
            "evaluation(s)") in proc.stdout
    result = json.load(open(out / "metrics.json"))
    assert (result["global_step"], result["early_stopped_at"], result["best_step"]) == (4, 4, 2)
    evals = {r["step"]: r["eval/loss"] for r in read_jsonl(out / "metrics.jsonl") if "eval/loss" in r}
    assert list(evals) == [2, 4]  # the evaluation that stopped the run is the final one, not made twice
    assert result["eval_loss"] == pytest.approx(evals[2], rel=1e-5)  # the best checkpoint (step 2) was loaded


def test_exact_match_rises_from_the_untrained_model_to_at_least_80(memorised, tmp_path):
    out, questions = memorised
    result = json.load(open(out / "metrics.json"))
    assert result["exact_match"] >= 80, result
    untrained = run_python("t5_qa.py", ["--predict", "--model", str(out / "base_model"), "--input_file",
                                        str(questions), "--max_length", "128", "--max_target_length", "16"])
    assert untrained.returncode == 0, untrained.stderr[-3000:]
    # stdout: the answers, a line each (an untrained model's hold control characters, maybe line breaks)
    assert untrained.stdout.count("\n") == len(read_jsonl(questions)), untrained.stdout
    em = float(untrained.stderr.split("exact match")[1].split()[0])  # the score beside them, on stderr
    assert em < 20 <= result["exact_match"] - em


def test_predict_mode_reproduces_the_saved_predictions(memorised, tmp_path):
    out, questions = memorised
    proc = run_python("t5_qa.py", ["--predict", "--model", str(out / "final"), "--input_file", str(questions),
                                   "--prediction_file", str(tmp_path / "again.jsonl")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved, again = read_jsonl(out / "predictions.jsonl"), read_jsonl(tmp_path / "again.jsonl")
    assert [r["prediction"] for r in again] == [r["prediction"] for r in saved]
    first = read_jsonl(questions)[0]
    proc = run_python("t5_qa.py", ["--predict", "--model", str(out / "final"), "--question", first["question"],
                                   "--context", first["context"]])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == saved[0]["prediction"]


def test_two_processes_score_an_odd_eval_set_like_one(memorised, tmp_path):
    out, _ = memorised
    odd = tmp_path / "odd.jsonl"
    odd.write_text("".join(open(SAMPLE).readlines()[:15]))
    results = {}
    for n in (1, 2):
        proc = launch("t5_qa.py", ["--predict", "--model", str(out / "final"), "--input_file", str(odd),
                                   "--prediction_file", str(tmp_path / f"p{n}.jsonl")], num_processes=n)
        line = next(l for l in proc.stdout.splitlines() if l.startswith("exact match"))
        results[n] = (line, [r["prediction"] for r in read_jsonl(tmp_path / f"p{n}.jsonl")])
    assert results[1] == results[2]
    assert "(15 questions)" in results[2][0]


def test_max_eval_and_max_predict_samples_bound_what_is_answered_and_written(tmp_path):
    short = ["--config", TINY, "--num_train_epochs", "1", "--eval_steps", "4", "--max_eval_samples", "5"]
    launch("t5_qa.py", [*short, "--output_dir", str(tmp_path / "val")])
    result = json.load(open(tmp_path / "val" / "metrics.json"))
    assert result["split"] == "validation" and result["examples"] == 5
    assert len(read_jsonl(tmp_path / "val" / "predictions.jsonl")) == 5
    launch("t5_qa.py", [*short, "--output_dir", str(tmp_path / "test"), "--test_file", SAMPLE,
                        "--max_predict_samples", "7"])
    result = json.load(open(tmp_path / "test" / "metrics.json"))
    assert result["split"] == "test" and result["examples"] == 7
    assert [r["id"] for r in read_jsonl(tmp_path / "test" / "predictions.jsonl")] == \
        [r["id"] for r in read_jsonl(SAMPLE)[:7]]
