"""The output directory a run finds: another run's config (refused, or set aside with ``overwrite_output_dir``), a
checkpoint to resume, the launch and the training data that wrote it, a run that would end before that checkpoint; all
checked before any model is loaded; output paths that cannot be written; the plain files a run writes (config.yaml,
jsonl predictions) and --predict's input file. Not here: the checkpoint files themselves (checkpoint.py)."""

from __future__ import annotations

import dataclasses
import fcntl
import itertools
import json
import logging
import os
import socket
import sys
import time

import yaml

from ftkit.checkpoint import (RESCHEDULE_KEYS, config_changes, config_hash, explicit_checkpoint, list_checkpoints,
                              read_state, resolve_resume_path)
from ftkit.config import ConfigError, build, load_yaml_recipe, to_dict
from ftkit.data import load_local_file, require_columns
from ftkit.distributed import launch_processes, launch_zero_stage

logger = logging.getLogger("ftkit")


_LOCK = []  # this process's open lock file: the OS releases its lock when the process ends, kill -9 included
SAME_JOB_WAIT_S = 600  # how long a requeued SLURM job waits for the lock its earlier run (same job id) still holds


def _holder(f) -> dict:
    f.seek(0)
    try:
        return json.loads(f.read())
    except ValueError:
        return {}  # its holder has not written it yet


