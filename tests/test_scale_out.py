"""Scale-out: DDP equivalence, DeepSpeed ZeRO-2/3 (and offload) runs of every script with 2 CPU
processes whose exported model reloads in one process with the logged eval loss, the launcher
configs, and the DeepSpeed config checks. Real accelerate launch, real DeepSpeed engines."""

import json
import os
import shutil

import pytest
import torch
import yaml

from conftest import ROOT, launch, load_script, read_jsonl, run_python

pytestmark = pytest.mark.slow
RECIPES = os.path.join(ROOT, "recipes", "tiny")
LAUNCH = os.path.join(ROOT, "launch", "accelerate")
SPAM = os.path.join(RECIPES, "spam.yaml")


def launch_with(config_file: str, script: str, args: list[str]):
    return launch(script, args, num_processes=2, launcher_config=os.path.join(LAUNCH, config_file))


# ---------------------------------------------------------------------------------------------
# DDP: 2 processes x batch b == 1 process x batch 2b, step by step
# ---------------------------------------------------------------------------------------------


def test_two_processes_follow_the_single_process_trajectory(tmp_path):
    sgd = ["--config", SPAM, "--optim", "sgd", "--learning_rate", "0.5", "--lr_scheduler_type", "constant",
           "--max_steps", "5", "--logging_steps", "1", "--eval_strategy", "steps", "--eval_steps", "1000",
           "--max_grad_norm", "0", "--load_best_model_at_end", "false"]
    launch("classify.py", sgd + ["--output_dir", str(tmp_path / "one"), "--per_device_train_batch_size", "8"])
    launch("classify.py", sgd + ["--output_dir", str(tmp_path / "two"), "--per_device_train_batch_size", "4"],
           num_processes=2)
    losses = {}
    for run in ("one", "two"):
        losses[run] = [r["train/loss"] for r in read_jsonl(tmp_path / run / "metrics.jsonl") if "train/loss" in r]
    assert len(losses["one"]) == 5
    for a, b in zip(losses["one"], losses["two"]):
        assert abs(a - b) <= 1e-5 * abs(a), losses
    from safetensors.torch import load_file

    one, two = (load_file(tmp_path / r / "final" / "model.safetensors") for r in ("one", "two"))
    base = load_file(tmp_path / "one" / "base_model" / "model.safetensors")
    moved = max((one[k] - base[k]).abs().max().item() for k in one if k in base)
    assert moved > 1e-3  # the weights did change
    assert max((one[k] - two[k]).abs().max().item() for k in one) <= 1e-5 * max(v.abs().max().item() for v in one.values())


# ---------------------------------------------------------------------------------------------
# DeepSpeed: every script, ZeRO-2 and ZeRO-3; the export reloads with the logged eval loss
# ---------------------------------------------------------------------------------------------


def _single_process_accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def _classify_eval_loss(out):
    from ftkit import config as cfg, data, modeling
    from transformers import AutoModelForSequenceClassification

    cl = load_script("classify")
    config = cfg.build(cl.ClassifyConfig, cfg.load_yaml_recipe(str(out / "final" / "ftkit_config.yaml")))
    splits = cl.load_classification_splits(config)
    names = json.load(open(out / "metrics.json"))["label_names"]
    tokenizer = modeling.load_tokenizer(str(out / "final"))
    model = AutoModelForSequenceClassification.from_pretrained(out / "final").eval()
    ds = cl.tokenize_split(splits["validation"], cl.label_ids(config, splits["validation"], names, "validation"),
                           tokenizer, config, 128, False, "validation")
    dl = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=data.PadCollator(tokenizer.pad_token_id))
    result, _, _ = cl.evaluate(_single_process_accelerator(), model, dl, len(names))
    return result["loss"], json.load(open(out / "metrics.json"))["validation"]["loss"]


def _qa_eval_loss(out):
    from ftkit import config as cfg, data, modeling
    from transformers import AutoModelForSeq2SeqLM

    qa = load_script("t5_qa")
    config = cfg.build(qa.QAConfig, cfg.load_yaml_recipe(str(out / "final" / "ftkit_config.yaml")))
    tokenizer = modeling.load_tokenizer(str(out / "final"))
    ds, _ = qa.tokenize_split(qa.load_qa_splits(config)["validation"], tokenizer, config, config.max_length, "v")
    dl = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=data.PadCollator(tokenizer.pad_token_id))
    model = AutoModelForSeq2SeqLM.from_pretrained(out / "final").eval()
    loss = qa.eval_loss(_single_process_accelerator(), model, dl, model.generation_config.decoder_start_token_id,
                        model.config.pad_token_id)
    return loss, json.load(open(out / "metrics.json"))["eval_loss"]


