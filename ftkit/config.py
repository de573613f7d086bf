"""Recipe configs: shared dataclass groups, YAML recipe + ``--name value`` parsing, validation, ``--help``.
Not here: what a run does with its options; resume matching of configs (checkpoint.py).

Every field has one name, one default and one help text (``metadata["help"]``, what ``--help`` prints);
constraints (``choices``, ``min``, ``max``, ``min_exclusive``) are checked in :func:`validate`. A problem
is a :class:`ConfigError`: one line, exit code 2, before any data or model is loaded."""

from __future__ import annotations

import dataclasses
import difflib
import operator
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

EXIT_BAD_INPUT = 2


class ConfigError(ValueError):
    """A problem with the user's input; reported as one line and exit code 2."""


class RunError(RuntimeError):
    """A run that cannot go on (disk full, non-finite loss); reported as one line and exit code 1."""


def opt(default, help: str, **constraints):
    """A config field with a help text and optional constraints (choices/min/max/min_exclusive)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **constraints})
    return field(default=default, metadata={"help": help, **constraints})


# --- Shared groups. Names follow transformers.TrainingArguments where one exists. -----------------


@dataclass
class ModelArguments:
    model_name_or_path: str | None = opt(None, "Hub id or local directory of the pretrained model.")
    model_config: dict | None = opt(None, "Build the model from this config instead of loading weights (random "
                                          "init, e.g. {model_type: phi, hidden_size: 64, ...}; offline tiny recipes).")
    tokenizer_name_or_path: str | None = opt(None, "Tokenizer hub id or directory (default: the model's).")
    tokenizer_files: list[str] | None = opt(None, "Train a small byte-level BPE tokenizer on these text/json/csv files "
                                             "(offline recipes).")
    tokenizer_vocab_size: int = opt(1024, "Vocabulary size of a tokenizer trained from tokenizer_files.", min=64)
    trust_remote_code: bool = opt(False, "Allow model code from the hub to run (off unless the recipe sets it).")
    torch_dtype: str = opt("auto", "Dtype to load the (non-quantized) weights in.",
                           choices=["auto", "float32", "bfloat16", "float16"])
    attn_implementation: str | None = opt(None, "Attention kernel: eager, sdpa, flash_attention_2 (default: model's).")
    load_in_4bit: bool = opt(False, "Load the base model in 4-bit (QLoRA) with bitsandbytes.")
    load_in_8bit: bool = opt(False, "Load the base model in 8-bit with bitsandbytes.")
    bnb_4bit_quant_type: str = opt("nf4", "4-bit quantization type.", choices=["nf4", "fp4"])
    bnb_4bit_use_double_quant: bool = opt(True, "Quantize the quantization constants too (QLoRA).")
    bnb_4bit_compute_dtype: str = opt("bfloat16", "Dtype of the 4-bit layers' matmuls.",
                                      choices=["bfloat16", "float16", "float32"])
    bnb_4bit_quant_storage: str | None = opt(None, "Storage dtype of 4-bit weights (default uint8; set to the compute "
                                                   "dtype automatically under ZeRO-3).",
                                             choices=[None, "uint8", "bfloat16", "float16", "float32"])
    upcast_unquantized_weights: bool = opt(True, "4/8-bit: cast the weights left unquantized (embeddings, output layer, "
                                                 "norms, biases) to float32, as peft's k-bit preparation does (S001); "
                                                 "false keeps them in the compute dtype (less memory, no fp32 head).")


@dataclass
class LoraArguments:
    use_peft: bool = opt(True, "Train LoRA adapters instead of all weights.")
    lora_r: int = opt(32, "LoRA rank.", min=1)
    lora_alpha: float = opt(32.0, "LoRA scaling numerator (scale = alpha / r).", min_exclusive=0)
    lora_dropout: float = opt(0.05, "Dropout on the LoRA input.", min=0, max=1)
    lora_target_modules: list[str] = opt(["q_proj", "k_proj", "v_proj", "dense"], "Module name suffixes to adapt.")
    lora_bias: str = opt("none", "Which biases LoRA trains.", choices=["none", "all", "lora_only"])
    merge_adapter: bool = opt(False, "Also write a merged full model to output_dir/final_merged/.")


@dataclass
class DataArguments:
    dataset_name: str | None = opt(None, "Hub dataset id (used when no local files are given).")
    dataset_config_name: str | None = opt(None, "Hub dataset configuration name.")
    train_file: str | None = opt(None, "Local training file (.json/.jsonl/.csv/.tsv/.parquet).")
    validation_file: str | None = opt(None, "Local validation file.")
    test_file: str | None = opt(None, "Local test file.")
    train_split: str = opt("train", "Split name for training (hub datasets).")
    validation_split: str = opt("validation", "Split name for validation (hub datasets).")
    test_split: str | None = opt("test", "Split name for the final test (hub datasets; null: none, e.g. GLUE's "
                                         "unlabelled test sets).")
    max_train_samples: int | None = opt(None, "Use only the first N training examples.", min=1)
    max_eval_samples: int | None = opt(None, "Use only the first N validation examples.", min=1)
    subset_seed: int | None = opt(None, "Draw the max_*_samples subsets at random with this seed (default: first N).")
    column_names: list[str] | None = opt(None, "Column names of csv/tsv files that have no header row.")
    file_format: str | None = opt(None, "Read local files as this format whatever their extension.",
                                  choices=[None, "json", "jsonl", "csv", "tsv", "parquet"])
    max_length: int | None = opt(None, "Max tokens per example (default: from the model config, else 1024).", min=8)
    preprocessing_num_workers: int | None = opt(None, "Processes for Dataset.map tokenization.", min=1)


@dataclass
class TrainingArguments:
    output_dir: str = opt("outputs/run", "Where checkpoints, metrics and the final model go.")
    overwrite_output_dir: bool = opt(False, "Allow reusing an output_dir that holds another run: a fresh run, the "
                                             "earlier one's files moved to output_dir/earlier_runs/<N>.")
    seed: int = opt(42, "Seed for model init, data order and dropout.", min=0)
    learning_rate: float = opt(2e-4, "Peak learning rate.", min_exclusive=0)
    weight_decay: float = opt(0.0, "AdamW weight decay (not applied to biases and norms).", min=0)
    adam_beta1: float = opt(0.9, "Adam beta1.", min=0, max=1)
    adam_beta2: float = opt(0.999, "Adam beta2.", min=0, max=1)
    adam_epsilon: float = opt(1e-8, "Adam epsilon.", min_exclusive=0)
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0 disables clipping).", min=0)
    optim: str = opt("adamw_torch", "Optimizer (adamw_torch_fused: one fused kernel instead of a loop over tensors).",
                     choices=["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit",
                              "paged_adamw_32bit", "sgd"])
    lr_scheduler_type: str = opt("linear", "Learning-rate schedule after warmup.",
                                 choices=["linear", "cosine", "constant", "constant_with_warmup"])
    warmup_steps: int = opt(0, "Linear warmup steps (wins over warmup_ratio when > 0).", min=0)
    warmup_ratio: float = opt(0.0, "Warmup as a fraction of the total optimizer steps.", min=0, max=1)
    num_train_epochs: float = opt(1.0, "Epochs to train (ignored when max_steps > 0).", min_exclusive=0)
    max_steps: int = opt(-1, "Total optimizer steps if > 0 (overrides num_train_epochs); -1 or 0: num_train_epochs decides.", min=-1)
    per_device_train_batch_size: int = opt(1, "Micro-batch size per process for training; auto: the largest that fits "
                                              "the device (--preflight's estimate, then one real step, halving on "
                                              "out-of-memory), taken out of gradient_accumulation_steps, which then "
                                              "counts the examples per process per optimizer step.", min=1, auto=True)
    per_device_eval_batch_size: int = opt(4, "Batch size per process for evaluation and generation.", min=1)
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step.", min=1)
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward (non-reentrant) to save memory.")
    torch_compile: bool = opt(False, "torch.compile each transformer block (one graph for all; batches padded to "
                                     "multiples of 64 unless pad_to_multiple_of is set, so few lengths occur).")
    group_by_length: bool = opt(False, "Batch examples of similar length together (seeded) to cut padding.")
    pad_to_multiple_of: int | None = opt(None, "Pad batch lengths to a multiple of this (default: 8 on a GPU, for "
                                                "tensor cores; none on a CPU).", min=1)
    dataloader_num_workers: int = opt(0, "DataLoader worker processes.", min=0)
    dataloader_pin_memory: bool = opt(True, "On a GPU: pinned training batches, copied to the device without blocking.")
    dataloader_drop_last: bool = opt(False, "Drop the last incomplete training batch of each epoch (S003 does).")
    bf16: bool = opt(False, "bf16 mixed precision.")
    logging_steps: int = opt(10, "Log train metrics every N optimizer steps.", min=1)
    eval_steps: int | None = opt(None, "Evaluate every N optimizer steps (default: only at the end).", min=1)
    save_strategy: str = opt("steps", "Save a checkpoint every save_steps optimizer steps, or at each epoch's end (the "
                                      "last step and each new best are saved anyway).", choices=["steps", "epoch"])
    save_steps: int | None = opt(None, "Save a checkpoint every N optimizer steps (default: only at the end).", min=1)
    save_total_limit: int | None = opt(2, "Keep at most N step checkpoints (oldest removed first).", min=1)
    resume_from_checkpoint: str | None = opt(None, "'latest' or a checkpoint directory to resume from (output_dir's "
                                                   "own are found automatically).")
    ignore_data_skip: bool = opt(False, "On resume, start the checkpoint's epoch from its first batch instead of where "
                                        "it stopped; lets a run resume on changed training data.")
    ddp_timeout: int = opt(1800, "Seconds a process waits for the others at a collective (e.g. while the main process "
                                 "tokenizes the data first) before the run fails (NCCL's own default: 600).", min=1)
    deepspeed: str | None = opt(None, "DeepSpeed JSON config (e.g. ds_configs/zero2.json) when the launcher gives none; "
                                      "'auto' values are filled from this recipe.")
    max_bad_steps: int = opt(3, "Optimizer steps in a row with a non-finite loss or gradient that are skipped "
                                "(with a warning) before the run stops with an error.", min=0)
    debug: bool = opt(False, "Debug mode: few examples and steps, no trackers, full tracebacks.")


@dataclass
class TrackingArguments:
    report_to: str = opt("none", "Experiment tracker.", choices=["none", "wandb", "tensorboard", "all"])
    project_name: str = opt("ftkit", "Tracker project name.")
    run_name: str | None = opt(None, "Tracker run name (default: output_dir's name).")
    tags: list[str] | None = opt(None, "W&B run tags.")
    group: str | None = opt(None, "W&B run group (to gather the runs of a sweep).")
    peak_tflops: float | None = opt(None, "Peak TFLOP/s of one device for the MFU estimate (default: "
                                          "A100 312, H100/H200 989; none on CPU).", min_exclusive=0)


@dataclass
class PreflightArguments:
    preflight: bool = opt(False, "Check the run before it runs, without loading weights: data kept and dropped, steps, "
                                 "memory per device and time; prints a table, writes output_dir/preflight.json; exit 0 "
                                 "if it fits, 3 if not (with the cheapest change that fits).")
    device_memory_gb: float | None = opt(None, "Memory of one device for --preflight's verdict (default: the visible "
                                               "GPU's, else this machine's RAM per process).", min_exclusive=0)
    preflight_device: str = opt("auto", "What --preflight estimates for: auto (a GPU if one is visible, else the CPU), "
                                        "cuda (e.g. a GPU job checked on a login node) or cpu.",
                                choices=["auto", "cuda", "cpu"])
    preflight_num_processes: int | None = opt(None, "Processes --preflight plans for (default: the launcher's); from "
                                                    "one process, e.g. the steps and memory per GPU of an 8-GPU job "
                                                    "checked on a login node, with the exit code kept.", min=1)
    assumed_mfu: float = opt(0.1, "Model FLOPs utilisation --preflight assumes for its time estimate (measured on "
                                  "an H100: 2-13%, benchmarks/README.md).", min_exclusive=0, max=1)


@dataclass
class EvaluationArguments:
    """When to evaluate and which checkpoint counts as the best (recipes that pick a best model)."""

    eval_strategy: str = opt("steps", "Evaluate every eval_steps optimizer steps, at the end of every epoch, or (no) "
                                      "only once training is done.", choices=["no", "steps", "epoch"])
    metric_for_best_model: str = opt("loss", "Eval metric that ranks checkpoints (e.g. loss, accuracy, f1).")
    greater_is_better: bool | None = opt(None, "Whether a larger metric is better (default: false for *loss, else true).")
    load_best_model_at_end: bool = opt(True, "Load the best checkpoint before the final evaluation and export.")
    early_stopping_patience: int | None = opt(None, "Stop training after this many evaluations in a row that do not "
                                                    "improve metric_for_best_model on the best so far (default: never); "
                                                    "a resumed run stops where an uninterrupted one would.", min=1)
    early_stopping_threshold: float = opt(0.0, "How much an evaluation must beat the best so far to count as an "
                                               "improvement for early_stopping_patience.", min=0)


# --- Parsing --------------------------------------------------------------------------------------

_TRUE, _FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}


def _base_type(tp):
    """(base type, optional?) of a hint like ``int | None``; a list's items' type stays: ``list[float]``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        non_none = [a for a in typing.get_args(tp) if a is not type(None)]
        return (non_none[0] if len(non_none) == 1 else str), True
    return tp, False


