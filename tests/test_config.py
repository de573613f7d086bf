"""Recipes + command-line overrides, types, --help/--print_config, and every error path."""

import dataclasses
import os
import sys

import pytest
import yaml

from conftest import ROOT, TINY_QA, TINY_SUMMARIZE, load_script, run_python
from ftkit import checkpoint, config as cfg
from ftkit.config import ConfigError

qs = load_script("qlora_summarize")
TINY_SPAM = os.path.join(ROOT, "recipes", "tiny", "spam.yaml")


def parse(*argv):
    return cfg.parse(qs.SummarizeConfig, list(argv), exit_on_error=False)


def test_recipe_values_are_loaded_and_typed():
    c = parse("--config", TINY_SUMMARIZE)
    assert c.load_in_4bit is True and c.optim == "paged_adamw_8bit"
    assert isinstance(c.learning_rate, float) and c.learning_rate == 1e-2
    assert c.model_config["model_type"] == "phi"


def test_command_line_overrides_the_recipe_and_converts_types():
    c = parse("--config", TINY_SUMMARIZE, "--learning_rate", "3e-4", "--max_steps=7", "--bf16", "true",
              "--lora_target_modules", "q_proj,v_proj", "--max_eval_samples", "none")
    assert (c.learning_rate, c.max_steps, c.bf16) == (3e-4, 7, True)
    assert c.lora_target_modules == ["q_proj", "v_proj"]
    assert c.max_eval_samples is None


def test_the_training_batch_size_may_be_auto():
    assert parse("--config", TINY_SUMMARIZE, "--per_device_train_batch_size", "AUTO").per_device_train_batch_size == "auto"


def test_bare_flag_sets_a_boolean_and_yaml_lists_parse():
    c = parse("--config", TINY_SUMMARIZE, "--gradient_checkpointing", "--lora_target_modules", "[dense, fc1]")
    assert c.gradient_checkpointing is True and c.lora_target_modules == ["dense", "fc1"]


def test_list_items_take_the_options_item_type_from_either_list_form():
    cs = load_script("classify")
    for given in ("0.7,0.3", "[0.7, 0.3]", "[7e-1, 3e-1]"):  # the comma form gave strings, refused later by the split
        c = cfg.parse(cs.ClassifyConfig, ["--config", TINY_SPAM, "--split_ratios", given], exit_on_error=False)
        assert c.split_ratios == [0.7, 0.3] and all(type(r) is float for r in c.split_ratios), given
    c = cfg.parse(cs.ClassifyConfig, ["--config", TINY_SPAM, "--tags", "[1, b]"], exit_on_error=False)
    assert c.tags == ["1", "b"]
    for given, message in (("0.7,x", "split_ratios[1]: expected a number, got 'x'"),
                           ("0.7", "split_ratios: give 2 or 3 positive fractions (train, validation[, test]), got [0.7]")):
        with pytest.raises(ConfigError) as e:  # before any data is read
            cfg.parse(cs.ClassifyConfig, ["--config", TINY_SPAM, "--split_ratios", given], exit_on_error=False)
        assert str(e.value) == message