def _summarize_eval_loss(out):
    from peft import PeftModel
    from ftkit import config as cfg, data, modeling
    from transformers import AutoModelForCausalLM

    qs = load_script("qlora_summarize")
    config = cfg.build(qs.SummarizeConfig, cfg.load_yaml_recipe(str(out / "final" / "ftkit_config.yaml")))
    tokenizer = modeling.load_tokenizer(str(out / "final"))
    raw = data.load_splits(config)["validation"]
    ds, _ = qs.tokenize_split(raw, tokenizer, config, 512, "validation")
    dl = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=data.PadCollator(tokenizer.pad_token_id))
    acc = _single_process_accelerator()
    base = modeling.load_pretrained(AutoModelForCausalLM, str(out / "base_model"), config, acc)
    model = PeftModel.from_pretrained(base, out / "final").eval()
    return qs.eval_loss(acc, model, dl, config, 512), json.load(open(out / "metrics.json"))["eval_loss"]


SCRIPTS = {
    "classify": ("classify.py", ["--config", SPAM, "--max_steps", "6"], _classify_eval_loss),
    "t5_qa": ("t5_qa.py", ["--config", os.path.join(RECIPES, "t5_qa.yaml"), "--max_steps", "12",
                           "--eval_steps", "6", "--max_eval_samples", "5"], _qa_eval_loss),
    "qlora_summarize": ("qlora_summarize.py", ["--config", os.path.join(RECIPES, "qlora_summarize.yaml"),
                                              "--max_steps", "6", "--num_test_compare", "3", "--num_eval_generate", "3",
                                              "--eval_steps", "3", "--max_new_tokens", "8"], _summarize_eval_loss),
}


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
@pytest.mark.parametrize("name", list(SCRIPTS))
def test_deepspeed_run_exports_a_model_that_reloads_with_the_logged_eval_loss(tmp_path, name, stage):
    script, args, reload_loss = SCRIPTS[name]
    out = tmp_path / "run"
    launch_with(f"deepspeed_{stage}.yaml", script, args + ["--output_dir", str(out)])
    checkpoint = sorted(os.listdir(out / "checkpoints"))[-1]
    # DeepSpeed's own layout: the engines really ran (accelerate can fall back to plain DDP silently)
    assert os.path.isdir(out / "checkpoints" / checkpoint / "pytorch_model"), "not a DeepSpeed checkpoint"
    reloaded, logged = reload_loss(out)
    assert abs(reloaded - logged) <= 1e-4 * abs(logged), (reloaded, logged)


def test_qlora_under_zero3_saves_a_complete_adapter_and_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    script, args, _ = SCRIPTS["qlora_summarize"]
    args = args + ["--max_steps", "4", "--save_steps", "2", "--save_total_limit", "4"]  # (and step 3: a new best)
    launch_with("deepspeed_zero3.yaml", script, args + ["--output_dir", str(straight)])
    adapter = load_file(straight / "final" / "adapter_model.safetensors")
    config = json.load(open(straight / "final" / "adapter_config.json"))
    targets = set(config["target_modules"])
    assert adapter and all(v.numel() > 0 for v in adapter.values())
    # every targeted module of both layers has its A and B matrices (nothing lost to sharding)
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in adapter} == targets
    assert any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k or "lora_embedding_B" in k)

    # resume from step 2: DeepSpeed's files hold the 4-bit quant state (strict load would reject it)
    # and its optimizer files are read with weights_only (ftkit's restricted unpickling)
    shutil.copytree(straight / "checkpoints" / "step_2", resumed / "checkpoints" / "step_2")
    proc = launch_with("deepspeed_zero3.yaml", script, args + ["--output_dir", str(resumed)])
    assert "resumed from" in proc.stdout + proc.stderr
    again = load_file(resumed / "final" / "adapter_model.safetensors")
    assert again.keys() == adapter.keys()
    for k in adapter:
        assert torch.equal(adapter[k], again[k]), k


