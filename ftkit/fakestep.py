"""One training step of a recipe's model on fake tensors (shapes, no weights, no memory), and the evaluation and
generation between steps, with the bytes of tensor storage alive at once counted, and what a GPU step would hold
instead where a CPU step differs (fused attention, autocast's float32 ops). Not here: the per-device accounting
under DDP/ZeRO, the verdict and the report (preflight.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ftkit import modeling

BNB_OPTIMIZERS = {"adamw_8bit": 2, "paged_adamw_8bit": 2, "paged_adamw_32bit": 8}  # state bytes per parameter
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps 32-bit state for smaller tensors
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")  # kept unquantized by transformers' bitsandbytes


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage alive at once, on real or fake tensors: each storage an operation creates (or that
    :meth:`add` is given) counts from its creation until it is freed; ``peak`` is the most at any moment."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key, size = id(storage), storage.nbytes()
        if key in self.live:
            return
        self.live[key] = weakref.ref(storage, lambda _, key=key, size=size: self._free(key, size))
        self.now += size
        self.peak = max(self.peak, self.now)

    def _free(self, key: int, size: int) -> None:
        if self.live.pop(key, None) is not None:
            self.now -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out


class FusedAttention(torch.autograd.Function):
    """What a GPU's fused attention kernels (flash, memory-efficient) hold: the output, the inputs and a log-sum-exp
    row statistic are saved for backward, no score matrix; backward makes the input gradients (and the mask's, when
    it has one, like T5's learned position bias). Shapes only: used on fake tensors."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        ctx.mask_shape = None if mask is None or not mask.requires_grad else (
            torch.broadcast_shapes(mask.shape, q.shape[:-1] + k.shape[-2:-1]), mask.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        mask = None if ctx.mask_shape is None else q.new_empty(ctx.mask_shape[0], dtype=ctx.mask_shape[1])
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), mask


class CudaRules(torch.overrides.TorchFunctionMode):
    """A CPU step that holds what the same step on a GPU would: attention through :class:`FusedAttention`, and under
    bf16 autocast CUDA's float32 list (the CPU's keeps these ops in bf16: e.g. ``pow`` in GELU's tanh form and
    ``layer_norm``/``softmax`` of bf16 inputs give fp32 tensors on a GPU, twice the bytes)."""

    FLOAT32 = {"acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
               "sinh", "tan", "pow", "__pow__", "__rpow__", "softplus", "layer_norm", "group_norm", "cosine_similarity",
               "nll_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "cross_entropy",
               "binary_cross_entropy_with_logits", "cdist", "renorm", "logsumexp", "prod", "softmax", "log_softmax",
               "cumprod", "cumsum", "sum", "norm"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs, name, autocast = kwargs or {}, getattr(func, "__name__", ""), torch.is_autocast_enabled("cpu")
        if name == "scaled_dot_product_attention":
            q, k, v, mask = (list(args) + [kwargs.get("attn_mask")])[:4]
            if autocast:  # autocast casts every floating input of attention, the mask too
                q, k, v, mask = (t.to(torch.bfloat16) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                                 for t in (q, k, v, mask))
            return FusedAttention.apply(q, k, v, mask)
        if autocast and name in self.FLOAT32:
            args, kwargs = torch.utils._pytree.tree_map(
                lambda t: t.float() if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 else t, (args, kwargs))
        return func(*args, **kwargs)


class OutputLayerWatch(torch.overrides.TorchFunctionMode):
    """The largest output of the output layer (``weight``'s linear: a module call, a chunk's in the chunked loss,
    or the single-pass loss's functional call), and its fp32 copy for the loss, in ``bytes``."""

    def __init__(self, weight):
        super().__init__()
        self.weight, self.bytes, self.watching = weight, 0, True

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        weight = args[1] if len(args) > 1 else (kwargs or {}).get("weight")
        if self.watching and func is torch.nn.functional.linear and weight is self.weight:
            self.bytes = max(self.bytes, out.numel() * (out.element_size() + (4 if out.dtype != torch.float32 else 0)))
        return out


# --- The step ------------------------------------------------------------------------------------


def _elements_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def quantized_bytes(numel: int, config) -> float:
    """Bytes bitsandbytes holds for a weight of ``numel`` elements: 4-bit with a scale per 64 (double quantization:
    8-bit scales and one fp32 per 256 of them), or 8-bit with a fp32 scale per row (about)."""
    if config.load_in_8bit:
        return numel * (1 + 4 / 4096)
    scales = numel / 64 * (1 + 4 / 256) if config.bnb_4bit_use_double_quant else numel / 64 * 4
    return numel / 2 + scales


def fake_parameters(model) -> None:
    """Each parameter and buffer of ``model`` replaced by an empty one of its shape and dtype (a fake one, inside a
    ``FakeTensorMode``); tied weights (T5's embeddings and head, GPT-2's) stay one tensor."""
    fakes = {}
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) not in fakes:  # (the real one is kept in the entry: its id is not reused while it lives)
                fakes[id(p)] = (p, torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype), p.requires_grad))
            setattr(module, name, fakes[id(p)][1])
        for name, b in list(module.named_buffers(recurse=False)):
            module._buffers[name] = torch.empty(b.shape, dtype=b.dtype)


