"""Accelerator construction (CPU/gloo, DeepSpeed plumbing, mixed precision, trackers), seeding, reductions,
and generation sharded over processes and gathered in order. Not here: what is reduced and when (loop.py)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time

import torch

from ftkit.config import ConfigError, check_writable, not_found

logger = logging.getLogger("ftkit")


def accelerator(config):
    """The run's ``Accelerator``, configured from the recipe and the launcher's environment.

    - FSDP launches are refused (see the error), DeepSpeed ZeRO-3 shards the same way.
    - No CUDA: the process group is created with gloo *before* the Accelerator, so that
      multi-process CPU runs (and DeepSpeed on CPU) count every process.
    - Gradient accumulation is driven by the script's accumulation windows (always complete), so
      accelerate must not force a sync at the end of the dataloader."""
    from datetime import timedelta

    from accelerate import Accelerator, PartialState
    from accelerate.utils import (DataLoaderConfiguration, GradientAccumulationPlugin, InitProcessGroupKwargs,
                                  ProjectConfiguration, set_seed)

    from ftkit.data import pin_memory

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise ConfigError("launcher: FSDP is not supported: ftkit's checkpoints, exact resume and 4-bit paths are built "
                          "and tested for DDP and DeepSpeed; shard with ZeRO-3 instead (accelerate launch "
                          "--config_file launch/accelerate/deepspeed_zero3.yaml)")
    cpu = not torch.cuda.is_available()
    check_bf16(config.bf16, not cpu, (not cpu) and torch.cuda.is_bf16_supported())
    launched_with_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    launch_zero_stage(config)  # reads the launcher's DeepSpeed config: one line if it is not there (accelerate: a traceback)
    deepspeed_plugin = None
    if config.deepspeed and not launched_with_deepspeed:
        from accelerate.utils import DeepSpeedPlugin

        deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=os.path.abspath(config.deepspeed))
    use_deepspeed = launched_with_deepspeed or deepspeed_plugin is not None
    if use_deepspeed and "LOCAL_RANK" not in os.environ and launch_processes() == 1:  # DeepSpeed needs a group
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()))
    timeout = timedelta(seconds=getattr(config, "ddp_timeout", 1800))  # how long a collective waits for every rank
    if cpu and (int(os.environ.get("WORLD_SIZE", "1")) > 1 or use_deepspeed):
        # `cpu=True` would make accelerate fall back to plain MULTI_CPU and silently drop DeepSpeed
        PartialState(cpu=not use_deepspeed, backend="gloo", timeout=timeout)
    if cpu and use_deepspeed:  # DeepSpeed compiles its shared-memory communication op for CPU processes (once)
        from torch.utils.cpp_extension import get_default_build_root

        check_writable(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root(),
                       "deepspeed: DeepSpeed's op build folder", "TORCH_EXTENSIONS_DIR")
    cpu = cpu and not use_deepspeed
    trackers = [] if config.report_to == "none" or config.debug else (
        ["wandb", "tensorboard"] if config.report_to == "all" else [config.report_to])
    from ftkit.tracking import check_trackers

    check_trackers(trackers)  # before any model is loaded
    acc = Accelerator(
        cpu=cpu,
        mixed_precision="bf16" if config.bf16 else "no",
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=config.gradient_accumulation_steps, sync_with_dataloader=False),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=pin_memory(config)),
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=config.output_dir,
                                            logging_dir=os.path.join(config.output_dir, "tensorboard")),
        step_scheduler_with_optimizer=False,
        deepspeed_plugin=deepspeed_plugin,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)],
    )
    fill_deepspeed_config(acc, config)
    planned_processes(acc, config)  # a preflight_num_processes that contradicts the launcher: before anything is built
    level = logging.INFO if acc.is_main_process else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=level)
    logger.setLevel(level)
    # accelerate's six lines per checkpoint (ftkit logs one) and rouge-score's "Using default tokenizer" per scoring
    for name in ("accelerate.accelerator", "accelerate.checkpointing", "absl"):
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")  # set by accelerate launch from its config or flag
    if acc.is_main_process and launcher and launcher != acc.mixed_precision:
        logger.warning("mixed precision: %s, as the recipe's bf16: %s says; the launcher's mixed_precision %s is not "
                       "used (set bf16 in the recipe or on the command line)", acc.mixed_precision,
                       str(config.bf16).lower(), launcher)
    set_seed(config.seed)  # python, numpy, torch (and CUDA): model init, data order, dropout
    return acc


def planned_processes(acc, config) -> int:
    """The processes a run is planned for: the launcher's, or in ``--preflight`` ``preflight_num_processes`` (a
    preflight in one process for an N-process run: its steps, DeepSpeed batch and memory per device)."""
    planned = getattr(config, "preflight_num_processes", None) if getattr(config, "preflight", False) else None
    if planned and acc.num_processes > 1 and planned != acc.num_processes:
        raise ConfigError(f"preflight_num_processes: {planned}, but the launcher started {acc.num_processes} "
                          f"processes; run the preflight in one process, or without preflight_num_processes")
    return planned or acc.num_processes


def launch_processes() -> int:
    """The processes the launcher started, read before the Accelerator exists as accelerate reads them: torchrun-style
    launchers set WORLD_SIZE, MPI its own variables; 1 without a launcher."""
    sizes = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    return next((int(os.environ[k]) for k in sizes if os.environ.get(k)), 1)


def launch_zero_stage(config) -> int | None | str:
    """The DeepSpeed ZeRO stage a run will have, None without DeepSpeed, read before the Accelerator exists: the
    launcher's DeepSpeed config file or stage, else the recipe's ``deepspeed``; "unknown" where accelerate chooses."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if not path:
            stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
            return int(stage) if stage else "unknown"
        where = "deepspeed_config_file (the accelerate config's)"
    elif config.deepspeed:
        path, where = config.deepspeed, "deepspeed"
    else:
        return None
    stage = read_deepspeed_config(path, where).get("zero_optimization", {}).get("stage", 0)
    return int(stage) if str(stage).isdigit() else "unknown"


