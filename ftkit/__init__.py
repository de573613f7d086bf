"""ftkit: the library the scripts share, in the order data flows: config, data, modeling, optim, loop,
checkpoint, tracking (with distributed and metrics). The training loops themselves are in scripts/."""

import os as _os

import torch as _torch

if not _torch.cuda.is_available():
    # Tell DeepSpeed up front; its auto-detection prints a warning to stdout, which would end up
    # mixed into piped output such as --predict's summaries.
    _os.environ.setdefault("DS_ACCELERATOR", "cpu")
