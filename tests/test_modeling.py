"""Model building, LoRA target checks, optimizers and the token-summed loss."""

import logging
import os
import warnings

import pytest
import torch

from conftest import TINY_QA, TINY_SUMMARIZE, load_script
from ftkit import config as cfg, losses, modeling, optim
from ftkit.config import ConfigError

qs = load_script("qlora_summarize")


def tiny_config(**overrides):
    return cfg.build(qs.SummarizeConfig, cfg.load_yaml_recipe(TINY_SUMMARIZE), overrides)


def test_max_length_follows_s001_lookup_order():
    from transformers import GPT2Config, PhiConfig, PretrainedConfig

    assert modeling.max_positions(GPT2Config(n_positions=256)) == 256
    assert modeling.max_positions(PhiConfig(max_position_embeddings=300)) == 300
    assert modeling.max_positions(PretrainedConfig()) == 1024


def test_lora_target_that_matches_nothing_lists_the_linear_layers():
    from transformers import AutoModelForCausalLM

    config = tiny_config()
    model_cfg = modeling.auto_config(config)
    modeling.check_lora_targets(model_cfg, AutoModelForCausalLM, ["q_proj", "dense"])
    with pytest.raises(ConfigError, match=r"lora_target_modules: 'query_key_value' matches no module of this model "
                                          r"\(linear layers: dense, fc1, fc2, k_proj, q_proj, v_proj\)"):
        modeling.check_lora_targets(model_cfg, AutoModelForCausalLM, ["q_proj", "query_key_value"])


def test_loss_sum_matches_mean_cross_entropy_times_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 1, 2, -100, -100]])
    loss_sum, count = losses.causal_lm_loss_sum(logits, labels)
    assert count.tolist() == [3, 2]
    mean = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    assert torch.allclose(loss_sum.sum() / count.sum(), mean)
    assert losses.count_target_tokens(labels) == 5


@pytest.mark.parametrize("name", ["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit",
                                  "paged_adamw_32bit", "sgd"])
def test_every_optimizer_steps_only_trainable_parameters(name, caplog):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    model[0].requires_grad_(False)
    config = tiny_config(optim=name, learning_rate=1e-2, weight_decay=0.1)
    with warnings.catch_warnings(record=True) as warned, caplog.at_level(logging.INFO, logger="ftkit"):
        warnings.simplefilter("always")
        opt = optim.build_optimizer(model, config)
        assert sum(len(g["params"]) for g in opt.param_groups) == 4  # LayerNorm (2) + last Linear (2)
        assert {g["weight_decay"] for g in opt.param_groups} == {0.1, 0.0}  # no decay on bias / norm
        frozen, before = model[0].weight.clone(), model[2].weight.clone()
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
    assert torch.equal(model[0].weight, frozen) and not torch.equal(model[2].weight, before)
    # a paged optimizer on CPU: one line before training, not bitsandbytes' UserWarning amid the progress bar
    assert [str(w.message) for w in warned if "aged" in str(w.message)] == []
    assert ("on CPU, bitsandbytes keeps it unpaged" in caplog.text) == name.startswith("paged_"), caplog.text


def test_fused_adamw_follows_the_loop_adamw():
    def train(name):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
        opt = optim.build_optimizer(model, tiny_config(optim=name, learning_rate=3e-2, weight_decay=0.1))
        inputs, targets, losses = torch.randn(64, 16), torch.randint(0, 4, (64,)), []
        for _ in range(30):
            loss = torch.nn.functional.cross_entropy(model(inputs), targets)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses, torch.cat([p.detach().flatten() for p in model.parameters()])

    (plain, w_plain), (fused, w_fused) = train("adamw_torch"), train("adamw_torch_fused")
    assert fused == pytest.approx(plain, rel=1e-5)
    assert plain[-1] < 0.5 * plain[0], plain
    assert (w_fused - w_plain).abs().max() <= 1e-5 * w_plain.abs().max()