def generation_bytes(model, rows: int, length: int, max_new_tokens: int, num_beams: int, live: LiveTensorBytes) -> int:
    """The most bytes ``generate`` (greedy or beam search, with its KV cache) adds to ``live`` for ``rows`` prompts of
    ``length`` tokens, on fake tensors: its first forward (the prompt's; or the encoder's, then the decoder's first
    token, which fills the cross-attention cache) and its last, with the cache at full length (each step between
    holds less than the last). Beam search runs every beam as a row; the encoder runs once per prompt. Beside each
    forward's logits, the next token's scores as ``generate`` holds them: its fp32 copy of the step's, and the previous
    step's (with beam search, their log-probabilities and those plus the running beam scores too)."""
    ids = torch.zeros(rows, length, dtype=torch.long)
    mask, rows, start = torch.ones_like(ids), rows * num_beams, live.now
    live.peak = start
    if model.config.is_encoder_decoder:
        hidden = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        fixed = {"encoder_outputs": (hidden.repeat_interleave(num_beams, 0),),
                 "attention_mask": mask.repeat_interleave(num_beams, 0)}
        del hidden
        name, tokens, mask = "decoder_input_ids", ids.new_zeros(rows, 1), None
    else:  # only the last position's logits are computed
        fixed, name, tokens = {"logits_to_keep": 1}, "input_ids", ids.repeat_interleave(num_beams, 0)
        mask = torch.ones_like(tokens)

    held = []  # what generate keeps of a step's scores into the next step

    def forward(tokens, cache):
        nonlocal mask, held
        extra = {}
        if mask is not None:  # a decoder's mask covers its cache and the new tokens
            if cache is not None:
                mask = torch.cat([mask, mask.new_ones(rows, tokens.shape[1])], 1)
            extra["attention_mask"] = mask
        out = model(**{name: tokens}, cache=cache, use_cache=True, **fixed, **extra)
        cache = out.cache
        # generate copies the next token's scores to fp32 while the previous step's are still held
        scores, held = out.logits[:, -1].to(copy=True, dtype=torch.float32), held[1:]
        if num_beams == 1:
            held = [scores]
            return cache
        # beam search: the log-probabilities (the previous step's sum goes), then those plus each beam's running score
        log_probs, held = torch.log_softmax(scores, -1), []
        del out
        held = [scores, log_probs + 0.0]
        return cache

    cache = forward(tokens, None)
    if max_new_tokens > 2:  # the cache grown to its size at the last step, not counted (the steps between hold less)
        peak = live.peak
        cache = forward(tokens.new_zeros(rows, max_new_tokens - 2), cache)
        live.peak = max(peak, live.now)
    if max_new_tokens > 1:
        forward(tokens.new_zeros(rows, 1), cache)
    return live.peak - start


