"""Checkpoint files: atomic save, rotation, resume matching and loading, RNG state, export (and --predict's config
from an export).
Not here: when to save or evaluate, the trainer state's counters (loop.py); what a run finds in and leaves in its
output_dir (rundir.py).

``checkpoints/step_<N>/`` is written as ``.tmp_step_<N>`` and renamed when whole (``trainer_state.json``
last); rotation renames to ``.trash_step_<N>`` before deleting: a kill never leaves a partial ``step_<N>``."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import sys

import numpy as np
import torch
from accelerate.utils import DistributedType

from ftkit.config import ConfigError, RunError, build, load_yaml_recipe, not_found, to_dict

logger = logging.getLogger("ftkit")

STATE_FILE = "trainer_state.json"
SCHEDULER_FILE = "scheduler.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")

# Options that change where/how a run is reported or resumed, not what it computes.
NON_TRAINING_KEYS = {
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "report_to", "project_name", "run_name", "tags",
    "group", "peak_tflops", "logging_steps", "save_steps", "save_total_limit", "dataloader_num_workers",
    "dataloader_pin_memory", "debug", "preprocessing_num_workers", "predict", "adapter", "input_file", "text",
    "prediction_file", "merge_adapter", "num_test_compare", "num_eval_generate", "model", "text_pair", "eval_on_train",
    "preflight", "device_memory_gb", "preflight_device", "assumed_mfu", "preflight_num_processes", "ddp_timeout",
    "save_strategy", "ignore_data_skip", "per_device_eval_batch_size",
}
# Options a resumed run may change (extending a run, evaluating more often): the learning-rate
# schedule is re-planned from the checkpoint's step. Any other training option refuses the resume.
RESCHEDULE_KEYS = {"max_steps", "num_train_epochs", "eval_strategy", "eval_steps", "save_steps", "logging_steps",
                   "save_total_limit", "early_stopping_patience", "early_stopping_threshold"}


def config_hash(config, legacy: bool = False) -> str:
    """Hash of the options that define the training computation (for resume matching). ``legacy``: the hash of
    checkpoints written before RESCHEDULE_KEYS existed (it includes them)."""
    skip = NON_TRAINING_KEYS if legacy else NON_TRAINING_KEYS | RESCHEDULE_KEYS
    data = {k: v for k, v in to_dict(config).items() if k not in skip}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_changes(previous, current) -> tuple[list, list]:
    """(changes a resume allows, changes it refuses) between two configs, each as (key, old, new)."""
    old, new = to_dict(previous), to_dict(current)
    changes = [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
               if k not in NON_TRAINING_KEYS and old.get(k) != new.get(k)]
    return [c for c in changes if c[0] in RESCHEDULE_KEYS], [c for c in changes if c[0] not in RESCHEDULE_KEYS]


def checkpoints_dir(config) -> str:
    return os.path.join(config.output_dir, "checkpoints")


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints in ``output_dir`` as (step, path), oldest first."""
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(root, name, STATE_FILE)):
            found.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(found)


def explicit_checkpoint(config) -> bool:
    """Whether ``resume_from_checkpoint`` names a directory; it must hold a complete checkpoint."""
    requested = config.resume_from_checkpoint
    if requested in (None, "latest"):
        return False
    if os.path.isfile(os.path.join(requested, STATE_FILE)):
        return True
    if not os.path.isdir(requested):
        raise ConfigError(f"resume_from_checkpoint: no such directory: {requested} (or 'latest': output_dir's own)")
    folder = os.path.normpath(requested)  # a run's output_dir, or its checkpoints/ folder?
    found = [path for _, path in reversed(list_checkpoints(os.path.dirname(folder) if os.path.basename(folder) ==
                                                           "checkpoints" else folder))]
    if found:
        others = "".join(", " + path for path in found[1:3]) + (", ..." if found[3:] else "")
        raise ConfigError(f"resume_from_checkpoint: {requested} holds checkpoints but is not one; name one of them: "
                          f"{found[0]} (the latest){others}")
    raise ConfigError(f"resume_from_checkpoint: {requested} is incomplete (no {STATE_FILE})")