def test_scheduler_warms_up_then_decays():
    model = torch.nn.Linear(2, 2)
    config = tiny_config(learning_rate=1.0, warmup_steps=2, lr_scheduler_type="linear")
    opt = optim.build_optimizer(model, config)
    sched = optim.build_scheduler(opt, config, total_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5, 0.25])
    assert optim.total_optimizer_steps(tiny_config(max_steps=-1, num_train_epochs=2.5), 4) == 10


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant", "constant_with_warmup"])
@pytest.mark.parametrize("warmup,total", [(0, 1), (0, 7), (3, 10), (5, 5), (4, 3)])
def test_scheduler_gives_transformers_rates_and_state(kind, warmup, total):
    """ftkit's schedules are its own (no transformers.optimization import at start-up): the rates of
    transformers.get_scheduler at every step, past the end too, and a state the other one loads."""
    from transformers import get_scheduler

    config = tiny_config(learning_rate=0.3, warmup_steps=warmup, lr_scheduler_type=kind)
    ours_opt, theirs_opt = (optim.build_optimizer(torch.nn.Linear(2, 2), config) for _ in range(2))
    ours = optim.build_scheduler(ours_opt, config, total_steps=total)
    theirs = get_scheduler(kind, optimizer=theirs_opt, num_warmup_steps=warmup, num_training_steps=total)
    for _ in range(total + 3):
        assert ours.get_last_lr() == pytest.approx(theirs.get_last_lr(), rel=1e-12, abs=0), (kind, ours.last_epoch)
        ours_opt.step(), theirs_opt.step()
        ours.step(), theirs.step()
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())
    assert ours.last_epoch == theirs.last_epoch == total + 3


def test_tokenizer_built_offline_round_trips_unseen_text(tiny_tokenizer):
    text = "#Person1#: Zebra café ünïcode 123?"
    assert tiny_tokenizer.decode(tiny_tokenizer(text)["input_ids"]) == text
    assert tiny_tokenizer.eos_token == tiny_tokenizer.pad_token == "<|endoftext|>"