@pytest.mark.parametrize("head", ["lora head", "frozen head"])
def test_chunked_loss_under_zero3_trains_as_the_whole_batch_loss(tmp_path, head):
    # The tiny recipe's output layer is a LoRA target: a frozen partitioned weight (gathered again for the recompute
    # in backward) and a trainable adapter. Length grouping gives the two ranks micro-batches of other lengths, so
    # they would call the output layer (one all-gather each) a different number of times without the padded chunks.
    # A frozen output layer (the recipes') is gathered once per micro-batch, whatever each rank's number of chunks.
    # SGD: Adam would magnify the last bits of the chunks' other summation order.
    from safetensors.torch import load_file

    script, args, _ = SCRIPTS["qlora_summarize"]
    args = args + ["--max_steps", "3", "--optim", "sgd", "--learning_rate", "0.5", "--lr_scheduler_type", "constant",
                   "--warmup_steps", "0", "--lora_dropout", "0", "--logging_steps", "1", "--eval_strategy", "no",
                   "--num_eval_generate", "0", "--num_test_compare", "2", "--max_new_tokens", "4"]
    if head == "frozen head":
        args += ["--lora_target_modules", "[q_proj, k_proj, v_proj, dense, fc1, fc2]"]
    runs = {}
    for chunk in (None, 61):  # 34 chunks cover the 4 x 512 positions a micro-batch can hold, the last one short
        out = tmp_path / f"chunk_{chunk}"
        launch_with("deepspeed_zero3.yaml", script, args + ["--output_dir", str(out)] +
                    (["--cross_entropy_chunk_tokens", str(chunk)] if chunk else []))
        losses = [r["train/loss"] for r in read_jsonl(out / "metrics.jsonl") if "train/loss" in r]
        losses.append(json.load(open(out / "metrics.json"))["eval_loss"])  # the final evaluation's: chunked too
        weights = load_file(next((out / "final").glob("*.safetensors")))
        runs[chunk] = losses, weights
    assert any(".lm_head." in k for k in weights) == (head == "lora head"), sorted(weights)
    (whole, w_whole), (chunked, w_chunked) = runs[None], runs[61]
    assert len(whole) == 4 and whole[2] < whole[0]
    for a, b in zip(whole, chunked):
        assert abs(a - b) <= 1e-6 * abs(a), (whole, chunked)
    assert w_whole.keys() == w_chunked.keys()
    largest = max(v.abs().max().item() for v in w_whole.values())
    assert max((w_whole[k] - w_chunked[k]).abs().max().item() for k in w_whole) <= 1e-6 * largest


def test_zero2_with_optimizer_offload_runs(tmp_path):
    out = tmp_path / "run"
    launch("classify.py", ["--config", SPAM, "--max_steps", "4", "--output_dir", str(out),
                           "--deepspeed", os.path.join(ROOT, "ds_configs", "zero2_offload.json")],
           num_processes=2)
    assert json.load(open(out / "metrics.json"))["global_step"] == 4


def test_one_process_runs_deepspeed_with_or_without_a_launcher_and_resumes(tmp_path):
    # ZeRO-Offload on one device: plain python, then the same run extended under a one-process accelerate launch
    # (neither sets up a process group, which DeepSpeed's engine needs)
    out, args = tmp_path / "run", ["--config", SPAM, "--save_steps", "3", "--deepspeed",
                                   os.path.join(ROOT, "ds_configs", "zero2_offload.json")]
    first = run_python("classify.py", args + ["--max_steps", "3", "--output_dir", str(out)])
    assert first.returncode == 0, first.stderr[-3000:]
    assert os.path.isdir(out / "checkpoints" / "step_3" / "pytorch_model")  # DeepSpeed's own checkpoint
    extended = launch("classify.py", args + ["--max_steps", "5", "--output_dir", str(out)], launcher=True)
    assert f"resumed from {out / 'checkpoints' / 'step_3'}" in extended.stderr
    assert json.load(open(out / "metrics.json"))["global_step"] == 5


