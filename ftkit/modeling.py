"""Models and tokenizers: hub or tiny-from-config models, offline tokenizers, 4/8-bit loading, LoRA,
freezing, checkpointing, a seq2seq decoder's inputs. Not here: optimizers (optim.py), devices (distributed.py), the
loss (losses.py)."""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import os
import pathlib

import torch

from ftkit.compiling import compile_blocks
from ftkit.config import ConfigError, not_found, path_like, relative_hint

logger = logging.getLogger("ftkit")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
POSITION_KEYS = ("n_positions", "max_position_embeddings", "seq_length")
DEFAULT_MAX_LENGTH = 1024


# --- Tokenizers -----------------------------------------------------------------------------------


def _texts_of(path: str):
    """Every string value of a text/json/jsonl/csv/tsv file (for training a tokenizer)."""
    import csv

    ext = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8") as f:
        if ext == ".jsonl":
            yield from (v for line in f if line.strip() for v in json.loads(line).values() if isinstance(v, str))
        elif ext in (".csv", ".tsv"):
            for row in csv.reader(f, delimiter="\t" if ext == ".tsv" else ",",
                                  quoting=csv.QUOTE_NONE if ext == ".tsv" else csv.QUOTE_MINIMAL):
                yield from row
        else:
            yield f.read()


BERT_SPECIAL_TOKENS = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]",
                       "mask_token": "[MASK]"}
# T5 expects pad = 0 (also the decoder start token) and eos = 1; every sequence ends with </s>
T5_SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
ENCODER_TYPES = ("bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2")
SEQ2SEQ_TYPES = ("t5", "mt5", "umt5", "longt5")


def special_tokens_for(model_type: str) -> dict | None:
    """Special tokens of a tokenizer built offline for ``model_type`` (None: GPT-style, one EOS token)."""
    if model_type in ENCODER_TYPES:
        return BERT_SPECIAL_TOKENS
    return T5_SPECIAL_TOKENS if model_type in SEQ2SEQ_TYPES else None


def _stamp(directory: str, what: str, inputs):
    """None when ``directory`` already holds what ``inputs`` build (its stamp file says so), else a function
    that writes that stamp once the build is saved."""
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = pathlib.Path(directory, f"ftkit_{what}_stamp")
    if path.is_file() and path.read_text() == digest:
        return None
    return lambda: path.write_text(digest)