def lock(config, main: bool) -> None:
    """One run at a time in an ``output_dir``: the run's main process (``main``, global rank 0) holds an exclusive
    lock on ``output_dir/.ftkit.lock`` until it ends. A second run started there (a job submitted twice) would resume
    the same checkpoint and overwrite the first's files as they are written; it is refused, naming the first, before
    it trains or moves anything (a run refused earlier, by bad input, leaves no lock file). A requeued SLURM job
    whose earlier run holds the lock (same job id: after a node failure a network filesystem keeps the lock of the
    dead node for a lease time) waits for it up to SAME_JOB_WAIT_S. On a filesystem without locks, a warning."""
    if _LOCK or not main:
        return
    os.makedirs(config.output_dir, exist_ok=True)
    f = open(os.path.join(config.output_dir, ".ftkit.lock"), "a+")
    job, deadline, said = os.environ.get("SLURM_JOB_ID"), time.monotonic() + SAME_JOB_WAIT_S, False
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = _holder(f)
            if job and holder.get("slurm_job") == job and time.monotonic() < deadline:
                if not said:
                    logger.warning("output_dir: the earlier run of SLURM job %s (pid %s on %s) still holds %s; waiting "
                                   "up to %d s for it to end", job, holder.get("pid"), holder.get("host"),
                                   config.output_dir, SAME_JOB_WAIT_S)
                    said = True
                time.sleep(1)
                continue
            f.close()
            who = (f"pid {holder['pid']} on {holder['host']}" + (f", SLURM job {holder['slurm_job']}"
                                                                 if holder.get("slurm_job") else "")
                   + f", started {holder['started']}") if holder else "its holder's details are not written yet"
            raise ConfigError(f"output_dir: {config.output_dir} is in use by another run ({who}); wait for it to end, "
                              f"or choose another output_dir") from None
        except OSError as e:
            f.close()
            logger.warning("output_dir: %s cannot be locked (%s): a second run started there is not refused",
                           config.output_dir, e.strerror)
            return
    f.seek(0)
    f.truncate()
    json.dump({"pid": os.getpid(), "host": socket.gethostname(), "slurm_job": job,
               "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
    f.flush()
    _LOCK.append(f)


def check_output_path(key: str, path: str | None, directory: bool = False) -> None:
    """An output ``path`` (a file, or a ``directory``) that can be written where it is named: not a directory where a
    file is meant, and no file where one of its folders would have to be made. One line now, not a traceback after the
    model has loaded (and, for predictions, run)."""
    if path is None:
        return
    if not path.strip():  # e.g. an unset shell variable: "" would be the current directory
        raise ConfigError(f"{key}: empty; name a {'directory' if directory else 'file'}")
    full = os.path.abspath(path)
    if not directory and os.path.isdir(full):
        raise ConfigError(f"{key}: {path} is a directory; name a file")
    existing = full if directory else os.path.dirname(full)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        made = "is a file, not a directory" if existing == full else f"cannot be made: {existing} is a file"
        raise ConfigError(f"{key}: {path} {made}")


def save_config(config, path: str) -> None:
    """The resolved config as YAML at ``path`` (config.yaml; ftkit_config.yaml of an export), written atomically."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"{WRITTEN_BY}{os.path.basename(sys.argv[0])}\n")  # which script: --predict names it if another reads it
        yaml.safe_dump(to_dict(config), f, sort_keys=False)
    os.replace(tmp, path)


WRITTEN_BY = "# ftkit config, written by "


def written_by(path: str) -> str | None:
    """The script that wrote the config at ``path`` (:func:`save_config`'s first line), or None."""
    with open(path, encoding="utf-8") as f:
        first = f.readline().strip()
    return first[len(WRITTEN_BY):] if first.startswith(WRITTEN_BY) else None


def write_jsonl(path: str, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def predict_input(config, columns: dict, gold: str, complete: tuple = ()) -> tuple:
    """``--predict``'s ``--input_file``, read as the run read its data, with the model's input ``columns`` (option ->
    column) and the gold column of option ``gold`` where it holds values (then scored: returns ``(rows, True)``).
    Options in ``complete`` need a value in every row."""
    ds = load_local_file(config.input_file, "input_file", config.column_names, config.file_format)
    column = getattr(config, gold)
    scored = column in ds.column_names and ds.with_format("arrow")[column].null_count < len(ds)  # not all empty
    require_columns(ds, {**columns, **({gold: column} if scored else {})}, config.input_file, complete)
    return ds, scored


def rows_of(columns: dict) -> list[dict]:
    """Rows (for a jsonl file) of ``columns`` (name -> values of equal length), those given as None left out."""
    kept = {name: values for name, values in columns.items() if values is not None}
    return [dict(zip(kept, row)) for row in zip(*kept.values())]


def write_or_print(path: str | None, rows: list[dict], lines: list[str], what: str, scores: str | None = None) -> None:
    """``--predict``'s output: ``rows`` as jsonl to ``path`` (``--prediction_file``; its folder made), else ``lines``
    printed, one per input row whatever they hold (a line break inside one is written ``\\n``), so that the output can
    be pasted beside the input. ``scores`` (against the input's gold column, if it had one) go to stdout after the
    file's line, or to stderr when stdout holds the predictions."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_jsonl(path, rows)
        print(f"wrote {len(rows)} {what} to {path}")
        if scores:
            print(scores)
    else:
        if scores:
            print(scores, file=sys.stderr, flush=True)
        print("\n".join(line.replace("\r", "\\r").replace("\n", "\\n") for line in lines))


def resume_path(config) -> str | None:
    """The checkpoint this run will resume, or None (with ``overwrite_output_dir``: only one named explicitly)."""
    return resolve_resume_path(config) if explicit_checkpoint(config) or not config.overwrite_output_dir else None


def check_output_dir(config) -> None:
    """Refuse an ``output_dir`` that holds another run's config (before anything is loaded). With
    ``overwrite_output_dir`` the old run is set aside (see :func:`set_aside_earlier_run`), not resumed."""
    check_output_path("output_dir", config.output_dir, directory=True)
    explicit = explicit_checkpoint(config)  # checked now, before anything is built or loaded
    resume = resume_path(config)
    if resume:
        check_launch(resume, launch_processes(), launch_zero_stage(config))
        if config.max_steps > 0:  # with epochs the run's length is known once the data is
            check_not_past(resume, config.max_steps, "max_steps")
    check_saved_config(config, explicit)
    if resume:  # after the saved config's auto batch size is adopted
        check_config_of(config, resume)  # a checkpoint of another training config


def check_saved_config(config, explicit: bool) -> None:
    """Refuse an ``output_dir`` whose config.yaml is another run's (unless overwritten); adopt its auto batch size."""
    saved = os.path.join(config.output_dir, "config.yaml")
    if config.overwrite_output_dir or not os.path.isfile(saved):
        return
    trainer, this = written_by(saved), os.path.basename(sys.argv[0])
    if trainer not in (None, this) and not (explicit and not list_checkpoints(config.output_dir)):
        raise ConfigError(f"output_dir: {config.output_dir} holds a run of {trainer}, not {this}; choose another "
                          f"output_dir or pass --overwrite_output_dir true (the run is set aside, not deleted)")
    try:
        previous = build(type(config), load_yaml_recipe(saved), where=saved)
        adopt_auto_batch_size(previous, config)
        allowed, refused = config_changes(previous, config)
        differs = f" ({', '.join(f'{k}: {a!r} -> {b!r}' for k, a, b in refused)})" if refused else ""
    except (ConfigError, TypeError, ValueError) as e:
        allowed, refused, differs = [], [("config.yaml", None, None)], f" (unreadable: {e})"
    if refused and not (explicit and not list_checkpoints(config.output_dir)):
        raise ConfigError(f"output_dir: {config.output_dir} holds a run with a different config{differs}; "
                          f"a resume may change only {', '.join(sorted(RESCHEDULE_KEYS))}; choose another "
                          f"output_dir or pass --overwrite_output_dir true")
    if allowed and list_checkpoints(config.output_dir):
        logger.warning("resuming with a changed schedule (%s): the learning-rate schedule is re-planned from the "
                       "checkpoint's step", ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in allowed))


def _launch(zero_stage) -> str:
    return "no DeepSpeed" if zero_stage is None else f"DeepSpeed ZeRO-{zero_stage}"


def check_launch(path: str, processes: int, zero_stage: int | None | str = "unknown") -> None:
    """A checkpoint resumes only under the launch that wrote it: as many processes (the examples per optimizer step
    and the position in the epoch, in micro-batches per process, depend on them) and the same DeepSpeed ZeRO stage
    or none (each writes other files). Checkpoints written before these were recorded are not checked."""
    state = read_state(path)
    written = state.get("num_processes")
    if written and written != processes:
        raise ConfigError(f"resume_from_checkpoint: {path} was written by {written} processes and this run has "
                          f"{processes}: the examples per optimizer step (per_device_train_batch_size x "
                          f"gradient_accumulation_steps x processes) and the position in the epoch depend on it; "
                          f"resume with {written} processes, or start over with --overwrite_output_dir true")
    if "zero_stage" in state and zero_stage != "unknown" and state["zero_stage"] != zero_stage:
        raise ConfigError(f"resume_from_checkpoint: {path} was written under {_launch(state['zero_stage'])} and this "
                          f"run has {_launch(zero_stage)}; resume with the launcher config (or --deepspeed) that wrote "
                          f"it, or start over with --overwrite_output_dir true")


def check_not_past(path: str, total_steps: int, option: str) -> int:
    """A resume extends a run, it cannot shorten one: the checkpoint must not be past the run's last step (returns
    the checkpoint's step)."""
    step = read_state(path)["global_step"]
    if step > total_steps:
        raise ConfigError(f"{option}: this run ends at step {total_steps}, but the checkpoint it would resume, {path}, "
                          f"is at step {step}; a resume can only extend a run: raise {option}, or start over in another "
                          f"output_dir or with --overwrite_output_dir true")
    return step


def check_config_of(config, path: str, state: dict | None = None) -> None:
    """Refuse a checkpoint written with another training config: its config hash differs and the config.yaml of its
    output_dir does not train as ``config`` does (a hash from an earlier ftkit, without the options added since, is
    fine when that config.yaml matches)."""
    state = read_state(path) if state is None else state
    if config.overwrite_output_dir or state.get("config_hash") in (config_hash(config), config_hash(config, legacy=True)):
        return
    if not trains_as_saved(config, path):
        raise ConfigError(f"resume_from_checkpoint: {path} was written with a different config (compare the "
                          f"config.yaml of its output_dir); pass --overwrite_output_dir true to start over")
    logger.info("%s: its config hash is another ftkit version's; its config.yaml trains as this run does (options it "
                "did not have count at their defaults)", path)


def data_fingerprint(ds) -> dict:
    """The data as a resume checks it: its rows and a digest of every column's values in row order (the token
    ids, labels and masks the loader batches, after filtering, truncation and packing)."""
    import hashlib

    import pyarrow as pa
    import pyarrow.compute as pc

    def add(array) -> None:
        if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
            digest.update(pc.list_value_length(array).fill_null(-1).to_numpy().tobytes())
            add(pc.list_flatten(array))
        elif pa.types.is_integer(array.type) or pa.types.is_floating(array.type) or pa.types.is_boolean(array.type):
            digest.update(array.to_numpy(zero_copy_only=False).tobytes())
        else:
            digest.update(json.dumps(array.to_pylist(), default=str).encode())

    digest = hashlib.sha256()
    for table in ds.with_format("arrow").iter(batch_size=10_000):
        for name in sorted(table.column_names):
            digest.update(name.encode())
            add(table.column(name).combine_chunks())
    return {"rows": len(ds), "digest": digest.hexdigest()[:16]}


def check_data(config, train_ds, eval_ds) -> dict:
    """The fingerprints of the training and validation data (kept in every checkpoint), checked against the checkpoint
    this run resumes. Other training data (a file edited since, another hub revision, another tokenizer) would leave
    the checkpoint's position in the epoch pointing at other examples: the resume is refused, before any model is
    loaded, unless ``ignore_data_skip`` restarts the epoch from its first batch. Other validation data gets a warning:
    the best checkpoint and early stopping then compare scores of both."""
    found = {"train_data": data_fingerprint(train_ds), "eval_data": data_fingerprint(eval_ds)}
    path = resume_path(config)
    if path is None:
        return found
    state = read_state(path)
    saved = state.get("train_data")  # None: a checkpoint of an ftkit that did not record it
    if saved not in (None, found["train_data"]):
        what = _difference(saved, found["train_data"])
        if not config.ignore_data_skip:
            raise ConfigError(f"resume_from_checkpoint: {path} was trained on other training data ({what}); its "
                              f"position in the epoch would point at other examples: restore the data, pass "
                              f"--ignore_data_skip true to go on from its weights and step with this data (the epoch "
                              f"restarts from its first batch), or start over with --overwrite_output_dir true")
        logger.warning("resume_from_checkpoint: %s was trained on other training data (%s); ignore_data_skip: this "
                       "epoch restarts from its first batch on this data", path, what)
    if state.get("eval_data") not in (None, found["eval_data"]) and state.get("scores"):
        logger.warning("resume_from_checkpoint: the validation data differs from the one the %d evaluation(s) before "
                       "%s scored (%s): the best checkpoint (step %s) and early stopping compare scores of both",
                       len(state["scores"]), path, _difference(state["eval_data"], found["eval_data"]),
                       state.get("best_step"))
    return found


def _difference(saved: dict, found: dict) -> str:
    if saved["rows"] != found["rows"]:
        return f"{saved['rows']} rows then, {found['rows']} now"
    return f"{found['rows']} rows, other values: digest {saved['digest']} then, {found['digest']} now"


def trains_as_saved(config, checkpoint_path: str) -> bool:
    """Whether the config.yaml of the output_dir holding ``checkpoint_path`` trains as ``config`` does, options missing
    from it (added to ftkit after it was written) counted at their defaults: a job requeued after an ftkit upgrade
    resumes, though the checkpoint's config hash, taken over every option, differs."""
    saved = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(checkpoint_path))), "config.yaml")
    try:
        previous = build(type(config), load_yaml_recipe(saved), where=saved)
    except (ConfigError, OSError, TypeError, ValueError):
        return False
    current = dataclasses.replace(config)
    adopt_auto_batch_size(previous, current, quiet=True)
    return not config_changes(previous, current)[1]