def fake_step(config, model_cfg, auto_cls, setup, step_loss, batch: dict, device: str,
              eval_batch: dict | None = None, generation: tuple | None = None) -> dict:
    """The training step that holds the most (a later step's last micro-batch: forward, loss, backward, clipping,
    optimizer) of the model as the script builds it, run on fake tensors (shapes, no memory), with the bytes alive
    counted: returns the bytes by part on one device. With ``eval_batch``, then the loss of that batch as an
    evaluation computes it between steps (eval mode, no gradient, the optimizer state alive):
    ``evaluation_activations``, the most bytes it adds; with ``generation`` (rows, prompt length, new tokens, beams),
    what that evaluation's ``generate`` adds: ``generation_activations``."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = modeling.skeleton_of(model_cfg, auto_cls, dtype=weights_dtype(config, model_cfg))
    quantized = []
    if config.load_in_4bit or config.load_in_8bit:  # bitsandbytes' layers: fake ones in the compute dtype
        quantized = [m for name, m in model.named_modules() if type(m) is torch.nn.Linear
                     and m is not model.get_output_embeddings() and name.rsplit(".", 1)[-1] not in HEAD_NAMES]
        model.is_loaded_in_4bit, model.is_loaded_in_8bit = config.load_in_4bit, config.load_in_8bit
    model = setup(model, dataclasses.replace(config, torch_compile=False))
    compute = modeling.DTYPES[config.bnb_4bit_compute_dtype] if config.load_in_4bit else torch.float32
    for m in quantized:  # k-bit preparation may have upcast them as any unquantized weight; bitsandbytes' stay
        m.weight.data = m.weight.data.to(compute)  # and a matmul never saves a cast copy of them for backward
    if device == "cuda":  # checkpointed blocks recompute in backward, where the mode is not on: they enter it too
        for m in model.modules():
            if getattr(m, "_gradient_checkpointing_func", None) is not None:
                m._gradient_checkpointing_func = functools.partial(
                    m._gradient_checkpointing_func, context_fn=lambda: (contextlib.nullcontext(), CudaRules()))
    with FakeTensorMode(allow_non_fake_inputs=True) as fake:
        fake_parameters(model)
        batch = {k: fake.from_tensor(v) for k, v in batch.items()}
        eval_batch = {k: fake.from_tensor(v) for k, v in eval_batch.items()} if eval_batch is not None else None
        trainable = [p for p in model.parameters() if p.requires_grad]
        if config.optim in BNB_OPTIMIZERS or config.optim == "sgd":  # bitsandbytes' state is counted below
            optimizer = torch.optim.SGD(trainable, lr=1e-3)
        else:  # the kernels the run will use: a loop over tensors on a CPU, foreach (or fused) on a GPU
            optimizer = torch.optim.AdamW(trainable, foreach=device == "cuda" and config.optim == "adamw_torch",
                                          fused=config.optim == "adamw_torch_fused")
        head = model.get_output_embeddings()
        logits = OutputLayerWatch(head.weight if head is not None else None)
        live = LiveTensorBytes()
        for t in [*model.parameters(), *model.buffers()]:
            live.add(t)
        reached = set()  # the parameters a backward gives a gradient to
        hooks = [p.register_post_accumulate_grad_hook(lambda p: reached.add(p)) for p in trainable]
        with live, CudaRules() if device == "cuda" else contextlib.nullcontext(), logits:
            # The step that holds the most is a later step's last micro-batch: the optimizer state of the steps
            # before, the gradients of the micro-batches before, its own activations. Only that micro-batch runs
            # forward and backward; the state is made first by a step on empty gradients of every trainable
            # parameter (a parameter the loss never reaches has none in the run: its bytes leave the peak below).
            for p in trainable:
                p.grad = torch.empty_like(p)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if config.gradient_accumulation_steps > 1:
                for p in trainable:
                    p.grad = torch.zeros_like(p)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
                loss = step_loss(model, batch)
            loss.backward()
            del loss
            unused = [p for p in trainable if p not in reached]
            live.peak -= _elements_bytes(t for p in unused for t in [*optimizer.state.pop(p, {}).values(), p.grad]
                                         if isinstance(t, torch.Tensor))
            for p in unused:
                p.grad = None
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm, foreach=device == "cuda")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            training_peak, evaluation, generating = live.peak, 0, 0
            logits.watching = False  # the logits of training only
            model.eval()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
                if eval_batch is not None:
                    live.peak = before = live.now
                    step_loss(model, eval_batch)
                    evaluation = live.peak - before
                if generation is not None:
                    generating = generation_bytes(model, *generation, live)
            model.train()
        state = _elements_bytes(v for s in optimizer.state.values() for v in s.values()
                                if isinstance(v, torch.Tensor) and v.dim())  # (not the step counters)
    for hook in hooks:
        hook.remove()
    with_grad = [p for p in trainable if p in reached]
    weights, grads = _elements_bytes([*model.parameters(), *model.buffers()]), _elements_bytes(with_grad)
    kept = {id(m.weight) for m in quantized}  # bitsandbytes' weights, whatever dtype the fake ones have
    fp32 = [t for t in [*model.parameters(), *model.buffers()] if t.dtype == torch.float32 and id(t) not in kept]
    activations = max(training_peak - weights - grads - state, 0)
    if config.optim in BNB_OPTIMIZERS:
        state = sum(p.numel() * (BNB_OPTIMIZERS[config.optim] if p.numel() >= BNB_MIN_8BIT_SIZE else 8)
                    for p in with_grad)
    if quantized:  # their real size, and one weight dequantized at a time in the compute dtype
        weights += sum(quantized_bytes(m.weight.numel(), config) - _elements_bytes([m.weight]) for m in quantized)
        dequantized = max(m.weight.numel() for m in quantized) * compute.itemsize
        activations += dequantized
        evaluation += dequantized if eval_batch is not None else 0
        generating += dequantized if generation is not None else 0
    trainable_params = sum(p.numel() for p in trainable)
    return {"weights": weights, "gradients": grads, "optimizer": state, "activations": activations,
            "logits": logits.bytes, "trainable_params": trainable_params, "fp32_bytes": _elements_bytes(fp32),
            "fp32_trainable_bytes": _elements_bytes(t for t in fp32 if t.requires_grad),
            "frozen_params": sum(p.numel() for p in model.parameters()) - trainable_params,
            "evaluation_activations": evaluation, "generation_activations": generating}


def weights_dtype(config, model_cfg) -> torch.dtype:
    """The dtype ``modeling.load_pretrained`` gives the (unquantized) weights."""
    DTYPES = modeling.DTYPES
    if config.torch_dtype != "auto":
        return DTYPES[config.torch_dtype]
    if config.load_in_4bit:
        return DTYPES[config.bnb_4bit_compute_dtype]
    saved = str(getattr(model_cfg, "dtype", None) or "").replace("torch.", "")
    return torch.float32 if config.load_in_8bit or config.model_config is not None else DTYPES.get(saved, torch.float32)