@pytest.mark.parametrize("argv, message", [
    (["--learning_rat", "1e-4"], "unknown option 'learning_rat' in the command line (did you mean 'learning_rate'?)"),
    (["--learning_rate", "fast"], "learning_rate: expected a number, got 'fast'"),
    (["--learning_rate", "-1"], "learning_rate: must be > 0, got -1.0"),
    (["--per_device_train_batch_size", "0"], "per_device_train_batch_size: must be >= 1, got 0"),
    (["--save_steps", "-5"], "save_steps: must be >= 1, got -5"),
    (["--warmup_ratio", "1.5"], "warmup_ratio: must be <= 1, got 1.5"),
    (["--optim", "adam"], "optim: 'adam' is not one of"),
    (["--bf16", "maybe"], "bf16: expected true or false, got 'maybe'"),
    (["--max_steps", "1.5"], "max_steps: expected an integer, got '1.5'"),
    (["--max_steps", "auto"], "max_steps: expected an integer, got 'auto'"),
    (["--per_device_train_batch_size", "big"], "per_device_train_batch_size: expected an integer or auto, got 'big'"),
    (["--load_in_8bit", "true"], "load_in_4bit and load_in_8bit: choose one"),
    (["--use_peft", "false"], "load_in_4bit: quantized weights cannot be trained; train LoRA adapters over them "
                              "(use_peft: true, QLoRA) or load the model unquantized"),  # a traceback at the optimizer
    (["--train_file", "none", "--dataset_name", "none"], "train_file: required"),
    (["--lora_target_modules", "[]"], "lora_target_modules: empty list"),
    (["--model_config", "{model_type:phi}"], "model_config: 'model_type:phi' reads as a key without a value; YAML needs "
                                             "a space after each colon: {model_type: phi}"),
    (["--lora_target_modules", "[q_proj, [v_proj]]"], "lora_target_modules[1]: expected a string, got ['v_proj']"),
])
def test_bad_values_name_the_key(argv, message):
    with pytest.raises(ConfigError) as e:
        parse("--config", TINY_SUMMARIZE, *argv)
    assert message in str(e.value)


def test_a_command_without_a_recipe_shows_how_to_give_one():
    with pytest.raises(ConfigError) as e:  # it said "model_name_or_path: required (or model_config ...)"
        cfg.parse(qs.SummarizeConfig, [], exit_on_error=False)
    assert str(e.value) == (f"no recipe: {os.path.basename(sys.argv[0])} --config RECIPE.yaml [--option value ...] "
                            f"(recipes/*.yaml; --help lists the options)")
    with pytest.raises(ConfigError) as e:  # a recipe given as the script's argument, as some tools take it
        parse(TINY_SUMMARIZE, "--max_steps", "3")
    assert str(e.value) == f"unexpected argument {TINY_SUMMARIZE!r} (a recipe is given as --config {TINY_SUMMARIZE})"
    with pytest.raises(ConfigError, match=r"^unexpected argument 'fast' \(options are written --name value\)$"):
        parse("--config", TINY_SUMMARIZE, "--bf16", "true", "fast")


def test_recipes_without_adapters_refuse_quantized_weights():
    for script, config_class, recipe in [("classify", "ClassifyConfig", TINY_SPAM), ("t5_qa", "QAConfig", TINY_QA)]:
        with pytest.raises(ConfigError, match=r"^load_in_8bit: quantized weights cannot be trained; this recipe trains "
                                              r"full weights: load the model unquantized$"):
            cfg.parse(getattr(load_script(script), config_class), ["--config", recipe, "--load_in_8bit", "true"],
                      exit_on_error=False)


def test_recipes_given_in_order_layer_and_the_command_line_wins(tmp_path):
    site = tmp_path / "site.yaml"  # e.g. a cluster's paths and batch over a shared recipe
    site.write_text("learning_rate: 3.0e-4\nmodel_config: {model_type: phi, hidden_size: 32}\n")
    c = parse("--config", TINY_SUMMARIZE, "--config", str(site), "--seed", "5")
    assert (c.learning_rate, c.seed, c.optim) == (3e-4, 5, "paged_adamw_8bit")  # the site's, the command line's, the recipe's
    assert c.model_config == {"model_type": "phi", "hidden_size": 32}  # a value is replaced whole, not merged
    assert {"optim", "learning_rate", "seed"} <= set(c.explicit)
    assert parse("--config", str(site), "--config", TINY_SUMMARIZE).learning_rate == 1e-2  # the later file wins
    typo = tmp_path / "typo.yaml"
    typo.write_text("lora_rank: 8\n")
    with pytest.raises(ConfigError, match=r"unknown option 'lora_rank' in .*typo.yaml \(did you mean 'lora_r'\?\)"):
        parse("--config", TINY_SUMMARIZE, "--config", str(typo))


def test_float16_weights_are_refused_only_where_torch_adamw_trains_them():
    fp16 = ["--config", TINY_SUMMARIZE, "--load_in_4bit", "false", "--torch_dtype", "float16", "--optim", "adamw_torch"]
    assert parse(*fp16).use_peft  # LoRA adapters over a float16 base train in float32
    assert parse(*fp16, "--use_peft", "false", "--optim", "adamw_8bit").optim == "adamw_8bit"
    with pytest.raises(ConfigError, match="torch_dtype: float16 weights trained by adamw_torch break at the first step"):
        parse(*fp16, "--use_peft", "false")


