"""ftkit: the library the scripts share, in the order data flows: config, data, modeling, optim, loop,
checkpoint, tracking (with distributed and metrics). The training loops themselves are in scripts/."""

import os as _os

import torch as _torch

if not _torch.cuda.is_available():
    # Tell DeepSpeed up front; its auto-detection prints a warning to stdout, which would end up
    # mixed into piped output such as --predict's summaries.
    _os.environ.setdefault("DS_ACCELERATOR", "cpu")

import logging as _logging

# On a CPU with AVX512-BF16, bitsandbytes asks the hub at its import for an optional 4-bit kernel (kernels-community)
# and warns when it cannot have it (offline, its publisher untrusted; the `kernels` package adds a warning of its own
# offline): before every run and error line. It then runs its own CPU kernel: the run is the same, and the notices say
# nothing a user can act on.
_BNB_HUB_KERNEL = "kernels-community/quantization-bitsandbytes"
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community"))
_logging.getLogger("kernels._internals.hf_hub").addFilter(lambda record: _BNB_HUB_KERNEL not in record.getMessage())

import warnings as _warnings

# peft (0.21) reads transformers' deprecated `is_gradient_checkpointing` in every get_peft_model: a notice for peft
_warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
