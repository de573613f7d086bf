"""Run a script that gets a stop signal at a moment a signal sent from outside cannot hit reliably:
``python tests/signal_at.py WHERE SIGNAL scripts/X.py --option value ...``, WHERE one of
- ``last_step``: right after the last optimizer step, before the loop's final check (``loop.LoopState.stop_if_signalled``);
- ``evaluation``: as the first evaluation during training begins (``loop.LoopState.evaluate``).
The signal is real, sent by the process to itself; its handler runs before the next line of Python."""

import os
import runpy
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ftkit import loop  # noqa: E402

where, name, script, sys.argv = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[3:]
method = {"last_step": "stop_if_signalled", "evaluation": "evaluate"}[where]
original = getattr(loop.LoopState, method)


def signalled_first(self, *args):
    if not getattr(self, "signal_sent", False):
        self.signal_sent = True
        os.kill(os.getpid(), getattr(signal, name))
    return original(self, *args)


setattr(loop.LoopState, method, signalled_first)
runpy.run_path(script, run_name="__main__")
