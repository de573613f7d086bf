"""``per_device_train_batch_size: auto``: the micro-batch chosen from --preflight's estimate, then confirmed by one
real step on the loaded model (halving when it does not fit). Not here: the estimate itself (preflight.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math

import torch

from ftkit import distributed
from ftkit.config import RunError
from ftkit.fakestep import LiveTensorBytes
from ftkit.preflight import GB, HEADROOM, Estimate, _gb, budget_bytes

logger = logging.getLogger("ftkit")


def set_batch_size(acc, config, batch: int, accumulate: int) -> None:
    config.per_device_train_batch_size, config.gradient_accumulation_steps = batch, accumulate
    acc.gradient_accumulation_steps = accumulate
    distributed.fill_deepspeed_config(acc, config)  # the micro-batch and accumulation keys it left "auto"


def auto_batch_size(acc, config, estimate: Estimate) -> None:
    """``per_device_train_batch_size: auto``: the largest micro-batch ``b`` that divides ``gradient_accumulation_steps``
    (``G``, the examples per process per optimizer step) and whose estimate fits the device; accumulation ``G / b``.
    Set in ``config`` (and the DeepSpeed config) and logged; if not even 1 fits, a RunError (``--preflight`` reports
    it with the cheapest change instead)."""
    if config.per_device_train_batch_size != "auto":
        return
    examples, usable = config.gradient_accumulation_steps, HEADROOM * budget_bytes(config, estimate.num_processes)[0]
    tried = {}
    for batch in (d for d in range(examples, 0, -1) if examples % d == 0):
        variant = dataclasses.replace(config, per_device_train_batch_size=batch,
                                      gradient_accumulation_steps=examples // batch)
        tried[batch] = estimate(variant, between_steps=False)["total"]
        if tried[batch] <= usable:
            break
    else:
        if not config.preflight:
            raise RunError(f"per_device_train_batch_size: auto: not even 1 example fits ({_gb(tried[1] / GB)} estimated, "
                           f"{_gb(usable / GB)} usable); run with --preflight true for the cheapest change that fits")
    estimate.auto = {"examples_per_process_step": examples, "usable_gb": usable / GB,
                     "estimates_gb": {b: total / GB for b, total in tried.items()}}
    set_batch_size(acc, config, batch, examples // batch)
    logger.info("per_device_train_batch_size auto: %d x gradient_accumulation_steps %d = %d examples per process per "
                "step (estimated %s of %s usable)", batch, examples // batch, examples, _gb(tried[batch] / GB),
                _gb(usable / GB))


def step_peak(acc, model, config, estimate: Estimate) -> float:
    """The most bytes one real forward and backward of the longest micro-batch holds at once (inf if the device ran
    out of memory); the RNG is left as it was and the gradients are dropped, so the run does not see it."""
    cuda = acc.device.type == "cuda"
    batch = {k: v.to(acc.device) for k, v in estimate.longest_batch(config).items()}
    training, live = model.training, LiveTensorBytes()
    model.train()
    try:
        with torch.random.fork_rng(devices=[acc.device] if cuda else []):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            for t in [*model.parameters(), *model.buffers()]:
                live.add(t)
            with (contextlib.nullcontext() if cuda else live), acc.autocast():
                estimate.step_loss(model, batch).backward()
        return torch.cuda.max_memory_allocated() if cuda else live.peak
    except torch.OutOfMemoryError:
        return math.inf
    finally:
        model.zero_grad(set_to_none=True)
        model.train(training)
        del batch
        if cuda:
            torch.cuda.empty_cache()


def confirm_batch_size(acc, model, config, estimate: Estimate) -> None:
    """After :func:`auto_batch_size`: one real step at the longest micro-batch on the loaded model, plus the
    optimizer state and buffers the estimate gives beside it, must fit the device on every process; if not, the
    next smaller micro-batch (more accumulation, same examples per step) is tried. Under DeepSpeed, whose engine
    only exists after ``prepare``, the estimate stands."""
    if estimate.auto is None:
        return
    if acc.state.deepspeed_plugin is not None:
        logger.info("per_device_train_batch_size auto: under DeepSpeed the estimate stands (no step before prepare)")
        return
    if not (config.load_in_4bit or config.load_in_8bit):
        model.to(acc.device)  # as prepare would; bitsandbytes' layers were loaded onto it
    examples, usable = estimate.auto["examples_per_process_step"], HEADROOM * budget_bytes(config, acc.num_processes)[0]
    while True:
        batch = config.per_device_train_batch_size
        total = step_peak(acc, model, config, estimate) + estimate(config, between_steps=False)["beside_the_step"]
        worst = acc.reduce(torch.tensor(total, device=acc.device), "max").item() if acc.num_processes > 1 else total
        if worst <= usable:
            logger.info("per_device_train_batch_size auto: %d confirmed by a real step (%s of %s usable)", batch,
                        _gb(worst / GB), _gb(usable / GB))
            return
        if batch == 1:
            raise RunError(f"per_device_train_batch_size: auto: one example of the longest batch needs "
                           f"{_gb(worst / GB)} ({_gb(usable / GB)} usable); run with --preflight true for the "
                           f"cheapest change that fits")
        smaller = max(d for d in range(1, batch) if examples % d == 0)
        logger.warning("per_device_train_batch_size auto: %d needs %s in a real step (%s usable): trying %d", batch,
                       _gb(worst / GB), _gb(usable / GB), smaller)
        set_batch_size(acc, config, smaller, examples // smaller)