def build_tokenizer(files: list[str], vocab_size: int, out_dir: str, special_tokens: dict | None = None):
    """Train a byte-level BPE tokenizer on ``files`` and save it to ``out_dir`` (reused if present). Byte-level BPE
    can encode any text, so a tokenizer trained on a few kilobytes still round-trips unseen input. ``special_tokens``
    maps roles (bos/eos/pad/unk/...) to token strings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special_tokens = special_tokens or {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                                        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    for path in files:
        if not os.path.isfile(path):
            raise not_found("tokenizer_files: file not found", path)
    stamp = _stamp(out_dir, "tokenizer", [sorted(special_tokens.items()), vocab_size] + [
        [p, os.path.getsize(p)] for p in files])
    if stamp is None:
        return PreTrainedTokenizerFast.from_pretrained(out_dir)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    unique = list(dict.fromkeys(special_tokens.values()))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=unique,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((t for p in files for t in _texts_of(p)), trainer=trainer)
    if "cls_token" in special_tokens:  # BERT-style: [CLS] a [SEP] b [SEP], token type ids 0 then 1
        cls_, sep = special_tokens["cls_token"], special_tokens["sep_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls_} $A {sep}", pair=f"{cls_} $A:0 {sep}:0 $B:1 {sep}:1",
            special_tokens=[(cls_, tok.token_to_id(cls_)), (sep, tok.token_to_id(sep))])
    elif "bos_token" not in special_tokens:  # T5-style: text </s>, and a pair as a </s> b </s>
        eos = special_tokens["eos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, tok.token_to_id(eos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **special_tokens)
    fast.save_pretrained(out_dir)
    stamp()
    return fast


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, padding_side: str = "right"):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"tokenizer: cannot load {name_or_path!r} ({_offline_hint(e, name_or_path)})") from None
    tok.padding_side = padding_side
    if tok.pad_token is None and tok.eos_token is not None:
        logger.info("tokenizer has no pad token: using the EOS token %r for padding", tok.eos_token)
        tok.pad_token = tok.eos_token
    return tok


def _offline_hint(error: Exception, source: str | None = None) -> str:
    if source is not None and path_like(source) and not os.path.exists(os.path.expanduser(source)):  # not a hub id
        return ", ".join(filter(None, ["no such directory", relative_hint(source)]))
    if source is not None and (base := adapter_base(os.path.expanduser(source))):  # a run's final/ as the model
        return (f"a LoRA adapter, not a model, over {base}: to train on from it, run its training command again with "
                f"--merge_adapter true and name the final_merged/ it writes")
    text = str(error).splitlines()[0][:200]
    if any(s in text.lower() for s in ("connect", "offline", "resolve", "couldn't", "not cached", "cannot find")):
        return f"not in the local cache and the hub is unreachable: {text}"
    return text


# --- Model source: a hub id / directory, or a model built from a config ---------------------------


def auto_config(config):
    """The model's ``PretrainedConfig`` without loading weights (for checks before loading)."""
    from transformers import AutoConfig

    if config.model_config is not None:
        from transformers import CONFIG_MAPPING

        kwargs = dict(config.model_config)
        model_type = kwargs.pop("model_type")
        if model_type not in CONFIG_MAPPING:
            close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3)
            raise ConfigError(f"model_config: unknown model_type {model_type!r} (" + (
                f"did you mean {' or '.join(map(repr, close))}?)" if close else "transformers' names: phi, gpt2, bert, t5, ...)"))
        try:
            return AutoConfig.for_model(model_type, **kwargs)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model_config: {str(e).splitlines()[0]}") from None
    return load_config(config.model_name_or_path, config)


def load_config(source: str, config, **kwargs):
    """``AutoConfig.from_pretrained(source)``; a model that cannot be found is one clear error."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=config.trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e):
            raise ConfigError(f"trust_remote_code: {source!r} needs its own code from the hub; set "
                              f"trust_remote_code: true if you trust it") from None
        raise ConfigError(f"model_name_or_path: cannot load {source!r} ({_offline_hint(e, source)})") from None


def max_positions(model_config) -> int:
    """First of n_positions / max_position_embeddings / seq_length in the config, else 1024 (S001)."""
    for key in POSITION_KEYS:
        value = getattr(model_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_MAX_LENGTH


def prepare_source(config, accelerator, auto_model_cls, weights: bool = True, **model_kwargs) -> str:
    """Return a directory or hub id holding the base model *and* its tokenizer. For ``model_config`` recipes the model
    is built with random weights (seeded), saved with its tokenizer to ``output_dir/base_model/`` and then loaded like
    any pretrained checkpoint, so the offline runs follow exactly the code path of real ones; without ``weights``
    (``--preflight``) only the tokenizer and the model's config are written there."""
    model_cfg = auto_config(config) if config.model_config is not None else None
    if model_cfg is not None:  # sizes its architecture refuses (a width the heads do not divide): one line, first
        try:
            skeleton_of(model_cfg, auto_model_cls)
        except (ValueError, TypeError, AssertionError) as e:
            raise ConfigError(f"model_config: {str(e).splitlines()[0]}") from None
    # an attention kernel that is unknown or that the model lacks; one this machine lacks (its package, a hub kernel) only
    # where it is to run, not in --preflight, which a login node without the GPU's packages makes for the GPU
    if config.attn_implementation and (weights or "/" not in config.attn_implementation):
        try:
            skeleton_of(model_cfg or load_config(config.model_name_or_path, config), auto_model_cls,
                        attn_implementation=config.attn_implementation)
        except (ValueError, ImportError) as e:
            if weights or not isinstance(e, ImportError):
                raise ConfigError(f"attn_implementation: {str(e).splitlines()[0]}") from None
    if config.model_config is None:
        return config.model_name_or_path
    path = os.path.abspath(os.path.join(config.output_dir, "base_model"))
    stamp = _stamp(path, "model", [config.model_config, config.seed, config.tokenizer_files,
                                   config.tokenizer_vocab_size, config.tokenizer_name_or_path, model_kwargs])
    if accelerator.is_main_process and stamp is not None:
        os.makedirs(path, exist_ok=True)
        if config.tokenizer_files:
            tok = build_tokenizer(config.tokenizer_files, config.tokenizer_vocab_size, path,
                                  special_tokens_for(config.model_config["model_type"]))
        else:
            tok = load_tokenizer(config.tokenizer_name_or_path)
            tok.save_pretrained(path)
        model_cfg.vocab_size = len(tok)
        for key, value in model_kwargs.items():  # e.g. num_labels, id2label for a classifier
            setattr(model_cfg, key, value)
        for role in ("pad", "bos", "eos"):
            token_id = getattr(tok, f"{role}_token_id")
            if token_id is not None:
                setattr(model_cfg, f"{role}_token_id", token_id)
        if not weights:  # the config alone, and no stamp: a run after it builds the weights
            model_cfg.save_pretrained(path)
        else:
            torch.manual_seed(config.seed)
            with whole_model_init():
                model = auto_model_cls.from_config(model_cfg)
            if model_cfg.is_encoder_decoder and model.generation_config.decoder_start_token_id is None:
                model.generation_config.decoder_start_token_id = tok.pad_token_id  # as T5 does
            model.save_pretrained(path)
            stamp()
    accelerator.wait_for_everyone()
    return path


