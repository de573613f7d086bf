"""ftkit: the shared library of the fine-tuning scripts (configs, data, models, checkpoints, tracking)."""

import os as _os

import torch as _torch

if not _torch.cuda.is_available():
    # Tell DeepSpeed up front; its auto-detection prints a warning to stdout, which would end up
    # mixed into piped output such as --predict's summaries.
    _os.environ.setdefault("DS_ACCELERATOR", "cpu")
