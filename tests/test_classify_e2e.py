"""End to end: `accelerate launch scripts/classify.py` on the three tiny recipes, as users run them (the module's
trained runs; the tests' own one-process runs are started as `python scripts/classify.py`, see conftest.run_python)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, launch, read_jsonl, run_python, script_env

pytestmark = pytest.mark.slow
TINY = {name: os.path.join(ROOT, "recipes", "tiny", f"{name}.yaml") for name in ("spam", "mrpc", "imdb")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each tiny recipe, trained once for the tests below."""
    out = {}
    for name in TINY:
        out[name] = tmp_path_factory.mktemp(name) / "run"
        launch("classify.py", ["--config", TINY[name], "--output_dir", str(out[name])], launcher=True)
    return out


@pytest.mark.parametrize("name,split", [("spam", "test"), ("imdb", "test"), ("mrpc", "validation")])
def test_tiny_recipe_learns_its_separable_set(runs, name, split):
    result = json.load(open(runs[name] / "metrics.json"))
    assert result[split]["accuracy"] >= 0.9, result[split]
    assert result[split]["examples"] == sum(map(sum, result[split]["confusion"]))
    for file in ("config.json", "model.safetensors", "tokenizer.json", "ftkit_config.yaml"):
        assert os.path.isfile(runs[name] / "final" / file), file


def test_spam_reports_all_three_splits_with_s003_sizes(runs):
    result = json.load(open(runs["spam"] / "metrics.json"))
    assert {k: result[k]["examples"] for k in ("train", "validation", "test")} == {"train": 42, "validation": 6, "test": 12}
    assert result["label_names"] == ["ham", "spam"]
    config = json.load(open(runs["spam"] / "final" / "config.json"))
    assert config["id2label"] == {"0": "ham", "1": "spam"}


def test_only_the_last_block_final_norm_and_head_were_trained(runs):
    from safetensors.torch import load_file

    base = load_file(runs["spam"] / "base_model" / "model.safetensors")
    final = load_file(runs["spam"] / "final" / "model.safetensors")
    changed = {k for k in base if k in final and not (base[k] == final[k]).all()}
    assert changed and all(k.startswith(("transformer.h.1.", "transformer.ln_f.", "score.")) for k in changed), changed
    assert any(k.startswith("transformer.h.1.") for k in changed)


def _texts_file(path, rows, pair=False):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({"text": r["text"], **({"text_pair": r["text_pair"]} if pair else {})}) + "\n")


def test_predict_mode_reproduces_the_saved_test_predictions(runs, tmp_path):
    saved = read_jsonl(runs["spam"] / "predictions_test.jsonl")
    _texts_file(tmp_path / "in.jsonl", saved)
    proc = run_python("classify.py", ["--predict", "--model", str(runs["spam"] / "final"),
                                      "--input_file", str(tmp_path / "in.jsonl"),
                                      "--prediction_file", str(tmp_path / "new" / "out.jsonl")])  # its folder made
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = read_jsonl(tmp_path / "new" / "out.jsonl")
    assert [r["prediction"] for r in again] == [r["prediction"] for r in saved]
    assert all(abs(a["probability"] - b["probability"]) < 1e-5 for a, b in zip(again, saved))


def test_predict_one_text_pair_prints_label_and_probability(runs):
    row = read_jsonl(runs["mrpc"] / "predictions_validation.jsonl")[0]
    proc = run_python("classify.py", ["--predict", "--model", str(runs["mrpc"] / "final"),
                                      "--text", row["text"], "--text_pair", row["text_pair"]])
    assert proc.returncode == 0, proc.stderr[-3000:]
    label, probability = proc.stdout.strip().split("\t")
    assert label == row["prediction"] and abs(float(probability) - row["probability"]) < 1e-4


