"""The training loop's state and cadence: counters, accumulation windows (one all-reduce per step), the
resume position, when to log/evaluate/save, early stopping, the non-finite guard, stop signals. Not here: forward,
backward and the optimizer step (each script's own loop), checkpoint files (checkpoint.py)."""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Iterable, Iterator, NamedTuple

import torch

from ftkit import checkpoint, distributed, rundir, tracking
from ftkit.config import ConfigError, RunError

logger = logging.getLogger("ftkit")


def windows_per_epoch(config, num_batches: int, num_processes: int, num_examples: int) -> int:
    """Optimizer steps in one epoch of ``num_batches`` micro-batches (all processes); 0 is an error."""
    windows = math.ceil(num_batches / num_processes) // config.gradient_accumulation_steps
    if windows == 0:
        raise ConfigError(f"gradient_accumulation_steps: {config.gradient_accumulation_steps} x batch "
                          f"{config.per_device_train_batch_size} x {num_processes} processes needs more than "
                          f"the {num_examples} training examples")
    return windows


def plan(acc, config, train_ds, pad_token_id: int):
    """The training loader and its schedule: (loader, sampler, optimizer steps per epoch, total optimizer steps)."""
    from ftkit import data, optim

    train_dl, sampler = data.train_loader(train_ds, pad_token_id, config)
    windows = windows_per_epoch(config, len(train_dl), acc.num_processes, len(train_ds))
    return train_dl, sampler, windows, optim.total_optimizer_steps(config, windows)


def accumulation_windows(batches: Iterable, size: int) -> Iterator[list]:
    """Micro-batches grouped into optimizer-step windows of exactly ``size``; a trailing incomplete
    window is dropped, so every step sees as many micro-batches (loss normalisation, DeepSpeed's counter)."""
    window = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []


class WindowCounts(NamedTuple):
    """What one optimizer step needs from every process, summed over processes."""

    units: int  # what the step's loss is averaged over: target tokens or examples
    samples: int  # examples (a packed row counts the examples it holds)
    tokens: int  # non-pad input tokens
    padded: int  # input tokens with padding: what the model computed
    rows: int  # rows of the micro-batches
    stop: bool  # a stop signal reached some process


def begin(acc, config, model, scheduler, total_steps: int, windows_per_epoch: int, batches_per_epoch: int,
          fingerprints: dict | None = None, **extra) -> "LoopState":
    """A fresh trainer state, or the one of the checkpoint to resume from (``--resume_from_checkpoint``
    or the latest in ``output_dir``: weights, optimizer and scheduler restored); writes config.yaml
    and starts the trackers. ``fingerprints``: of the training and validation data (:func:`rundir.check_data`);
    ``extra`` goes into the state (e.g. counts of dropped examples)."""
    acc.ftkit_scheduler = scheduler  # saved and loaded by checkpoint.save() / load() as JSON
    state = {"global_step": 0, "epoch": 0, "batches_in_epoch": 0, "samples_seen": 0, "tokens_seen": 0, **extra}
    rundir.lock(config, acc.is_main_process)  # one run at a time in output_dir
    rundir.set_aside_earlier_run(config, acc)  # a fresh run (e.g. overwrite_output_dir): the earlier one's files
    checkpoint.register_trainable_only_hooks(acc)  # checkpoints hold the trainable weights only
    resume_path = checkpoint.resolve_resume_path(config)
    if resume_path:
        plugin = acc.state.deepspeed_plugin  # checked before loading: the launcher's count and DeepSpeed stage
        rundir.check_launch(resume_path, acc.num_processes, plugin.zero_stage if plugin is not None else None)
        rundir.check_not_past(resume_path, total_steps, "max_steps" if config.max_steps > 0 else "num_train_epochs")
        state.update(checkpoint.load(acc, config, resume_path))
        if config.ignore_data_skip:  # the epoch again from its first batch, or the next one if it was complete
            epoch_batches = state.get("epoch_windows", windows_per_epoch) * config.gradient_accumulation_steps
            complete = state["batches_in_epoch"] >= epoch_batches
            state["epoch"], state["batches_in_epoch"] = state["epoch"] + complete, 0
    elif config.resume_from_checkpoint == "latest":
        logger.info("resume_from_checkpoint=latest: no checkpoint in %s yet, starting fresh", config.output_dir)
    state["epoch_windows"] = windows_per_epoch  # optimizer steps in an epoch of this data
    state.update(fingerprints or {})
    if acc.is_main_process:
        rundir.save_config(config, os.path.join(config.output_dir, "config.yaml"))
    return LoopState(acc, config, model, state, resume_path, total_steps, windows_per_epoch, batches_per_epoch)