def resolve_resume_path(config) -> str | None:
    """The checkpoint to resume from: explicit path, 'latest', or automatic when output_dir has one."""
    if explicit_checkpoint(config):
        return config.resume_from_checkpoint
    found = list_checkpoints(config.output_dir)
    return found[-1][1] if found else None


# --- Trainable-only model state (LoRA adapters, partly frozen models) -----------------------------


def register_trainable_only_hooks(accelerator) -> None:
    """Store only trainable weights in checkpoints, and load them back strictly. A 4-bit base model's state dict
    carries bitsandbytes quantization-state entries that a strict load rejects, and a frozen base needs no copy in
    every checkpoint: the frozen weights come from the base model at resume."""
    from safetensors.torch import load_file

    def trainable_names(model):  # names as in the unwrapped model's state dict (no DDP "module.")
        return {n for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}

    def save_hook(models, weights, output_dir):
        for i, model in enumerate(models):
            if i < len(weights):
                keep = trainable_names(model)
                weights[i] = {k: v for k, v in weights[i].items() if k.removeprefix("module.") in keep}

    def load_hook(models, input_dir):
        for i, model in enumerate(list(models)):
            name = "model.safetensors" if i == 0 else f"model_{i}.safetensors"
            path = os.path.join(input_dir, name)
            if not os.path.isfile(path):
                raise ConfigError(f"resume_from_checkpoint: {input_dir} has no {name}")
            state = load_file(path)  # to CPU; load_state_dict copies onto the parameters' devices
            expected = trainable_names(model)
            if set(state) != expected:
                missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
                raise ConfigError(f"resume_from_checkpoint: {path} does not match the model's trainable weights "
                                  f"(missing {missing[:3]}, unexpected {extra[:3]}); was it saved by another config?")
            accelerator.unwrap_model(model).load_state_dict(state, strict=False)
        models.clear()  # loaded here; accelerate must not load them again strictly

    if accelerator.distributed_type.value != "DEEPSPEED":
        accelerator.register_save_state_pre_hook(save_hook)
        accelerator.register_load_state_pre_hook(load_hook)


# --- RNG state, restored *after* the dataloader iterator is created (creating it draws a seed) ----


def _rng_file(path, rank):
    return os.path.join(path, f"rng_state_{rank}.safetensors")


def save_rng(path: str, rank: int) -> None:
    from safetensors.torch import save_file

    tensors = {"torch": torch.get_rng_state(), **{f"cuda_{i}": s for i, s in enumerate(
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])}}
    py_version, py_state, py_gauss = random.getstate()
    tensors["python"] = torch.tensor(py_state, dtype=torch.int64)
    np_state = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    meta = {"python_version": str(py_version), "python_gauss": json.dumps(py_gauss),
            "numpy_pos": str(np_state[2]), "numpy_has_gauss": str(np_state[3]), "numpy_gauss": repr(np_state[4])}
    save_file(tensors, _rng_file(path, rank), metadata=meta)


def restore_rng(path: str, rank: int) -> None:
    from safetensors import safe_open

    file = _rng_file(path, rank)
    if not os.path.isfile(file):
        return
    with safe_open(file, framework="pt") as f:
        meta = f.metadata()
        torch.set_rng_state(f.get_tensor("torch"))
        if torch.cuda.is_available():
            states = [f.get_tensor(k) for k in sorted(k for k in f.keys() if k.startswith("cuda_"))]
            if len(states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states)
        random.setstate((int(meta["python_version"]), tuple(f.get_tensor("python").tolist()),
                         json.loads(meta["python_gauss"])))
        np.random.set_state(("MT19937", f.get_tensor("numpy").numpy().astype(np.uint32),
                             int(meta["numpy_pos"]), int(meta["numpy_has_gauss"]), float(meta["numpy_gauss"])))


def restore_rng_once_started(batches, path: str, rank: int):
    """Iterate ``batches``, restoring the checkpoint's RNG state right after the first batch. Starting a DataLoader
    iterator draws a seed from the global RNG, and accelerate's dataloader only starts its inner iterator at the first
    ``next()``. The uninterrupted run drew that seed at the start of the epoch, so the saved RNG state must be put
    back after it, or dropout masks (e.g. LoRA dropout) differ from the uninterrupted run."""
    iterator = iter(batches)
    try:
        first = next(iterator)
    except StopIteration:  # saved at the very end of an epoch: the next epoch must see the saved state
        restore_rng(path, rank)
        return
    restore_rng(path, rank)
    yield first
    yield from iterator


