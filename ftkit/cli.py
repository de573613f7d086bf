"""A script's entry point: parse the config (and what ``--debug`` changes), run the training (or ``--predict``), and end
as a job should: one line and an exit code for a user error (2), a run error (1), a stop signal (0, after its
checkpoint) or Ctrl-C (130); a warning where the launcher would cut a stop's checkpoint short.
Not here: what the config holds and how it is checked (options.py, config.py), the signal handler itself (distributed.py)."""

from __future__ import annotations

import ast
import dataclasses
import faulthandler
import os
import re
import shlex
import signal
import sys

from ftkit import distributed
from ftkit.config import EXIT_BAD_INPUT, ConfigError, RunError, fail, load_yaml_recipe, parse


def run(config_cls, train, predict) -> None:
    """A script's entry point: parse, apply --debug, run ``train`` (or ``predict`` with --predict), exit 0; a
    ConfigError is one line and exit 2, a RunError one line and exit 1 (tracebacks with --debug)."""
    faulthandler.enable()  # a rank killed by a signal (a native library's SIGSEGV, SIGABRT) prints its Python stacks
    try:
        config = parse(config_cls, exit_on_error=False)
    except ConfigError as error:  # an unknown option in a recipe written for another script: that script's command
        recipe = getattr(error, "where", "")
        other = script_of_recipe(recipe) if os.path.isfile(recipe) else None
        fail(f"{recipe} is a recipe for {os.path.basename(other)}, not {os.path.basename(sys.argv[0])}: python "
             f"{os.path.relpath(other)} --config {recipe}" if other else error)
    if config.debug:
        apply_debug(config)
    try:
        if not (config.predict or getattr(config, "preflight", False)):
            distributed.STOP.install()  # SIGUSR1/SIGTERM from now on: the run stops where all its processes can
            distributed.STOP.killed_after_s = launcher_kills_after_s()
            if distributed.STOP.killed_after_s:
                sys.stderr.write(f"[ftkit] warning: one process under `accelerate launch` is killed by the launcher "
                                 f"{distributed.STOP.killed_after_s:g} s after a Ctrl-C or SIGTERM, before a checkpoint "
                                 f"that takes longer to save; `python {shlex.join(sys.argv)}` trains the same without "
                                 f"that limit\n")
        predict(config) if config.predict else train(config)
    except distributed.Stopped:  # a stop signal during the base model's evaluation (the loop's own stops return)
        distributed.stopped_before_training()
    except KeyboardInterrupt:  # Ctrl-C outside training, or a second one (the first stops training as SIGTERM does)
        distributed.STOP.phase = "quit"
        if config.debug:
            raise
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher's copy must not cut this short
        training = not (config.predict or getattr(config, "preflight", False))
        fail("interrupted by Ctrl-C" + (": stopped at once, nothing saved since the latest checkpoint in output_dir "
                                        "(the same command goes on from there)" if training else ""), 130, "[ftkit] ",
             sys.stdout if distributed.STOP.notice_fd == 1 else None)
    except (ConfigError, RunError) as error:
        if config.debug:
            raise
        fail(error, EXIT_BAD_INPUT if isinstance(error, ConfigError) else 1)
    except RuntimeError as error:  # a collective that waited past ddp_timeout (gloo raises; NCCL's watchdog aborts)
        if config.debug or "timed out" not in str(error).lower() or not hasattr(config, "ddp_timeout"):
            raise
        fail(RunError(f"ddp_timeout: rank {os.environ.get('RANK', '0')} waited more than {config.ddp_timeout} s for the "
                      f"other processes ({str(error).strip().splitlines()[0]}); if one was busy (the main process "
                      f"tokenizes the data first), raise ddp_timeout; if one died, its own log says why"), 1)
    # without the interpreter's teardown of native state (see there); 130 after a Ctrl-C that stopped training
    distributed.exit_finished(130 if distributed.STOP.signal_name == "SIGINT" else 0)


def apply_debug(config) -> None:
    """``--debug``: a few examples and steps, evaluation and a checkpoint inside the run, no trackers, anomaly checks."""
    import torch

    torch.autograd.set_detect_anomaly(True)
    config.max_train_samples = min(config.max_train_samples or 16, 16)
    config.max_eval_samples = min(config.max_eval_samples or 8, 8)
    config.max_steps = 4 if config.max_steps <= 0 else min(config.max_steps, 4)
    config.eval_steps, config.save_steps, config.logging_steps, config.save_strategy, config.report_to = 2, 2, 1, "steps", "none"
    if hasattr(config, "eval_strategy"):
        config.eval_strategy = "steps"
    for name in {"num_eval_generate", "num_test_compare"} & set(vars(config)):
        setattr(config, name, min(getattr(config, name), 2))


def launcher_kills_after_s() -> float | None:
    """Seconds after a Ctrl-C or SIGTERM at which this process's launcher kills it, where that is set by the launcher:
    accelerate 1.16's ``accelerate launch`` of one process (no DeepSpeed, no several processes: its "simple
    launcher") passes the signal on, then kills the process 5 s later (``_terminate_process_tree``; measured: a
    5 s step stopped by Ctrl-C was killed 6.4 s after it, its checkpoint unsaved). None under ``python`` and under
    torchrun (several processes, DeepSpeed, SLURM jobs), which waits ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` (30) s."""
    if "TORCHELASTIC_RUN_ID" in os.environ or "ACCELERATE_USE_CPU" not in os.environ:  # (set by the simple launcher)
        return None
    try:
        import psutil  # (a dependency of accelerate)

        parent = " ".join(psutil.Process(os.getppid()).cmdline()[:3])
    except Exception:  # no such process, no permission: no launcher to speak of
        return None
    if not re.search(r"accelerate(\s+launch|-launch|\.commands\.launch)\b", parent):
        return None
    from accelerate.commands import launch

    return 5.0 if hasattr(launch, "_terminate_process_tree") else None


def script_of_recipe(recipe: str) -> str | None:
    """The script beside this one (scripts/*.py) whose options take every key of ``recipe``, read from the scripts'
    source (their ``...Config`` class: the shared option groups it is made of, and its own fields)."""
    from ftkit import options as shared

    keys, here = set(load_yaml_recipe(recipe)), os.path.abspath(sys.argv[0])
    for name in sorted(os.listdir(os.path.dirname(here))):
        script = os.path.join(os.path.dirname(here), name)
        if not name.endswith(".py") or script == here:
            continue
        try:
            with open(script, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (OSError, SyntaxError, ValueError):  # not a script to compare with
            continue
        for node in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name.endswith("Config")):
            options = {a.target.id for a in node.body if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name)}
            for base in node.bases:  # options.ModelArguments, ...
                group = getattr(shared, getattr(base, "attr", getattr(base, "id", "")), None)
                options |= {f.name for f in dataclasses.fields(group)} if dataclasses.is_dataclass(group) else set()
            if keys <= options:
                return script
    return None
