"""The token-summed training loss: cross-entropy summed per example with its count of target tokens (so a window of
micro-batches, across processes, is normalised by all its tokens), from a batch's logits or, with
``cross_entropy_chunk_tokens``, from the final hidden states a chunk of positions at a time."""

from __future__ import annotations

import torch

from ftkit import modeling


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor, shift: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token cross-entropy over labelled tokens, and their count (per example). Returns two tensors of shape
    [batch]: the loss sum and the number of target tokens, so callers can normalise by the tokens of a whole
    accumulation window, across processes. ``shift``: a causal LM predicts token t+1 at position t; a seq2seq
    decoder's logits already line up with its labels (``shift=False``)."""
    if shift:
        logits, labels = logits[:, :-1, :], labels[:, 1:]
    per_token = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(labels.shape)
    mask = labels.ne(-100)
    return (per_token * mask).sum(dim=1), mask.sum(dim=1)


def count_target_tokens(labels: torch.Tensor, shift: bool = True) -> torch.Tensor:
    """Tokens that contribute to the loss (for a causal LM, the labels shifted by one)."""
    return (labels[:, 1:] if shift else labels).ne(-100).sum()


def causal_lm_forward_loss(model, inputs: dict, labels: torch.Tensor, chunk_tokens: int | None = None,
                           max_tokens: int | None = None):
    """The forward pass and :func:`causal_lm_loss_sum` over its logits. With ``chunk_tokens`` the batch's logits
    (batch x length x vocabulary, fp32 for the loss) are never held whole: the model computes logits for its last
    position only, its final hidden states are kept (a forward hook on the decoder), and they pass through the output
    layer ``chunk_tokens`` positions at a time. Same loss, same gradients.

    A frozen output layer (LoRA and QLoRA on the blocks, the recipes') computes each chunk's logits once: forward
    keeps the gradient of each token's loss with respect to its hidden state instead of the logits
    (:class:`FrozenHeadLosses`); under ZeRO-3 its partitioned weights are gathered once per micro-batch. An output
    layer that trains (a full fine-tune, a LoRA target) is checkpointed per chunk, its logits recomputed in backward.
    Under ZeRO-3 each of those calls gathers its weights from all processes (once in forward, twice in backward),
    so every process must make as many chunks whatever its batch's length: the chunks cover ``max_tokens`` (the most
    tokens a micro-batch can hold), those past the batch's end empty."""
    if not chunk_tokens:
        return causal_lm_loss_sum(model(**inputs).logits, labels)
    net = getattr(model, "module", model)  # DDP / DeepSpeed wrapper: the forward still goes through it
    kept = []
    hook = net.get_decoder().register_forward_hook(lambda module, args, out: kept.append(out.last_hidden_state))
    try:
        model(**inputs, logits_to_keep=1)
    finally:
        hook.remove()
    hidden, targets = kept[-1][:, :-1].reshape(-1, kept[-1].size(-1)), labels[:, 1:].reshape(-1)
    head = net.get_output_embeddings()
    if type(head) is torch.nn.Linear and not any(p.requires_grad for p in head.parameters()):
        with modeling.gathered(head):  # ZeRO-3: once for all the chunks
            per_token = FrozenHeadLosses.apply(hidden, head.weight, head.bias, targets, chunk_tokens)
    else:
        span = len(targets)
        if any(hasattr(p, "ds_id") for p in head.parameters()):  # partitioned by ZeRO-3
            if max_tokens is None or len(targets) > max_tokens:
                raise ValueError(f"cross_entropy_chunk_tokens under ZeRO-3: a micro-batch of {len(targets)} tokens, "
                                 f"more than max_tokens={max_tokens}; every process must make the same chunks")
            span = max_tokens
        # determinism_check off: ZeRO-3 releases a frozen output layer's gathered weights after the recompute and
        # gathers them again before its backward, so their shape at the check is the empty shard's (the values used
        # are whole)
        per_token = torch.cat([torch.utils.checkpoint.checkpoint(_token_losses, head, hidden[s:s + chunk_tokens],
                                                                 targets[s:s + chunk_tokens], use_reentrant=False,
                                                                 determinism_check="none")
                               for s in range(0, span, chunk_tokens)])
    mask = labels[:, 1:].ne(-100)
    return (per_token.view(mask.shape) * mask).sum(dim=1), mask.sum(dim=1)


def _token_losses(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(head(hidden).float(), targets, ignore_index=-100, reduction="none")


class FrozenHeadLosses(torch.autograd.Function):
    """Per-token cross-entropy of hidden states [tokens x hidden] through a frozen output layer (``weight``,
    ``bias``), ``chunk_tokens`` rows at a time. Forward computes each chunk's logits once, its losses (0 where the
    target is -100) and, when the hidden states need a gradient, the gradient of each token's loss with respect to
    its own hidden state, (softmax - one-hot) @ weight, in the logits' dtype as autograd's path would: that
    gradient depends on nothing else, so backward only scales its rows by the gradients of the losses. No logits
    are kept and none recomputed: two matmuls with the output layer per chunk instead of a checkpoint's three."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens):
        wants_grad = ctx.needs_input_grad[0]
        losses = hidden.new_empty(len(targets), dtype=torch.float32)  # every row is written below
        grads = torch.empty_like(hidden) if wants_grad else None
        for s in range(0, len(targets), chunk_tokens):
            logits = torch.nn.functional.linear(hidden[s:s + chunk_tokens], weight, bias)
            log_probs = logits.float().log_softmax(-1)
            chunk = targets[s:s + chunk_tokens]
            kept = chunk.ne(-100)
            at = chunk.clamp(min=0).unsqueeze(1)
            losses[s:s + chunk_tokens] = torch.where(kept, -log_probs.gather(1, at).squeeze(1), 0.0)
            if wants_grad:
                d_logits = log_probs.exp_().scatter_add_(1, at, torch.full_like(at, -1, dtype=log_probs.dtype))
                grads[s:s + chunk_tokens] = torch.matmul(d_logits.to(logits.dtype), weight.to(logits.dtype)) * \
                    kept.unsqueeze(1)
        ctx.save_for_backward(grads)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        (grads,) = ctx.saved_tensors
        return grads * grad_losses.unsqueeze(1).to(grads.dtype), None, None, None, None