class LoopState:
    """The counting and deciding around a script's loop; the script itself trains. ``state`` is the trainer state
    saved in every checkpoint (global step, epoch, position in the epoch, samples and tokens seen, best metric). Per
    optimizer step the loop makes two host syncs, none per micro-batch: :meth:`count`'s all-reduce and
    :meth:`finite`'s check of the gradient norm (tests/test_loop.py counts them); the loss sums stay on the device
    until a log event."""

    def __init__(self, acc, config, model, state, resume_path, total_steps, windows_per_epoch, batches_per_epoch):
        from tqdm.auto import tqdm

        self.acc, self.config, self.state, self.resume_path = acc, config, state, resume_path
        self.total_steps, self.windows_per_epoch = total_steps, windows_per_epoch
        self.batches_per_epoch = batches_per_epoch
        self.log_ = tracking.start(acc, config, state)
        self.speed = tracking.Throughput(acc.unwrap_model(model), tracking.peak_tflops(config), acc.num_processes)
        # the loss summed since the last log event; a checkpoint keeps it, so a resumed run logs the same means
        pending, self.loss_units = state.get("loss_since_log", [0.0, 0])
        self.loss_sum = torch.tensor(pending if acc.is_main_process else 0.0, device=acc.device)
        self.stop = distributed.STOP.install()  # SIGUSR1 (SLURM preemption) / SIGTERM: save and exit cleanly
        self.stop.quit_if_interrupted()
        self.stop.phase, self.first_step, self.stopped = "training", state["global_step"], False
        self.progress = tqdm(total=total_steps, initial=state["global_step"], disable=not acc.is_local_main_process)
        self.grad_norm, self.new_best, self.bad_in_a_row = None, False, 0
        self.resumed_state = json.dumps(state, sort_keys=True, default=str) if resume_path else None
        self.last_eval = None  # (step, entry) of the latest evaluation in this process
        self.stopped_early = self.early_stop(resumed=True)  # a resumed run that had stopped early stays stopped

    @property
    def step(self) -> int:
        return self.state["global_step"]

    @property
    def results(self) -> dict:
        """The trainer state for metrics.json: without the loss a resume carries over to its first log event."""
        return {k: v for k, v in self.state.items() if k != "loss_since_log"}

    def windows(self, train_dl, sampler, evaluate) -> Iterator[list]:
        """The optimizer-step windows of micro-batches until ``total_steps``, epoch after epoch, starting at a resumed
        checkpoint's position; first, the evaluation a stop signal interrupted there (:meth:`evaluate`)."""
        if self.state.get("evaluation_pending") and not self.evaluate(evaluate):
            return  # stopped again: the checkpoint keeps it pending
        while self.step < self.total_steps and not self.stopped_early:
            batches = self.epoch_batches(train_dl, sampler)
            for window in accumulation_windows(batches, self.config.gradient_accumulation_steps):
                yield window
                if self.step >= self.total_steps or self.stopped_early:
                    break
            else:  # the epoch's batches are used up (a trailing incomplete window is skipped)
                self.state["epoch"] += 1
                self.state["batches_in_epoch"] = 0
        if self.stopped_early and self.loss_units:  # the steps since the last log event, logged as at the end
            self.log_train(self.acc.ftkit_scheduler)
        self.progress.close()

    def epoch_batches(self, train_dl, sampler):
        """This epoch's micro-batches, after the ones a resumed checkpoint already used."""
        # Both: one process, accelerate overwrites the sampler's epoch with its loader's counter (and
        # a resume's skip-loader has its own); several, its shard wrapper never passes it on.
        sampler.set_epoch(self.state["epoch"])
        skip = self.state["batches_in_epoch"]
        batches = self.acc.skip_first_batches(train_dl, skip) if skip else train_dl
        batches.set_epoch(self.state["epoch"])
        if self.resume_path:  # starting the iterator draws from the RNG: restore it as it was at the save
            batches = checkpoint.restore_rng_once_started(batches, self.resume_path, self.acc.process_index)
            self.resume_path = None
        return batches

    def count(self, window: list, units) -> WindowCounts:
        """Count an optimizer step's micro-batches on all processes with ONE all-reduce (and one host
        sync, before the step's first forward): the loss denominator ``units`` (this process's share),
        samples, real and padded tokens, rows, and whether a stop signal arrived (so every rank stops at
        the same step). The counts come from the batches alone: nothing waits for a forward pass."""
        from ftkit.data import examples_in
        from ftkit.distributed import reduce_sum

        device = self.acc.device
        on_device = torch.stack([torch.as_tensor(units, device=device).long().sum(),
                                 torch.as_tensor(sum(examples_in(b) for b in window), device=device).long(),
                                 sum(b["attention_mask"].sum() for b in window).to(device).long()])
        from_shapes = [sum(b["attention_mask"].numel() for b in window), sum(len(b["attention_mask"]) for b in window),
                       int(self.stop.signal_name is not None)]  # padded tokens, rows, stop: known on the host
        *counts, stopping = reduce_sum(self.acc, torch.cat([on_device, torch.tensor(from_shapes, device=device)])).tolist()
        return WindowCounts(*counts, bool(stopping))

    def add_loss(self, loss_sum: torch.Tensor) -> None:
        self.loss_sum += loss_sum.detach()  # stays on the device until a log event: no host sync

    def finite(self, grad_norm) -> bool:
        """Take this optimizer step? A non-finite gradient norm skips it with a warning; more than
        ``max_bad_steps`` in a row stop the run with an error naming the step."""
        self.grad_norm = grad_norm
        if grad_norm is None or torch.isfinite(torch.as_tensor(grad_norm)).item():  # None: DeepSpeed checks itself
            self.bad_in_a_row = 0
            return True
        self.bad_in_a_row += 1
        step, limit = self.step + 1, self.config.max_bad_steps
        if self.bad_in_a_row > limit:
            raise RunError(f"loss or gradients not finite at step {step}: {self.bad_in_a_row} steps in a row "
                           f"(max_bad_steps {limit}); lower learning_rate or check the data")
        logger.warning("step %d: gradient norm is %s, optimizer step skipped (%d of max_bad_steps %d in a row)",
                       step, float(grad_norm), self.bad_in_a_row, limit)
        return False

    def advance(self, window: list, counts: WindowCounts) -> int:
        """Count one optimizer step over ``window``; returns the new global step."""
        self.state["global_step"] += 1
        self.state["batches_in_epoch"] += len(window)
        self.state["samples_seen"] += counts.samples
        self.state["tokens_seen"] = self.state.get("tokens_seen", 0) + counts.tokens
        self.loss_units += counts.units
        self.speed.add(counts)
        self.new_best = False
        self.progress.update(1)
        return self.step

    def log_due(self) -> bool:
        return log_due(self.config, self.step, self.total_steps)

    def log_train(self, scheduler) -> None:
        """Log the mean loss since the last log event (all processes), the learning rate, throughput, memory."""
        from ftkit.distributed import reduce_sum

        loss = (reduce_sum(self.acc, self.loss_sum) / self.loss_units).item()
        self.loss_sum.zero_()
        self.loss_units = 0
        entry = {"train/loss": loss, "train/lr": scheduler.get_last_lr()[0],
                 "train/epoch": self.state["epoch"] + self.state["batches_in_epoch"] / max(self.batches_per_epoch, 1),
                 **self.speed.report(self.step, self.total_steps)}
        if self.grad_norm is not None:
            entry["train/grad_norm"] = float(self.grad_norm)
        self.log(entry)
        self.progress.set_postfix(tracking.progress_fields(entry))

    def log(self, entry: dict) -> None:
        """Log an entry at this step; an evaluation's generated texts (``entry["samples"]``, rows) go to
        eval_samples.jsonl and the trackers' tables."""
        samples = entry.pop("samples", None)
        self.log_.log(entry, self.step)
        if samples:
            self.log_.log_samples(samples, self.step)

    def evaluation_due(self) -> bool:
        """Evaluate now? Every ``eval_steps``, or at the end of each epoch (the final one is separate)."""
        return evaluation_due(self.config, self.step, self.total_steps, self.epoch_end())

    def epoch_end(self) -> bool:
        """Whether this step used the epoch's last complete window."""
        return self.state["batches_in_epoch"] >= self.windows_per_epoch * self.config.gradient_accumulation_steps

    def evaluate(self, evaluate) -> bool:
        """``evaluate()`` this step, log it and rank it (:meth:`record_eval`). A stop signal during it (between two
        batches: ``distributed.Stopped``) saves the step with its evaluation pending, the next run's first act; then
        False: the script returns."""
        try:
            entry = evaluate()
        except distributed.Stopped:
            self.state["evaluation_pending"] = True
            self.save_and_stop()
            return False
        self.state.pop("evaluation_pending", None)
        self.log(entry)
        self.record_eval(entry)
        return True

    def record_eval(self, entry: dict) -> None:
        """Rank an evaluation by ``metric_for_best_model``; a new best makes a save due now; ``early_stopping_patience``
        evaluations in a row without an improvement end the loop (the script's final evaluation reuses this one)."""
        self.new_best = record_eval(self.state, entry, self.config)
        self.last_eval = (self.step, entry)
        self.stopped_early = self.early_stop()

    def early_stop(self, resumed: bool = False) -> bool:
        """Whether ``early_stopping_patience`` ends the run now; noted in the state as ``early_stopped_at`` (a resumed
        run decides again from its scores, so a larger patience goes on)."""
        due = early_stop_due(self.config, self.state)
        self.state.pop("early_stopped_at", None)
        if not due:
            return False
        self.state["early_stopped_at"] = self.step
        if self.acc.is_main_process and (not resumed or self.step < self.total_steps):
            step, value, _ = last_improvement(self.state["scores"], greater_is_better(self.config),
                                              self.config.early_stopping_threshold)
            by = f" by more than {self.config.early_stopping_threshold:g}" if self.config.early_stopping_threshold else ""
            why = (f"eval/{self.config.metric_for_best_model} has not improved{by} on {value:.6g} (step {step}) for "
                   f"{self.config.early_stopping_patience} evaluation(s)")
            print(f"[ftkit] this run stopped early at step {self.step}: {why}; raise early_stopping_patience to train on"
                  if resumed else f"[ftkit] early stopping at step {self.step}: {why}", flush=True)
        return True

    def final_evaluation(self, evaluate) -> dict:
        """The evaluation that ends training, logged: ``evaluate()``'s entry, or the one this step has just had (when
        early stopping ended the loop)."""
        if self.last_eval is not None and self.last_eval[0] == self.step:
            return self.last_eval[1]
        entry = evaluate()
        self.log(entry)
        return entry

    def save_due(self) -> bool:
        """Save now? Every ``save_steps`` (or epoch) and at each new best (the last checkpoint is :meth:`finish`'s)."""
        due = save_due(self.config, self.step, self.total_steps, self.epoch_end()) or self.new_best
        return due and self.step < self.total_steps and not self.stopped_early  # else finish() saves

    def save(self) -> str:
        """A checkpoint of this step (all processes call it), with the loss summed since the last log event."""
        self.note_pending_loss()
        return checkpoint.save(self.acc, self.config, self.state)

    def note_pending_loss(self) -> None:
        from ftkit.distributed import reduce_sum

        self.state["loss_since_log"] = [reduce_sum(self.acc, self.loss_sum).item(), self.loss_units]

    def stop_if_signalled(self) -> bool:
        """After the loop, before the final evaluation: if a stop signal reached any process during the last optimizer
        step (after the loop's own check), save that step and stop (True: the script returns); the final evaluation
        and export are then the next run's. One all-reduce; every process calls it. A signal after it no longer stops
        the run: what is left is the evaluation and export, which a requeued run would have to do again."""
        if self.stopped:  # already (an evaluation the stopped run left pending was stopped again)
            return True
        self.stop.phase = "over"
        if distributed.signalled(self.acc):
            self.save_and_stop()
            return True
        return False

    def save_and_stop(self) -> None:
        """A stop signal: save the last completed step, say how to go on; the script returns (exit 0). Before this run's
        first optimizer step nothing is saved: the checkpoint it resumed from (or none) is where the next run starts.
        With ``FTKIT_STOPPED_FILE`` set (launch/slurm/job.sh sets it), the main process writes the step there once the
        checkpoint is saved: the job is requeued only if the run stopped before its end."""
        self.progress.close()
        self.stopped = True
        fresh = self.step == self.first_step  # no optimizer step in this run: nothing new to save
        path = None if fresh else self.save()
        if self.acc.is_main_process:
            by = self.stop.signal_name or "a signal on another rank"
            print(f"[ftkit] stopped by {by} before the first optimizer step of this run: nothing new to save; run the "
                  f"same command again to {'resume from step %d' % self.step if self.step else 'start'}" if fresh else
                  f"[ftkit] stopped by {by} at step {self.step}: checkpoint {path} saved; run the same command again "
                  f"to resume", flush=True)
            distributed.note_stopped(self.step)
        distributed.end(self.acc)

    def finish(self, final_eval: dict | None = None) -> bool:
        """The last checkpoint; with a best-model metric, rank the final evaluation and reload the best (True if that
        is not the last step's)."""
        if final_eval is not None:
            record_eval(self.state, final_eval, self.config)
        self.note_pending_loss()
        if json.dumps(self.state, sort_keys=True, default=str) != self.resumed_state:  # else: a finished run again
            checkpoint.save(self.acc, self.config, self.state)
        if final_eval is not None and self.config.load_best_model_at_end:
            return checkpoint.load_best(self.acc, self.config, self.state)
        return False

    def close(self) -> None:
        """Close the trackers, draw the curves (and the --debug summary)."""
        self.log_.finish(self.state)
        if self.stop.signal_name is not None and self.acc.is_main_process:
            print(f"[ftkit] {self.stop.signal_name} came after the last optimizer step: the run finished its "
                  f"evaluation and export (nothing to resume)", flush=True)