def test_predict_takes_a_runs_output_dir_and_explains_a_checkpoint(runs, tmp_path):
    """--model RUN is RUN/final; --model RUN/checkpoints/step_N is refused with the command that exports it, and
    that command writes a model in another output_dir (the best up to that step, reloaded as the run's end did),
    leaving the run as it was."""
    text = ["--text", "WIN a FREE prize, call now"]
    final = run_python("classify.py", ["--predict", "--model", str(runs["spam"] / "final"), *text])
    whole_run = run_python("classify.py", ["--predict", "--model", str(runs["spam"]), *text])
    assert whole_run.returncode == 0 and whole_run.stdout == final.stdout, whole_run.stderr[-2000:]

    ckpt = max((runs["spam"] / "checkpoints").iterdir(), key=lambda p: int(p.name.split("_")[1]))
    step = ckpt.name.split("_")[1]
    refused = run_python("classify.py", ["--predict", "--model", str(ckpt), *text])
    error = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 2 and error.startswith(f"error: model: {ckpt} is a training checkpoint"), error
    assert f"--resume_from_checkpoint {ckpt} --max_steps {step} --output_dir NEW_DIR" in error, error
    unfinished = tmp_path / "unfinished"  # a run still training (or stopped): no final/ yet
    shutil.copytree(runs["spam"], unfinished, ignore=shutil.ignore_patterns("final"))
    refused = run_python("classify.py", ["--predict", "--model", str(unfinished), *text])
    error = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 2 and error.startswith(
        f"error: model: {unfinished} is a run's output_dir with no final/ yet; its latest checkpoint "
        f"{unfinished / 'checkpoints' / ckpt.name} is not a model"), error

    before = {p: p.stat().st_mtime_ns for p in runs["spam"].rglob("*") if p.is_file()}
    exported = tmp_path / "step_model"
    proc = run_python("classify.py", ["--config", TINY["spam"], "--resume_from_checkpoint", str(ckpt),
                                      "--max_steps", step, "--output_dir", str(exported)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = run_python("classify.py", ["--predict", "--model", str(exported / "final"), *text])
    assert again.returncode == 0 and again.stdout == final.stdout  # the last checkpoint: the run's own export
    assert {p: p.stat().st_mtime_ns for p in runs["spam"].rglob("*") if p.is_file()} == before


def test_predict_scores_a_labelled_file_as_the_run_scored_its_test_split(runs, tmp_path):
    saved = read_jsonl(runs["spam"] / "predictions_test.jsonl")
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text("".join(json.dumps({"id": f"m{i}", "text": r["text"], "label": r["label"]}) + "\n"
                                for i, r in enumerate(saved)))
    proc = run_python("classify.py", ["--predict", "--model", str(runs["spam"]), "--input_file", str(labelled)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # stdout holds the predictions alone, a line per row (to paste beside the input); the scores go to stderr
    assert [line.split("\t")[0] for line in proc.stdout.splitlines()] == [r["prediction"] for r in saved]
    test = json.load(open(runs["spam"] / "metrics.json"))["test"]
    assert f"input      accuracy {test['accuracy']:.4f}  f1 {test['f1']:.4f}  loss " in proc.stderr
    assert f"confusion (rows: true, columns: predicted; ham, spam): {test['confusion']}" in proc.stderr
    out = tmp_path / "out.jsonl"
    proc = run_python("classify.py", ["--predict", "--model", str(runs["spam"]), "--input_file", str(labelled),
                                      "--prediction_file", str(out)])
    assert proc.returncode == 0 and f"accuracy {test['accuracy']:.4f}" in proc.stdout
    assert [(r["id"], r["prediction"], r["label"]) for r in read_jsonl(out)] == [
        (f"m{i}", r["prediction"], r["label"]) for i, r in enumerate(saved)]
    # a gold label the model does not know: one line naming it and its row; an empty label column is no gold
    labelled.write_text('{"text": "see you at 6", "label": "ham"}\n{"text": "WIN cash now", "label": "maybe"}\n')
    proc = run_python("classify.py", ["--predict", "--model", str(runs["spam"]), "--input_file", str(labelled)])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "error: label_column: label 'maybe' in the input data (row 2) is not in label_map: ham, spam"), proc.stderr
    labelled.write_text('{"text": "see you at 6", "label": null}\n{"text": "WIN cash now", "label": null}\n')
    proc = run_python("classify.py", ["--predict", "--model", str(runs["spam"]), "--input_file", str(labelled)])
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 2 and "accuracy" not in proc.stderr


def test_predict_with_another_script_names_the_one_that_trained_the_model(runs):
    # (a T5 head over a GPT-2 classifier: the options of another script, then a traceback or a random head)
    run = str(runs["spam"])
    for script, args in [("t5_qa.py", ["--model", run, "--question", "Where?", "--context", "Here."]),
                         ("qlora_summarize.py", ["--adapter", run, "--text", "#Person1#: Hi."])]:
        proc = run_python(script, ["--predict", *args])
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
            f"error: {args[0][2:]}: {runs['spam'] / 'final'} was trained by classify.py, not {script} (its options include "
            f"'text_column'): predict with python scripts/classify.py --predict"), proc.stderr[-2000:]
    assert open(runs["spam"] / "final" / "ftkit_config.yaml").readline() == "# ftkit config, written by classify.py\n"


def test_empty_and_missing_texts_are_labelled_too(runs, tmp_path):
    # GPT-2's tokenizer makes no tokens of "": the row is its end-of-text token (a batch of no tokens failed)
    (tmp_path / "in.jsonl").write_text('{"text": ""}\n{"text": null}\n{"id": 3}\n')
    proc = run_python("classify.py", ["--predict", "--model", str(runs["spam"] / "final"), "--input_file",
                                      str(tmp_path / "in.jsonl")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("\t") for line in proc.stdout.strip().splitlines()]
    assert len(rows) == 3 and len({tuple(r) for r in rows}) == 1 and rows[0][0] in ("ham", "spam"), rows


def test_a_column_of_numbers_is_labelled_as_the_same_text(runs, tmp_path):
    # a CSV column of numbers reads as integers: tokenized as text (the tokenizer refused them: a traceback)
    (tmp_path / "numbers.csv").write_text("text\n12345\n0\n")
    (tmp_path / "strings.jsonl").write_text('{"text": "12345"}\n{"text": "0"}\n')
    outputs = [run_python("classify.py", ["--predict", "--model", str(runs["spam"]), "--input_file", str(tmp_path / f),
                                          "--column_names", "null"]) for f in ("numbers.csv", "strings.jsonl")]
    assert all(p.returncode == 0 for p in outputs), outputs[0].stderr[-3000:]
    assert outputs[0].stdout == outputs[1].stdout and len(outputs[0].stdout.splitlines()) == 2


def test_the_best_checkpoint_is_reloaded_with_the_metrics_it_was_chosen_for(tmp_path):
    # Ranking by *lowest* accuracy picks an early, poor checkpoint: the final metrics must be its.
    out = tmp_path / "run"
    launch("classify.py", ["--config", TINY["spam"], "--output_dir", str(out), "--eval_strategy", "steps",
                           "--eval_steps", "2", "--greater_is_better", "false", "--save_total_limit", "1"])
    result = json.load(open(out / "metrics.json"))
    assert result["best_step"] < result["global_step"]
    logged = {r["step"]: r for r in read_jsonl(out / "metrics.jsonl") if "eval/loss" in r}
    best = logged[result["best_step"]]
    assert result["validation"]["accuracy"] == best["eval/accuracy"] == result["best_metric"]
    assert abs(result["validation"]["loss"] - best["eval/loss"]) <= 1e-6 * max(1.0, best["eval/loss"])
    # rotation kept the best next to the latest
    kept = sorted(os.listdir(out / "checkpoints"))
    assert kept == sorted({f"step_{result['best_step']}", f"step_{result['global_step']}"})


def test_a_run_folder_moved_elsewhere_still_reloads_its_best_checkpoint(tmp_path):
    # the run finished, then its folder moved (another filesystem, a cluster mounted elsewhere): the same command
    # there evaluates and exports again from its own best checkpoint (the saved state named the old folder's)
    args = ["--config", TINY["spam"], "--eval_strategy", "steps", "--eval_steps", "2", "--greater_is_better", "false",
            "--save_total_limit", "1", "--max_steps", "10"]
    first, moved = tmp_path / "first", tmp_path / "elsewhere" / "run"
    launch("classify.py", args + ["--output_dir", str(first)])
    result = json.load(open(first / "metrics.json"))
    assert result["best_step"] < result["global_step"]
    moved.parent.mkdir()
    shutil.move(first, moved)
    proc = launch("classify.py", args + ["--output_dir", str(moved)])
    assert f"loaded the best checkpoint {moved / 'checkpoints'}" in proc.stderr, proc.stderr[-3000:]
    again = json.load(open(moved / "metrics.json"))
    assert again["validation"] == result["validation"] and again["best_step"] == result["best_step"]


def test_save_strategy_epoch_checkpoints_every_epoch_end(tmp_path):
    # 42 examples, batch 8, drop_last: 5 steps an epoch; the last epoch's end is the final checkpoint
    out = tmp_path / "run"
    launch("classify.py", ["--config", TINY["spam"], "--output_dir", str(out), "--num_train_epochs", "3",
                           "--eval_strategy", "no", "--save_strategy", "epoch", "--save_steps", "2",
                           "--save_total_limit", "5"])
    assert sorted(os.listdir(out / "checkpoints"), key=lambda d: int(d[5:])) == ["step_5", "step_10", "step_15"]
    state = json.load(open(out / "checkpoints" / "step_10" / "trainer_state.json"))
    assert (state["epoch"], state["batches_in_epoch"]) == (1, 5)


def test_two_processes_score_every_example_exactly_once(tmp_path):
    # 60 balanced examples split 70/15/15: validation and test hold 9 each, odd for 2 processes.
    out = tmp_path / "run"
    launch("classify.py", ["--config", TINY["spam"], "--output_dir", str(out), "--split_ratios", "[0.7, 0.15, 0.15]",
                           "--per_device_train_batch_size", "4"], num_processes=2)
    result = json.load(open(out / "metrics.json"))
    assert result["validation"]["examples"] == 9 and result["test"]["examples"] == 9
    saved = read_jsonl(out / "predictions_test.jsonl")
    assert len(saved) == 9
    # the same model scored in one process gives the same predictions, hence the same metrics
    _texts_file(tmp_path / "in.jsonl", saved)
    proc = run_python("classify.py", ["--predict", "--model", str(out / "final"), "--input_file",
                                      str(tmp_path / "in.jsonl"), "--prediction_file", str(tmp_path / "one.jsonl")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = read_jsonl(tmp_path / "one.jsonl")
    assert [r["prediction"] for r in single] == [r["prediction"] for r in saved]
    accuracy = sum(r["prediction"] == s["label"] for r, s in zip(single, saved)) / len(saved)
    assert accuracy == result["test"]["accuracy"]


def test_a_full_fine_tune_imports_neither_peft_nor_bitsandbytes(tmp_path):
    """Their imports cost a run without adapters or 8-bit/4-bit layers 1.3 to 2 s of start-up on a 2-core CPU
    (bitsandbytes pulls in torch's inductor); transformers.get_scheduler was the path that brought them in."""
    script = os.path.join(ROOT, "scripts", "classify.py")
    code = ("import atexit, runpy, sys\n"
            "atexit.register(lambda: print('imported:', [m for m in ('peft', 'bitsandbytes') if m in sys.modules]))\n"
            f"sys.argv = [{script!r}, '--config', {TINY['spam']!r}, '--max_steps', '1', '--output_dir', "
            f"{str(tmp_path / 'run')!r}]\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=script_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.load(open(tmp_path / "run" / "metrics.json"))["global_step"] == 1
    assert "imported: []" in proc.stdout.splitlines(), proc.stdout[-2000:]
