"""Optimizer and learning-rate schedule of the trainable parameters (AdamW, bitsandbytes 8-bit/paged, SGD).
Not here: the optimizer step itself (the scripts) or its cadence (loop.py)."""

from __future__ import annotations

import math

import torch

NO_DECAY = ("bias", "norm", "ln_", "layernorm", "layer_norm")


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """Trainable parameters, split so biases and norm weights get no weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if any(k in name.lower() for k in NO_DECAY) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


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
    return cls(groups, lr=lr, betas=betas, eps=eps)


def build(model, config, total_steps: int):
    """The optimizer over the trainable parameters and its learning-rate schedule over ``total_steps``."""
    optimizer = build_optimizer(model, config)
    return optimizer, build_scheduler(optimizer, config, total_steps)


def warmup_steps(config, total_steps: int) -> int:
    return config.warmup_steps if config.warmup_steps > 0 else math.ceil(config.warmup_ratio * total_steps)


def build_scheduler(optimizer, config, total_steps: int):
    from transformers import get_scheduler

    return get_scheduler(config.lr_scheduler_type, optimizer=optimizer,
                         num_warmup_steps=warmup_steps(config, total_steps), num_training_steps=total_steps)


def total_optimizer_steps(config, windows_per_epoch: int) -> int:
    """Optimizer steps of the run: ``max_steps`` if set, else epochs x windows per epoch."""
    if config.max_steps > 0:
        return config.max_steps
    return max(1, math.ceil(config.num_train_epochs * windows_per_epoch))