def log_due(config, step: int, total_steps: int) -> bool:
    return step % config.logging_steps == 0 or step == total_steps


def evaluation_due(config, step: int, total_steps: int, epoch_end: bool) -> bool:
    """Evaluate after ``step``? Every ``eval_steps``, at each epoch's end, or never (``no``); the final evaluation is the
    script's."""
    strategy = getattr(config, "eval_strategy", "steps")
    if step >= total_steps or strategy == "no":
        return False
    if strategy == "epoch":
        return epoch_end
    return bool(config.eval_steps) and step % config.eval_steps == 0


def save_due(config, step: int, total_steps: int, epoch_end: bool) -> bool:
    """A checkpoint by the ``save_strategy`` cadence (the last one is saved at the end, others at each new best)."""
    if step >= total_steps:
        return False
    if getattr(config, "save_strategy", "steps") == "epoch":
        return epoch_end
    return bool(config.save_steps) and step % config.save_steps == 0


def planned(config, total_steps: int, windows_per_epoch: int) -> dict:
    """The steps after which a fresh run evaluates and saves by its cadence, and its number of log events."""
    steps = range(1, total_steps + 1)
    return {"evaluation_steps": [s for s in steps if evaluation_due(config, s, total_steps, s % windows_per_epoch == 0)],
            "save_steps": [s for s in steps if save_due(config, s, total_steps, s % windows_per_epoch == 0)],
            "log_events": sum(log_due(config, s, total_steps) for s in steps)}


