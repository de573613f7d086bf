"""The option groups the scripts' configs are made of (names follow ``transformers.TrainingArguments`` where one
exists), and the cross-field rules they share. Each script's ``...Config`` inherits the groups it needs and adds its own
options; reading them from recipes and the command line is config.py's.

An option that names a file or folder has ``path=True``: ``~`` and ``$VAR`` in it are expanded (config.expand_path)."""

from __future__ import annotations

from dataclasses import dataclass

from ftkit.config import ConfigError, opt


@dataclass
class ModelArguments:
    model_name_or_path: str | None = opt(None, "Hub id or local directory of the pretrained model.", path=True)
    model_config: dict | None = opt(None, "Build the model from this config instead of loading weights (random "
                                          "init, e.g. {model_type: phi, hidden_size: 64, ...}; offline tiny recipes).")
    tokenizer_name_or_path: str | None = opt(None, "Tokenizer hub id or directory (default: the model's).", path=True)
    tokenizer_files: list[str] | None = opt(None, "Train a small byte-level BPE tokenizer on these text/json/csv files "
                                             "(offline recipes).", path=True)
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
    dataset_name: str | None = opt(None, "Hub dataset id, or a folder laid out as one (used when no local files are "
                                         "given).", path=True)
    dataset_config_name: str | None = opt(None, "Hub dataset configuration name.")
    train_file: str | None = opt(None, "Local training file (.json/.jsonl/.csv/.tsv/.parquet).", path=True)
    validation_file: str | None = opt(None, "Local validation file.", path=True)
    test_file: str | None = opt(None, "Local test file.", path=True)
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
    output_dir: str = opt("outputs/run", "Where checkpoints, metrics and the final model go.", path=True)
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
                                                   "own are found automatically).", path=True)
    ignore_data_skip: bool = opt(False, "On resume, start the checkpoint's epoch from its first batch instead of where "
                                        "it stopped; lets a run resume on changed training data.")
    ddp_timeout: int = opt(1800, "Seconds a process waits for the others at a collective (e.g. while the main process "
                                 "tokenizes the data first) before the run fails (NCCL's own default: 600).", min=1)
    deepspeed: str | None = opt(None, "DeepSpeed JSON config (e.g. ds_configs/zero2.json) when the launcher gives none; "
                                      "'auto' values are filled from this recipe.", path=True)
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