def tiny_4bit_base(tmp_path, tokenizer, **overrides):
    """The tiny recipe's Phi, saved with random weights and loaded in 4-bit as the script loads it."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(output_dir=str(tmp_path), **overrides)
    model_cfg = modeling.auto_config(config)
    model_cfg.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(model_cfg).save_pretrained(tmp_path / "base")
    return modeling.load_pretrained(AutoModelForCausalLM, str(tmp_path / "base"), config), config


def linear4bit_layers(model):
    from bitsandbytes.nn import Linear4bit

    return [m for m in model.modules() if isinstance(m, Linear4bit)]


def test_4bit_lora_model_trains_only_adapters(tmp_path, tiny_tokenizer):
    model, config = tiny_4bit_base(tmp_path, tiny_tokenizer)
    assert linear4bit_layers(model)
    model = modeling.add_lora(model, config, "CAUSAL_LM")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    trainable_count, total = modeling.parameter_counts(model)
    assert 0 < trainable_count < total


def train_step_after_an_evaluation(model, tokenizer):
    """What the script does at an evaluation between training steps: a no-grad eval forward, then train."""
    ids = torch.tensor([tokenizer("#Person1#: Hello there. #Person2#: Hi!")["input_ids"]])
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss


@pytest.mark.parametrize("cpu_has_avx512bf16", [True, False], ids=["avx512bf16", "no-avx512bf16"])
def test_a_4bit_model_being_trained_never_takes_the_cpu_inference_layout(tmp_path, tiny_tokenizer, monkeypatch,
                                                                          cpu_has_avx512bf16):
    # bitsandbytes asks the CPU once per Linear4bit; forcing the answer runs both of its branches on any CPU
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: cpu_has_avx512bf16)
    model, config = tiny_4bit_base(tmp_path, tiny_tokenizer)
    assert {layer.support_avx512bf16_for_cpu for layer in linear4bit_layers(model)} == {cpu_has_avx512bf16}
    model = modeling.add_lora(model, config, "CAUSAL_LM")
    loss = train_step_after_an_evaluation(model, tiny_tokenizer)
    assert not [layer for layer in linear4bit_layers(model) if getattr(layer.weight.quant_state, "packing_format_for_cpu", False)]
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert torch.isfinite(loss) and grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_bitsandbytes_hub_kernel_notices_are_dropped_and_other_warnings_kept():
    # they come at import on AVX512-BF16 CPUs only (the real import below); the same loggers' records are sent on any CPU
    import subprocess
    import sys

    code = ("import logging, ftkit, bitsandbytes; logging.basicConfig(format='%(message)s')\n"
            "import bitsandbytes.backends.cpu.ops\n"
            "log = logging.getLogger('bitsandbytes.backends.cpu.ops')\n"
            "log.warning('Failed to load CPU gemm_4bit_forward from kernels-community: %s', 'offline')\n"
            "log.warning('another warning')\n"
            "log = logging.getLogger('kernels._internals.hf_hub')\n"
            "log.warning('Skipping publisher trust check for %r (offline)', 'kernels-community/quantization-bitsandbytes')\n"
            "log.warning('Skipping publisher trust check for %r (offline)', 'kernels-community/flash-attn')")
    for offline in ("0", "1"):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "HF_HUB_OFFLINE": offline})
        assert proc.returncode == 0 and "another warning" in proc.stderr, proc.stderr[-2000:]
        assert "kernels-community/flash-attn" in proc.stderr, proc.stderr[-2000:]  # another kernel's is kept
        assert "bitsandbytes" not in proc.stderr and "gemm_4bit" not in proc.stderr, proc.stderr[-2000:]


def test_a_4bit_weight_already_in_the_cpu_inference_layout_is_restored_for_training(tmp_path, tiny_tokenizer):
    from bitsandbytes.functional import _convert_weight_packed_for_cpu, dequantize_4bit

    model, config = tiny_4bit_base(tmp_path, tiny_tokenizer)
    layer = linear4bit_layers(model)[0]
    before = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data,
                                                                                 layer.weight.quant_state)
    assert layer.weight.quant_state.packing_format_for_cpu
    model = modeling.add_lora(model, config, "CAUSAL_LM")
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    after = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    # double quantization re-quantizes the block scales on the way back: equal to their 8-bit precision
    assert torch.allclose(after, before, atol=1e-2 * before.abs().max().item())
    assert torch.isfinite(train_step_after_an_evaluation(model, tiny_tokenizer))


def test_without_the_upcast_unquantized_weights_stay_in_the_compute_dtype_and_train_alike(tmp_path, tiny_tokenizer):
    # peft's k-bit preparation casts every unquantized bf16 weight (embeddings, head, norms, biases) to fp32;
    # upcast_unquantized_weights false keeps them in bf16: half their bytes, and the losses of a few steps agree
    ids = torch.tensor([tiny_tokenizer("#Person1#: Hello there, how are you? #Person2#: Fine, thanks!")["input_ids"]])
    runs = {}
    for upcast in (True, False):
        model, config = tiny_4bit_base(tmp_path / str(upcast), tiny_tokenizer, bnb_4bit_compute_dtype="bfloat16",
                                       lora_dropout=0.0, upcast_unquantized_weights=upcast, learning_rate=1e-2)
        model = modeling.add_lora(model, config, "CAUSAL_LM")
        frozen = [p for p in model.parameters() if not p.requires_grad and p.__class__.__name__ != "Params4bit"]
        assert frozen and {p.dtype for p in frozen} == {torch.float32 if upcast else torch.bfloat16}
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}  # the adapters
        assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
        prepared_bytes = sum(p.numel() * p.element_size() for p in frozen)
        opt, losses = optim.build_optimizer(model, config), []
        for _ in range(4):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        runs[upcast] = losses, prepared_bytes, sum(p.numel() * p.element_size() for p in frozen)
    (upcast_losses, upcast_prepared, upcast_trained), (kept_losses, kept_prepared, kept_trained) = runs[True], runs[False]
    assert kept_prepared == upcast_prepared // 2
    # bitsandbytes casts a 4-bit layer's bias to its input's dtype at the first forward: that part of the upcast
    # is undone anyway; the embeddings, head and norms stay in fp32
    assert kept_trained == kept_prepared and kept_prepared < upcast_trained < upcast_prepared
    assert upcast_losses[-1] < upcast_losses[0] - 0.1, upcast_losses  # it trains: the comparison means something
    assert kept_losses == pytest.approx(upcast_losses, rel=1e-2)  # bf16 keeps 8 significant bits; 4e-4 measured


def test_frozen_head_losses_are_cross_entropy_and_their_gradients_any_weighting_of_them():
    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(11, 8, requires_grad=True), torch.randn(30, 8), torch.randn(30)
    targets = torch.randint(0, 30, (11,))
    targets[[2, 7]] = -100
    weighting = torch.rand(11)  # not the same for every token
    exact = hidden.detach().double().requires_grad_()  # the reference, in float64
    expected = torch.nn.functional.cross_entropy(torch.nn.functional.linear(exact, weight.double(), bias.double()),
                                                 targets, ignore_index=-100, reduction="none")
    (expected * weighting.double()).sum().backward()
    got = losses.FrozenHeadLosses.apply(hidden, weight, bias, targets, 4)  # chunks of 4, 4 and 3
    (got * weighting).sum().backward()
    assert got.dtype == torch.float32 and torch.allclose(got.double(), expected, rtol=1e-5)
    assert torch.allclose(hidden.grad.double(), exact.grad, rtol=1e-5, atol=1e-6) and not hidden.grad[[2, 7]].any()


@pytest.mark.parametrize("head", ["lora head", "frozen head"])
@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_chunked_cross_entropy_gives_the_loss_and_gradients_of_the_whole_batch(tmp_path, tiny_tokenizer, quantized,
                                                                              head):
    # a LoRA output layer: each chunk checkpointed (logits computed in forward and again in backward); a frozen one
    # (the recipes'): each chunk's logits computed once, in forward (FrozenHeadLosses)
    from transformers import AutoModelForCausalLM

    targets = ["q_proj", "k_proj", "v_proj", "dense"] + (["lm_head"] if head == "lora head" else [])
    model, config = tiny_4bit_base(tmp_path, tiny_tokenizer, load_in_4bit=quantized, lora_target_modules=targets)
    if not quantized:
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = modeling.add_lora(model, config, "CAUSAL_LM")
    model.eval()  # no LoRA dropout: the two passes must see the same network
    torch.manual_seed(0)
    for name, p in model.named_parameters():  # B = 0 (LoRA's start) would give A no gradient to compare
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    output_layer = model.get_output_embeddings()
    assert (type(output_layer) is torch.nn.Linear) == (head == "frozen head")
    assert output_layer.bias is not None  # Phi's output layer has one
    calls = []
    output_layer.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[:-1].numel()))
    texts = ["#Person1#: Hello there, how are you? #Person2#: Fine.", "#Person1#: Bye."]
    enc = tiny_tokenizer(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"].eq(0), -100)
    labels[:, :3] = -100
    for autocast in (False, True):  # fp32, and bf16 autocast as on a GPU
        results = []
        for chunk in (None, 7):
            model.zero_grad()
            calls.clear()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss_sum, count = losses.causal_lm_forward_loss(model, dict(enc), labels, chunk)
            loss_sum.sum().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            results.append((loss_sum.detach(), count, grads, list(calls)))
        (plain, n_plain, g_plain, c_plain), (chunked, n_chunked, g_chunked, c_chunked) = results
        tokens = labels[:, 1:].numel()
        assert c_plain == [labels.numel()]
        chunks = -(-tokens // 7)  # forward (and backward's recompute: a call each too) of each chunk
        assert c_chunked == [2] + ([7] * (chunks - 1) + [tokens - 7 * (chunks - 1)]) * (
            2 if head == "lora head" else 0), c_chunked  # (the model's own call: logits of the last positions)
        # measured: gradients 4e-7 of the largest apart in fp32; in bf16 equal (frozen head) or 5e-3 (LoRA head)
        rtol, atol = (1e-5, 1e-6) if not autocast else (1e-3, 1e-2)
        assert torch.equal(n_plain, n_chunked) and torch.allclose(chunked, plain, rtol=rtol), (autocast, chunked, plain)
        assert g_plain.keys() == g_chunked.keys() and any("lm_head" in n for n in g_plain) == (head == "lora head")
        for name, grad in g_plain.items():
            scale = grad.abs().max().item()
            assert torch.allclose(g_chunked[name], grad, rtol=rtol * 10, atol=atol * scale), (autocast, name)
            assert scale > 1e-3, name  # every adapter has a gradient to compare
    # the script's evaluation loss takes the same chunks: an evaluation batch's logits are never held whole either
    from accelerate import Accelerator

    rows = [{"input_ids": i, "attention_mask": m, "labels": lab} for i, m, lab in
            zip(enc["input_ids"], enc["attention_mask"], labels)]
    evaluated = []
    for chunk in (None, 7):
        calls.clear()
        config.cross_entropy_chunk_tokens = chunk
        dl = torch.utils.data.DataLoader(rows, batch_size=2)
        evaluated.append((qs.eval_loss(Accelerator(cpu=True), model, dl, config, labels.size(1)), list(calls)))
    assert evaluated[1][0] == pytest.approx(evaluated[0][0], rel=1e-6), evaluated
    assert max(evaluated[1][1]) <= 7 < max(evaluated[0][1]) == labels.numel(), evaluated  # no whole-batch call


@pytest.mark.parametrize("model_type", ["phi", "t5"])
def test_sdpa_attention_the_default_gives_the_loss_of_eager_attention(model_type):
    # transformers picks sdpa for both (T5 with its position bias as an additive mask); eager is the reference
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    sizes = {"phi": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0),
             "t5": dict(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, dropout_rate=0.0)}[model_type]
    cls = AutoModelForSeq2SeqLM if model_type == "t5" else AutoModelForCausalLM
    torch.manual_seed(0)
    model = cls.from_config(AutoConfig.for_model(model_type, vocab_size=100, **sizes))
    assert model.config._attn_implementation == "sdpa"
    ids, mask = torch.randint(1, 100, (2, 12)), torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    labels = ids.masked_fill(mask.eq(0), -100)
    extra = {"decoder_input_ids": modeling.shift_right(labels, 0, 0)} if model_type == "t5" else {}
    by_kernel = {}
    for kernel in ("sdpa", "eager"):
        model.set_attn_implementation(kernel)
        logits = model(input_ids=ids, attention_mask=mask, **extra).logits
        by_kernel[kernel] = losses.causal_lm_loss_sum(logits, labels, shift=model_type != "t5")[0]
    assert torch.allclose(by_kernel["sdpa"], by_kernel["eager"], rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_torch_compile_compiles_every_block_and_keeps_the_loss_and_gradients(tmp_path, tiny_tokenizer, quantized):
    # in training mode, as the scripts train: the blocks are checkpointed (the tiny recipe's gradient_checkpointing),
    # and each must be one graph with no break (a break runs the block eagerly: the same loss, no speed)
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM

    _, config = tiny_4bit_base(tmp_path, tiny_tokenizer, load_in_4bit=False, lora_dropout=0.0)
    assert config.gradient_checkpointing
    config.load_in_4bit = quantized
    enc = tiny_tokenizer(["#Person1#: Hello there, how are you? #Person2#: Fine, thanks."], return_tensors="pt")
    results = []
    for compiled in (False, True):
        config.torch_compile = compiled
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)  # the same LoRA initialisation
        model = modeling.add_lora(modeling.load_pretrained(AutoModelForCausalLM, str(tmp_path / "base"), config),
                                  config, "CAUSAL_LM").train()
        blocks = [m for m in model.modules() if type(m).__name__ == "PhiDecoderLayer"]
        assert len(blocks) == 2 and all((getattr(b, "_compiled_call_impl", None) is not None) == compiled for b in blocks)
        loss_sum, _ = losses.causal_lm_forward_loss(model, dict(enc), enc["input_ids"])
        loss_sum.sum().backward()
        results.append((loss_sum.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
        if compiled:  # both blocks ran one graph (shared), with no break
            assert not counters["graph_break"], dict(counters["graph_break"])
            assert counters["stats"]["unique_graphs"] == 1 and counters["frames"]["ok"] >= 1, dict(counters["stats"])
    (eager, g_eager), (compiled, g_compiled) = results
    assert torch.allclose(compiled, eager, rtol=1e-5)
    for name, grad in g_eager.items():
        assert torch.allclose(g_compiled[name], grad, rtol=1e-4, atol=1e-6 * grad.abs().max().item()), name


@pytest.mark.slow
def test_torch_compile_t5_trains_and_evaluates_in_compiled_blocks_without_breaks_or_eager_fallback():
    # T5's blocks need a graph each for the first block of a stack (it computes the position bias), the others, the
    # decoder's, and each of those again for no-grad evaluation: past torch.compile's limit they would run eagerly
    from torch._dynamo.utils import counters
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    qa = load_script("t5_qa")
    config = cfg.build(qa.QAConfig, cfg.load_yaml_recipe(TINY_QA), {})
    model_cfg = AutoConfig.for_model("t5", vocab_size=120, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                     dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    base = AutoModelForSeq2SeqLM.from_config(model_cfg).state_dict()
    batches = [(torch.randint(2, 120, (2, n)), torch.randint(2, 120, (2, m))) for n, m in ((12, 5), (9, 4), (15, 6))]
    losses = {}
    torch._dynamo.config.fail_on_recompile_limit_hit = True  # an eager fallback fails the test
    try:
        for compiled in (False, True):
            config.torch_compile = compiled
            torch._dynamo.reset()
            counters.clear()
            model = AutoModelForSeq2SeqLM.from_config(model_cfg)
            model.load_state_dict(base)
            model = modeling.training_setup(model, config).train()
            run = []
            for ids, labels in batches:
                loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
                loss.backward()
                run.append(loss.detach())
            model.eval()
            with torch.no_grad():
                for ids, labels in batches:
                    run.append(model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss)
            losses[compiled] = torch.stack(run)
            if compiled:
                assert not counters["graph_break"], dict(counters["graph_break"])
                assert counters["stats"]["unique_graphs"] >= 4, dict(counters["stats"])
    finally:
        torch._dynamo.config.fail_on_recompile_limit_hit = False
    assert torch.allclose(losses[True], losses[False], rtol=1e-5), losses