def greater_is_better(config) -> bool:
    """Whether a higher metric_for_best_model is better (default: unless it is a loss)."""
    if config.greater_is_better is not None:
        return config.greater_is_better
    return not config.metric_for_best_model.endswith("loss")


def evaluations_without_improvement(scores: dict, greater: bool, threshold: float = 0.0) -> int:
    """Evaluations since the last one that beat the best before it by more than ``threshold`` (the first one counts as
    an improvement). ``scores`` maps a step (as a string) to its metric."""
    return last_improvement(scores, greater, threshold)[2]


def last_improvement(scores: dict, greater: bool, threshold: float = 0.0) -> tuple:
    """(step, value) of the last evaluation that counted as an improvement, and the evaluations since."""
    best, count = (None, None), 0
    for step in sorted(scores, key=int):
        value = scores[step]
        if best[1] is None or (value - best[1] if greater else best[1] - value) > threshold:
            best, count = (int(step), value), 0
        else:
            count += 1
    return (*best, count)


def early_stop_due(config, state: dict) -> bool:
    """``early_stopping_patience`` evaluations in a row without an improvement (from the scores in ``state``)."""
    patience = getattr(config, "early_stopping_patience", None)
    return bool(patience) and evaluations_without_improvement(
        state.get("scores", {}), greater_is_better(config), config.early_stopping_threshold) >= patience


def record_eval(state: dict, metrics: dict, config) -> bool:
    """Note an evaluation's ``metric_for_best_model`` in ``state``; True when it is a new best. ``metrics`` holds
    ``eval/<name>`` keys. Every score is kept in ``state["scores"]``, so that the checkpoint rotation keeps the best
    checkpoints; a save is due at each new best."""
    key = f"eval/{config.metric_for_best_model}"
    if key not in metrics:
        names = ", ".join(k.split("/", 1)[1] for k in metrics)
        raise ConfigError(f"metric_for_best_model: {config.metric_for_best_model!r} is not computed (metrics: {names})")
    value, best = float(metrics[key]), state.get("best_metric")
    better = best is None or (value > best if greater_is_better(config) else value < best)
    state.setdefault("scores", {})[str(state["global_step"])] = value
    state["greater_is_better"] = greater_is_better(config)
    if better:
        state["best_metric"] = value
        state["best_step"] = state["global_step"]
        state["best_checkpoint"] = checkpoint.step_path(config, state["global_step"])
    return better
