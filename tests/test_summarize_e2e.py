"""End to end: `accelerate launch scripts/qlora_summarize.py` on the tiny recipe, as users run it (the module's
trained run; the tests' own one-process runs are started as `python scripts/qlora_summarize.py`, see
conftest.run_python)."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TINY_SUMMARIZE, launch, read_jsonl, run_python
from ftkit import metrics

pytestmark = pytest.mark.slow
TRAIN = os.path.join(ROOT, "data", "dialogsum_sample_train.jsonl")


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """Train on 8 dialogues and score ROUGE on the same 8: a memorisation run."""
    out = tmp_path_factory.mktemp("memorise") / "run"
    launch("qlora_summarize.py", [
        "--config", TINY_SUMMARIZE, "--output_dir", str(out), "--train_file", TRAIN, "--test_file", TRAIN,
        "--max_train_samples", "8", "--num_test_compare", "8", "--per_device_train_batch_size", "4",
        "--gradient_accumulation_steps", "1", "--max_steps", "60", "--logging_steps", "1",
        "--eval_steps", "30", "--save_steps", "30", "--num_eval_generate", "2", "--merge_adapter", "true"],
        launcher=True)
    return out


def test_run_writes_config_metrics_checkpoints_and_final_adapter(memorised):
    assert os.path.isfile(memorised / "config.yaml")
    result = json.load(open(memorised / "metrics.json"))
    assert result["global_step"] == 60 and result["num_test_examples"] == 8
    assert "loss_since_log" not in result  # the loop's own carry-over, not a result
    assert set(result["tuned"]) == {"rouge1", "rouge2", "rougeL", "rougeLsum"}
    final = memorised / "final"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "ftkit_config.yaml"):
        assert os.path.isfile(final / name), name
    adapter = load_file(final / "adapter_model.safetensors")
    assert adapter and all("lora_" in k for k in adapter)
    assert sorted(os.listdir(memorised / "checkpoints")) == ["step_30", "step_60"]
    log = read_jsonl(memorised / "metrics.jsonl")
    assert [r["step"] for r in log if "train/loss" in r] == list(range(1, 61))
    assert [r["step"] for r in log if "eval/loss" in r] == [30, 60]
    assert all("eval/rougeL" in r for r in log if "eval/loss" in r)  # validation ROUGE, each evaluation
    assert [r["step"] for r in log if "test/rougeL" in r] == [60]  # the S001 table's, once
    samples = read_jsonl(memorised / "eval_samples.jsonl")  # each evaluation's summaries beside its ROUGE
    assert [r["step"] for r in samples] == [30, 30, 60, 60]
    assert [list(r) for r in samples[:1]] == [["step", "id", "dialogue", "prediction", "reference"]]
    validation = read_jsonl(os.path.join(ROOT, "data", "dialogsum_sample_validation.jsonl"))[:2]
    assert [(r["dialogue"], r["reference"]) for r in samples[:2]] == [(r["dialogue"], r["summary"]) for r in validation]


def test_early_stopping_and_the_best_adapter(tmp_path):
    # ranked by the *highest* validation loss (the first evaluation, step 4) and no improvement counted (threshold
    # 100): the evaluation at step 8 stops the run and the step-4 adapter is reloaded and exported
    out = tmp_path / "run"
    proc = launch("qlora_summarize.py", [
        "--config", TINY_SUMMARIZE, "--output_dir", str(out), "--max_steps", "40", "--eval_steps", "4",
        "--save_steps", "4", "--num_eval_generate", "1", "--num_test_compare", "2", "--greater_is_better", "true",
        "--early_stopping_patience", "1", "--early_stopping_threshold", "100", "--load_best_model_at_end", "true"])
    assert "[ftkit] early stopping at step 8: eval/loss has not improved by more than 100" in proc.stdout
    result = json.load(open(out / "metrics.json"))
    assert (result["global_step"], result["early_stopped_at"], result["best_step"]) == (8, 8, 4)
    evals = {r["step"]: r["eval/loss"] for r in read_jsonl(out / "metrics.jsonl") if "eval/loss" in r}
    assert list(evals) == [4, 8] and evals[4] > evals[8]
    assert result["eval_loss"] == pytest.approx(evals[4], rel=1e-5)  # the exported adapter is step 4's
    exported = load_file(out / "final" / "adapter_model.safetensors")
    best = {k.replace(".default", ""): v for k, v in load_file(out / "checkpoints" / "step_4" / "model.safetensors").items()}
    assert exported.keys() == best.keys() and all(torch.equal(exported[k], best[k]) for k in exported)


def test_training_loss_falls_by_half_and_tuned_rouge_beats_base(memorised):
    losses = [r["train/loss"] for r in read_jsonl(memorised / "metrics.jsonl") if "train/loss" in r]
    assert losses[-1] < 0.5 * losses[0], losses
    result = json.load(open(memorised / "metrics.json"))
    assert result["tuned"]["rougeL"] > result["base"]["rougeL"] + 10, result
    # the table's summaries, base and fine-tuned, beside each test dialogue and its reference
    rows = read_jsonl(memorised / "predictions_test.jsonl")
    assert [list(r) for r in rows[:1]] == [["id", "dialogue", "prediction", "base_prediction", "reference"]]
    assert [r["dialogue"] for r in rows] == [r["dialogue"] for r in read_jsonl(TRAIN)[:8]]
    for key, scores in (("base_prediction", result["base"]), ("prediction", result["tuned"])):
        assert metrics.rouge([r[key] for r in rows], [r["reference"] for r in rows]) == pytest.approx(scores)


def test_saved_adapter_reloads_and_generates_what_training_generated(memorised, tmp_path):
    # the input holds the reference summaries too: --predict scores them, as the run scored its test dialogues
    prediction_file = tmp_path / "pred.jsonl"
    rows = read_jsonl(TRAIN)[:8]
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"id": r["id"], "dialogue": r["dialogue"], "summary": r["summary"]}) + "\n"
                              for r in rows))
    proc = run_python("qlora_summarize.py", ["--predict", "--adapter", str(memorised / "final"),
                                             "--input_file", str(inputs), "--prediction_file", str(prediction_file)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    predicted = read_jsonl(prediction_file)
    in_process = [r["prediction"] for r in read_jsonl(memorised / "predictions_test.jsonl")]
    assert [r["prediction"] for r in predicted] == in_process
    assert [(r["id"], r["reference"]) for r in predicted] == [(r["id"], r["summary"]) for r in rows]
    assert any(len(r["prediction"]) > 10 for r in predicted)
    tuned = json.load(open(memorised / "metrics.json"))["tuned"]
    assert proc.stdout.splitlines()[-1] == "  ".join(f"{k} {v:.2f}" for k, v in tuned.items()) + "  (8 dialogues)"


def test_merged_model_equals_base_plus_adapter(memorised):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(memorised / "final_merged").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    base = AutoModelForCausalLM.from_pretrained(memorised / "base_model")
    with_adapter = PeftModel.from_pretrained(base, memorised / "final").eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.no_grad():
        a, b = merged(input_ids=ids).logits, with_adapter(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    # ... and the adapter really changed the model
    with torch.no_grad(), with_adapter.disable_adapter():
        plain = with_adapter(input_ids=ids).logits
    assert (plain - b).abs().max() > 1e-2


def test_predict_takes_the_merged_model_and_it_summarizes_as_base_plus_adapter(memorised):
    # a whole model (final_merged here; a use_peft: false run's final likewise), its options read from its folder
    dialogue = read_jsonl(TRAIN)[1]["dialogue"]
    outputs = [run_python("qlora_summarize.py", ["--predict", "--adapter", str(memorised / name), "--text", dialogue,
                                                 "--load_in_4bit", "false"]) for name in ("final_merged", "final")]
    assert all(p.returncode == 0 for p in outputs), outputs[0].stderr[-3000:] + outputs[1].stderr[-3000:]
    assert outputs[0].stdout == outputs[1].stdout and outputs[0].stdout.strip()


def test_a_model_from_a_folder_trains_into_an_output_dir_not_made_yet(memorised, tmp_path):
    # as a hub model: nothing is built into output_dir before the base model's scores are written there (they were
    # written into a folder that did not exist yet: FileNotFoundError after the base model's evaluation)
    out = tmp_path / "outputs" / "from_merged"
    proc = run_python("qlora_summarize.py", [
        "--config", TINY_SUMMARIZE, "--model_name_or_path", str(memorised / "final_merged"), "--model_config", "null",
        "--output_dir", str(out), "--max_steps", "2", "--num_test_compare", "2", "--num_eval_generate", "0"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not os.path.exists(out / "base_model")
    base = json.load(open(out / "base_eval.json"))
    assert {k: base[k] for k in ("rouge1", "rougeL")} == {k: json.load(open(out / "metrics.json"))["base"][k]
                                                          for k in ("rouge1", "rougeL")}


def test_a_moved_run_folder_predicts_with_its_own_base_model(memorised, tmp_path):
    # a model built from model_config is saved as the run's base_model/, and the adapter names that folder's path
    # then; the run moved (here: its final/ and base_model/ copied, and the path they were at gone), --predict finds
    # base_model/ beside final/
    moved = tmp_path / "elsewhere"
    for name in ("final", "base_model"):
        shutil.copytree(memorised / name, moved / name)
    adapter_config = json.load(open(moved / "final" / "adapter_config.json"))
    assert adapter_config["base_model_name_or_path"] == str(memorised / "base_model")
    adapter_config["base_model_name_or_path"] = str(tmp_path / "gone" / "run" / "base_model")
    json.dump(adapter_config, open(moved / "final" / "adapter_config.json", "w"))
    dialogue = read_jsonl(TRAIN)[0]["dialogue"]
    procs = [run_python("qlora_summarize.py", ["--predict", "--adapter", str(run), "--text", dialogue])
             for run in (memorised, moved)]
    assert procs[1].returncode == 0, procs[1].stderr[-3000:]
    assert procs[1].stdout == procs[0].stdout and procs[0].stdout.strip()


def test_a_dialogue_too_long_for_the_model_is_cut_to_fit_with_its_summary(memorised):
    # the tiny model has 512 positions: a dialogue of ~2,000 tokens was generated from past them (transformers'
    # "friendly reminder"; a model with learned positions fails there)
    dialogue = "\n".join([read_jsonl(TRAIN)[0]["dialogue"]] * 30)
    proc = run_python("qlora_summarize.py", ["--predict", "--adapter", str(memorised / "final"), "--text", dialogue])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 of 1 dialogues cut to fit their prompt and max_new_tokens 40 in max_length 512" in proc.stderr
    assert "exceeded the model's predefined maximum length" not in proc.stderr and len(proc.stdout.splitlines()) == 1


def test_predict_with_text_prints_a_summary(memorised):
    dialogue = read_jsonl(TRAIN)[0]["dialogue"]
    proc = run_python("qlora_summarize.py", ["--predict", "--adapter", str(memorised / "final"), "--text", dialogue])
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = read_jsonl(memorised / "predictions_test.jsonl")[0]["prediction"]
    assert proc.stdout.strip() == expected.strip().replace("\r", "\\r").replace("\n", "\\n")  # a line, printed


# ---------------------------------------------------------------------------------------------
# Gradient accumulation: loss normalised by the target tokens of the whole window
# ---------------------------------------------------------------------------------------------

ONE_SGD_STEP = [
    "--config", TINY_SUMMARIZE, "--max_steps", "1", "--optim", "sgd", "--learning_rate", "1.0",
    "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--max_grad_norm", "0", "--lora_dropout", "0",
    "--group_by_length", "false", "--num_test_compare", "1", "--num_eval_generate", "0", "--max_new_tokens", "2",
]


def _update(out):
    """LoRA B matrices start at zero, so after one SGD step they *are* the update."""
    weights = load_file(os.path.join(out, "final", "adapter_model.safetensors"))
    return {k: v for k, v in weights.items() if "lora_B" in k or "lora_embedding_B" in k}


def test_accumulated_micro_batches_give_the_update_of_one_large_batch(tmp_path):
    launch("qlora_summarize.py", ONE_SGD_STEP + ["--output_dir", str(tmp_path / "b4"),
                                                 "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1"])
    launch("qlora_summarize.py", ONE_SGD_STEP + ["--output_dir", str(tmp_path / "ga4"),
                                                 "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "4"])
    launch("qlora_summarize.py", ONE_SGD_STEP + ["--output_dir", str(tmp_path / "2x_ga2"),
                                                 "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2"],
           num_processes=2)
    reference = _update(tmp_path / "b4")
    scale = max(v.abs().max().item() for v in reference.values())
    assert scale > 0
    for other in ("ga4", "2x_ga2"):
        update = _update(tmp_path / other)
        assert update.keys() == reference.keys()
        worst = max((update[k] - reference[k]).abs().max().item() for k in reference)
        assert worst <= 1e-5 * scale, (other, worst, scale)


# ---------------------------------------------------------------------------------------------
# Resume in the middle of an epoch
# ---------------------------------------------------------------------------------------------


def test_resume_mid_epoch_matches_the_uninterrupted_run(tmp_path):
    # 36 examples / batch 4 = 9 micro-batches = 4 windows of 2 per epoch: step 3 is mid-epoch.
    # The recipe's paged 8-bit AdamW and LoRA dropout (0.05) stay on: optimizer state, RNG state and
    # the data order of the next epoch (steps 5-6) must all come back exactly.
    args = ["--config", TINY_SUMMARIZE, "--max_steps", "6", "--save_steps", "3", "--logging_steps", "1",
            "--num_test_compare", "1", "--num_eval_generate", "0", "--max_new_tokens", "2", "--eval_steps", "1000"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch("qlora_summarize.py", args + ["--output_dir", str(straight), "--save_total_limit", "5"], fresh=True)
    state = json.load(open(straight / "checkpoints" / "step_3" / "trainer_state.json"))
    assert (state["epoch"], state["batches_in_epoch"]) == (0, 6)
    # a run that stopped after its step-3 checkpoint: its output_dir holds just that checkpoint; resumed with the
    # tokenization in 2 processes (the same rows in the same order, else the data check would refuse the resume)
    shutil.copytree(straight / "checkpoints" / "step_3", resumed / "checkpoints" / "step_3")
    proc = launch("qlora_summarize.py", args + ["--output_dir", str(resumed), "--preprocessing_num_workers", "2"],
                  fresh=True)
    assert "tokenize train (num_proc=2)" in proc.stderr
    losses = {r["step"]: r["train/loss"] for r in read_jsonl(straight / "metrics.jsonl") if "train/loss" in r}
    resumed_losses = {r["step"]: r["train/loss"] for r in read_jsonl(resumed / "metrics.jsonl") if "train/loss" in r}
    assert sorted(resumed_losses) == [4, 5, 6]
    assert all(resumed_losses[s] == losses[s] for s in (4, 5, 6)), (losses, resumed_losses)
    a = load_file(straight / "final" / "adapter_model.safetensors")
    b = load_file(resumed / "final" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_output_dir_of_another_config_is_refused_and_left_intact(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(open(TINY_SUMMARIZE).read().replace("seed: 42", "seed: 1"))
    (out / "keep.txt").write_text("precious")
    proc = run_python("qlora_summarize.py", ["--config", TINY_SUMMARIZE, "--output_dir", str(out)])
    assert proc.returncode == 2
    assert "holds a run with a different config" in proc.stderr.strip().splitlines()[-1]
    assert sorted(os.listdir(out)) == ["config.yaml", "keep.txt"]


@pytest.mark.slow
def test_a_torch_compile_run_trains_generates_and_exits(tmp_path):
    # compiled, checkpointed 4-bit blocks; evaluation and the ROUGE table generate with the blocks run eagerly; the
    # finished run exits although torch.compile's worker threads are still alive (it hung in exit_finished's join)
    out = tmp_path / "run"
    proc = run_python("qlora_summarize.py", ["--config", TINY_SUMMARIZE, "--output_dir", str(out), "--max_steps", "3",
                                             "--eval_steps", "2", "--num_eval_generate", "2", "--num_test_compare", "2",
                                             "--max_new_tokens", "6", "--torch_compile", "true"], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.load(open(out / "metrics.json"))["global_step"] == 3
    assert "recompile_limit" not in proc.stderr