# --- Loading --------------------------------------------------------------------------------------


def linear_module_names(model) -> list[str]:
    """Distinct name suffixes of the linear layers (LoRA candidates), lm_head excluded."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt", "Conv1D"):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names - {"lm_head"})


@contextlib.contextmanager
def whole_model_init():
    """Build a model unpartitioned even under ZeRO-3 (transformers would wrap it in ``zero.Init``, a collective that
    partitions it): for skeletons on the meta device and the tiny base model that rank 0 alone builds and saves."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def gathered(model):
    """A context with the whole weights of a model (or module) that ZeRO-3 partitioned, e.g. to evaluate the base
    model before its engine exists, or for the chunked loss's output layer; a no-op otherwise."""
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


def skeleton_of(model_cfg, auto_model_cls, **kwargs):
    """The model's modules on the meta device (no memory, no weights) for checks before loading and preflight; tied
    weights one tensor as when loaded (``init_empty_weights`` leaves T5's embeddings and head four tensors)."""
    from accelerate import init_empty_weights

    with whole_model_init(), init_empty_weights():
        model = auto_model_cls.from_config(model_cfg, **kwargs)
    model.tie_weights()
    return model


def check_lora_targets(model_cfg, auto_model_cls, targets: list[str]) -> None:
    """Every LoRA target must match a module; checked on the meta device before loading weights."""
    skeleton = skeleton_of(model_cfg, auto_model_cls)
    module_names = [n for n, _ in skeleton.named_modules()]
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in module_names):
            raise ConfigError(f"lora_target_modules: {target!r} matches no module of this model "
                              f"(linear layers: {', '.join(linear_module_names(skeleton))})")


def _matches(name: str, pattern: str) -> bool:
    import fnmatch

    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


def module_overview(model) -> str:
    """Module names two levels deep, numbered blocks folded (``transformer.h.0-11``), for error messages."""
    names = []
    for name, module in model.named_modules():
        if not name or name.count(".") > 1:
            continue
        children = [c for c, _ in module.named_children()]
        if children and all(c.isdigit() for c in children):
            names.append(f"{name}.0-{len(children) - 1}")
        elif not name.split(".")[-1].isdigit():
            names.append(name)
    return ", ".join(names)