def test_unknown_key_in_recipe_names_the_file_and_suggests(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(open(TINY_SUMMARIZE).read() + "\nlora_rank: 8\n")
    with pytest.raises(ConfigError, match=r"unknown option 'lora_rank' in .*r.yaml \(did you mean 'lora_r'\?\)"):
        parse("--config", str(recipe))


def test_invalid_yaml_reports_file_and_line(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("learning_rate: 1e-4\nmax_steps: [1, 2\nseed: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+:\d+: invalid YAML"):
        parse("--config", str(recipe))


def test_a_key_given_twice_is_refused_at_its_second_place(tmp_path):
    recipe = tmp_path / "twice.yaml"
    recipe.write_text(open(TINY_SUMMARIZE).read() + "\nlearning_rate: 5.0e-4\n")
    first = open(TINY_SUMMARIZE).read().splitlines().index("learning_rate: 1.0e-2") + 1
    second = len(open(TINY_SUMMARIZE).read().splitlines()) + 2
    with pytest.raises(ConfigError) as e:
        parse("--config", str(recipe))
    assert str(e.value) == f"{recipe}:{second}:1: invalid YAML: 'learning_rate' given twice (first at {first}:1)"
    with pytest.raises(ConfigError, match=r"model_config: cannot parse .*'ham' given twice \(first at 1:2\)"):
        parse("--config", TINY_SUMMARIZE, "--model_config", "{ham: 0, ham: 1}")
    # a key that a merge (<<) brings in may be set again, and 1 and "1" are two keys
    merged = tmp_path / "merged.yaml"
    merged.write_text("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\n1: a\n'1': b\n")
    assert cfg.load_yaml_recipe(str(merged)) == {"base": {"x": 1, "y": 2}, "other": {"x": 3, "y": 2}, 1: "a", "1": "b"}


def test_missing_recipe_file():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        parse("--config", "nope.yaml")


def test_home_and_environment_variables_in_paths_are_expanded_as_a_shell_would(tmp_path, monkeypatch):
    """A recipe is read by no shell: `output_dir: ~/runs/x` made a folder named '~' in the current directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("FTKIT_TEST_DATA", str(tmp_path / "data"))
    (tmp_path / "r.yaml").write_text("output_dir: ~/runs/x\ntrain_file: $FTKIT_TEST_DATA/train.jsonl\n"
                                     "tokenizer_files: ['${FTKIT_TEST_DATA}/a.txt', ~/b.txt]\n"
                                     "response_key: '### $HOME ~'\n")
    c = parse("--config", TINY_SUMMARIZE, "--config=~/r.yaml", "--validation_file", "~/v.jsonl")  # bash leaves --x=~
    assert c.output_dir == str(tmp_path / "runs" / "x") and c.validation_file == str(tmp_path / "v.jsonl")
    assert c.train_file == str(tmp_path / "data" / "train.jsonl")
    assert c.tokenizer_files == [str(tmp_path / "data" / "a.txt"), str(tmp_path / "b.txt")]
    assert c.response_key == "### $HOME ~"  # text, not a path
    assert parse("--config", TINY_SUMMARIZE, "--model_name_or_path", "microsoft/phi-2").model_name_or_path == "microsoft/phi-2"
    hub = parse("--config", TINY_SUMMARIZE, "--dataset_name=~/dialogsum", "--train_file", "none")  # a folder in hub layout
    assert hub.dataset_name == str(tmp_path / "dialogsum")
    assert parse("--config", TINY_SUMMARIZE, "--dataset_name", "knkarthick/dialogsum").dataset_name == "knkarthick/dialogsum"
    monkeypatch.delenv("FTKIT_TEST_UNSET", raising=False)
    with pytest.raises(ConfigError) as e:  # not a folder named '$FTKIT_TEST_UNSET'
        parse("--config", TINY_SUMMARIZE, "--output_dir", "${FTKIT_TEST_UNSET}/run")
    assert str(e.value) == ("output_dir: '${FTKIT_TEST_UNSET}/run' names the environment variable ${FTKIT_TEST_UNSET}, "
                            "which is not set")


def test_help_lists_every_option_with_default_and_meaning(capsys):
    with pytest.raises(SystemExit) as e:
        parse("--help")
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("learning_rate", "per_device_train_batch_size", "lora_target_modules", "train_on_prompt",
                 "resume_from_checkpoint", "report_to"):
        assert f"--{name}" in out
    assert "(default: 0.0002)" in out and "Peak learning rate." in out
    # one default each: a help text that explains its default (resume_from_checkpoint's, run_name's) is not followed
    # by the field's value too
    assert "(default: output_dir's name)" in out and not [line for line in out.splitlines() if line.count("(default:") > 1]
    assert sum("(default:" in line for line in out.splitlines()) == out.count("\n  --")
    # grouped: the script's own options first (they listed the preflight options first), then options.py's groups
    headings = [line for line in out.splitlines() if line.endswith(" options:")]
    assert headings == [f"{os.path.basename(sys.argv[0])}'s own options:"] + [
        f"{group} options:" for group in ("Model", "LoRA", "Data", "Training", "Evaluation", "Tracking", "Preflight")]
    assert out.index("--train_on_prompt") < out.index("--model_name_or_path") < out.index("--preflight ")
    assert "  --output_dir PATH\n" in out and "  --tokenizer_files LIST[PATH]\n" in out and "  --seed INT\n" in out


def test_print_config_prints_the_resolved_config_and_exits(capsys):
    with pytest.raises(SystemExit) as e:
        parse("--config", TINY_SUMMARIZE, "--seed", "7", "--print_config")
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["seed"] == 7 and printed["load_in_4bit"] is True
    # in --help's order (as config.yaml): the script's own options, then the model's ... (preflight's came first)
    keys = list(printed)
    assert keys[0] == "dialogue_column" and keys.index("model_name_or_path") < keys.index("lora_r") < keys.index(
        "train_file") < keys.index("output_dir") < keys.index("eval_strategy") < keys.index("report_to") < keys.index(
        "preflight")
    assert sorted(keys) == sorted(f.name for f in dataclasses.fields(qs.SummarizeConfig))


def test_config_hash_ignores_reporting_options_only():
    a = parse("--config", TINY_SUMMARIZE)
    b = parse("--config", TINY_SUMMARIZE, "--logging_steps", "3", "--output_dir", "/tmp/elsewhere")
    c = parse("--config", TINY_SUMMARIZE, "--learning_rate", "1e-3")
    assert checkpoint.config_hash(a) == checkpoint.config_hash(b) != checkpoint.config_hash(c)


@pytest.mark.parametrize("argv, key", [
    (["--learning_rate", "fast"], "learning_rate"),
    (["--lora_alpha", "0"], "lora_alpha"),
    (["--nonsense", "1"], "nonsense"),
])
def test_script_exits_2_with_one_line_before_anything_is_written(tmp_path, argv, key):
    out = tmp_path / "run"
    proc = run_python("qlora_summarize.py", ["--config", TINY_SUMMARIZE, "--output_dir", str(out), *argv])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("name,config_class", [("qlora_summarize", "SummarizeConfig"), ("classify", "ClassifyConfig"),
                                                ("t5_qa", "QAConfig")])
def test_every_option_is_read_by_the_code(name, config_class):
    # an option that --help lists and nothing reads is a setting users change for nothing (preprocessing_num_workers
    # was one: declared, never passed to the tokenization)
    import dataclasses
    import glob
    import re

    code = "".join(open(p).read() for p in glob.glob(os.path.join(ROOT, "ftkit", "*.py")) + [
        os.path.join(ROOT, "scripts", f"{name}.py")])
    unread = [f.name for f in dataclasses.fields(getattr(load_script(name), config_class))
              if not re.search(rf'\.{f.name}\b|getattr\(\w+, "{f.name}"', code)]
    assert not unread, unread
