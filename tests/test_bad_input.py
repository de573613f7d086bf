"""Bad input, case by case (issue table): one line `error: ...` naming what is wrong, exit code 2, no
traceback, nothing in output_dir destroyed; nothing built or loaded when the config alone shows it."""

import json
import os
import subprocess

import pytest
import yaml

from conftest import BIN, ROOT, free_port, run_python, script_env

pytestmark = pytest.mark.slow
TINY = os.path.join(ROOT, "recipes", "tiny")
SPAM, MRPC = os.path.join(TINY, "spam.yaml"), os.path.join(TINY, "mrpc.yaml")
SUMMARIZE, QA = os.path.join(TINY, "qlora_summarize.yaml"), os.path.join(TINY, "t5_qa.yaml")


def write(path, content, mode="w"):
    with open(path, mode) as f:
        f.write(content)
    return str(path)


def recipe_with(tmp, base, **changes):
    values = yaml.safe_load(open(base))
    values.update(changes)
    return write(tmp / "recipe.yaml", yaml.safe_dump(values))


# Each case: (script, argv builder taking tmp_path, expected text in the error line, config-only?)
# "config-only" cases must stop before anything is written to output_dir (not even the tiny base model).
CASES = {
    "1 unknown key with a suggestion": ("classify.py", lambda t: ["--config", SPAM, "--learning_rat", "1e-3"],
                                        "unknown option 'learning_rat' in the command line (did you mean 'learning_rate'?)", True),
    "1b unknown key in the recipe": ("classify.py", lambda t: ["--config", recipe_with(t, SPAM, num_train_epoch=3)],
                                     "unknown option 'num_train_epoch' in", True),
    "1c a recipe of another script": ("t5_qa.py", lambda t: ["--config", SPAM],
                                      f"error: {SPAM} is a recipe for classify.py, not t5_qa.py: python "
                                      f"scripts/classify.py --config {SPAM}", True),
    "1c t5_qa.py's recipe given to classify.py": ("classify.py", lambda t: ["--config", QA],
                                                  f"error: {QA} is a recipe for t5_qa.py, not classify.py", True),
    "1d a recipe without --config": ("classify.py", lambda t: [SPAM],
                                     f"error: unexpected argument {SPAM!r} (a recipe is given as --config {SPAM})", True),
    "2 wrong type": ("classify.py", lambda t: ["--config", SPAM, "--learning_rate", "fast"],
                     "learning_rate: expected a number, got 'fast'", True),
    "3 negative learning rate": ("classify.py", lambda t: ["--config", SPAM, "--learning_rate", "-1e-3"],
                                 "learning_rate: must be > 0", True),
    "3 zero batch size": ("classify.py", lambda t: ["--config", SPAM, "--per_device_train_batch_size", "0"],
                          "per_device_train_batch_size: must be >= 1, got 0", True),
    "3 negative save_steps": ("classify.py", lambda t: ["--config", SPAM, "--save_steps", "-5"],
                              "save_steps: must be >= 1, got -5", True),
    "3 warmup_ratio above 1": ("classify.py", lambda t: ["--config", SPAM, "--warmup_ratio", "1.5"],
                               "warmup_ratio: must be <= 1, got 1.5", True),
    "4 recipe that is not YAML": ("classify.py", lambda t: ["--config", write(t / "bad.yaml", "seed: 1\nlr: [1, 2\n")],
                                  "bad.yaml:3:1: invalid YAML", True),
    "4 recipe key given twice": ("classify.py", lambda t: ["--config", write(t / "twice.yaml", open(SPAM).read() + "seed: 7\n")],
                                 "twice.yaml:{n}:1: invalid YAML: 'seed' given twice (first at ".format(
                                     n=len(open(SPAM).read().splitlines()) + 1), True),
    "5 missing data file": ("classify.py", lambda t: ["--config", SPAM, "--train_file", "data/nope.tsv"],
                            "train_file: file not found: data/nope.tsv", True),
    "6 unsupported extension": ("classify.py", lambda t: ["--config", SPAM, "--train_file", write(t / "d.xlsx", "x")],
                                "train_file: unsupported file extension '.xlsx'", True),
    "7 missing column lists the columns": ("classify.py", lambda t: ["--config", SPAM, "--text_column", "body"],
                                           "text_column: column 'body' not in the train data (columns: label, text)", True),
    "8 malformed JSONL line": ("t5_qa.py", lambda t: ["--config", QA, "--train_file", write(
        t / "qa.jsonl", '{"context": "c", "question": "q", "answers": ["a"]}\n{"context": "c", oops}\n')],
        "qa.jsonl:2: malformed JSON line", True),
    "9 non-UTF-8 bytes": ("classify.py", lambda t: ["--config", SPAM, "--train_file", write(
        t / "latin.tsv", "ham\tok\nspam\tcaf\xe9 prize\n".encode("latin-1"), "wb")],
        "latin.tsv:2: not UTF-8 (byte offset 15", True),
    "10 empty data file": ("classify.py", lambda t: ["--config", SPAM, "--train_file", write(t / "empty.tsv", "")],
                           "empty.tsv: holds no examples (empty file)", True),
    "10 empty after dropping over-long examples": ("qlora_summarize.py", lambda t: ["--config", SUMMARIZE, "--max_length", "16"],
                                                   "train: no examples left: all 36 have >= max_length=16 tokens", False),
    "10 null summary": ("qlora_summarize.py", lambda t: ["--config", SUMMARIZE, "--train_file", write(t / "d.jsonl", "".join(
        open(os.path.join(ROOT, "data", "dialogsum_sample_train.jsonl")).readlines()[:2]) + '{"dialogue": "#Person1#: Hi."}\n')],
        "summary_column: column 'summary' has no value in row 3 of the train data (1 of 3 rows have none)", True),
    "11 row without a label": ("classify.py", lambda t: ["--config", SPAM, "--train_file", write(
        t / "s.tsv", "ham\tsee you at six\nspam\tWIN a prize now\n\tno label here\nham\tok\n")],
        "label_column: column 'label' has no value in row 3 of the train data (1 of 4 rows have none)", True),
    "11 label outside num_labels": ("classify.py", lambda t: ["--config", SPAM, "--label_map", "null", "--column_names", "null",
                                                              "--split_ratios", "null", "--balance", "none",
                                                              "--train_file", write(t / "l.csv", "text,label\na,0\nb,1\nc,0\n"),
                                                              "--validation_file", write(t / "v.csv", "text,label\na,1\nb,5\n")],
                                    "label 5 in the validation data (row 2) is outside 0..1 (num_labels 2)", True),
    "11 unknown string label": ("classify.py", lambda t: ["--config", MRPC, "--split_ratios", "null", "--label_map", "{same: 1, different: 0}",
                                                          "--train_file", write(t / "p.tsv", "Quality\t#1 String\t#2 String\nsame\ta\tb\nmaybe\tc\td\n"),
                                                          "--validation_file", write(t / "v.tsv", "Quality\t#1 String\t#2 String\ndifferent\ta\tb\n")],
                                "label 'maybe' in the train data (row 2) is not in label_map: same, different", True),
    "11 YAML yes/no label names": ("classify.py", lambda t: ["--config", MRPC, "--label_map", "{yes: 1, no: 0}"],
                                   "label_map: key True is YAML's reading of an unquoted yes/no/on/off", True),
    "11 label_map without spaces": ("classify.py", lambda t: ["--config", SPAM, "--label_map", "{ham:0, spam: 1}"],
                                    "label_map: 'ham:0' reads as a key without a value; YAML needs a space after "
                                    "each colon: {ham: 0}", True),
    "12 unknown model_type": ("classify.py", lambda t: ["--config", SPAM, "--model_config", "{model_type: brt, hidden_size: 16}"],
                              "model_config: unknown model_type 'brt' (did you mean 'bert'", True),
    "12 sizes the architecture refuses": ("qlora_summarize.py", lambda t: ["--config", SUMMARIZE, "--model_config",
                                                                           "{model_type: gpt2, n_embd: 30, n_head: 4}"],
                                          "model_config: `embed_dim` must be divisible by num_heads", True),
    "13 max_length beyond the model": ("classify.py", lambda t: ["--config", SPAM, "--max_length", "4096"],
                                       "max_length: 4096 exceeds the model's position limit 128", False),
    "14 LoRA targets that match nothing": ("qlora_summarize.py", lambda t: ["--config", SUMMARIZE, "--lora_target_modules", "query,value"],
                                           "lora_target_modules: 'query' matches no module of this model (linear layers: ", False),
    "15 trainable_modules matching nothing": ("classify.py", lambda t: ["--config", SPAM, "--trainable_modules", "[encoder.layer.1]"],
                                              "trainable_modules: 'encoder.layer.1' matches no parameter of this model (modules: transformer", False),
    "15 trainable_modules empty": ("classify.py", lambda t: ["--config", SPAM, "--trainable_modules", "[]"],
                                   "trainable_modules: empty list; name at least one module, or leave it unset", True),
    "16 DeepSpeed config missing": ("classify.py", lambda t: ["--config", SPAM, "--deepspeed", "ds_configs/zero9.json"],
                                    "deepspeed: DeepSpeed config not found: ds_configs/zero9.json", True),
    "16 DeepSpeed config not JSON": ("classify.py", lambda t: ["--config", SPAM, "--deepspeed", write(t / "ds.json", "{ stage: 2 }")],
                                     "ds.json:1:3: invalid JSON in the DeepSpeed config", True),
    "16 DeepSpeed config with a key twice": ("classify.py", lambda t: ["--config", SPAM, "--deepspeed", write(
        t / "ds.json", '{"zero_optimization": {"stage": 2, "stage": 3}}')],
        "ds.json: 'stage' given twice in one object of the DeepSpeed config; keep one", True),
    "17 recipe / DeepSpeed conflict": ("classify.py", lambda t: ["--config", SPAM, "--deepspeed", write(
        t / "ds.json", json.dumps({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}}))],
        "train_micro_batch_size_per_gpu is 2 but the recipe's per_device_train_batch_size is 8", True),
    "17 auto batch / fixed DeepSpeed micro-batch": ("classify.py", lambda t: ["--config", SPAM, "--per_device_train_batch_size",
        "auto", "--deepspeed", write(t / "ds.json", json.dumps({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}}))],
        "ds.json: train_micro_batch_size_per_gpu is 2 but the recipe's per_device_train_batch_size is auto", True),
    "18 resume path missing": ("classify.py", lambda t: ["--config", SPAM, "--resume_from_checkpoint", str(t / "nowhere")],
                               "resume_from_checkpoint: no such directory", True),
    "18 resume path incomplete": ("classify.py", lambda t: ["--config", SPAM, "--resume_from_checkpoint", str(_half_checkpoint(t))],
                                  "is incomplete (no trainer_state.json)", True),
    "18 resume path a run's output_dir": ("classify.py", lambda t: ["--config", SPAM, "--resume_from_checkpoint",
                                                                     str(_checkpointed_run(t) / "checkpoints")],
                                          "checkpoints holds checkpoints but is not one; name one of them: "
                                          "{t}/run/checkpoints/step_10 (the latest), {t}/run/checkpoints/step_5", True),
    "19 attention kernel unknown": ("t5_qa.py", lambda t: ["--config", QA, "--attn_implementation", "sdpa2"],
                                    "attn_implementation: Specified `attn_implementation=\"sdpa2\"` is not supported", True),
    "19 attention kernel the model lacks": ("t5_qa.py", lambda t: ["--config", QA, "--attn_implementation", "flash_attention_2"],
                                            "attn_implementation: T5ForConditionalGeneration does not support Flash Attention 2", True),
    "19 float16 weights under AdamW": ("t5_qa.py", lambda t: ["--config", QA, "--torch_dtype", "float16"],
                                       "torch_dtype: float16 weights trained by adamw_torch break at the first step", True),
    "20 wandb without credentials": ("classify.py", lambda t: ["--config", SPAM, "--report_to", "wandb"],
                                     "report_to: wandb has no credentials", True),
    "21 model not cached offline": ("classify.py", lambda t: ["--config", SPAM, "--model_config", "null",
                                                              "--model_name_or_path", "nobody/no-such-model-xyz"],
                                    "model_name_or_path: cannot load 'nobody/no-such-model-xyz' (not in the local cache and the hub is unreachable", True),
    "21 model path that does not exist": ("classify.py", lambda t: ["--config", SPAM, "--model_config", "null",
                                                                    "--model_name_or_path", str(t / "moved" / "base_model")],
                                          "model_name_or_path: cannot load '{t}/moved/base_model' (no such directory)", True),
    "23 accumulation larger than the data": ("classify.py", lambda t: ["--config", SPAM, "--gradient_accumulation_steps", "64"],
                                             "gradient_accumulation_steps: 64 x batch 8 x 1 processes needs more than the 42 training examples", False),
    "24 early stopping without evaluations": ("t5_qa.py", lambda t: ["--config", QA, "--early_stopping_patience", "2",
                                                                     "--eval_strategy", "steps", "--eval_steps", "null"],
                                              "early_stopping_patience: needs evaluations during training, but "
                                              "eval_strategy is 'steps' without eval_steps", True),
    "25 predict input with wrong columns": ("classify.py", lambda t: ["--predict", "--model", _trained_classifier(),
                                                                       "--input_file", write(t / "in.jsonl", '{"body": "hi"}\n')],
                                            "text_column: column 'text' not in", True),
    "26 prediction_file is a directory": ("classify.py", lambda t: ["--predict", "--model", _trained_classifier(), "--text",
                                                                     "hi", "--prediction_file", str(t)],
                                          "prediction_file: {t} is a directory; name a file", True),
    "26 prediction_file under a file": ("classify.py", lambda t: ["--predict", "--model", _trained_classifier(), "--text",
                                                                  "hi", "--prediction_file", str(t / "out" / "keep.txt" / "p.jsonl")],
                                        "/out/keep.txt/p.jsonl cannot be made: {t}/out/keep.txt is a file", True),
    "26 prediction_file is the input_file": ("classify.py", lambda t: [
        "--predict", "--model", _trained_classifier(), "--input_file", str(t / "out" / "keep.txt"), "--prediction_file",
        str(t / "out" / ".." / "out" / "keep.txt")],
        "prediction_file: {t}/out/../out/keep.txt is the input_file; writing it would replace the input", True),
    "27 datasets cache that cannot be written": ("classify.py", lambda t: ["--config", SPAM],
                                                 "the datasets cache {t}/out/keep.txt/datasets cannot be written (Not a "
                                                 "directory): set HF_DATASETS_CACHE (or HF_HOME) to a folder you can write",
                                                 True),
    "27 W&B data folder that cannot be written": ("t5_qa.py", lambda t: ["--config", QA, "--report_to", "all"],
                                                  "report_to: wandb: W&B's data folder {t}/out/keep.txt/wandb cannot be "
                                                  "written (Not a directory): set WANDB_DATA_DIR to a folder you can write",
                                                  True),
    "27 DeepSpeed op folder that cannot be written": ("classify.py", lambda t: [
        "--config", SPAM, "--deepspeed", os.path.join(ROOT, "ds_configs", "zero2.json")],
        "deepspeed: DeepSpeed's op build folder {t}/out/keep.txt/ops cannot be written (Not a directory): set "
        "TORCH_EXTENSIONS_DIR to a folder you can write", True),
    "28 a LoRA adapter as the model to fine-tune": ("qlora_summarize.py", lambda t: [
        "--config", SUMMARIZE, "--model_config", "null", "--model_name_or_path", _adapter_folder(t)],
        "model_name_or_path: cannot load '{t}/adapter' (a LoRA adapter, not a model, over microsoft/phi-2: to train on "
        "from it, run its training command again with --merge_adapter true and name the final_merged/ it writes)", True),
    "29 dataset_name a folder that is not there": ("qlora_summarize.py", lambda t: [
        "--config", SUMMARIZE, "--train_file", "none", "--dataset_name", str(t / "dialogsum")],
        "dataset_name: no such directory: {t}/dialogsum", True),
}
# the environment of a case (a home folder that cannot be written, on a compute node): where each library writes
CASE_ENV = {"27 datasets cache that cannot be written": {"HF_DATASETS_CACHE": "{t}/out/keep.txt/datasets"},
            "27 W&B data folder that cannot be written": {"WANDB_DATA_DIR": "{t}/out/keep.txt/wandb"},
            "27 DeepSpeed op folder that cannot be written": {"TORCH_EXTENSIONS_DIR": "{t}/out/keep.txt/ops"}}


