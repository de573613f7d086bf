"""ftkit: the library the scripts share, in the order data flows: config, data, modeling, optim, loop,
checkpoint, tracking (with distributed and metrics). The training loops themselves are in scripts/."""

import os as _os

import torch as _torch

if not _torch.cuda.is_available():
    # Tell DeepSpeed up front; its auto-detection prints a warning to stdout, which would end up
    # mixed into piped output such as --predict's summaries.
    _os.environ.setdefault("DS_ACCELERATOR", "cpu")

import logging as _logging

# On a CPU with AVX512-BF16, bitsandbytes tries at import to fetch an optional 4-bit kernel from the hub
# (kernels-community) and warns when it cannot (offline, or its publisher untrusted), before every error line and
# run; it then uses its own CPU kernel, so the run is the same. The notice says nothing a user can act on.
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community"))
