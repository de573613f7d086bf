"""Measure a real run's peak tensor memory: ``python tests/peak_memory.py OUT scripts/X.py --option value ...`` (also
under ``accelerate launch``). Every tensor storage created through PyTorch's dispatcher is counted from its creation
until it is freed (``fakestep.LiveTensorBytes`` on real tensors), and the prepared model's own weights with them;
from the end of ``Accelerator.prepare`` to the loop's end (``LoopState.final_evaluation`` or ``finish``, whichever
comes first), the most bytes alive at once are the training's peak; the process exits 0 there, without the final
evaluation and export. Each rank writes ``OUT.<rank>.json``: ``{"peak": bytes, "at_prepare": bytes}``."""

import atexit
import json
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import accelerate  # noqa: E402

from ftkit import loop  # noqa: E402
from ftkit.fakestep import LiveTensorBytes  # noqa: E402

live = LiveTensorBytes()
marks = {}
prepare = accelerate.Accelerator.prepare


def measured_prepare(self, *args, **kwargs):
    result = prepare(self, *args, **kwargs)
    for obj in result if isinstance(result, tuple) else (result,):
        if hasattr(obj, "parameters") and hasattr(obj, "buffers"):
            for t in [*obj.parameters(), *obj.buffers()]:
                live.add(t)
    if "at_prepare" not in marks and any(hasattr(obj, "parameters") for obj in
                                         (result if isinstance(result, tuple) else (result,))):
        marks["at_prepare"] = live.peak = live.now  # the training's peak is counted from here
    return result


def measured_end_of_training(self, *args, **kwargs):
    """The loop has ended: the peak is known. What follows (final evaluation, generation, export) is not training's,
    so the process ends here, each rank by itself (no collective follows)."""
    marks.setdefault("peak", live.peak)
    live.__exit__(None, None, None)
    write()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def write():
    rank = os.environ.get("RANK", "0")
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump({"peak": marks.get("peak", live.peak), "at_prepare": marks.get("at_prepare")}, f)


loop.LoopState.finish = loop.LoopState.final_evaluation = measured_end_of_training
accelerate.Accelerator.prepare = measured_prepare
out, script, sys.argv = sys.argv[1], sys.argv[2], sys.argv[2:]
atexit.register(write)  # a run that ends otherwise (an error) still writes what it measured
live.__enter__()
try:
    runpy.run_path(script, run_name="__main__")
finally:
    live.__exit__(None, None, None)
