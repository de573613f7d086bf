"""Tracking: accelerate trackers (W&B, TensorBoard), an always-on metrics.jsonl, throughput."""

from __future__ import annotations

import json
import os
import re
import time

import torch

SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.IGNORECASE)


def without_secrets(values: dict) -> dict:
    """Drop every entry whose name looks like a credential (recursively)."""
    clean = {}
    for k, v in values.items():
        if SECRET.search(str(k)):
            continue
        clean[k] = without_secrets(v) if isinstance(v, dict) else v
    return clean


def start(accelerator, config) -> "MetricsLog":
    """Initialise the configured trackers (their files go under output_dir); returns the run's log."""
    log = MetricsLog(accelerator, config.output_dir)
    if not accelerator.log_with:
        return log
    from ftkit.config import to_dict

    run_name = config.run_name or os.path.basename(os.path.normpath(config.output_dir))
    init_kwargs = {"wandb": {"name": run_name, "dir": config.output_dir}}
    safe = {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
            for k, v in without_secrets(to_dict(config)).items()}
    accelerator.init_trackers(config.project_name, config=safe, init_kwargs=init_kwargs)
    return log


class MetricsLog:
    """Writes each log event to ``output_dir/metrics.jsonl`` (main process) and to the trackers."""

    def __init__(self, accelerator, output_dir: str):
        self.accelerator = accelerator
        self.path = os.path.join(output_dir, "metrics.jsonl")

    def log(self, metrics: dict, step: int) -> None:
        metrics = {k: (float(v) if hasattr(v, "item") else v) for k, v in metrics.items()}
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.accelerator.log_with:
            self.accelerator.log(metrics, step=step)


class RunningLoss:
    """Sum of the loss (``add``, per micro-batch, this process) and of what it is averaged over
    (``count``, per optimizer step, all processes: tokens or examples) between log events.

    The sum stays on the device until a log event, so the hot loop has no host sync.
    """

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.total = torch.zeros((), device=accelerator.device)
        self.count = 0

    def add(self, loss_sum: "torch.Tensor") -> None:
        self.total += loss_sum.detach()

    def pop(self) -> float:
        """The mean over all processes since the last call."""
        from ftkit.distributed import reduce_sum

        mean = (reduce_sum(self.accelerator, self.total) / self.count).item()
        self.total.zero_()
        self.count = 0
        return mean


def log_due(config, step: int, total_steps: int) -> bool:
    return step % config.logging_steps == 0 or step == total_steps


def train_entry(loss: float, scheduler, state: dict, batches_per_epoch: int, speed, grad_norm,
                num_processes: int) -> dict:
    """The ``train/*`` and ``perf/*`` values of one log event."""
    entry = {"train/loss": loss, "train/lr": scheduler.get_last_lr()[0],
             "train/epoch": state["epoch"] + state["batches_in_epoch"] / max(batches_per_epoch, 1),
             **speed.report(num_processes)}
    if grad_norm is not None:
        entry["train/grad_norm"] = float(grad_norm)
    return entry


class Throughput:
    """Counts real (non-pad) tokens and samples between log events."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.tokens = 0
        self.samples = 0
        self.padded = 0
        self.start = time.perf_counter()

    def add(self, batch) -> None:
        mask = batch["attention_mask"]
        self.tokens = self.tokens + mask.sum()  # stays on the device: no host sync per micro-step
        self.padded += mask.numel()
        self.samples += mask.shape[0]

    def report(self, num_processes: int = 1) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        tokens = int(self.tokens)
        out = {"perf/tokens_per_s": tokens * num_processes / elapsed,
               "perf/samples_per_s": self.samples * num_processes / elapsed,
               "perf/padding_efficiency": tokens / max(self.padded, 1)}
        self.reset()
        return out
