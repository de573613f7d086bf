"""Preflight (``--preflight true``): what a run will need, known before it is queued: the data kept, dropped and
truncated, the schedule, memory per device (one training step of the real model code on fake tensors: shapes,
no weights), time, a verdict and the cheapest change that fits. Not here: loading weights or training (scripts)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ftkit import data, distributed, loop, modeling, optim, tracking

logger = logging.getLogger("ftkit")

EXIT_FITS, EXIT_DOES_NOT_FIT = 0, 3
GB = 2**30
HEADROOM = 0.9  # a run fits when its estimate is at most this share of the device (allocator slack, context)
BNB_OPTIMIZERS = {"adamw_8bit": 2, "paged_adamw_8bit": 2, "paged_adamw_32bit": 8}  # state bytes per parameter
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps 32-bit state for smaller tensors
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")  # kept unquantized by transformers' bitsandbytes


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage alive at once, on real or fake tensors: each storage an operation creates (or that
    :meth:`add` is given) counts from its creation until it is freed; ``peak`` is the most at any moment."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key, size = id(storage), storage.nbytes()
        if key in self.live:
            return
        self.live[key] = weakref.ref(storage, lambda _, key=key, size=size: self._free(key, size))
        self.now += size
        self.peak = max(self.peak, self.now)

    def _free(self, key: int, size: int) -> None:
        if self.live.pop(key, None) is not None:
            self.now -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out


class FusedAttention(torch.autograd.Function):
    """What a GPU's fused attention kernels (flash, memory-efficient) hold: the output, the inputs and a log-sum-exp
    row statistic are saved for backward, no score matrix; backward makes the input gradients (and the mask's, when
    it has one, like T5's learned position bias). Shapes only: used on fake tensors."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        ctx.mask_shape = None if mask is None or not mask.requires_grad else (
            torch.broadcast_shapes(mask.shape, q.shape[:-1] + k.shape[-2:-1]), mask.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        mask = None if ctx.mask_shape is None else q.new_empty(ctx.mask_shape[0], dtype=ctx.mask_shape[1])
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), mask


