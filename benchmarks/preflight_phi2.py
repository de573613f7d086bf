"""The preflight of the Phi-2 QLoRA recipe (recipes/phi2_qlora_dialogsum.yaml) for one 80 GB GPU, made on this
machine without a GPU or the hub: Phi-2's architecture from its published config (2.7B parameters, 32 layers,
hidden 2560, vocabulary 51200), a byte-level BPE tokenizer of the same vocabulary size trained on the DialogSum
training set, and DialogSum itself from ../shared/realdata (skipped when that folder is absent). Token counts
follow that tokenizer, not Phi-2's own; the memory estimate is of Phi-2's shapes. Writes results/preflight_phi2.json
(the report) and prints the table."""

import json
import os
import shutil
import subprocess
import sys

from harness import REAL, RESULTS, ROOT, env

PHI2 = ("{model_type: phi, hidden_size: 2560, intermediate_size: 10240, num_hidden_layers: 32, "
        "num_attention_heads: 32, num_key_value_heads: 32, max_position_embeddings: 2048, partial_rotary_factor: 0.4, "
        "hidden_act: gelu_new, resid_pdrop: 0.1, embd_pdrop: 0.0, attention_dropout: 0.0, layer_norm_eps: 1.0e-5}")


def main() -> None:
    folder = os.path.join(REAL, "dialogsum")
    if not os.path.isdir(folder):
        print(f"skipped: {folder} is absent")
        return
    out = os.path.join(ROOT, "outputs", "preflight_phi2")
    shutil.rmtree(out, ignore_errors=True)
    train = os.path.join(folder, "dialogsum.train.jsonl")
    args = ["--config", os.path.join(ROOT, "recipes", "phi2_qlora_dialogsum.yaml"), "--model_name_or_path", "null",
            "--model_config", PHI2, "--tokenizer_files", train, "--tokenizer_vocab_size", "51200",
            "--train_file", train, "--validation_file", os.path.join(folder, "dialogsum.dev.jsonl"),
            "--test_file", os.path.join(folder, "dialogsum.test.jsonl"), "--report_to", "none", "--output_dir", out,
            "--preflight", "true", "--preflight_device", "cuda", "--device_memory_gb", "80", "--peak_tflops", "989"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "qlora_summarize.py"), *args], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=1800)
    if proc.returncode not in (0, 3):
        raise RuntimeError(f"preflight failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.load(open(os.path.join(out, "preflight.json")))
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "preflight_phi2.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(proc.stdout[proc.stdout.index("preflight:"):])


if __name__ == "__main__":
    main()
