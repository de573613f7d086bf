"""--preflight: its memory estimate against the peak a real run then reaches (tests/peak_memory.py), its schedule
against what the run then does, the verdict and advice when a recipe does not fit, and bad input. Real scripts,
real accelerate launch (runs of several processes) and DeepSpeed engines for the runs it is compared with."""

import contextlib
import json
import os
import shutil

import pytest
import torch

from conftest import ROOT, launch, read_jsonl, run_python

pytestmark = pytest.mark.slow
RECIPES = os.path.join(ROOT, "recipes", "tiny")
SUMMARIZE = ["--config", os.path.join(RECIPES, "qlora_summarize.yaml"), "--num_test_compare", "1",
             "--max_new_tokens", "4", "--num_eval_generate", "0"]  # the base model's ROUGE: one short summary
# Phi-shaped and big enough that weights, optimizer state and activations all count (14M parameters)
PHI = SUMMARIZE + ["--tokenizer_vocab_size", "4096", "--model_config",
                   "{model_type: phi, hidden_size: 512, intermediate_size: 2048, num_hidden_layers: 4, "
                   "num_attention_heads: 8, max_position_embeddings: 512, partial_rotary_factor: 0.5, resid_pdrop: 0.0, "
                   "embd_pdrop: 0.0, attention_dropout: 0.0}"]
FULL = ["--use_peft", "false", "--load_in_4bit", "false", "--optim", "adamw_torch"]
LORA = ["--load_in_4bit", "false"]
NO_CHECKPOINTING = ["--gradient_checkpointing", "false"]
ZERO = {2: os.path.join(ROOT, "launch", "accelerate", "deepspeed_zero2.yaml"),
        3: os.path.join(ROOT, "launch", "accelerate", "deepspeed_zero3.yaml")}


def test_live_tensor_bytes_counts_each_storage_from_creation_to_free():
    from ftkit.fakestep import LiveTensorBytes

    live = LiveTensorBytes()
    with live:
        a = torch.zeros(1000)  # 4,000 bytes
        b = torch.zeros(500, dtype=torch.float64)  # 4,000
        view = a[:10]  # same storage: not counted again
        del a, b
        c = torch.ones(250)  # 1,000
    assert (live.peak, live.now) == (8000, 5000)  # a's storage lives on in its view
    del view, c
    assert live.now == 0


@pytest.mark.parametrize("model_type", ["t5", "gpt2"])
def test_tied_weights_are_counted_once_as_in_the_loaded_model(model_type):
    # T5's embeddings and output layer are one tensor, GPT-2's too: the skeleton and the fake step keep them one
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from conftest import load_script
    from ftkit import config as cfg, fakestep, modeling

    qa = load_script("t5_qa")
    config = cfg.build(qa.QAConfig, {"model_name_or_path": "x", "output_dir": "unused", "train_file": "unused.jsonl"})
    spec = {"t5": dict(d_model=128, d_ff=64, d_kv=16, num_layers=1, num_heads=2, decoder_start_token_id=0),
            "gpt2": dict(n_embd=128, n_layer=1, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)}[model_type]
    model_cfg = AutoConfig.for_model(model_type, vocab_size=4000, **spec)  # the embedding: most of the weights
    cls = AutoModelForSeq2SeqLM if model_type == "t5" else AutoModelForCausalLM
    loaded = cls.from_config(model_cfg)
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    params = sum(p.numel() for p in loaded.parameters())  # (each tensor once)
    skeleton = modeling.skeleton_of(model_cfg, cls)
    assert sum(p.numel() for p in skeleton.parameters()) == params
    ids = torch.zeros(2, 16, dtype=torch.long)
    batch = {"input_ids": ids, "labels": ids}
    parts = fakestep.fake_step(config, model_cfg, cls, modeling.training_setup, lambda m, b: m(**b).loss, batch, "cpu")
    assert parts["trainable_params"] == params
    assert parts["weights"] == parts["gradients"] == 4 * params and parts["optimizer"] == 8 * params, parts