def test_a_deepspeed_checkpoint_resumes_only_under_deepspeed_with_its_stage(tmp_path, monkeypatch):
    from ftkit.distributed import launch_zero_stage

    out, args = tmp_path / "run", ["--config", SPAM, "--save_steps", "3"]
    launch_with("deepspeed_zero2.yaml", "classify.py", args + ["--max_steps", "3", "--output_dir", str(out)])
    before = sorted(os.listdir(out / "checkpoints" / "step_3"))
    proc = launch("classify.py", args + ["--max_steps", "6", "--output_dir", str(out)], num_processes=2, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]  # both ranks': said once
    assert proc.returncode != 0 and errors == [
        f"error: resume_from_checkpoint: {out / 'checkpoints' / 'step_3'} was written under DeepSpeed ZeRO-2 and this "
        "run has no DeepSpeed; resume with the launcher config (or --deepspeed) that wrote it, or start over with "
        "--overwrite_output_dir true"], proc.stderr[-3000:]
    assert sorted(os.listdir(out / "checkpoints")) == ["step_3"]
    assert sorted(os.listdir(out / "checkpoints" / "step_3")) == before
    assert "resumed from" not in proc.stderr  # refused before the model was loaded

    # the stage is read before the Accelerator exists: the launcher's config file or stage, else the recipe's
    recipe = load_script("classify").ClassifyConfig(deepspeed=None)
    for name in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(name, raising=False)
    assert launch_zero_stage(recipe) is None
    recipe.deepspeed = os.path.join(ROOT, "ds_configs", "zero3.json")
    assert launch_zero_stage(recipe) == 3
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert launch_zero_stage(recipe) == "unknown"  # neither file nor stage: accelerate's choice
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1")
    assert launch_zero_stage(recipe) == 1
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", os.path.join(ROOT, "ds_configs", "zero2.json"))
    assert launch_zero_stage(recipe) == 2


