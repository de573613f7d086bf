"""Optimizer and learning-rate schedule of the trainable parameters (AdamW, bitsandbytes 8-bit/paged, SGD).
Not here: the optimizer step itself (the scripts) or its cadence (loop.py)."""

from __future__ import annotations

import functools
import logging
import math
import warnings

import torch

NO_DECAY = ("bias", "norm", "ln_", "layernorm", "layer_norm")
logger = logging.getLogger("ftkit")


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """Trainable parameters, split so biases and norm weights get no weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if any(k in name.lower() for k in NO_DECAY) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def check_weight_dtype(config) -> None:
    """Refuse float16 weights that torch's AdamW would train: its epsilon (1e-8) and small squared gradients are 0 in
    float16, and the first step writes inf and nan (LoRA adapters over a float16 base train in float32)."""
    from ftkit.config import ConfigError

    if config.torch_dtype == "float16" and config.optim in ("adamw_torch", "adamw_torch_fused") and not (
            getattr(config, "use_peft", False)):
        raise ConfigError(f"torch_dtype: float16 weights trained by {config.optim} break at the first step (inf and nan: "
                          f"its epsilon and small squared gradients are 0 in float16); load float32 (with bf16: true "
                          f"for mixed precision) or bfloat16, or use adamw_8bit")


def build_optimizer(model, config) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    lr, betas, eps = config.learning_rate, (config.adam_beta1, config.adam_beta2), config.adam_epsilon
    if config.optim in ("adamw_torch", "adamw_torch_fused"):  # fused: one kernel for all parameters
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=config.optim == "adamw_torch_fused")
    if config.optim == "sgd":
        return torch.optim.SGD(groups, lr=lr)
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[config.optim]
    if config.optim.startswith("paged_") and _run_device(groups) == "cpu":
        # bitsandbytes says so in a UserWarning at the first step, amid the progress bar: said once, here, instead
        warnings.filterwarnings("ignore", "Paged optimizers are not supported on CPU", UserWarning)
        logger.info(f"optim {config.optim}: paging moves optimizer state out of GPU memory; on CPU, bitsandbytes keeps "
                    f"it unpaged ({config.optim[len('paged_'):]}, the same updates)")
    return cls(groups, lr=lr, betas=betas, eps=eps)


def _run_device(groups) -> str:
    """The device this process trains on: the accelerator's (made before the optimizer, which comes before the model
    is moved there), else that of the parameters (benchmarks, tests)."""
    from accelerate.state import AcceleratorState, is_initialized

    return AcceleratorState().device.type if is_initialized() else groups[0]["params"][0].device.type


def build(model, config, total_steps: int):
    """The optimizer over the trainable parameters and its learning-rate schedule over ``total_steps``."""
    optimizer = build_optimizer(model, config)
    return optimizer, build_scheduler(optimizer, config, total_steps)


def warmup_steps(config, total_steps: int) -> int:
    return config.warmup_steps if config.warmup_steps > 0 else math.ceil(config.warmup_ratio * total_steps)


def lr_factor(step: int, *, kind: str, warmup: int, total: int) -> float:
    """The learning rate at optimizer step ``step`` as a fraction of the configured one: a linear ramp over
    ``warmup`` steps (``constant`` has none), then flat, linear to 0 at ``total``, or half a cosine to 0 at
    ``total``. The same numbers as ``transformers.get_scheduler`` (a test compares them), without importing
    ``transformers.optimization``, whose ``trainer_utils`` imports peft and, through it, bitsandbytes and
    torch's inductor: 1.3 to 2 s of start-up for every run that uses neither."""
    if kind == "constant":
        return 1.0
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant_with_warmup":
        return 1.0
    left = max(1, total - warmup)
    if kind == "linear":
        return max(0.0, (total - step) / left)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / left)))
    raise ValueError(f"lr_scheduler_type: unknown schedule {kind!r}")


def build_scheduler(optimizer, config, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``config.lr_scheduler_type`` over ``total_steps``. LambdaLR's state keeps no plan (for a ``partial``, an empty
    dict, as transformers' schedulers write): a resumed run follows the plan of its own total (checkpoint.py)."""
    factor = functools.partial(lr_factor, kind=config.lr_scheduler_type, warmup=warmup_steps(config, total_steps),
                               total=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def total_optimizer_steps(config, windows_per_epoch: int) -> int:
    """Optimizer steps of the run: ``max_steps`` if set, else epochs x windows per epoch."""
    if config.max_steps > 0:
        return config.max_steps
    return max(1, math.ceil(config.num_train_epochs * windows_per_epoch))