def free_port() -> int:
    """A TCP port nobody listens on now (the rendezvous of a one-process DeepSpeed run)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_bf16(bf16: bool, cuda: bool, supported: bool | None) -> None:
    """``bf16: true`` needs a GPU with bfloat16 (Ampere or newer); on a CPU it runs, emulated and slow."""
    if not bf16:
        return
    if cuda and not supported:
        raise ConfigError("bf16: this GPU does not support bfloat16 (Ampere or newer needed); set bf16: false")
    if not cuda:
        logger.warning("bf16 on a CPU: supported by PyTorch but usually slower than float32")


def fill_deepspeed_config(acc, config) -> None:
    """Put the recipe's values into the DeepSpeed config's "auto" fields; a fixed value that
    disagrees with the recipe is an error naming both (before any model is loaded)."""
    plugin = acc.state.deepspeed_plugin
    if plugin is None:
        return
    where = config.deepspeed or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or "the DeepSpeed config"
    batch, ga = config.per_device_train_batch_size, config.gradient_accumulation_steps
    wanted = {  # DeepSpeed key: (recipe option, value)
        "train_micro_batch_size_per_gpu": ("per_device_train_batch_size", batch),
        "gradient_accumulation_steps": ("gradient_accumulation_steps", ga),
        "train_batch_size": ("per_device_train_batch_size x gradient_accumulation_steps x processes",
                             (1 if batch == "auto" else batch) * ga * planned_processes(acc, config)),
        "gradient_clipping": ("max_grad_norm", float(config.max_grad_norm)),
        "bf16.enabled": ("bf16", bool(config.bf16)),
    }
    ds = plugin.deepspeed_config
    if batch == "auto":  # filled again once autobatch.auto_batch_size has split ga into micro-batch x accumulation
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            if ds.get(key, "auto") != "auto":
                raise ConfigError(f"{where}: {key} is {ds[key]} but the recipe's per_device_train_batch_size is auto; "
                                  f"set it to \"auto\" (ftkit fills it with its choice)")
            del wanted[key]
    for key, (option, value) in wanted.items():
        *parents, leaf = key.split(".")
        node = ds
        for p in parents:
            node = node.setdefault(p, {})
        current = node.get(leaf, "auto")
        if current == "auto":
            node[leaf] = value
        elif (float(current) != float(value)) if not isinstance(value, bool) else (bool(current) != value):
            raise ConfigError(f"{where}: {key} is {current} but the recipe's {option} is {value}; "
                              f"set it to \"auto\" or make the two agree")
    if config.optim != "adamw_torch" and isinstance(ds.get("zero_optimization"), dict) and \
            ds["zero_optimization"].get("offload_optimizer", {}).get("device", "none") != "none":
        raise ConfigError(f"optim: {config.optim} cannot run with {where}'s optimizer offload "
                          f"(use optim adamw_torch, or a config without offload_optimizer)")


def end(acc) -> None:
    """Close the trackers and the process group, all ranks together: PyTorch asks that every rank destroy its group
    when none of them still communicates, and rank 0 may still be writing the final outputs when the others are done."""
    acc.wait_for_everyone()
    acc.end_training()


def exit_finished(code: int = 0) -> None:
    """End the process of a run that finished (every rank past ``end``'s barrier, outputs written) without the
    interpreter's teardown. That teardown destroys module state, torch's, gloo's and DeepSpeed's native objects
    among it, in no set order, and there a rank sometimes aborted (SIGABRT, "terminate called without an active
    exception"): rank 1 of ZeRO-3 runs in 2 of 3 suite runs until the run's reference cycles were freed first,
    then rank 1 of a 2-process DDP run once in CI (not reproduced in 65 repeats here). An abort at that point turned a finished
    run into a failed job (torchrun stops the other ranks; SLURM marks the job failed). What a normal exit does
    for Python code is kept, in its order: other threads are ended and joined, cycles freed, atexit handlers (W&B's,
    logging's) run, output flushed."""
    import atexit
    import gc
    import sys
    import threading

    # as the interpreter does: threading's own exit hooks first (they tell idle ThreadPoolExecutor workers, such as
    # torch.compile's, to end; joined without them, a torch_compile run hung at its end), then the other threads
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None and threading.current_thread() is threading.main_thread():
        shutdown()
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    gc.collect()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def reduce_sum(acc, value) -> torch.Tensor:
    """Sum of a number or tensor over all processes."""
    t = value.detach().clone() if isinstance(value, torch.Tensor) else torch.tensor(value)
    t = t.to(acc.device)
    return acc.reduce(t, reduction="sum") if acc.num_processes > 1 else t


@torch.no_grad()
def generate_in_order(acc, model, tokenizer, inputs: list, batch_size: int, encode, **generate_kwargs) -> list[str]:
    """Greedy or beam ``generate`` over ``inputs``, sharded over processes and gathered back in order,
    each input exactly once; ``encode(chunk)`` gives a chunk's model inputs. Every process makes the
    same number of calls (collective under ZeRO-3: ``synced_gpus``); padding slots are discarded."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    net = acc.unwrap_model(model)
    was_training = net.training
    net.eval()
    mine = list(range(acc.process_index, len(inputs), acc.num_processes))
    mine += [-1] * (-(-len(inputs) // acc.num_processes) - len(mine))
    results = []
    # torch_compile's blocks run eagerly here: decoding with a KV cache changes their shapes and cache at every token,
    # and compiled they recompiled for each (one block after another, until torch.compile's limit)
    eager = torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else contextlib.nullcontext()
    with eager:
        for start in range(0, len(mine), batch_size):
            stop_point(acc)  # a stop signal before or during training ends the generation here
            chunk = mine[start:start + batch_size]
            enc = {k: v.to(acc.device) for k, v in encode([inputs[max(i, 0)] for i in chunk]).items()}
            out = net.generate(**enc, do_sample=False, synced_gpus=is_deepspeed_zero3_enabled(), **generate_kwargs)
            if not net.config.is_encoder_decoder:  # a decoder's output starts with its prompt
                out = out[:, enc["input_ids"].shape[1]:]
            results += zip(chunk, tokenizer.batch_decode(out, skip_special_tokens=True))
    net.train(was_training)
    return gather_by_index(acc, results, len(inputs))


def gather_by_index(acc, pairs: list[tuple[int, object]], n: int) -> list:
    """Gather ``(index, value)`` pairs from all processes into one list ordered by index. Each index appears exactly
    once in the result: no duplicates, none missing."""
    from accelerate.utils import gather_object

    everything = gather_object(pairs) if acc.num_processes > 1 else pairs
    by_index = {i: v for i, v in everything if i >= 0}
    missing = [i for i in range(n) if i not in by_index]
    if missing:
        raise RuntimeError(f"gather lost examples {missing[:5]}")
    return [by_index[i] for i in range(n)]


def read_deepspeed_config(path: str, key: str) -> dict:
    """A DeepSpeed JSON config as a dict; a missing file or invalid JSON is one clear error."""
    if not os.path.isfile(path):
        raise not_found(f"{key}: DeepSpeed config not found", path)

    def unique(pairs):  # JSON, like Python's json, would keep a key's last value silently
        if len(keys := [k for k, _ in pairs]) != len(set(keys)):
            twice = next(k for k in keys if keys.count(k) > 1)
            raise ConfigError(f"{path}: {twice!r} given twice in one object of the DeepSpeed config; keep one")
        return dict(pairs)

    try:
        with open(path, encoding="utf-8") as f:
            ds = json.load(f, object_pairs_hook=unique)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}:{e.colno}: invalid JSON in the DeepSpeed config ({e.msg})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: a DeepSpeed config must be a JSON object")
    return ds


# --- Stop signals -----------------------------------------------------------------------------------


class StopRequest:
    """SIGUSR1 (SLURM's preemption warning) or SIGTERM: stop at the next point where every process can, save, exit 0.
    The handler only records the signal. A training run installs it at start-up (``cli.run``), so a signal during
    the loading, the data or the base model's evaluation is kept. Acting on it is collective: before each optimizer
    step (:meth:`loop.LoopState.count`), between evaluation batches (:func:`stop_point`) and once after the last step
    (:meth:`loop.LoopState.stop_if_signalled`); after that (``phase`` "over": the final evaluation and export) a
    signal stops nothing. A second signal changes nothing.

    SIGINT (Ctrl-C) is a person at the terminal: during training it stops as the others do (exit 130); before and after
    training, or once more after the first, it quits at once (``KeyboardInterrupt``, one line in ``cli.run``). A
    second SIGINT within a second is the same Ctrl-C passed on by the launcher (torchrun sends its own signal to
    processes that the terminal's reached too)."""

    SIGNALS = ("SIGUSR1", "SIGTERM", "SIGINT")
    SAME_CTRL_C_S = 1.0

    def __init__(self):
        self.signal_name = None
        # then "training" (loop.LoopState), then "over" (LoopState.stop_if_signalled); at a Ctrl-C that quits at once,
        # "quitting" (KeyboardInterrupt raised), then "quit" (cli.run has it)
        self.phase = "start-up"
        self.installed = False
        self.ctrl_c_at = None
        self.killed_after_s = None  # set by cli.run where the launcher kills the process that long after a signal

    def install(self) -> "StopRequest":
        if not self.installed:
            for name in self.SIGNALS:
                signal.signal(getattr(signal, name), self._handler)
            self.installed = True
        return self

    def _handler(self, signum, frame) -> None:
        if self.phase == "quit":  # cli.run says so and exits: the launcher passing the Ctrl-C on (as SIGTERM) is silent
            return
        name = signal.Signals(signum).name
        if name == "SIGINT":
            if self.ctrl_c_at is not None and time.monotonic() - self.ctrl_c_at <= self.SAME_CTRL_C_S:
                return  # the launcher's copy of the Ctrl-C this process has just had
            self.ctrl_c_at = time.monotonic()
        if self.phase == "quitting" or name == "SIGINT" and (self.phase != "training" or self.signal_name is not None):
            self.phase = "quitting"  # (again: a KeyboardInterrupt not yet in cli.run, which C code may have swallowed)
            raise KeyboardInterrupt
        if self.signal_name is None:
            self.signal_name = name
            then = {"start-up": "training will stop before its first optimizer step",
                    "training": "stopping after this optimizer step or evaluation batch",
                    "over": "training has ended: its evaluation and export go on"}[self.phase]
            again = " (Ctrl-C again to quit at once, without saving)" if name == "SIGINT" else ""
            if self.killed_after_s and name != "SIGUSR1":
                again += f"; the launcher kills this process {self.killed_after_s:g} s after the signal"
            line = f"[ftkit] rank {os.environ.get('RANK', '0')}: {name} received, {then}{again}\n"
            os.write(self.notice_fd, line.encode())  # (not sys.stderr: a handler may run amid one of its writes)

    @property
    def notice_fd(self) -> int:
        """Where the lines at a signal go: stderr (2), but stdout (1) under accelerate's one-process launcher
        (killed_after_s set), which copies stderr through a pipe and drops a chunk it has read when its own copy of
        the signal arrives (a line lost to 1 Ctrl-C in 12, both on one core); its stdout is the terminal's, as the
        "stopped by" line's."""
        return 1 if self.killed_after_s else 2

    def quit_if_interrupted(self) -> None:
        """Raise again the KeyboardInterrupt of a Ctrl-C that has not reached cli.run: C code that clears errors
        swallows it (seen: Cython's set-up of numpy.random, imported as the data is read, and the run trained on).
        Called before training and between the base model's evaluation batches."""
        if self.phase == "quitting":
            raise KeyboardInterrupt


STOP = StopRequest()  # one per process: the handler may be installed long before the loop begins


class Stopped(Exception):
    """A stop signal reached some process during an evaluation (raised on every process at the same batch)."""


def signalled(acc) -> bool:
    """Whether a stop signal reached any process (one all-reduce: every process calls it at the same point)."""
    return bool(reduce_sum(acc, int(STOP.signal_name is not None)).item())


def stop_point(acc) -> None:
    """Between evaluation batches, every process as often: raise :class:`Stopped` if a stop signal reached any
    process while training can still stop. Nothing without the handler (--predict, --preflight)."""
    STOP.quit_if_interrupted()
    if STOP.installed and STOP.phase != "over" and signalled(acc):
        raise Stopped(STOP.signal_name or "a signal on another rank")


def stopped_before_training() -> None:
    """A stop signal during the base model's evaluation (:class:`Stopped` before the loop began): nothing to save;
    say so (and tell launch/slurm/job.sh to requeue), end the process group on every rank."""
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:
        print(f"[ftkit] stopped by {STOP.signal_name or 'a signal on another rank'} before the first optimizer step of "
              f"this run: nothing new to save; run the same command again", flush=True)
        note_stopped(0)
    state.wait_for_everyone()
    state.destroy_process_group()


def note_stopped(step: int) -> None:
    """``FTKIT_STOPPED_FILE`` (set by launch/slurm/job.sh): the run stopped early at ``step``; the job requeues."""
    if os.environ.get("FTKIT_STOPPED_FILE"):
        with open(os.environ["FTKIT_STOPPED_FILE"], "w") as f:
            f.write(f"{step}\n")


def said_by_another_rank(line: str) -> bool:
    """Whether another process of this launch on this machine has already printed ``line``: the ranks of one launch
    meet the same bad option (or the same Ctrl-C) at once, and the user should read it once, not once per process.
    The first to say it makes a file named after the launcher and the line (``O_EXCL``: only one can) in the
    temporary folder; those of launchers no longer alive are removed. Only torchrun's ranks (accelerate launch of
    several processes, DeepSpeed, SLURM jobs), whose launcher is their parent, one per launch (and per restart), ask;
    each node of a multi-node run says it once (its files, its view of them)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or os.getppid() == 1:  # (1: the launcher is gone)
        return False
    import hashlib
    import tempfile

    import psutil  # (a dependency of accelerate)

    folder = tempfile.gettempdir()
    try:
        launcher = psutil.Process(os.getppid())
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        mark = f"ftkit-said-{launcher.pid}-{launcher.create_time():.2f}-{restart}-"
        for name in os.listdir(folder):
            if name.startswith("ftkit-said-") and not name.startswith(mark) and not psutil.pid_exists(
                    int(name.split("-")[2])):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, name))
        os.close(os.open(os.path.join(folder, mark + hashlib.sha1(line.encode()).hexdigest()[:16]),
                         os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return True
    except (OSError, ValueError, psutil.Error):  # no launcher to ask, a folder not writable: say it
        return False
    return False
