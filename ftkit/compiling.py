"""torch_compile: each transformer block compiled, as one graph also when it is checkpointed, within a recompile limit
that fits every kind of block in training and evaluation. Used by modeling's set-up of a model to train."""

from __future__ import annotations

import torch

_REPLAY_FLAG = "skip_fwd_side_effects_in_bwd_under_checkpoint"
_GRAPHS_PER_BLOCK_CODE = 32


def compile_blocks(model, config) -> int:
    """With ``torch_compile``: ``torch.compile`` each transformer block (the model's ``_no_split_modules`` held in a
    ModuleList). The blocks share one graph, their weights being its inputs; a new sequence length recompiles once,
    with dynamic shapes. Training runs without the KV cache: its per-layer state would make every block a graph of its
    own. Returns the number of blocks compiled."""
    if not getattr(config, "torch_compile", False):
        return 0
    if getattr(config, "gradient_checkpointing", False) and hasattr(torch._dynamo.config, _REPLAY_FLAG):
        # A checkpointed block compiles as one graph only if its forward's Python side effects need not be replayed
        # in the backward's recompute. transformers' attention sets and resets a context variable (its hub-kernel
        # functions) in forward: with the default, every checkpointed block broke its graph there and ran eagerly
        # (on a CPU: 53,154 dispatched ops per step of a 32-layer QLoRA model against 22,369 with the blocks whole).
        setattr(torch._dynamo.config, _REPLAY_FLAG, True)
    # Blocks that differ (T5's first block of each stack computes the position bias the others take; a decoder block
    # attends to the encoder), training and no-grad evaluation each need a graph of the one shared code object: T5
    # needs 8 for training, torch.compile's default limit, so its evaluation ran eagerly with a warning.
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), _GRAPHS_PER_BLOCK_CODE))
    model.config.use_cache = False
    kinds = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [block for modules in model.modules() if isinstance(modules, torch.nn.ModuleList)
              for block in modules if type(block).__name__ in kinds]
    for block in blocks:
        block.compile()
    return len(blocks)