def _adapter_folder(tmp):  # what peft writes for an adapter (a run's final/): no config.json
    os.makedirs(tmp / "adapter")
    write(tmp / "adapter" / "adapter_config.json", json.dumps({"base_model_name_or_path": "microsoft/phi-2",
                                                                "peft_type": "LORA", "r": 8}))
    return str(tmp / "adapter")


def _half_checkpoint(tmp):
    path = tmp / "half" / "step_3"
    os.makedirs(path)
    return path


def _checkpointed_run(tmp):  # an output_dir with two complete checkpoints and a half-written one
    for name in ("step_5", "step_10", ".tmp_step_15"):
        os.makedirs(tmp / "run" / "checkpoints" / name)
        if not name.startswith("."):
            (tmp / "run" / "checkpoints" / name / "trainer_state.json").write_text("{}")
    return tmp / "run"


_TRAINED = {}


def _trained_classifier():
    """A tiny trained classifier (once) for the --predict case."""
    if "dir" not in _TRAINED:
        import tempfile

        out = os.path.join(tempfile.mkdtemp(), "run")
        proc = run_python("classify.py", ["--config", SPAM, "--output_dir", out, "--max_steps", "2"])
        assert proc.returncode == 0, proc.stderr[-2000:]
        _TRAINED["dir"] = os.path.join(out, "final")
    return _TRAINED["dir"]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line_and_exit_2(case, tmp_path, monkeypatch):
    script, argv, expected, config_only = CASES[case]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    args = argv(tmp_path)
    if "--predict" not in args:
        args += ["--output_dir", str(out)]
    env_fix = {"WANDB_MODE": "online", "WANDB_API_KEY": "", "HOME": str(tmp_path)} if "wandb" in case else {}
    env_fix.update({k: v.replace("{t}", str(tmp_path)) for k, v in CASE_ENV.get(case, {}).items()})
    proc = run_python(script, args, env=env_fix)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected.replace("{t}", str(tmp_path)) in last, last
    assert "Traceback" not in proc.stderr
    assert (out / "keep.txt").read_text() == "precious"
    if config_only:
        assert sorted(os.listdir(out)) == ["keep.txt"], os.listdir(out)