def check_trainable_modules(model_cfg, auto_model_cls, patterns: list[str]) -> None:
    """Every ``trainable_modules`` pattern must match a parameter; checked on the meta device."""
    skeleton = skeleton_of(model_cfg, auto_model_cls)
    names = [n for n, _ in skeleton.named_parameters()]
    for pattern in patterns:
        if not any(_matches(n, pattern) for n in names):
            raise ConfigError(f"trainable_modules: {pattern!r} matches no parameter of this model "
                              f"(modules: {module_overview(skeleton)})")


def freeze_except(model, patterns: list[str] | None) -> None:
    """Train only parameters under a module matched by ``patterns`` (name, prefix or glob); None: all."""
    if patterns is None:
        return
    for name, p in model.named_parameters():
        p.requires_grad_(any(_matches(name, pat) for pat in patterns))


def quantization_config(config):
    from transformers import BitsAndBytesConfig
    from transformers.integrations import is_deepspeed_zero3_enabled

    if config.load_in_4bit:  # ZeRO-3 shards parameters by dtype: 4-bit weights stored in the compute dtype
        storage = config.bnb_4bit_quant_storage or (config.bnb_4bit_compute_dtype if is_deepspeed_zero3_enabled()
                                                    else None)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=config.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=config.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=DTYPES[config.bnb_4bit_compute_dtype],
            bnb_4bit_quant_storage=DTYPES.get(storage, torch.uint8),
        )
    if config.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_pretrained(auto_model_cls, source: str, config, accelerator=None, quantize: bool = True, device=None,
                    **kwargs):
    """``from_pretrained`` with the recipe's dtype, quantization and attention options. Quantized weights are created
    on ``device`` (default: the accelerator's device, else the CPU)."""
    qconfig = quantization_config(config) if quantize else None
    dtype = config.torch_dtype if config.torch_dtype == "auto" else DTYPES[config.torch_dtype]
    if qconfig is not None and config.torch_dtype == "auto":
        dtype = DTYPES[config.bnb_4bit_compute_dtype] if config.load_in_4bit else torch.float32
    load_kwargs = dict(dtype=dtype, trust_remote_code=config.trust_remote_code, **kwargs)
    if config.attn_implementation:
        load_kwargs["attn_implementation"] = config.attn_implementation
    if qconfig is not None:
        load_kwargs["quantization_config"] = qconfig
        from transformers.integrations import is_deepspeed_zero3_enabled
        if not is_deepspeed_zero3_enabled():
            # quantized weights are created on their final device; one copy per process
            device = device or (accelerator.device if accelerator is not None else "cpu")
            load_kwargs["device_map"] = {"": device}
    try:
        return auto_model_cls.from_pretrained(source, **load_kwargs)
    except OSError as e:
        raise ConfigError(f"model_name_or_path: cannot load {source!r} ({_offline_hint(e, source)})") from None


def adapter_base(path: str) -> str | None:
    """The base model a PEFT adapter directory names (its adapter_config.json), or None where ``path`` holds none."""
    adapter_config = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(adapter_config):
        return None
    with open(adapter_config) as f:
        base = json.load(f)["base_model_name_or_path"]
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), "base_model")
    if not os.path.isdir(base) and os.path.basename(os.path.normpath(base)) == "base_model" and os.path.isdir(beside):
        return beside  # the run's own base_model/ (a model built from model_config), its run folder moved since
    return base


def load_trained(auto_model_cls, path: str, config, accelerator=None):
    """A trained export for ``--predict``: an adapter over the base it names, loaded as the training run loaded it, or
    a whole model (a full fine-tune, a merged adapter) with the recipe's dtype and quantization options."""
    base = adapter_base(path)
    if base is None:
        return load_pretrained(auto_model_cls, path, config, accelerator)
    from peft import PeftModel

    return PeftModel.from_pretrained(load_pretrained(auto_model_cls, base, config, accelerator), path)


