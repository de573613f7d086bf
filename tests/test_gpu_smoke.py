"""benchmarks/gpu_smoke.py: each real recipe turned into its offline, real-size smoke run.

The GPU run itself needs CUDA; what is checked here is that the composed config of every real
recipe is valid for its script, keeps the recipe's model and training settings, builds the hub
model's architecture (not the tiny one) and reads data files that exist.
"""

import os
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import fixtures  # noqa: E402
import gpu_smoke  # noqa: E402

CLASSES = {"qlora_summarize": "SummarizeConfig", "t5_qa": "QAConfig", "classify": "ClassifyConfig"}
TRAINING = ["load_in_4bit", "bnb_4bit_compute_dtype", "lora_r", "lora_target_modules", "bf16", "optim",
            "gradient_checkpointing", "per_device_train_batch_size", "gradient_accumulation_steps",
            "learning_rate", "max_length", "trainable_modules", "group_by_length"]


def test_every_real_recipe_has_a_smoke_run():
    recipes = {f[:-5] for f in os.listdir(os.path.join(ROOT, "recipes")) if f.endswith(".yaml")}
    assert recipes == set(gpu_smoke.RECIPES)


@pytest.mark.parametrize("name", sorted(gpu_smoke.RECIPES))
def test_the_smoke_config_is_the_recipe_at_real_size_on_offline_data(name, tmp_path):
    script, _, arch = gpu_smoke.RECIPES[name]
    composed = gpu_smoke.smoke_config(name, str(tmp_path), max_steps=20, tiny=False)
    config = fixtures.script_config(script, CLASSES[script], composed)  # raises on a bad key or value
    real = yaml.safe_load(open(os.path.join(ROOT, "recipes", f"{name}.yaml")))
    for key in TRAINING:
        if key in real:
            assert getattr(config, key) == real[key], key
    assert config.model_name_or_path is None and config.model_config == arch
    assert getattr(config, "dataset_name", None) is None
    for key in ("train_file", "validation_file", "test_file", "tokenizer_files"):
        value = getattr(config, key, None)
        for path in value if isinstance(value, list) else [value] if value else []:
            assert os.path.isfile(path), (key, path)
    assert config.eval_steps == config.save_steps == 10 and config.max_steps == 20


@pytest.mark.slow
def test_gpu_contenders_run_their_code_path_on_a_cpu():
    # make bench-gpu's contenders (ftkit's script, a bare loop, the HF Trainer), with the tiny model
    import subprocess

    from conftest import script_env

    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_contenders.py"), "--tiny"], cwd=ROOT,
                          env=script_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert "ftkit / bare" in line and "ftkit / Trainer" in line, line


@pytest.mark.slow
def test_the_smoke_run_with_its_preflight_runs_on_a_cpu_at_tiny_size():
    # make bench-gpu's recipe smoke run (preflight, run, resume), with the tiny recipe's model
    import json
    import subprocess

    from conftest import script_env

    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_smoke.py"), "--tiny", "--only",
                           "phi2_qlora_dialogsum", "--max_steps", "2"], cwd=ROOT, env=script_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("phi2_qlora_dialogsum: ", 1)[1].splitlines()[0])
    assert result["rc"] == result["resume_rc"] == 0 and result["preflight_fits"] and result["preflight_gb"] > 0, result


@pytest.mark.slow
def test_the_gpu_benchmark_runs_its_code_path_and_its_levers_on_a_cpu():
    # make bench-gpu's first benchmark (a short device session may give it its only run): every probe, the lever
    # sweep and the tables, on tiny configs
    import subprocess

    import gpu
    from conftest import script_env

    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"), "--tiny"], cwd=ROOT,
                          env=script_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert any(row.startswith("| T5-base-shaped, full |") for row in rows), rows
    assert sum(row.startswith("| Phi-2-shaped, QLoRA |") for row in rows) == len(gpu.TINY_SHAPES["qlora"])
    lines = proc.stdout.splitlines()
    t5_at = next(i for i, line in enumerate(lines) if line.startswith("The T5 recipe's levers"))
    for lever in ["recipe", *gpu.LEVERS]:  # the QLoRA sweep's table, then the T5 recipe's
        assert any(row.startswith(f"| {lever} | ") and "failed" not in row for row in lines[:t5_at]), (lever, rows)
    for lever in ["recipe", *gpu.T5_LEVERS]:
        assert any(row.startswith(f"| {lever} | ") and "failed" not in row for row in lines[t5_at:]), (lever, rows)
    assert proc.stdout.strip().splitlines()[-1].startswith("levers faster than the recipe at no more memory: ")