def test_output_dir_of_another_run_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    write(out / "config.yaml", open(SPAM).read().replace("seed: 123", "seed: 7"))
    (out / "keep.txt").write_text("precious")
    proc = run_python("classify.py", ["--config", SPAM, "--output_dir", str(out)])
    assert proc.returncode == 2 and "holds a run with a different config" in proc.stderr.strip().splitlines()[-1]
    assert sorted(os.listdir(out)) == ["config.yaml", "keep.txt"]


def test_output_dir_of_another_scripts_run_names_that_script(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    write(out / "config.yaml", "# ftkit config, written by t5_qa.py\n" + open(QA).read())
    proc = run_python("classify.py", ["--config", SPAM, "--output_dir", str(out)])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"error: output_dir: {out} holds a run of t5_qa.py, not classify.py; choose another output_dir or pass "
        f"--overwrite_output_dir true (the run is set aside, not deleted)"), proc.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["config.yaml"]


@pytest.mark.parametrize("case", ["a file", "under a file", "empty", "blank"])
def test_an_output_dir_that_is_a_file_under_one_or_empty_is_one_line(tmp_path, case):
    blocker = write(tmp_path / "notes.txt", "precious")
    out = {"a file": blocker, "under a file": os.path.join(blocker, "run"), "empty": "", "blank": " "}[case]
    proc = run_python("t5_qa.py", ["--config", QA, "--output_dir", out], cwd=str(tmp_path))  # "": the cwd
    last = proc.stderr.strip().splitlines()[-1]
    expected = {"a file": f"output_dir: {out} is a file, not a directory",
                "under a file": f"output_dir: {out} cannot be made: {blocker} is a file",
                "empty": "output_dir: empty; name a directory", "blank": "output_dir: empty; name a directory"}[case]
    assert proc.returncode == 2 and last == f"error: {expected}", proc.stderr[-3000:]
    assert open(blocker).read() == "precious" and os.listdir(tmp_path) == ["notes.txt"]