def _coerce(name: str, value: Any, tp, auto: bool = False) -> Any:
    """Convert a YAML or command-line value to the field's type (or "auto" where ``auto``), or raise ConfigError."""
    base, optional = _base_type(tp)
    item_type = typing.get_args(base)[0] if typing.get_origin(base) is list else None
    base = typing.get_origin(base) or base
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ConfigError(f"{name}: a value is required (got null)")
    if base is bool:
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            value = value.lower() in _TRUE
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if base in (int, float):
        if auto and isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:  # YAML 1.1 reads "2e-4" as a string; float() accepts it
            number = float(value) if not isinstance(value, (bool, int)) else value
            if isinstance(number, bool) or (base is int and not float(number).is_integer()):
                raise ValueError
            return int(number) if base is int else float(number)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{name}: expected {'an integer' if base is int else 'a number'}"
                              f"{' or auto' if auto else ''}, got {value!r}") from None
    if base in (list, dict):
        if isinstance(value, str):  # a YAML flow list or mapping, or comma-separated list items
            text = value.strip()
            value = (_yaml_value(name, text) if base is dict or text.startswith("[")
                     else [v.strip() for v in text.split(",") if v.strip()])
        if not isinstance(value, base):
            raise ConfigError(f"{name}: expected {'a list' if base is list else 'a mapping'}, got {value!r}")
        glued = [str(k) for k, v in value.items() if v is None and ":" in str(k)] if base is dict else []
        if glued:  # {ham:0} is the key "ham:0" with no value
            key, _, rest = glued[0].partition(":")
            raise ConfigError(f"{name}: {glued[0]!r} reads as a key without a value; YAML needs a space after each "
                              f"colon: {{{key}: {rest}}}")
        return [_coerce(f"{name}[{i}]", v, item_type) for i, v in enumerate(value)] if item_type else value
    if base is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return str(value)
    return value


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (which YAML forbids; PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        first = {}
        for key_node, _ in node.value:  # the mapping's own keys (not those merged in with <<), as YAML types them
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key, mark = self.construct_object(key_node), key_node.start_mark
                if key in first:
                    raise yaml.constructor.ConstructorError(problem=f"{key!r} given twice (first at {first[key]})",
                                                            problem_mark=mark)
                first[key] = f"{mark.line + 1}:{mark.column + 1}"
        return super().construct_mapping(node, deep)


def _yaml_value(name, text):
    try:
        return yaml.load(text, Loader=_UniqueKeys)
    except yaml.YAMLError as e:
        raise ConfigError(f"{name}: cannot parse {text!r}: {getattr(e, 'problem', None) or e.__class__.__name__}") from None


def load_yaml_recipe(path: str) -> dict:
    if not os.path.isfile(path):
        raise not_found("config file not found", path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_UniqueKeys)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise ConfigError(f"{where}: invalid YAML: {e.problem or e.context}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte offset {e.start})") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of option: value, got {type(data).__name__}")
    return data or {}


def _known(cls, values: dict, where: str) -> dict:
    """``values``, whose keys must all be options of ``cls`` (else the error names the first unknown one and ``where``)."""
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            raise _unknown(str(key), names, where)
    return values


def _unknown(name: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else " (see --help)"
    (error := ConfigError(f"unknown option {name!r} in {where}{hint}")).where = where  # (cli.py: a recipe's script)
    return error


def help_text(cls, prog: str) -> str:
    lines = [f"usage: {prog} [--config RECIPE.yaml ...] [--OPTION VALUE ...] [--print_config] [--help]", "",
             (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "",
             "Options (YAML recipe keys; a later --config overrides an earlier one, a command-line --OPTION VALUE "
             "overrides them all):"]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        base, _ = _base_type(hints[f.name])
        tname = str(base) if typing.get_origin(base) is list else getattr(base, "__name__", str(base))
        extra = " {" + ", ".join(str(c) for c in f.metadata["choices"] if c is not None) + "}" if "choices" in f.metadata else ""
        lines.append(f"  --{f.name} {tname.upper()}{'|auto' if f.metadata.get('auto') else ''}{extra}")
        said = f.metadata.get("help", "")  # a help text that explains its default is not followed by another
        lines.append(f"      {said}" + ("" if "(default:" in said else f" (default: {default!r})"))
    return "\n".join(lines)


def parse(cls, argv: list[str] | None = None, *, exit_on_error: bool = True):
    """Build ``cls`` from ``--config recipe.yaml`` plus ``--name value`` overrides, then validate. On bad input prints
    one line ``error: ...`` to stderr and exits with code 2 (or raises ConfigError when ``exit_on_error`` is False).
    ``--help`` and ``--print_config`` print and exit 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "script"
    try:
        if "-h" in argv or "--help" in argv:
            print(help_text(cls, prog))
            sys.exit(0)
        config_paths, print_config, overrides = _split_argv(argv, cls)
        # the recipes in the order given, a later one's keys replacing an earlier one's (whole values)
        values = {k: v for path in config_paths for k, v in _known(cls, load_yaml_recipe(path), path).items()}
        config = build(cls, values, overrides)
        # which options the user set (recipe or command line), e.g. to layer them over a saved config
        object.__setattr__(config, "explicit", {**values, **overrides})
    except ConfigError as e:
        if not exit_on_error:
            raise
        fail(e)
    if print_config:
        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
        sys.exit(0)
    return config


def not_found(what: str, path: str) -> ConfigError:
    return ConfigError(f"{what}: {path}" + (f" ({hint})" if (hint := relative_hint(path)) else ""))


def relative_hint(path: str) -> str:
    """For a relative ``path`` that is not there: where it was looked for, and where it is if it is in this checkout
    (a command run from another folder than the repository root, whose recipes name paths from there); "" if absolute."""
    if os.path.isabs(os.path.expanduser(path)):
        return ""
    root = os.path.dirname(os.path.dirname(os.path.abspath(sys.argv[0] if sys.argv and sys.argv[0] else ".")))
    there = f"; it is in {root}: run the command from there" if os.path.exists(os.path.join(root, path)) else ""
    return f"relative to the current directory, {os.getcwd()}{there}"


def fail(error, code: int = EXIT_BAD_INPUT, prefix: str = "error: "):
    """Report a user error as one line (once, where several processes of a launch meet it) and exit."""
    from tqdm import tqdm  # (a dependency of transformers and datasets)

    from ftkit.distributed import said_by_another_rank
    for bar in list(getattr(tqdm, "_instances", [])):  # or a progress bar would redraw itself after the error line
        bar.close()
    if not said_by_another_rank(f"{prefix}{error}"):
        sys.stderr.write(f"{prefix}{error}\n")  # one write (line-buffered): ranks' different lines do not interleave
    sys.exit(code)


def _split_argv(argv, cls):
    names = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    config_paths, print_config, overrides = [], False, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r} (options are written --name value)")
        key, eq, val = arg[2:].partition("=")
        key = key.replace("-", "_")
        has_value = bool(eq)
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if not has_value and nxt is not None and not nxt.startswith("--"):
            val, has_value = nxt, True
            i += 1
        i += 1
        if key == "config":
            if not has_value:
                raise ConfigError("--config needs a path to a YAML recipe")
            config_paths.append(val)
        elif key == "print_config":
            print_config = True if not has_value else _coerce("print_config", val, bool)
        elif key in names:
            if not has_value:
                if _base_type(hints[key])[0] is not bool:
                    raise ConfigError(f"--{key} needs a value")
                val = True
            overrides[key] = val
        else:
            raise _unknown(key, sorted(names | {"config", "print_config"}), "the command line")
    return config_paths, print_config, overrides


def build(cls, values: dict, overrides: dict | None = None, where: str = "the recipe"):
    """Merge recipe values and overrides into ``cls``, coercing types and validating."""
    merged = {**_known(cls, values, where), **(overrides or {})}
    hints, autos = typing.get_type_hints(cls), {f.name for f in dataclasses.fields(cls) if f.metadata.get("auto")}
    kwargs = {k: _coerce(k, v, hints[k], k in autos) for k, v in merged.items()}
    config = cls(**kwargs)
    validate(config)
    return config


def validate(config) -> None:
    """Check every field's constraints, then the config's own cross-field ``check()``."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        m = f.metadata
        if "choices" in m and value not in m["choices"]:
            choices = ", ".join(str(c) for c in m["choices"] if c is not None)
            raise ConfigError(f"{f.name}: {value!r} is not one of: {choices}")
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        for key, holds, word in (("min", operator.ge, ">="), ("max", operator.le, "<="),
                                 ("min_exclusive", operator.gt, ">")):
            if key in m and not holds(value, m[key]):
                raise ConfigError(f"{f.name}: must be {word} {m[key]}, got {value!r}")
    check = getattr(config, "check", None)
    if callable(check):
        check()


def check_script(config, key: str, given: bool, alternative: str, metrics: list, why: str = "") -> bool:
    """What every script's config checks: with ``--predict``, a trained model (option ``key``) and something to
    predict (the script's own inputs, ``given``, named by ``alternative``, or ``--input_file``); else the shared rules
    and a ``metric_for_best_model`` among ``metrics`` (``why`` tells why one is not). True when the config trains."""
    if config.predict:
        if not getattr(config, key):
            raise ConfigError(f"{key}: --predict needs --{key} DIR (a trained output_dir/final)")
        if not (config.input_file or given):
            raise ConfigError(f"input_file: --predict needs {alternative} or --input_file FILE")
        return False
    check_common(config)
    if config.metric_for_best_model not in metrics:
        raise ConfigError(f"metric_for_best_model: {config.metric_for_best_model!r} is not one of "
                          f"{', '.join(metrics)}{why}")
    return True


def check_common(config) -> None:
    """Cross-field rules shared by every recipe (called from each config's ``check``)."""
    quantized = [k for k in ("load_in_4bit", "load_in_8bit") if getattr(config, k, False)]
    if len(quantized) == 2:
        raise ConfigError("load_in_4bit and load_in_8bit: choose one")
    if quantized and not getattr(config, "use_peft", False):  # bitsandbytes' 4/8-bit weights take no gradient
        raise ConfigError(f"{quantized[0]}: quantized weights cannot be trained; " + (
            "train LoRA adapters over them (use_peft: true, QLoRA) or load the model unquantized"
            if hasattr(config, "use_peft") else "this recipe trains full weights: load the model unquantized"))
    if getattr(config, "model_name_or_path", None) is None and getattr(config, "model_config", None) is None:
        raise ConfigError("model_name_or_path: required (or model_config to build a model from a config)")
    if getattr(config, "model_config", None) is not None and "model_type" not in config.model_config:
        raise ConfigError("model_config: needs a 'model_type' key (e.g. phi, gpt2, bert, t5)")
    if getattr(config, "model_config", None) is not None and not (config.tokenizer_name_or_path or config.tokenizer_files):
        raise ConfigError("model_config: a built model needs tokenizer_files or tokenizer_name_or_path")
    if getattr(config, "deepspeed", None):
        from ftkit.distributed import read_deepspeed_config

        read_deepspeed_config(config.deepspeed, "deepspeed")
    if hasattr(config, "train_file") and not (config.train_file or config.dataset_name):
        raise ConfigError("train_file: required (or dataset_name for a hub dataset)")
    from ftkit.optim import check_weight_dtype
    check_weight_dtype(config)
    if getattr(config, "lora_target_modules", None) == [] and getattr(config, "use_peft", False):
        raise ConfigError("lora_target_modules: empty list; name at least one module")
    if getattr(config, "trainable_modules", None) == []:
        raise ConfigError("trainable_modules: empty list; name at least one module, or leave it unset to train all")
    if getattr(config, "early_stopping_patience", None) and (
            config.eval_strategy == "no" or (config.eval_strategy == "steps" and not config.eval_steps)):
        raise ConfigError(f"early_stopping_patience: needs evaluations during training, but eval_strategy is "
                          f"{config.eval_strategy!r}{' without eval_steps' if config.eval_strategy == 'steps' else ''}; "
                          f"set eval_steps, or eval_strategy: epoch")


def to_dict(config) -> dict:
    return dataclasses.asdict(config)