def merge_adapter(auto_model_cls, adapter_dir: str, out_dir: str, config) -> None:
    """Reload the adapter's base unquantized, fold the adapter into its weights, save the whole model (with the
    tokenizer and the run's options, which --predict reads)."""
    from peft import PeftModel

    from ftkit.rundir import save_config

    base = load_pretrained(auto_model_cls, adapter_base(adapter_dir), config, quantize=False)
    PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(adapter_dir).save_pretrained(out_dir)
    save_config(config, os.path.join(out_dir, "ftkit_config.yaml"))
    logger.info("merged model written to %s", out_dir)


def keep_4bit_training_layout(model) -> int:
    """Keep every 4-bit weight of a model that will train in the layout training reads; returns the 4-bit layers' count.

    On a CPU with AVX512-BF16, bitsandbytes repacks a ``Linear4bit`` weight in place into an inference-only layout at
    its first no-grad forward in eval mode (an evaluation or ``generate``); the training forward afterwards crashes on
    it. A model that trains never takes that layout (we clear the layer's CPU-feature flag, and undo a repacking
    already done); ``--predict`` keeps it."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    from bitsandbytes.nn import Linear4bit

    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
        if getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
            layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                layer.weight.data, layer.weight.quant_state)
    return len(layers)


def max_length_of(config, model_config) -> int:
    """``max_length``, else the model's position limit (:func:`max_positions`); above the limit is an error."""
    limit = max_positions(model_config)
    if config.max_length and config.max_length > limit:
        raise ConfigError(f"max_length: {config.max_length} exceeds the model's position limit {limit}")
    return config.max_length or limit


def training_setup(model, config, pad_token_id: int | None = None):
    """The loaded model made ready to train as the recipe asks: its padding id (decoders classify at the last token
    that is not padding), ``trainable_modules``, gradient checkpointing (non-reentrant, no KV cache), compiled
    blocks; returns the model."""
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    freeze_except(model, getattr(config, "trainable_modules", None))
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    compile_blocks(model, config)
    return model


def add_lora(model, config, task_type: str):
    """Gradient checkpointing, k-bit preparation and LoRA adapters, as QLoRA prescribes."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.load_in_4bit:
        keep_4bit_training_layout(model)
    kbit, checkpointing = config.load_in_4bit or config.load_in_8bit, {"use_reentrant": False}
    if kbit and config.upcast_unquantized_weights:  # freezes the base, casts its unquantized bf16/fp16 weights to fp32
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    elif kbit:  # frozen as above, without the cast (non-reentrant checkpointing needs no input gradients)
        model.requires_grad_(False)
    if config.gradient_checkpointing:  # (peft's k-bit preparation would call transformers' deprecated name for this)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
    if config.use_peft:
        model = get_peft_model(model, LoraConfig(
            r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, bias=config.lora_bias,
            target_modules=list(config.lora_target_modules), task_type=task_type))
    compile_blocks(model, config)  # after LoRA: the compiled blocks include the adapters
    return model


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their logical size."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())  # ZeRO-3 leaves each process an empty shard
        if hasattr(p, "quant_state") or p.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values are packed per byte
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def describe_parameters(model) -> str:
    trainable, total = parameter_counts(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}"


# --- Encoder-decoder inputs -----------------------------------------------------------------------


def shift_right(labels: torch.Tensor, decoder_start_token_id: int, pad_token_id: int) -> torch.Tensor:
    """Decoder inputs of an encoder-decoder model: the labels moved right by one, the start token first."""
    decoder_input_ids = labels.new_full(labels.shape, pad_token_id)
    decoder_input_ids[:, 1:] = labels[:, :-1]
    decoder_input_ids[:, 0] = decoder_start_token_id
    return decoder_input_ids.masked_fill(decoder_input_ids.eq(-100), pad_token_id)