class CudaRules(torch.overrides.TorchFunctionMode):
    """A CPU step that holds what the same step on a GPU would: attention through :class:`FusedAttention`, and under
    bf16 autocast CUDA's float32 list (the CPU's keeps these ops in bf16: e.g. ``pow`` in GELU's tanh form and
    ``layer_norm``/``softmax`` of bf16 inputs give fp32 tensors on a GPU, twice the bytes)."""

    FLOAT32 = {"acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
               "sinh", "tan", "pow", "__pow__", "__rpow__", "softplus", "layer_norm", "group_norm", "cosine_similarity",
               "nll_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "cross_entropy",
               "binary_cross_entropy_with_logits", "cdist", "renorm", "logsumexp", "prod", "softmax", "log_softmax",
               "cumprod", "cumsum", "sum", "norm"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs, name, autocast = kwargs or {}, getattr(func, "__name__", ""), torch.is_autocast_enabled("cpu")
        if name == "scaled_dot_product_attention":
            q, k, v, mask = (list(args) + [kwargs.get("attn_mask")])[:4]
            if autocast:  # autocast casts every floating input of attention, the mask too
                q, k, v, mask = (t.to(torch.bfloat16) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                                 for t in (q, k, v, mask))
            return FusedAttention.apply(q, k, v, mask)
        if autocast and name in self.FLOAT32:
            args, kwargs = torch.utils._pytree.tree_map(
                lambda t: t.float() if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 else t, (args, kwargs))
        return func(*args, **kwargs)


# --- Data and schedule ----------------------------------------------------------------------------


def batches_of(lengths: list[int], config) -> list[list[int]]:
    """The first epoch's micro-batches (example indices) as the training sampler draws them."""
    return data.train_sampler(lengths, config).batches()


def padded_length(n: int, config) -> int:
    return data.round_up(n, data.pad_multiple(config))


def data_section(splits: dict, counts: dict, config) -> dict:
    """Per split: examples kept, dropped and truncated, token-length percentiles; for training, the padding
    efficiency of the configured batching (dynamic padding, length grouping, packing)."""
    out = {}
    for name, ds in splits.items():
        unsorted = list(ds["length"])
        lengths = sorted(unsorted)
        entry = {"examples": len(ds), **counts.get(name, {}),
                 "tokens": {f"p{q}": lengths[min(len(lengths) - 1, int(q / 100 * len(lengths)))] for q in (50, 90, 99)}
                 | {"max": lengths[-1], "total": sum(lengths)}}
        if name == "train":
            batches = batches_of(unsorted, config)
            padded = sum(padded_length(max(unsorted[i] for i in b), config) * len(b) for b in batches)
            entry["padding_efficiency"] = sum(lengths) / max(padded, 1)
            if "examples" in ds.column_names:  # packed rows
                entry["packed_examples"] = sum(ds["examples"])
        out[name] = entry
    return out


def schedule_section(config, num_batches: int, num_processes: int, windows_per_epoch: int, total_steps: int) -> dict:
    """Micro-batches and optimizer steps per epoch for ``num_processes``, total and warmup steps, and the steps at
    which the run evaluates and saves (from loop.planned, the loop's own cadence)."""
    plan = loop.planned(config, total_steps, windows_per_epoch)
    return {"processes": num_processes, "micro_batches_per_epoch": num_batches,
            "micro_batches_per_epoch_per_process": math.ceil(num_batches / num_processes),
            "optimizer_steps_per_epoch": windows_per_epoch, "epochs": total_steps / windows_per_epoch,
            "total_steps": total_steps, "warmup_steps": optim.warmup_steps(config, total_steps),
            "examples_per_step": config.per_device_train_batch_size * config.gradient_accumulation_steps * num_processes,
            "early_stopping_patience": getattr(config, "early_stopping_patience", None), **plan}


# --- Memory ---------------------------------------------------------------------------------------


def _elements_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def quantized_bytes(numel: int, config) -> float:
    """Bytes bitsandbytes holds for a weight of ``numel`` elements: 4-bit with a scale per 64 (double quantization:
    8-bit scales and one fp32 per 256 of them), or 8-bit with a fp32 scale per row (about)."""
    if config.load_in_8bit:
        return numel * (1 + 4 / 4096)
    scales = numel / 64 * (1 + 4 / 256) if config.bnb_4bit_use_double_quant else numel / 64 * 4
    return numel / 2 + scales


def fake_step(config, model_cfg, auto_cls, setup, step_loss, batch: dict, device: str) -> dict:
    """Two training steps (forward, loss and backward of up to two micro-batches, clipping, optimizer) of the model
    as the script builds it, run on fake tensors (shapes, no memory), with the bytes alive counted: returns the
    bytes by part on one device."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = modeling.skeleton_of(model_cfg, auto_cls, dtype=weights_dtype(config, model_cfg))
    quantized = []
    if config.load_in_4bit or config.load_in_8bit:  # bitsandbytes' layers: fake ones in the compute dtype
        quantized = [m for name, m in model.named_modules() if type(m) is torch.nn.Linear
                     and m is not model.get_output_embeddings() and name.rsplit(".", 1)[-1] not in HEAD_NAMES]
        model.is_loaded_in_4bit, model.is_loaded_in_8bit = config.load_in_4bit, config.load_in_8bit
    model = setup(model, dataclasses.replace(config, torch_compile=False))
    compute = modeling.DTYPES[config.bnb_4bit_compute_dtype] if config.load_in_4bit else torch.float32
    for m in quantized:  # k-bit preparation upcast them as it does every unquantized weight; bitsandbytes' stay
        m.weight.data = m.weight.data.to(compute)  # and a matmul never saves a cast copy of them for backward
    if device == "cuda":  # checkpointed blocks recompute in backward, where the mode is not on: they enter it too
        for m in model.modules():
            if getattr(m, "_gradient_checkpointing_func", None) is not None:
                m._gradient_checkpointing_func = functools.partial(
                    m._gradient_checkpointing_func, context_fn=lambda: (contextlib.nullcontext(), CudaRules()))
    with FakeTensorMode(allow_non_fake_inputs=True) as fake:
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                setattr(module, name, torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype), p.requires_grad))
            for name, b in list(module.named_buffers(recurse=False)):
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype)
        batch = {k: fake.from_tensor(v) for k, v in batch.items()}
        trainable = [p for p in model.parameters() if p.requires_grad]
        if config.optim in BNB_OPTIMIZERS or config.optim == "sgd":  # bitsandbytes' state is counted below
            optimizer = torch.optim.SGD(trainable, lr=1e-3)
        else:  # the kernels the run will use: a loop over tensors on a CPU, foreach (or fused) on a GPU
            optimizer = torch.optim.AdamW(trainable, foreach=device == "cuda" and config.optim == "adamw_torch",
                                          fused=config.optim == "adamw_torch_fused")
        logits = [0]  # the largest output of the output layer (a chunk's with the chunked loss), and its fp32 copy
        head = model.get_output_embeddings()
        hook = head.register_forward_hook(lambda m, i, out: logits.__setitem__(0, max(logits[0], out.numel() * (
            out.element_size() + (4 if out.dtype != torch.float32 else 0))))) if head is not None else None
        live = LiveTensorBytes()
        for t in [*model.parameters(), *model.buffers()]:
            live.add(t)
        with live, CudaRules() if device == "cuda" else contextlib.nullcontext():
            for _ in range(2):  # the second step holds the optimizer state from the first
                for _ in range(min(config.gradient_accumulation_steps, 2)):  # a second one meets the gradients
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
                        loss = step_loss(model, batch)
                    loss.backward()
                if config.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm, foreach=device == "cuda")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        state = _elements_bytes(v for s in optimizer.state.values() for v in s.values()
                                if isinstance(v, torch.Tensor) and v.dim())
        if hook is not None:
            hook.remove()
    weights, grads = _elements_bytes([*model.parameters(), *model.buffers()]), _elements_bytes(trainable)
    kept = {id(m.weight) for m in quantized}  # bitsandbytes' weights, whatever dtype the fake ones have
    fp32 = [t for t in [*model.parameters(), *model.buffers()] if t.dtype == torch.float32 and id(t) not in kept]
    activations = max(live.peak - weights - grads - state, 0)
    if config.optim in BNB_OPTIMIZERS:
        state = sum(p.numel() * (BNB_OPTIMIZERS[config.optim] if p.numel() >= BNB_MIN_8BIT_SIZE else 8)
                    for p in trainable)
    if quantized:  # their real size, and one weight dequantized at a time in the compute dtype
        weights += sum(quantized_bytes(m.weight.numel(), config) - _elements_bytes([m.weight]) for m in quantized)
        activations += max(m.weight.numel() for m in quantized) * compute.itemsize
    trainable_params = sum(p.numel() for p in trainable)
    return {"weights": weights, "gradients": grads, "optimizer": state, "activations": activations,
            "logits": logits[0], "trainable_params": trainable_params, "fp32_bytes": _elements_bytes(fp32),
            "fp32_trainable_bytes": _elements_bytes(t for t in fp32 if t.requires_grad),
            "frozen_params": sum(p.numel() for p in model.parameters()) - trainable_params}


def weights_dtype(config, model_cfg) -> torch.dtype:
    """The dtype ``modeling.load_pretrained`` gives the (unquantized) weights."""
    DTYPES = modeling.DTYPES
    if config.torch_dtype != "auto":
        return DTYPES[config.torch_dtype]
    if config.load_in_4bit:
        return DTYPES[config.bnb_4bit_compute_dtype]
    saved = str(getattr(model_cfg, "dtype", None) or "").replace("torch.", "")
    return torch.float32 if config.load_in_8bit or config.model_config is not None else DTYPES.get(saved, torch.float32)


def _zero_number(zero: dict, key: str, auto: float, default: float) -> float:
    value = zero.get(key, default)
    return auto if value == "auto" else float(value)


def per_device(parts: dict, num_processes: int, zero: dict | None, hidden: int, bf16: bool) -> dict:
    """The step's bytes by part on one device under DDP or DeepSpeed ZeRO (``zero``: its zero_optimization section),
    measured on CPU runs with 2 processes (tests/test_preflight.py): DeepSpeed keeps an fp32 copy of the trainable
    weights and the optimizer state partitioned (none with offload_optimizer), full gradients (stage 1: two copies)
    or fp32 partitions (stage 2: and the full ones as they are made, stage 3: only those), gradient buckets of
    ``reduce_bucket_size`` elements (two with overlap_comm, stage 1-2), and under stage 3 the weights partitioned plus
    those gathered for compute (up to ``stage3_max_live_parameters``); with bf16 it holds weights in bf16."""
    out = {k: parts[k] for k in ("weights", "gradients", "optimizer", "activations")}
    if zero is None:
        if num_processes > 1:
            out["gradients"] *= 2  # DDP's buckets hold a second copy of the gradients
        return out
    n, stage, trainable = num_processes, int(zero.get("stage", 0)), parts["trainable_params"]
    if bf16:  # the engine casts the model to bf16
        out["weights"] -= parts["fp32_bytes"] / 2
        out["gradients"] -= parts["fp32_trainable_bytes"] / 2
    offload = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    out["optimizer"] = 0 if offload else (parts["optimizer"] + 4 * trainable) / n
    grad_size = out["gradients"] / max(trainable, 1)
    bucket = _zero_number(zero, "reduce_bucket_size", hidden * hidden, 5e8) * grad_size
    if stage <= 2:
        overlap = zero.get("overlap_comm", False) not in (False, "false")
        out["buckets"] = bucket * (2 if overlap else 1) if zero.get("contiguous_gradients", True) else 0
        out["gradients"] = 2 * out["gradients"] if stage < 2 else out["gradients"] + 4 * trainable / n
    else:
        out["buckets"] = bucket
        out["gradients"] = 4 * trainable / n
        elements = parts["trainable_params"] + parts["frozen_params"]
        live = min(elements, _zero_number(zero, "stage3_max_live_parameters", 1e9, 1e9))
        out["weights"] = out["weights"] / n + out["weights"] * live / max(elements, 1)
    return out


class Estimate:
    """Memory per device of a recipe's training step at its longest micro-batch, for this recipe or a variant: the
    script's model (``model_cfg``, ``auto_cls``, ``setup(model, config)``) and loss (``step_loss(model, batch)``)
    on ``train_ds`` with the run's processes and DeepSpeed config."""

    def __init__(self, acc, config, model_cfg, auto_cls, setup, step_loss, train_ds, pad_token_id: int):
        self.model_cfg, self.auto_cls, self.setup, self.step_loss = model_cfg, auto_cls, setup, step_loss
        self.train_ds, self.pad_token_id = train_ds, pad_token_id
        self.num_processes = distributed.planned_processes(acc, config)
        plugin = acc.state.deepspeed_plugin
        self.zero = dict(plugin.deepspeed_config.get("zero_optimization", {})) if plugin is not None else None
        self.device = config.preflight_device if config.preflight_device != "auto" else (
            "cuda" if torch.cuda.is_available() else "cpu")
        self.lengths, self.auto = list(train_ds["length"]), None  # auto: how an auto batch size was chosen

    def longest_batch(self, config) -> dict:
        """The micro-batch with the most (padded) tokens in the first epoch, collated as the run collates it."""
        rows = max(batches_of(self.lengths, config),
                   key=lambda b: (padded_length(max(self.lengths[i] for i in b), config) * len(b), len(b)))
        return data.PadCollator(self.pad_token_id, data.pad_multiple(config))([self.train_ds[i] for i in rows])

    def __call__(self, config, zero: dict | None = ...) -> dict:
        batch = self.longest_batch(config)
        with torch.random.fork_rng(devices=[]):  # building the skeleton draws from it; the run's draws stay its own
            parts = fake_step(config, self.model_cfg, self.auto_cls, self.setup, self.step_loss, batch, self.device)
        on_device = per_device(parts, self.num_processes, self.zero if zero is ... else zero,
                               tracking.model_dims(self.model_cfg)[1], config.bf16)
        return {"parts": on_device, "total": sum(on_device.values()), "longest_batch": list(batch["input_ids"].shape),
                "trainable_params": parts["trainable_params"], "frozen_params": parts["frozen_params"],
                "logits": parts["logits"], "beside_the_step": on_device["optimizer"] + on_device.get("buckets", 0)
                + on_device["gradients"] - parts["gradients"]}


# --- Verdict and advice ---------------------------------------------------------------------------


def budget_bytes(config, num_processes: int) -> tuple[float, str]:
    """Memory of one device: ``device_memory_gb``, else the visible GPU's, else this machine's RAM per process."""
    if config.device_memory_gb:
        return config.device_memory_gb * GB, "device_memory_gb"
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, torch.cuda.get_device_name()
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / max(num_processes, 1), "RAM per process"


DS_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_configs")


def _zero_of(name: str) -> dict | None:
    """The zero_optimization section of ds_configs/<name> (None where the repository's configs are absent)."""
    path = os.path.join(DS_CONFIGS, name)
    return distributed.read_deepspeed_config(path, "deepspeed").get("zero_optimization", {}) if os.path.isfile(
        path) else None


def changes_to_try(config, num_processes: int, zero: dict | None) -> list[tuple[dict, dict, dict]]:
    """Changes that cut memory, cheapest first in lost speed: DeepSpeed's gradient buckets sized to the model,
    8-bit optimizer state, chunked loss, ZeRO-2, a smaller micro-batch with more accumulation (same effective
    batch), gradient checkpointing, ZeRO-3; as (what to tell the user, config options, zero_optimization keys)."""
    cheap, stage = [], int(zero.get("stage", 0)) if zero else -1
    if 0 <= stage <= 2 and zero.get("reduce_bucket_size", 5e8) != "auto":
        cheap.append(({"zero_optimization.reduce_bucket_size": "auto"}, {}, {"reduce_bucket_size": "auto"}))
    if config.optim in ("adamw_torch", "adamw_torch_fused"):
        cheap.append(({"optim": "paged_adamw_8bit"}, {"optim": "paged_adamw_8bit"}, {}))
    if hasattr(config, "cross_entropy_chunk_tokens") and not config.cross_entropy_chunk_tokens and stage < 3:
        cheap.append(({"cross_entropy_chunk_tokens": 1024}, {"cross_entropy_chunk_tokens": 1024}, {}))
    zero2, zero3 = (_zero_of(name) if num_processes > 1 and stage < level else None
                    for name, level in (("zero2.json", 2), ("zero3.json", 3)))
    if zero2 is not None:
        cheap.append(({"deepspeed": "ds_configs/zero2.json"}, {}, zero2))
    batch, accumulate, slower = config.per_device_train_batch_size, config.gradient_accumulation_steps, []
    while batch > 1:
        batch, accumulate = batch // 2, accumulate * 2
        change = {"per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulate}
        slower.append((change, change, {}))
    if not config.gradient_checkpointing:
        slower.append(({"gradient_checkpointing": True}, {"gradient_checkpointing": True}, {}))
    if zero3 is not None:
        slower.append(({"deepspeed": "ds_configs/zero3.json"}, {}, zero3))
    return cheap + slower


def cheapest_fix(config, estimate: Estimate, usable: float) -> dict | None:
    """The first change of :func:`changes_to_try` that fits; else the changes together, one after another, until
    the run fits (None if even all of them do not)."""

    def total(options: dict, zero_keys: dict, base: dict | None) -> float:
        zero = {**(base or {}), **zero_keys} if zero_keys else base
        return estimate(dataclasses.replace(config, **options), zero)["total"]

    tried = changes_to_try(config, estimate.num_processes, estimate.zero)
    for shown, options, zero_keys in tried:
        if (size := total(options, zero_keys, estimate.zero)) <= usable:
            return {"change": shown, "total_gb": size / GB}
    shown_all, combined, zero = {}, {}, estimate.zero
    for shown, options, zero_keys in tried:
        shown_all.update(shown)
        combined.update(options)
        zero = {**(zero or {}), **zero_keys} if zero_keys else zero
        if (size := total(combined, {}, zero)) <= usable:
            return {"change": dict(shown_all), "total_gb": size / GB}
    return None


# --- The report -----------------------------------------------------------------------------------


def time_section(config, model_cfg, memory: dict, data_info: dict, schedule: dict) -> dict:
    """FLOPs per optimizer step (tracking.flops_per_token over the real tokens of a mean step) and, with a peak
    FLOP/s (``peak_tflops`` or a known GPU) and ``assumed_mfu``, the time per epoch on all processes."""
    train = data_info["train"]
    per_token = tracking.flops_per_token(model_cfg, memory["trainable_params"], memory["frozen_params"],
                                         train["tokens"]["total"] / max(train["examples"], 1))
    tokens_per_epoch = train["tokens"]["total"]
    out = {"flops_per_step": per_token * tokens_per_epoch / schedule["optimizer_steps_per_epoch"],
           "peak_tflops": tracking.peak_tflops(config), "assumed_mfu": config.assumed_mfu}
    if out["peak_tflops"]:
        rate = out["peak_tflops"] * 1e12 * config.assumed_mfu * schedule["processes"]
        out["seconds_per_epoch"] = per_token * tokens_per_epoch / rate
        out["seconds_total"] = out["seconds_per_epoch"] * schedule["epochs"]
    return out


def run(acc, config, estimate: Estimate, splits: dict, counts: dict) -> None:
    """``--preflight``: print the table, write ``output_dir/preflight.json`` and exit 0 if the run fits its device,
    3 if not (with the cheapest change that fits); nothing else is written. ``estimate`` holds the script's model
    and loss, ``splits`` the tokenized data, ``counts`` what each split dropped or truncated."""
    model_cfg, num_batches = estimate.model_cfg, len(batches_of(estimate.lengths, config))
    processes = estimate.num_processes
    windows_per_epoch = loop.windows_per_epoch(config, num_batches, processes, len(splits["train"]))
    total_steps = optim.total_optimizer_steps(config, windows_per_epoch)
    device, zero = estimate.device, estimate.zero
    memory = estimate(config)
    other = estimate(dataclasses.replace(config, gradient_checkpointing=not config.gradient_checkpointing))
    with_, without = (memory, other) if config.gradient_checkpointing else (other, memory)
    memory["activations_gb"] = {"with_checkpointing": with_["parts"]["activations"] / GB,
                                "without_checkpointing": without["parts"]["activations"] / GB,
                                "of_which_logits": memory["logits"] / GB}
    budget, source = budget_bytes(config, processes)
    fits = memory["total"] <= HEADROOM * budget
    report = {"device": device, "processes": processes, "zero_stage": (zero or {}).get("stage"),
              "batch_size": {"per_device_train_batch_size": config.per_device_train_batch_size,
                             "gradient_accumulation_steps": config.gradient_accumulation_steps, "auto": estimate.auto},
              "data": data_section(splits, counts, config)}
    report["schedule"] = schedule_section(config, num_batches, processes, windows_per_epoch, total_steps)
    report["memory"] = {"parts_gb": {k: v / GB for k, v in memory["parts"].items()}, "total_gb": memory["total"] / GB,
                        "activations_gb": memory["activations_gb"], "longest_batch": memory["longest_batch"],
                        "trainable_params": memory["trainable_params"], "frozen_params": memory["frozen_params"],
                        "budget_gb": budget / GB, "budget_from": source, "headroom": HEADROOM, "fits": fits,
                        "advice": None if fits else cheapest_fix(config, estimate, HEADROOM * budget)}
    report["time"] = time_section(config, model_cfg, memory, report["data"], report["schedule"])
    report["exit_code"] = EXIT_FITS if fits else EXIT_DOES_NOT_FIT
    if acc.is_main_process:
        os.makedirs(config.output_dir, exist_ok=True)
        with open(os.path.join(config.output_dir, "preflight.json"), "w") as f:
            json.dump(report, f, indent=2)
        print(table(report), flush=True)
    acc.wait_for_everyone()
    sys.exit(report["exit_code"])


def _gb(x: float) -> str:
    return f"{x:.2f} GB" if x >= 0.1 else f"{x * 1024:.1f} MB"


def table(report: dict) -> str:
    """The report as the lines ``--preflight`` prints."""
    lines = [f"preflight: {report['processes']} process(es) on {report['device']}"
             + (f", ZeRO-{report['zero_stage']}" if report["zero_stage"] is not None else "")]
    b = report["batch_size"]
    if b["auto"]:
        lines.append(f"per_device_train_batch_size auto: {b['per_device_train_batch_size']} x gradient_accumulation_steps "
                     f"{b['gradient_accumulation_steps']} (estimated by micro-batch: " + ", ".join(
                         f"{k}: {_gb(v)}" for k, v in b["auto"]["estimates_gb"].items()) + ")")
    lines += ["", "data"]
    for name, d in report["data"].items():
        dropped = ", ".join(f"{k} {v}" for k, v in d.items() if k not in ("examples", "tokens", "padding_efficiency",
                                                                           "packed_examples"))
        t = d["tokens"]
        lines.append(f"  {name:<11} {d['examples']:>7} examples{' (' + dropped + ')' if dropped else ''}; tokens "
                     f"p50 {t['p50']} p90 {t['p90']} p99 {t['p99']} max {t['max']}"
                     + (f"; padding efficiency {100 * d['padding_efficiency']:.1f}%" if "padding_efficiency" in d else ""))
    s = report["schedule"]
    lines += ["", "schedule",
              f"  {s['micro_batches_per_epoch']} micro-batches per epoch ({s['micro_batches_per_epoch_per_process']} per "
              f"process), {s['optimizer_steps_per_epoch']} optimizer steps per epoch of {s['examples_per_step']} examples",
              f"  {s['total_steps']} steps ({s['epochs']:.2f} epochs), {s['warmup_steps']} warmup; "
              f"evaluations: {len(s['evaluation_steps'])} during training + the final one"
              + (" (early stopping may end it sooner)" if s.get("early_stopping_patience") else "")
              + "; checkpoints: "
              f"{len(s['save_steps'])} during training + the last (and one at each new best)"]
    m = report["memory"]
    lines += ["", f"memory per device (longest micro-batch {m['longest_batch'][0]} x {m['longest_batch'][1]} tokens; "
                  f"{m['trainable_params']:,} trainable of {m['trainable_params'] + m['frozen_params']:,} parameters)"]
    lines += [f"  {k:<34} {_gb(v):>10}" for k, v in m["parts_gb"].items()]
    lines += [f"  {'(activations ' + k.replace('_', ' ') + ')':<34} {_gb(v):>10}"
              for k, v in m["activations_gb"].items() if k != "of_which_logits"]
    lines.append(f"  {'(of the activations: logits)':<34} {_gb(m['activations_gb']['of_which_logits']):>10}")
    lines.append(f"  {'total':<34} {_gb(m['total_gb']):>10} of {_gb(m['budget_gb'])} ({m['budget_from']}): "
                 + ("fits" if m["fits"] else f"does NOT fit ({100 * m['headroom']:.0f}% usable)"))
    if not m["fits"]:
        fix = m["advice"]
        lines.append("  cheapest change that fits: " + (", ".join(f"{k}: {v}" for k, v in fix["change"].items())
                                                        + f" ({_gb(fix['total_gb'])})" if fix else "none found"))
    t = report["time"]
    lines += ["", f"time: {t['flops_per_step'] / 1e12:.3g} TFLOPs per optimizer step"
              + (f"; about {t['seconds_per_epoch'] / 60:.1f} min per epoch, {t['seconds_total'] / 60:.1f} min in all at "
                 f"{100 * t['assumed_mfu']:.0f}% of {t['peak_tflops']:.0f} TFLOP/s" if "seconds_per_epoch" in t
                 else " (set --peak_tflops for a time estimate)")]
    return "\n".join(lines)