# --- Save / load ----------------------------------------------------------------------------------


def check_finite_weights(model, step: int) -> None:
    """Refuse to checkpoint non-finite weights (they would poison every resume)."""
    for name, p in model.named_parameters():
        if p.requires_grad and p.numel() and not torch.isfinite(p.detach()).all():
            raise RunError(f"weights not finite at step {step} ({name}): checkpoint not saved")


def step_path(config, step: int) -> str:
    return os.path.join(checkpoints_dir(config), f"step_{step}")


def save(accelerator, config, state: dict) -> str:
    """Atomically write ``checkpoints/step_<global_step>`` and rotate old ones. All ranks call this."""
    root = checkpoints_dir(config)
    step = state["global_step"]
    final = step_path(config, step)
    tmp = os.path.join(root, f".tmp_step_{step}")
    if accelerator.distributed_type.value != "DEEPSPEED":
        for model in accelerator._models:
            check_finite_weights(accelerator.unwrap_model(model), step)
    try:
        if accelerator.is_main_process:
            for name in os.listdir(root) if os.path.isdir(root) else []:
                if name.startswith(".trash_"):  # leftover of a run killed while deleting
                    shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            shutil.rmtree(tmp, ignore_errors=True)  # leftover of a crashed save
            os.makedirs(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(tmp)
        save_rng(tmp, accelerator.process_index)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            scheduler = getattr(accelerator, "ftkit_scheduler", None)
            if scheduler is not None:
                with open(os.path.join(tmp, SCHEDULER_FILE), "w") as f:
                    json.dump(scheduler.state_dict(), f)
            with open(os.path.join(tmp, STATE_FILE), "w") as f:
                plugin = accelerator.state.deepspeed_plugin
                json.dump({**state, "config_hash": config_hash(config), "num_processes": accelerator.num_processes,
                           "zero_stage": plugin.zero_stage if plugin is not None else None}, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
    except Exception as e:  # no half checkpoint stays behind, whatever stopped the save
        shutil.rmtree(tmp, ignore_errors=True)
        # writers report a full disk as OSError (torch, json), SafetensorError or RuntimeError
        text = str(e)
        if not (isinstance(e, OSError) or "os error" in text or "No space left" in text or "failed writing" in text):
            raise
        reason = e.strerror if isinstance(e, OSError) and e.strerror else text.splitlines()[0][-120:]
        kept = list_checkpoints(config.output_dir)
        raise RunError(f"cannot write checkpoint step_{step} in {root}: {reason}; nothing half-written is left, "
                       f"the last complete checkpoint is {os.path.basename(kept[-1][1]) if kept else 'none'}") from None
    if accelerator.is_main_process:
        _replace(tmp, final)
        _rotate(root, config.save_total_limit, state.get("scores"), state.get("greater_is_better", True))
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def _rotate(root: str, limit: int | None, scores: dict | None = None, greater: bool = True) -> None:
    """Keep the last ``limit`` checkpoints and, among those scored by an evaluation, the best ``limit``. ``scores``
    maps a step (as a string, from trainer_state.json) to its ``metric_for_best_model``."""
    if not limit:
        return
    found = list_checkpoints(os.path.dirname(root))
    scored = [(scores[str(step)], step) for step, _ in found if scores and str(step) in scores]
    best = {step for _, step in sorted(scored, key=lambda t: -t[0] if greater else t[0])[:limit]}
    for step, path in found[:-limit]:
        if step not in best:
            shutil.rmtree(_to_trash(path), ignore_errors=True)


def _to_trash(path: str) -> str:
    """Rename ``path`` (if it exists) to a hidden ``.trash_`` name, which nothing resumes from, and return
    that name: deleting it afterwards, a kill at any moment leaves the folder whole or gone, never half."""
    parent, name = os.path.split(path.rstrip(os.sep))
    trash = os.path.join(parent, f".trash_{name}")
    shutil.rmtree(trash, ignore_errors=True)  # leftover of an earlier kill
    if os.path.exists(path):
        os.rename(path, trash)
    return trash


def _replace(tmp: str, final: str) -> None:
    """Put the complete folder ``tmp`` in place of ``final``; the old one is deleted only afterwards."""
    trash = _to_trash(final)
    os.rename(tmp, final)
    shutil.rmtree(trash, ignore_errors=True)


def _replan_learning_rates(scheduler) -> None:
    """Set the optimizer's learning rates from the scheduler's current plan at the checkpoint's step. The loaded
    optimizer holds the rate the *old* plan chose for the next step; after a resume with another ``max_steps`` /
    ``num_train_epochs`` the plan (the scheduler's lambdas, built for the new total) says otherwise. With an unchanged
    plan this writes back the same numbers."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if not lambdas:
        return
    rates = [base * f(scheduler.last_epoch) for base, f in zip(scheduler.base_lrs, lambdas)]
    for group, rate in zip(scheduler.optimizer.param_groups, rates):
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(rate)
        else:
            group["lr"] = rate
    scheduler._last_lr = rates


def _deepspeed_safe_globals() -> list:
    """The few DeepSpeed classes its ZeRO optimizer-state files pickle (plain data, no code)."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def _weights_only_loads(path: str):
    """Every ``torch.load`` inside runs with ``weights_only=True``. accelerate already loads its own files that way,
    but DeepSpeed's checkpoint engine asks for ``weights_only=False`` (full unpickling). Here its request is
    overridden and only the plain-data DeepSpeed classes above are allowed, so a tampered checkpoint cannot run code
    on load."""
    original = torch.load
    allowed = _deepspeed_safe_globals()

    def load_weights_only(f, *args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed):
            try:
                return original(f, *args, **kwargs)
            except pickle.UnpicklingError as e:
                what = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
                raise RunError(f"checkpoint {path}: {f} holds a pickled object that is not plain data "
                               f"({what}); ftkit does not unpickle arbitrary objects") from None

    torch.load = load_weights_only
    try:
        yield
    finally:
        torch.load = original


def _load_state(accelerator, config, path: str) -> None:
    kwargs = {}
    if accelerator.distributed_type == DistributedType.DEEPSPEED and (getattr(config, "load_in_4bit", False)
                                                                      or getattr(config, "load_in_8bit", False)):
        # DeepSpeed's module file also holds the bitsandbytes quant-state entries (absmax, quant_map...)
        # of the frozen base layers, which a strict load rejects; the weights themselves load as usual
        kwargs["load_module_strict"] = False
    with _weights_only_loads(path):
        accelerator.load_state(path, **kwargs)
    scheduler, file = getattr(accelerator, "ftkit_scheduler", None), os.path.join(path, SCHEDULER_FILE)
    if scheduler is not None and os.path.isfile(file):
        with open(file) as f:
            scheduler.load_state_dict(json.load(f))
        _replan_learning_rates(scheduler)


def read_state(path: str) -> dict:
    """The trainer state of the checkpoint at ``path`` (its trainer_state.json)."""
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)


def load(accelerator, config, path: str) -> dict:
    """Restore model/optimizer/scheduler state from ``path``; returns its trainer state."""
    state = read_state(path)
    from ftkit.rundir import check_config_of  # (rundir imports this module)

    check_config_of(config, path, state)
    _load_state(accelerator, config, path)
    logger.info("resumed from %s (step %d, epoch %d, batch %d)", path, state["global_step"], state["epoch"],
                state["batches_in_epoch"])
    return state


def load_best(accelerator, config, state: dict) -> bool:
    """Load the best checkpoint's weights back (``load_best_model_at_end``); False (a no-op) if the last is best."""
    best = state.get("best_checkpoint")
    if not best or state.get("best_step") == state["global_step"]:
        return False
    here = step_path(config, state["best_step"])  # this output_dir's, wherever the run was when it saved it (a
    if os.path.isfile(os.path.join(here, STATE_FILE)):  # run folder moved or copied elsewhere); else where it was
        best = here  # saved: another run's, resumed into this output_dir
    if not os.path.isfile(os.path.join(best, STATE_FILE)):
        logger.warning("best checkpoint %s is missing: keeping the last weights", best)
        return False
    _load_state(accelerator, config, best)
    logger.info("loaded the best checkpoint %s (%s = %.4f)", best, config.metric_for_best_model, state["best_metric"])
    return True


# --- Export: output_dir/final ---------------------------------------------------------------------


def export(accelerator, model, tokenizer, config, name: str = "final", **save_kwargs) -> str:
    """Write ``output_dir/<name>``: model (or adapter) + tokenizer + the run's config, atomically. Every rank calls it
    (gathering the state dict is collective under ZeRO-3); rank 0 writes to a temporary folder and renames it, so
    ``final/`` is never half written."""
    from ftkit.rundir import save_config  # (rundir imports this module)

    accelerator.wait_for_everyone()
    final = os.path.join(config.output_dir, name)
    tmp = os.path.join(config.output_dir, f".tmp_{name}")
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict, safe_serialization=True,
                                                        **save_kwargs)
        tokenizer.save_pretrained(tmp)
        save_config(config, os.path.join(tmp, "ftkit_config.yaml"))
        _replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def with_saved_run(cls, config, key: str, marker: str | tuple):
    """A ``--predict`` config: the trained model or adapter in ``config.<key>`` (a directory holding ``marker``, or
    one of them), and the training run's options saved there under what the user set now."""
    directory, markers = getattr(config, key), (marker,) if isinstance(marker, str) else marker
    exported = lambda folder: any(os.path.isfile(os.path.join(folder, m)) for m in markers)  # noqa: E731
    if exported(os.path.join(directory, "final")):  # a run's output_dir: the model it exported
        directory = os.path.join(directory, "final")
        setattr(config, key, directory)
        object.__setattr__(config, "explicit", {**getattr(config, "explicit", {}), key: directory})
    elif not exported(directory):
        found = list_checkpoints(directory)  # a run's output_dir with no final/ yet: its latest checkpoint
        ckpt = directory if os.path.isfile(os.path.join(directory, STATE_FILE)) else found[-1][1] if found else None
        if ckpt is None and not os.path.isdir(directory):
            raise ConfigError(f"{key}: {directory} is a file, not a trained output_dir/final") if os.path.exists(
                directory) else not_found(f"{key}: no such directory", directory)
        if ckpt is None:
            raise ConfigError(f"{key}: {directory} holds no {' or '.join(markers)} (expected a trained output_dir/final)")
        what = ("a training checkpoint (trainable weights and optimizer state)," if ckpt == directory else
                f"a run's output_dir with no final/ yet; its latest checkpoint {ckpt} is")
        raise ConfigError(f"{key}: {directory} is {what} not a model; export it with the training command plus "
                          f"--resume_from_checkpoint {ckpt} --max_steps {read_state(ckpt).get('global_step', 'N')} "
                          f"--output_dir NEW_DIR, then name NEW_DIR/final")
    from ftkit.rundir import check_output_path, written_by  # (rundir imports this module)
    check_output_path("prediction_file", config.prediction_file)
    if config.prediction_file and config.input_file and os.path.exists(config.prediction_file) and os.path.samefile(
            config.prediction_file, config.input_file):
        raise ConfigError(f"prediction_file: {config.prediction_file} is the input_file; writing it would replace the "
                          f"input: name another file")
    saved = os.path.join(directory, "ftkit_config.yaml")
    if not os.path.isfile(saved):
        return config
    values, this, trainer = load_yaml_recipe(saved), os.path.basename(sys.argv[0]), written_by(saved)
    foreign = [k for k in values if k not in {f.name for f in dataclasses.fields(cls)}]
    if foreign and trainer != this:  # (the same script: an option since removed, named by build below)
        raise ConfigError(f"{key}: {directory} was trained by {trainer or 'another ftkit script'}, not {this} (its "
                          f"options include {foreign[0]!r}): predict with "
                          + (f"python scripts/{trainer} --predict" if trainer else "the script that trained it"))
    return build(cls, {**values, **getattr(config, "explicit", {})}, where=saved)