# ---------------------------------------------------------------------------------------------
# Launcher configs and DeepSpeed config checks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(os.listdir(LAUNCH)))
def test_every_accelerate_config_parses_and_names_files_that_exist(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(os.path.join(LAUNCH, name))
    raw = yaml.safe_load(open(os.path.join(LAUNCH, name)))
    assert config.distributed_type.value == raw["distributed_type"]
    ds_file = (raw.get("deepspeed_config") or {}).get("deepspeed_config_file")
    if ds_file:
        assert os.path.isfile(os.path.join(ROOT, ds_file)), ds_file


@pytest.mark.parametrize("name", ["single_gpu.yaml", "multi_gpu.yaml"])
def test_cpu_capable_launch_configs_run(tmp_path, name):
    out = tmp_path / "run"
    procs = 1 if name == "single_gpu.yaml" else 2
    proc = launch("classify.py", ["--config", SPAM, "--max_steps", "2", "--output_dir", str(out)], num_processes=procs,
                  launcher_config=os.path.join(LAUNCH, name))
    assert json.load(open(out / "metrics.json"))["global_step"] == 2
    # both configs name bf16, the tiny recipe has bf16: false: the run says which one it follows
    assert "mixed precision: no, as the recipe's bf16: false says; the launcher's mixed_precision bf16 is not used" \
        in proc.stderr


def test_an_fsdp_launch_is_refused_in_one_line_before_anything_is_built(tmp_path):
    # accelerate runs FSDP only on accelerators; on a CPU it would quietly run DDP, so this checks the refusal
    fsdp = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "FSDP", "num_machines": 1, "num_processes": 2,
            "machine_rank": 0, "mixed_precision": "no", "rdzv_backend": "static", "same_network": True,
            "fsdp_config": {"fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                            "fsdp_state_dict_type": "SHARDED_STATE_DICT"}}
    (tmp_path / "fsdp.yaml").write_text(yaml.safe_dump(fsdp))
    out = tmp_path / "run"
    proc = launch("classify.py", ["--config", SPAM, "--output_dir", str(out)], num_processes=2, check=False,
                  launcher_config=str(tmp_path / "fsdp.yaml"))
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and errors, proc.stderr[-3000:]
    assert len(errors) == 1 and "FSDP is not supported" in errors[0] and "deepspeed_zero3.yaml" in errors[0]
    assert not os.path.exists(out / "base_model")  # nothing built or loaded


def test_every_deepspeed_config_is_valid_json_with_auto_batch_values():
    folder = os.path.join(ROOT, "ds_configs")
    names = sorted(os.listdir(folder))
    assert names == ["zero1.json", "zero2.json", "zero2_offload.json", "zero3.json", "zero3_offload.json"]
    for name in names:
        ds = json.load(open(os.path.join(folder, name)))
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
            assert ds[key] == "auto", (name, key)


def test_recipe_and_deepspeed_config_conflict_is_one_line_naming_both(tmp_path):
    ds = json.load(open(os.path.join(ROOT, "ds_configs", "zero2.json")))
    ds["gradient_accumulation_steps"] = 4
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    out = tmp_path / "run"
    proc = run_python("classify.py", ["--config", SPAM, "--output_dir", str(out), "--deepspeed", str(tmp_path / "ds.json")])
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "gradient_accumulation_steps is 4 but the recipe's gradient_accumulation_steps is 1" in last
    assert str(tmp_path / "ds.json") in last
    assert not os.path.exists(out / "base_model")  # nothing built or loaded


@pytest.mark.parametrize("content,message", [(None, "DeepSpeed config not found"),
                                             ('{"zero_optimization": {', "invalid JSON in the DeepSpeed config")])
def test_missing_or_invalid_deepspeed_config_is_one_line(tmp_path, content, message):
    path = tmp_path / "ds.json"
    if content is not None:
        path.write_text(content)
    proc = run_python("classify.py", ["--config", SPAM, "--output_dir", str(tmp_path / "run"), "--deepspeed", str(path)])
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1]


def test_torchrun_script_joins_two_nodes_on_one_host(tmp_path):
    import subprocess

    from conftest import BIN, free_port, script_env

    env = script_env()
    env["PATH"] = f"{BIN}:{env['PATH']}"
    out = tmp_path / "run"
    port = str(free_port())
    cmd = lambda rank: [os.path.join(ROOT, "launch", "torchrun.sh"), "--nnodes", "2", "--node_rank", rank,  # noqa: E731
                        "--master_port", port, "scripts/classify.py", "--config", SPAM, "--output_dir", str(out),
                        "--max_steps", "4"]
    second = subprocess.Popen(cmd("1"), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = subprocess.run(cmd("0"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    second.wait(timeout=120)
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-3000:]
    ranks = sorted(f for f in os.listdir(out / "checkpoints" / "step_4") if f.startswith("rng_state_"))
    assert ranks == ["rng_state_0.safetensors", "rng_state_1.safetensors"]


def test_no_rank_closes_its_process_group_before_the_others_are_done(tmp_path):
    """ftkit.distributed.end: rank 0 still writes its final outputs while rank 1 is done; rank 1 destroys its
    process group only once rank 0 has arrived too."""
    script = tmp_path / "end.py"
    script.write_text(
        "import json, sys, time\n"
        "import torch\n"
        "from accelerate import Accelerator\n"
        "from ftkit import distributed\n"
        "acc = Accelerator(cpu=True)\n"
        "if acc.is_main_process:\n"
        "    time.sleep(3)  # the main process's final outputs\n"
        "arrived = time.time()\n"
        "distributed.end(acc)\n"
        "record = {'arrived': arrived, 'ended': time.time(), 'open': torch.distributed.is_initialized()}\n"
        "json.dump(record, open(f'{sys.argv[1]}/{acc.process_index}.json', 'w'))\n")
    launch(str(script), [str(tmp_path)], num_processes=2)
    main, other = (json.load(open(tmp_path / f"{rank}.json")) for rank in (0, 1))
    assert other["ended"] >= main["arrived"] and main["arrived"] - other["arrived"] >= 2.5, (main, other)
    assert not main["open"] and not other["open"]


@pytest.mark.parametrize("processes", [1, 2])
def test_a_finished_run_exits_0_even_if_the_interpreter_teardown_would_abort(tmp_path, processes):
    """After the last barrier, what interpreter shutdown does is destroy module state, native libraries' included; a
    rank that aborted there (SIGABRT, "terminate called without an active exception" from gloo's threads) turned a
    finished run into a failed job. Here a module global aborts when torn down: the run still exits 0, and the atexit
    handlers (W&B's, logging's) still ran on every rank. Idle ThreadPoolExecutor workers (torch.compile's) are ended
    as at a normal exit, not waited for."""
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(
        "import atexit, os, runpy, sys\n"
        "class AbortsWhenTornDown:\n"
        "    def __del__(self):\n"
        "        os.abort()\n"
        "doomed = AbortsWhenTornDown()\n"
        "done = sys.argv[1]\n"
        "atexit.register(lambda: open(os.path.join(done, 'atexit.' + os.environ.get('RANK', '0')), 'w').close())\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "pool = ThreadPoolExecutor(2)  # idle workers alive at the end, as torch.compile's pool leaves them\n"
        "pool.submit(sum, [1, 2]).result()\n"
        "sys.argv = sys.argv[2:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    out = tmp_path / "run"
    launch(str(wrapper), [str(tmp_path), os.path.join(ROOT, "scripts", "classify.py"), "--config", SPAM,
                          "--max_steps", "2", "--output_dir", str(out)],
           num_processes=processes, timeout=300)  # without threading's exit hooks: hangs joining the pool's workers
    assert json.load(open(out / "metrics.json"))["global_step"] == 2
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("atexit.")) == [f"atexit.{r}" for r in range(processes)]