def test_debug_shows_the_traceback_instead(tmp_path):
    proc = run_python("classify.py", ["--config", SPAM, "--output_dir", str(tmp_path / "o"), "--train_file",
                                      "data/nope.tsv", "--debug"])
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "file not found" in proc.stderr


def test_single_class_training_set_warns_and_trains(tmp_path):
    data = write(tmp_path / "ham.tsv", "".join(f"ham\tmessage number {i}\n" for i in range(30)))
    proc = run_python("classify.py", ["--config", SPAM, "--output_dir", str(tmp_path / "o"), "--train_file", data,
                                      "--balance", "none", "--max_steps", "2", "--label_map", "{ham: 0, spam: 1}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the training set holds a single class (ham)" in proc.stderr


def test_tokenizer_without_pad_token_gets_eos_and_says_so(tmp_path, caplog):
    import logging

    from ftkit import modeling

    tok = modeling.build_tokenizer([os.path.join(ROOT, "data", "spam_sample.tsv")], 300, str(tmp_path / "tok"))
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "nopad")
    with caplog.at_level(logging.INFO, logger="ftkit"):
        loaded = modeling.load_tokenizer(str(tmp_path / "nopad"))
    assert loaded.pad_token == loaded.eos_token
    assert "no pad token: using the EOS token" in caplog.text


@pytest.mark.parametrize("cuda,supported,message", [(True, False, "bf16: this GPU does not support bfloat16"),
                                                     (True, True, None), (False, None, None)])
def test_bf16_on_hardware_without_it_is_an_error(cuda, supported, message):
    from ftkit import distributed
    from ftkit.config import ConfigError

    if message:
        with pytest.raises(ConfigError, match=message):
            distributed.check_bf16(True, cuda, supported)
    else:
        distributed.check_bf16(True, cuda, supported)


def test_a_relative_path_that_is_not_there_says_where_it_was_looked_for_and_where_it_is(tmp_path):
    # a command run from scripts/ (or anywhere but the repository root), whose recipes name paths from the root
    scripts, out = os.path.join(ROOT, "scripts"), tmp_path / "out"
    for args, what in [(["--config", "recipes/tiny/spam.yaml"], "config file not found: recipes/tiny/spam.yaml"),
                       (["--config", SPAM], "train_file: file not found: data/spam_sample.tsv"),
                       (["--config", SPAM, "--deepspeed", "ds_configs/zero2.json"],
                        "deepspeed: DeepSpeed config not found: ds_configs/zero2.json")]:
        proc = run_python("classify.py", args + ["--output_dir", str(out)], cwd=scripts)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
            f"error: {what} (relative to the current directory, {scripts}; it is in {ROOT}: run the command from "
            f"there)"), proc.stderr[-2000:]
    assert not out.exists()
    proc = run_python("classify.py", ["--config", SPAM, "--model_config", "null", "--model_name_or_path", "./nope",
                                      "--output_dir", str(out)])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"error: model_name_or_path: cannot load './nope' (no such directory, relative to the current directory, "
        f"{ROOT})"), proc.stderr[-2000:]
    # a model folder that is nowhere, or a file
    proc = run_python("classify.py", ["--predict", "--model", "outputs/nope/final", "--text", "hi"], cwd=str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"error: model: no such directory: outputs/nope/final (relative to the current directory, {tmp_path})")
    proc = run_python("classify.py", ["--predict", "--model", SPAM, "--text", "hi"])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"error: model: {SPAM} is a file, not a trained output_dir/final"), proc.stderr[-2000:]
    # the launcher's DeepSpeed config, named relative to the root by launch/accelerate/*.yaml: accelerate's traceback
    # in every rank ("Expected a string path to an existing deepspeed config")
    data = os.path.join(ROOT, "data", "spam_sample.tsv")
    proc = subprocess.run([os.path.join(BIN, "accelerate"), "launch", "--config_file", os.path.join(
        "..", "launch", "accelerate", "deepspeed_zero3.yaml"), "--num_processes", "2", "--main_process_port",
        str(free_port()), "classify.py", "--config", SPAM, "--train_file", data, "--tokenizer_files", data,
        "--output_dir", str(out)], cwd=scripts, env=script_env(), capture_output=True, text=True, timeout=300)
    said = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and said == [
        f"error: deepspeed_config_file (the accelerate config's): DeepSpeed config not found: ds_configs/zero3.json "
        f"(relative to the current directory, {scripts}; it is in {ROOT}: run the command from there)"], proc.stderr[-3000:]
    assert "Expected a string path" not in proc.stderr and not out.exists()
    # a folder where a file is wanted, from the repository root (it said "it is in ROOT: run the command from there")
    for args, what in [(["--config", "recipes"], "config file not found: recipes"),
                       (["--config", SPAM, "--train_file", "data"], "train_file: file not found: data")]:
        proc = run_python("classify.py", args + ["--output_dir", str(out)])
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
            f"error: {what} (a folder, not a file)"), proc.stderr[-2000:]