def adopt_auto_batch_size(previous, config, quiet: bool = False) -> None:
    """``per_device_train_batch_size: auto`` in a resumed run keeps the micro-batch and accumulation the run chose
    (saved in its config.yaml) when they make the same examples per step: the data order and the position of a
    mid-epoch checkpoint depend on the micro-batch, and a new device would choose anew."""
    b, ga = previous.per_device_train_batch_size, previous.gradient_accumulation_steps
    if config.per_device_train_batch_size == "auto" and b != "auto" and b * ga == config.gradient_accumulation_steps:
        config.per_device_train_batch_size, config.gradient_accumulation_steps = b, ga
        if not quiet:
            logger.warning("per_device_train_batch_size auto: %d x gradient_accumulation_steps %d, as the run in %s "
                           "chose", b, ga, config.output_dir)


# what a run writes into output_dir, besides base_model/ (the built random-init model, stamped) and base_eval.json
# (the base model's scores: the same for a run with the same config, computed anew with overwrite_output_dir)
RUN_OUTPUTS = ("config.yaml", "checkpoints", "metrics.jsonl", "eval_samples.jsonl", "tensorboard", "curves.png",
               "metrics.json", "final", "final_merged")


def set_aside_earlier_run(config, accelerator) -> str | None:
    """A fresh run in a used ``output_dir`` (``overwrite_output_dir``, or the earlier run left no complete checkpoint)
    first moves the earlier run's outputs together into ``output_dir/earlier_runs/<N>``, kept: its checkpoints, logs,
    config, final model, metrics and predictions. So nothing of it is resumed, appended to, or taken for the new run's
    result if the new run stops before its end. Returns that folder (main process), or None."""
    moved = None
    fresh = not explicit_checkpoint(config) and (config.overwrite_output_dir or not list_checkpoints(config.output_dir))
    if accelerator.is_main_process and fresh and os.path.isdir(config.output_dir):
        names = [n for n in sorted(os.listdir(config.output_dir))
                 if n in RUN_OUTPUTS or (n.startswith("predictions") and n.endswith(".jsonl"))]
        if names:
            root = os.path.join(config.output_dir, "earlier_runs")
            moved = next(os.path.join(root, str(n)) for n in itertools.count(1)
                         if not os.path.exists(os.path.join(root, str(n))))
            os.makedirs(moved)
            for name in names:
                os.rename(os.path.join(config.output_dir, name), os.path.join(moved, name))
            logger.warning("output_dir: a fresh run; the earlier run's %s moved to %s", ", ".join(names), moved)
    accelerator.wait_for_everyone()
    return moved
