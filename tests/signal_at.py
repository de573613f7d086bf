"""Run a script that gets a stop signal at a moment a signal sent from outside cannot hit reliably:
``python tests/signal_at.py WHERE SIGNAL scripts/X.py --option value ...``, WHERE one of
- ``loading``: as the model is about to be loaded (``modeling.load_pretrained``), before training;
- ``last_step``: right after the last optimizer step, before the loop's final check (``loop.LoopState.stop_if_signalled``);
- ``evaluation``: as the first evaluation during training begins (``loop.LoopState.evaluate``);
- ``loading_swallowed``: as ``loading``, but the first signal's exception is swallowed where it is raised, as C code
  that clears errors does (seen: Cython's set-up of numpy.random, imported as the data is read, dropped a Ctrl-C).
SIGNAL is a name, or names joined by commas: sent one after the other, with a pause between them longer than the one
in which a second Ctrl-C counts as the same (a person pressing Ctrl-C twice).
The signal is real, sent by the process to itself; its handler runs before the next line of Python."""

import os
import runpy
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ftkit import distributed, loop, modeling  # noqa: E402

where, names, script, sys.argv = sys.argv[1], sys.argv[2].split(","), sys.argv[3], sys.argv[3:]
owner, method = {"loading": (modeling, "load_pretrained"), "last_step": (loop.LoopState, "stop_if_signalled"),
                 "evaluation": (loop.LoopState, "evaluate"), "loading_swallowed": (modeling, "load_pretrained")}[where]
original = getattr(owner, method)
sent = []


def signalled_first(*args, **kwargs):
    if not sent:
        sent.append(True)
        for i, name in enumerate(names):
            if i:
                time.sleep(distributed.StopRequest.SAME_CTRL_C_S + 0.2)
            if i == 0 and where == "loading_swallowed":
                try:
                    os.kill(os.getpid(), getattr(signal, name))
                    time.sleep(0.1)  # (the handler has run by now)
                except BaseException:
                    pass
            else:
                os.kill(os.getpid(), getattr(signal, name))
    return original(*args, **kwargs)


setattr(owner, method, signalled_first)
runpy.run_path(script, run_name="__main__")
