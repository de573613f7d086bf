"""A script's entry point: parse the config, run the training (or ``--predict``), and end as a job should: one line
and an exit code for a user error (2), a run error (1), a stop signal (0, after its checkpoint) or Ctrl-C (130).
Not here: what the config holds and how it is checked (config.py), the signal handler itself (distributed.py)."""

from __future__ import annotations

import faulthandler
import os
import signal

from ftkit import distributed
from ftkit.config import EXIT_BAD_INPUT, ConfigError, RunError, apply_debug, fail, parse


def run(config_cls, train, predict) -> None:
    """A script's entry point: parse, apply --debug, run ``train`` (or ``predict`` with --predict), exit 0; a
    ConfigError is one line and exit 2, a RunError one line and exit 1 (tracebacks with --debug)."""
    faulthandler.enable()  # a rank killed by a signal (a native library's SIGSEGV, SIGABRT) prints its Python stacks
    config = parse(config_cls)
    if config.debug:
        apply_debug(config)
    if not (config.predict or getattr(config, "preflight", False)):
        distributed.STOP.install()  # SIGUSR1/SIGTERM from now on: the run stops where all its processes can
    try:
        predict(config) if config.predict else train(config)
    except distributed.Stopped:  # a stop signal during the base model's evaluation (the loop's own stops return)
        distributed.stopped_before_training()
    except KeyboardInterrupt:  # Ctrl-C outside training, or a second one (the first stops training as SIGTERM does)
        if config.debug:
            raise
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher's copy must not cut this short
        training = not (config.predict or getattr(config, "preflight", False))
        fail("interrupted by Ctrl-C" + (": stopped at once, nothing saved since the latest checkpoint in output_dir "
                                        "(the same command goes on from there)" if training else ""), 130, "[ftkit] ")
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
