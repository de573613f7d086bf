"""Run a script that gets a stop signal right after its last optimizer step, before the loop's final check
(``loop.LoopState.stop_if_signalled``): ``python tests/signal_after_last_step.py SIGUSR1 scripts/X.py --option value ...``.
A signal sent from outside cannot hit that moment reliably; this one is a real signal, sent by the process to itself."""

import os
import runpy
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ftkit import loop  # noqa: E402

stop_if_signalled = loop.LoopState.stop_if_signalled


def signalled_first(self):
    os.kill(os.getpid(), getattr(signal, name))  # its handler runs before the next line of Python
    return stop_if_signalled(self)


loop.LoopState.stop_if_signalled = signalled_first
name, script, sys.argv = sys.argv[1], sys.argv[2], sys.argv[2:]
runpy.run_path(script, run_name="__main__")
