"""Run a script (``python tests/count_host_syncs.py scripts/X.py --option value ...``) and print, as the
last line, the host syncs (``.item()``, ``.tolist()``, ``float()``/``int()``/``bool()`` of a tensor) made
in each optimizer step of its loop (steps marked by loop.LoopState.windows), as JSON: ``ours`` counts the
calls made by ftkit/ and scripts/ (but not by data.py's sampler and collator, which work on host tensors
before any copy to the device), ``all`` every call (libraries included), one number per step each."""

import atexit
import json
import os
import runpy
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
OURS = (os.path.join(ROOT, "ftkit"), os.path.join(ROOT, "scripts"))
HOST_ONLY = os.path.join(ROOT, "ftkit", "data.py")
calls = [0, 0]  # ours, all


def counting(method):
    def wrapper(self, *args, **kwargs):
        caller = sys._getframe(1).f_code.co_filename
        calls[0] += caller.startswith(OURS) and caller != HOST_ONLY
        calls[1] += 1
        return method(self, *args, **kwargs)
    return wrapper


for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
    setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))

from ftkit import loop  # noqa: E402

marks = []
windows = loop.LoopState.windows


def marked_windows(self, *args):
    for window in windows(self, *args):
        marks.append(list(calls))  # the step starts here: count, forward, backward, step, advance, cadence
        yield window
    marks.append(list(calls))


loop.LoopState.windows = marked_windows
atexit.register(lambda: print(json.dumps({key: [b[i] - a[i] for a, b in zip(marks, marks[1:])]
                                          for i, key in enumerate(("ours", "all"))}), flush=True))
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