def _gpt2_step_case(gradient_accumulation_steps: int):
    """A tiny GPT-2 and the t5_qa script's options (a full fine-tune with AdamW), for the fake step's tests."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from conftest import load_script
    from ftkit import config as cfg

    qa = load_script("t5_qa")
    config = cfg.build(qa.QAConfig, {"model_name_or_path": "x", "output_dir": "unused", "train_file": "unused.jsonl",
                                     "gradient_accumulation_steps": gradient_accumulation_steps,
                                     "gradient_checkpointing": False, "optim": "adamw_torch"})
    model_cfg = AutoConfig.for_model("gpt2", vocab_size=512, n_embd=64, n_layer=2, n_head=2, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    ids = torch.zeros(4, 48, dtype=torch.long)
    return config, model_cfg, AutoModelForCausalLM, {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("accumulation", [1, 3])
def test_the_fake_step_holds_what_real_steps_hold_at_their_busiest(accumulation):
    # the fake step runs one micro-batch, after an optimizer step on empty gradients (and, accumulating, with the
    # earlier micro-batches' gradients made empty): real steps on real tensors reach the same peak
    from ftkit import fakestep, modeling

    config, model_cfg, cls, batch = _gpt2_step_case(accumulation)
    parts = fakestep.fake_step(config, model_cfg, cls, modeling.training_setup, lambda m, b: m(**b).loss, batch, "cpu")
    estimate = parts["weights"] + parts["gradients"] + parts["optimizer"] + parts["activations"]
    torch.manual_seed(0)
    model = modeling.training_setup(cls.from_config(model_cfg), config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    with fakestep.LiveTensorBytes() as live:
        for t in [*model.parameters(), *model.buffers()]:
            live.add(t)
        for _ in range(3):
            for _ in range(accumulation):
                model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    assert abs(estimate / live.peak - 1) < 0.01, (estimate, live.peak, parts)


def test_a_trainable_parameter_the_loss_never_reaches_has_no_gradient_or_optimizer_state():
    # as in a real run, where the optimizer skips a parameter without a gradient: the estimate is the one of the
    # same parameter frozen, but for the count of trainable parameters
    from ftkit import fakestep, modeling

    config, model_cfg, cls, batch = _gpt2_step_case(2)

    def with_unused(requires_grad: bool):
        def setup(model, config):
            model.unused = torch.nn.Parameter(torch.zeros(256, 256), requires_grad=requires_grad)
            return modeling.training_setup(model, config)
        return fakestep.fake_step(config, model_cfg, cls, setup, lambda m, b: m(**b).loss, batch, "cpu")

    unused, frozen = with_unused(True), with_unused(False)
    assert unused.pop("trainable_params") == frozen.pop("trainable_params") + 256 * 256
    assert unused.pop("frozen_params") == frozen.pop("frozen_params") - 256 * 256
    unused.pop("fp32_trainable_bytes"), frozen.pop("fp32_trainable_bytes")
    assert unused == frozen


def test_cuda_rules_keep_fused_attention_s_memory_and_cuda_s_float32_ops():
    """The step of a GPU target: attention holds no score matrix, and under bf16 autocast pow, layer_norm and
    softmax of bf16 inputs give fp32 as on a GPU (on a CPU they stay bf16); a checkpointed block recomputes alike."""
    from torch.utils.checkpoint import checkpoint

    from ftkit.fakestep import CudaRules, LiveTensorBytes

    q = torch.randn(2, 4, 1024, 16, requires_grad=True)
    kv = torch.randn(2, 2, 1024, 16, requires_grad=True)  # grouped-query: fewer key/value heads
    bias = torch.zeros(1, 4, 1024, 1024, requires_grad=True)  # a learned position bias, as T5's
    scores = 2 * 4 * 1024 * 1024 * 4  # one fp32 score matrix: 32 MiB
    peaks = {}
    for target, rules in (("cpu", contextlib.nullcontext()), ("cuda", CudaRules())):
        live = LiveTensorBytes()
        with live, rules:
            out = torch.nn.functional.scaled_dot_product_attention(q, kv, kv, attn_mask=bias, enable_gqa=True)
            out.sum().backward()
        assert out.shape == q.shape and q.grad.shape == q.shape and kv.grad.shape == kv.shape
        assert bias.grad.shape == bias.shape
        peaks[target], q.grad, kv.grad, bias.grad = live.peak, None, None, None
    assert peaks["cpu"] - peaks["cuda"] >= scores, peaks  # the CPU's kernel keeps the scores for backward
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True)
        on_cpu = [(x ** 3).dtype, torch.nn.functional.layer_norm(x, (16,)).dtype, x.softmax(-1).dtype]
        with CudaRules():
            on_gpu = [(x ** 3).dtype, torch.nn.functional.layer_norm(x, (16,)).dtype, x.softmax(-1).dtype,
                      torch.nn.functional.linear(x.float(), torch.randn(4, 16)).dtype]
            y = checkpoint(lambda t: (t ** 3).sum(), x, use_reentrant=False,
                           context_fn=lambda: (contextlib.nullcontext(), CudaRules()))
    y.backward()  # recomputed under the same rules: no saved/recomputed dtype mismatch
    assert on_cpu == [torch.bfloat16] * 3 and on_gpu == [torch.float32] * 3 + [torch.bfloat16], (on_cpu, on_gpu)


@pytest.mark.parametrize("model_type, rows, length, new_tokens, beams", [
    ("phi", 8, 120, 48, 1), ("phi", 4, 30, 120, 1), ("phi", 2, 60, 16, 4), ("t5", 8, 150, 24, 4), ("t5", 8, 60, 48, 1)])
def test_the_generation_estimate_is_what_generate_holds(model_type, rows, length, new_tokens, beams):
    # a real generate (every row to its last token) against the estimate's first and last forwards on fake tensors:
    # the prompt's (or the encoder's and the cross-attention cache's) or the full KV cache's, whichever is larger
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import PhiConfig, PhiForCausalLM, T5Config, T5ForConditionalGeneration

    from ftkit.fakestep import LiveTensorBytes, fake_parameters, generation_bytes

    torch.manual_seed(0)
    model = (PhiForCausalLM(PhiConfig(vocab_size=1024, hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                                      num_attention_heads=4, max_position_embeddings=256))
             if model_type == "phi" else
             T5ForConditionalGeneration(T5Config(vocab_size=1024, d_model=128, d_ff=512, num_layers=3, num_heads=4,
                                                 d_kv=32, decoder_start_token_id=0))).eval()
    def counting():  # the model's own tensors counted from the start
        live = LiveTensorBytes()
        for t in [*model.parameters(), *model.buffers()]:
            live.add(t)
        return live

    live, ids = counting(), torch.randint(3, 1024, (rows, length))
    with live, torch.no_grad():
        start = live.now
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, num_beams=beams, do_sample=False, pad_token_id=0)
    measured = live.peak - start
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake_parameters(model)
        live = counting()
        with live, torch.no_grad():
            estimate = generation_bytes(model, rows, length, new_tokens, beams, live)
    assert 0.9 <= estimate / measured <= 1.1, (estimate, measured, estimate / measured)


def preflight_of(tmp_path, script: str, args: list, processes: int = 1, zero: int | None = None, code: int = 0):
    """--preflight's report and output: ``python`` for one process (its exit code is the verdict's), else
    ``accelerate launch`` (whose launcher turns any non-zero exit into 1; the verdict stays in the report)."""
    out = tmp_path / "preflight"
    args = args + ["--output_dir", str(out), "--preflight", "true"]
    if processes == 1:
        proc = run_python(script, args)
    else:
        proc = launch(script, args, num_processes=processes, launcher_config=ZERO.get(zero), check=False)
    assert proc.returncode == (code if processes == 1 else min(code, 1)), proc.stdout[-2000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["base_model", "preflight.json"]  # no checkpoint, no config.yaml, no metrics
    assert not os.path.exists(out / "base_model" / "model.safetensors")  # no weights were built
    return json.load(open(out / "preflight.json")), proc.stdout


def measured_peak(tmp_path, script: str, args: list, processes: int = 1, zero: int | None = None) -> float:
    """The most tensor bytes a real run holds at once while training, on the busiest process."""
    out, peak = tmp_path / "run", tmp_path / "peak"
    measure = [os.path.join(ROOT, "tests", "peak_memory.py"), str(peak), os.path.join(ROOT, "scripts", script), *args,
               "--output_dir", str(out)]
    if processes == 1:
        proc = run_python(measure[0], measure[1:])
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        launch(measure[0], measure[1:], num_processes=processes, launcher_config=ZERO.get(zero))
    return max(json.load(open(f"{peak}.{rank}.json"))["peak"] for rank in range(processes))


CASES = {  # name: script, options, processes, ZeRO stage
    "tiny qlora": ("qlora_summarize.py", SUMMARIZE, 1, None),
    "tiny t5": ("t5_qa.py", ["--config", os.path.join(RECIPES, "t5_qa.yaml")], 1, None),
    "tiny bert pairs": ("classify.py", ["--config", os.path.join(RECIPES, "mrpc.yaml")], 1, None),
    "phi full": ("qlora_summarize.py", PHI + FULL, 1, None),
    "phi full, no checkpointing": ("qlora_summarize.py", PHI + FULL + NO_CHECKPOINTING, 1, None),
    "phi lora": ("qlora_summarize.py", PHI + LORA, 1, None),
    "phi lora, no checkpointing": ("qlora_summarize.py", PHI + LORA + NO_CHECKPOINTING, 1, None),
    "phi qlora": ("qlora_summarize.py", PHI, 1, None),
    "phi qlora, no checkpointing": ("qlora_summarize.py", PHI + NO_CHECKPOINTING, 1, None),
    "phi full, zero-2": ("qlora_summarize.py", PHI + FULL, 2, 2),
    "phi lora, zero-3": ("qlora_summarize.py", PHI + LORA, 2, 3),
    "phi qlora, zero-3": ("qlora_summarize.py", PHI, 2, 3),
    "phi lora blocks, chunked loss": ("qlora_summarize.py", PHI + LORA + [
        "--lora_target_modules", "[q_proj, v_proj]", "--cross_entropy_chunk_tokens", "256"], 1, None),
    # an evaluation between steps (at step 1) holds more than a training step: the peak is the evaluation's
    "tiny qlora, evaluation the peak": ("qlora_summarize.py", SUMMARIZE + ["--eval_steps", "1"], 1, None),
    "phi lora, evaluation the peak": ("qlora_summarize.py", PHI + LORA + [
        "--eval_steps", "1", "--per_device_train_batch_size", "1"], 1, None),
    # the evaluation's generate holds more than its loss and a training step: the KV cache of long summaries
    "phi lora, generation the peak": ("qlora_summarize.py", PHI + LORA + [
        "--eval_steps", "1", "--per_device_train_batch_size", "1", "--num_eval_generate", "8",
        "--per_device_eval_batch_size", "8", "--max_new_tokens", "200"], 1, None),
    # T5's beam search: the encoder's output and the cross-attention cache for every beam
    "tiny t5 beam search, generation the peak": ("t5_qa.py", [
        "--config", os.path.join(RECIPES, "t5_qa.yaml"), "--eval_steps", "1", "--generation_num_beams", "8",
        "--generation_max_length", "24"], 1, None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_the_memory_estimate_is_within_25_percent_of_the_measured_peak(tmp_path, name):
    script, args, processes, zero = CASES[name]
    # "<part> the peak": the run evaluates at step 1 (the case's --eval_steps), and that part is the largest; else
    # the run does not evaluate between its 2 steps: a training step's peak
    peak_of = next((part for part in ("evaluation", "generation") if f"{part} the peak" in name), None)
    args = args + ["--max_steps", "2", "--save_steps", "1000"] + ([] if peak_of else ["--eval_steps", "1000"])
    report, _ = preflight_of(tmp_path, script, args, processes, zero)
    memory = report["memory"]
    if peak_of:  # the case means something
        assert memory[peak_of]["total_gb"] == memory["peak_gb"] > memory["total_gb"], memory
    estimate = memory["peak_gb" if peak_of else "total_gb"] * 2**30
    measured = measured_peak(tmp_path, script, args, processes, zero)
    assert 0.75 <= estimate / measured <= 1.25, (name, estimate / 2**20, measured / 2**20, report["memory"]["parts_gb"])


def test_the_logits_line_is_the_output_layer_output_at_the_longest_batch_or_one_loss_chunk(tmp_path):
    report, stdout = preflight_of(tmp_path, "qlora_summarize.py", PHI + LORA)  # fp32: no upcast copy
    rows, tokens = report["memory"]["longest_batch"]
    vocab = json.load(open(tmp_path / "preflight" / "base_model" / "config.json"))["vocab_size"]
    assert report["memory"]["activations_gb"]["of_which_logits"] * 2**30 == rows * tokens * vocab * 4
    assert "(of the activations: logits)" in stdout
    shutil.rmtree(tmp_path / "preflight")
    report, _ = preflight_of(tmp_path, "qlora_summarize.py", PHI + LORA + ["--cross_entropy_chunk_tokens", "256"])
    assert report["memory"]["activations_gb"]["of_which_logits"] * 2**30 == 256 * vocab * 4
    shutil.rmtree(tmp_path / "preflight")  # a frozen output layer: its single pass calls it as a function
    report, _ = preflight_of(tmp_path, "qlora_summarize.py", PHI + LORA + ["--cross_entropy_chunk_tokens", "256",
                                                                         "--lora_target_modules", "[q_proj, v_proj]"])
    assert report["memory"]["activations_gb"]["of_which_logits"] * 2**30 == 256 * vocab * 4


def test_a_gpu_target_is_estimated_with_bf16_and_checkpointing_on_a_cpu(tmp_path):
    # a GPU job checked on a login node: CUDA's rules, checkpointed blocks recomputed under them too; a kernel whose
    # package only the GPU nodes have is not refused here (training refuses it where it is missing, test_bad_input)
    args = PHI + ["--preflight_device", "cuda", "--bf16", "true", "--gradient_checkpointing", "true"]
    import importlib.util
    if importlib.util.find_spec("flash_attn") is None:
        args += ["--attn_implementation", "flash_attention_2"]
    report, stdout = preflight_of(tmp_path, "qlora_summarize.py", args)
    assert report["device"] == "cuda" and "preflight: 1 process(es) on cuda" in stdout
    activations = report["memory"]["activations_gb"]
    assert 0 < activations["with_checkpointing"] < activations["without_checkpointing"], activations


def test_schedule_is_what_the_run_then_does_with_two_processes_epochs_and_accumulation(tmp_path):
    # tiny MRPC: 80 examples, batches of 8 -> 10 micro-batches, 5 per process, 2 optimizer steps per epoch (GA 2)
    args = ["--config", os.path.join(RECIPES, "mrpc.yaml"), "--num_train_epochs", "3", "--gradient_accumulation_steps",
            "2", "--logging_steps", "1", "--save_total_limit", "100"]
    report, _ = preflight_of(tmp_path, "classify.py", args, processes=2)
    s = report["schedule"]
    assert (s["processes"], s["micro_batches_per_epoch"], s["micro_batches_per_epoch_per_process"]) == (2, 10, 5)
    assert (s["optimizer_steps_per_epoch"], s["total_steps"], s["evaluation_steps"]) == (2, 6, [2, 4])
    out = tmp_path / "run"
    launch("classify.py", args + ["--output_dir", str(out)], num_processes=2)
    assert_run_follows(report, out)


def test_schedule_is_what_the_run_then_does_with_max_steps_and_cadences(tmp_path):
    args = ["--config", os.path.join(RECIPES, "t5_qa.yaml"), "--max_steps", "7", "--eval_steps", "3", "--save_steps",
            "2", "--logging_steps", "2", "--max_eval_samples", "4", "--save_total_limit", "100"]
    report, _ = preflight_of(tmp_path, "t5_qa.py", args)
    s = report["schedule"]
    assert (s["total_steps"], s["evaluation_steps"], s["save_steps"], s["log_events"]) == (7, [3, 6], [2, 4, 6], 4)
    out = tmp_path / "run"
    launch("t5_qa.py", args + ["--output_dir", str(out)])
    assert_run_follows(report, out)

    # the preflight of an extension resumes the run's checkpoint: the steps left, and the cadence after it
    longer = [*args[:args.index("--max_steps")], "--max_steps", "12", *args[args.index("--max_steps") + 2:],
              "--output_dir", str(out)]
    before = {p: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("*")}
    proc = run_python("t5_qa.py", longer + ["--preflight", "true"])
    assert proc.returncode == 0 and "resumes its checkpoint at step 7: 5 steps left" in proc.stdout, proc.stderr[-2000:]
    s = json.load(open(out / "preflight.json"))["schedule"]
    assert (s["resumes_at_step"], s["steps_left"], s["evaluation_steps"], s["save_steps"]) == (7, 5, [9], [8, 10])
    assert {p: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("*")} == before
    launch("t5_qa.py", longer)
    assert [e["step"] for e in read_jsonl(out / "metrics.jsonl") if "eval/loss" in e] == [3, 6, 7, 9, 12]


def assert_run_follows(report: dict, out):
    s = report["schedule"]
    events = read_jsonl(out / "metrics.jsonl")
    trained = [e["step"] for e in events if "train/loss" in e]
    assert trained[-1] == s["total_steps"] and len(trained) == s["log_events"], trained
    evaluated = [e["step"] for e in events if "eval/loss" in e]
    assert evaluated == s["evaluation_steps"] + [s["total_steps"]], evaluated  # the last one is the final evaluation
    saved = {int(name.split("_")[1]) for name in os.listdir(out / "checkpoints")}
    planned = set(s["save_steps"]) | {s["total_steps"]}
    assert planned <= saved and saved - planned <= set(s["evaluation_steps"]), (saved, planned)  # extras: new bests


def test_a_recipe_that_does_not_fit_exits_3_naming_the_cheapest_change_that_fits(tmp_path):
    args = PHI + FULL + ["--max_steps", "2"]
    report, _ = preflight_of(tmp_path, "qlora_summarize.py", args)
    parts, total = report["memory"]["parts_gb"], report["memory"]["total_gb"]
    # a device on which the run misses by a quarter of its optimizer state: 8-bit state (a quarter of it) fits
    budget = (total - parts["optimizer"] / 4) / report["memory"]["headroom"]
    shutil.rmtree(tmp_path / "preflight")
    report, stdout = preflight_of(tmp_path, "qlora_summarize.py", args + ["--device_memory_gb", str(budget)], code=3)
    advice = report["memory"]["advice"]
    assert advice["change"] == {"optim": "paged_adamw_8bit"}, advice
    assert advice["total_gb"] <= budget * report["memory"]["headroom"]
    assert "does NOT fit" in stdout and "cheapest change that fits: optim: paged_adamw_8bit" in stdout
    shutil.rmtree(tmp_path / "preflight")
    report, stdout = preflight_of(tmp_path, "qlora_summarize.py", args + ["--device_memory_gb", "0.001"], code=3)
    assert report["memory"]["advice"] is None and "none found" in stdout


@pytest.mark.parametrize("part", ["evaluation", "generation"])
def test_an_evaluation_that_does_not_fit_exits_3_naming_a_smaller_evaluation_batch(tmp_path, part):
    # the tiny Phi recipe's evaluation takes 12 dialogues per batch and trains on 4; the tiny T5's generation answers
    # 16 questions per batch with 8 beams each: on a device between the training step and the evaluation (its loss,
    # or its generation), the step fits and the evaluation does not
    script, args, batch = {"evaluation": ("qlora_summarize.py", SUMMARIZE, 12), "generation": (
        "t5_qa.py", ["--config", os.path.join(RECIPES, "t5_qa.yaml"), "--generation_num_beams", "8"], 16)}[part]
    report, _ = preflight_of(tmp_path, script, args)
    memory = report["memory"]
    training, evaluation = memory["total_gb"], memory[part]["total_gb"]
    assert memory[part]["longest_batch"][0] == batch and evaluation == memory["peak_gb"] > 1.2 * training, memory
    budget = (training + evaluation) / 2 / memory["headroom"]
    shutil.rmtree(tmp_path / "preflight")
    report, stdout = preflight_of(tmp_path, script, args + ["--device_memory_gb", str(budget)], code=3)
    advice = report["memory"]["advice"]
    assert advice["change"] == {"per_device_eval_batch_size": batch // 2}, advice
    assert advice["total_gb"] <= budget * memory["headroom"]
    assert f"{part} ({'batch ' if part == 'evaluation' else ''}{batch} x " in stdout, stdout
    assert f"cheapest change that fits: per_device_eval_batch_size: {batch // 2}" in stdout


@pytest.mark.parametrize("option, message", [(["--device_memory_gb", "0"], "device_memory_gb: must be > 0"),
                                             (["--train_file", "missing.jsonl"], "train_file: file not found")])
def test_bad_input_to_preflight_is_one_line_and_exit_2_writing_nothing(tmp_path, option, message):
    out = tmp_path / "run"
    proc = run_python("qlora_summarize.py", SUMMARIZE + ["--output_dir", str(out), "--preflight", "true", *option])
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()


def test_under_zero2_the_advice_is_gradient_buckets_sized_to_the_model(tmp_path):
    # ds_configs/zero2.json asks DeepSpeed for two buckets of 5e8 gradient elements (3.7 GiB in fp32), whatever
    # the model: on a 1 GB device the tiny recipe fits only once the buckets are sized to it ("auto")
    report, stdout = preflight_of(tmp_path, "qlora_summarize.py", SUMMARIZE + ["--device_memory_gb", "1"],
                                  processes=2, zero=2, code=3)
    assert report["exit_code"] == 3 and report["memory"]["parts_gb"]["buckets"] > 3.5
    assert report["memory"]["advice"]["change"] == {"zero_optimization.reduce_bucket_size": "auto"}
    assert "cheapest change that fits: zero_optimization.reduce_bucket_size: auto" in stdout
    # the same preflight in one process, planned for two (a login node): the same report, and its exit code 3
    shutil.rmtree(tmp_path / "preflight")
    alone, _ = preflight_of(tmp_path, "qlora_summarize.py", SUMMARIZE + [
        "--device_memory_gb", "1", "--preflight_num_processes", "2", "--deepspeed",
        os.path.join(ROOT, "ds_configs", "zero2.json")], code=3)
    assert alone == report


def test_preflight_num_processes_must_match_a_launcher_that_started_several(tmp_path):
    out = tmp_path / "run"
    proc = launch("classify.py", ["--config", os.path.join(RECIPES, "spam.yaml"), "--output_dir", str(out),
                                  "--preflight", "true", "--preflight_num_processes", "4"], num_processes=2, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]  # both ranks': said once
    assert proc.returncode != 0 and errors == ["error: preflight_num_processes: 4, but the launcher started 2 processes; "
                                               "run the preflight in one process, or without preflight_num_processes"]
    assert not out.exists()


# --- per_device_train_batch_size: auto --------------------------------------------------------------


def auto_estimates(tmp_path, args: list, processes: int = 1) -> dict:
    """--preflight's estimate for every micro-batch that divides the 8 examples per step: on a device too small
    for any, auto tries them all (and the verdict is 3)."""
    report, stdout = preflight_of(tmp_path, "qlora_summarize.py", args + ["--device_memory_gb", "0.0001"],
                                  processes=processes, code=3)
    shutil.rmtree(tmp_path / "preflight")
    assert "per_device_train_batch_size auto: 1 x gradient_accumulation_steps 8" in stdout
    estimates = {int(b): gb for b, gb in report["batch_size"]["auto"]["estimates_gb"].items()}
    assert list(estimates) == [8, 4, 2, 1] and estimates[8] > estimates[4] > estimates[2] > estimates[1], estimates
    return estimates


def between(estimates: dict, fits: int) -> str:
    """A device_memory_gb on which micro-batch ``fits`` fits and the next larger one does not."""
    return str((estimates[fits] * estimates[2 * fits]) ** 0.5 / 0.9)


def test_auto_batch_size_is_the_largest_micro_batch_that_fits_and_a_resume_keeps_it(tmp_path):
    # evaluation batches of 2: the recipe's 12 would not fit the device made to fit a training micro-batch of 2
    base = SUMMARIZE + ["--max_steps", "2", "--save_steps", "1", "--logging_steps", "1",
                        "--per_device_eval_batch_size", "2"]
    args = base + ["--per_device_train_batch_size", "auto", "--gradient_accumulation_steps", "8"]
    budget = between(auto_estimates(tmp_path, args), fits=2)
    report, stdout = preflight_of(tmp_path, "qlora_summarize.py", args + ["--device_memory_gb", budget])
    b = report["batch_size"]
    assert (b["per_device_train_batch_size"], b["gradient_accumulation_steps"]) == (2, 4), b
    assert report["schedule"]["examples_per_step"] == 8 and report["memory"]["fits"]
    assert "per_device_train_batch_size auto: 2 x gradient_accumulation_steps 4" in stdout

    out = tmp_path / "run"
    proc = launch("qlora_summarize.py", args + ["--device_memory_gb", budget, "--output_dir", str(out)])
    assert "per_device_train_batch_size auto: 2 confirmed by a real step" in proc.stderr, proc.stderr[-3000:]
    saved = (out / "config.yaml").read_text()
    assert "per_device_train_batch_size: 2\n" in saved and "gradient_accumulation_steps: 4\n" in saved
    state = json.load(open(out / "metrics.json"))
    assert (state["global_step"], state["samples_seen"], state["batches_in_epoch"]) == (2, 16, 8), state  # 8 per step

    # the choice and its real step leave the run as it would be with that micro-batch set by hand (RNG included)
    fixed = tmp_path / "fixed"
    launch("qlora_summarize.py", base + ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "4",
                                         "--output_dir", str(fixed)])
    losses = [[e["train/loss"] for e in read_jsonl(o / "metrics.jsonl") if "train/loss" in e] for o in (out, fixed)]
    assert losses[0] == losses[1] and len(losses[0]) == 2, losses

    # resumed on a device where 8 would fit: the run keeps the micro-batch its checkpoint was trained with
    proc = launch("qlora_summarize.py", args + ["--device_memory_gb", "100", "--output_dir", str(out),
                                                "--max_steps", "3"])
    assert "resumed from" in proc.stderr and "as the run in" in proc.stderr, proc.stderr[-3000:]
    assert "per_device_train_batch_size: 2\n" in (out / "config.yaml").read_text()
    assert json.load(open(out / "metrics.json"))["samples_seen"] == 24


def test_auto_batch_size_under_zero2_with_two_processes_fills_deepspeed_and_trains(tmp_path):
    zero2 = json.load(open(os.path.join(ROOT, "ds_configs", "zero2.json")))
    zero2["zero_optimization"]["reduce_bucket_size"] = "auto"  # buckets sized to the model, not 3.7 GiB
    ds = tmp_path / "zero2.json"
    ds.write_text(json.dumps(zero2))
    args = SUMMARIZE + LORA + ["--per_device_train_batch_size", "auto", "--gradient_accumulation_steps", "8",
                               "--max_steps", "2", "--logging_steps", "1", "--deepspeed", str(ds)]
    budget = between(auto_estimates(tmp_path, args, processes=2), fits=4)
    out = tmp_path / "run"
    proc = launch("qlora_summarize.py", args + ["--device_memory_gb", budget, "--output_dir", str(out)],
                  num_processes=2)
    assert "auto: 4 x gradient_accumulation_steps 2" in proc.stderr, proc.stderr[-3000:]
    state = json.load(open(out / "metrics.json"))
    assert (state["global_step"], state["samples_seen"], state["batches_in_epoch"]) == (2, 32, 4), state  # 8 x 2


def test_auto_batch_size_with_two_ddp_processes_is_confirmed_on_both(tmp_path):
    out = tmp_path / "run"
    args = ["--per_device_train_batch_size", "auto", "--gradient_accumulation_steps", "4", "--max_steps", "2"]
    proc = launch("qlora_summarize.py", SUMMARIZE + args + ["--output_dir", str(out)], num_processes=2)
    assert "per_device_train_batch_size auto: 4 confirmed by a real step" in proc.stderr, proc.stderr[-3000:]
    state = json.load(open(out / "metrics.json"))
    assert (state["samples_seen"], state["batches_in_epoch"]) == (16, 2), state


def test_the_real_step_halves_an_auto_batch_the_device_cannot_hold(tmp_path):
    """confirm_batch_size on the loaded model, in this process: a device smaller than the one the micro-batch was
    chosen for (as when an estimate is too low) makes it halve until one real step fits; the run's RNG, weights and
    gradients are left as they were."""
    import dataclasses

    from conftest import load_script
    from ftkit import autobatch, config as cfg, distributed, modeling, preflight
    from ftkit.config import RunError
    from transformers import AutoModelForCausalLM

    script = load_script("qlora_summarize")
    config = cfg.parse(script.SummarizeConfig, SUMMARIZE + ["--output_dir", str(tmp_path / "run"),
                                                            "--per_device_train_batch_size", "auto",
                                                            "--gradient_accumulation_steps", "4",
                                                            "--device_memory_gb", "100"], exit_on_error=False)
    acc = distributed.accelerator(config)
    source = modeling.prepare_source(config, acc, AutoModelForCausalLM)
    tokenizer = modeling.load_tokenizer(source)
    train_ds, _ = script.tokenize_split(data_train(config), tokenizer, config, 256, "train")
    estimate = preflight.Estimate(acc, config, modeling.load_config(source, config), AutoModelForCausalLM,
                                  script.setup, lambda m, b: script.step_loss(m, b, config), train_ds,
                                  tokenizer.pad_token_id)
    autobatch.auto_batch_size(acc, config, estimate)
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps) == (4, 1)
    model = script.setup(modeling.load_pretrained(AutoModelForCausalLM, source, config, acc), config)
    weights = {k: v.clone() for k, v in model.state_dict().items() if v.dtype.is_floating_point}
    rng = torch.random.get_rng_state()

    totals = {b: estimate(dataclasses.replace(config, per_device_train_batch_size=b))["total"] / 2**30 for b in (1, 2)}
    config.device_memory_gb = float(between(totals, fits=1))
    autobatch.confirm_batch_size(acc, model, config, estimate)
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps) == (1, 4)
    assert acc.gradient_accumulation_steps == 4
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items() if k in weights)

    config.device_memory_gb = totals[1] / 4
    with pytest.raises(RunError, match="per_device_train_batch_size: auto: one example of the longest batch needs"):
        autobatch.confirm_batch_size(acc, model, config, estimate)


def data_train(config):
    from ftkit import data

    return data.load_splits(config)["train"]
