"""The README's first command, `make demo`, exactly as a new user runs it: a fresh checkout, no outputs yet."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, script_env

pytestmark = pytest.mark.slow


def checkout_copy(dest):
    """The tracked files of this checkout, timestamps kept (what `git clone` gives a user)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in filter(None, files.split("\0")):
        os.makedirs(os.path.join(dest, os.path.dirname(name)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, name), os.path.join(dest, name))


def test_make_demo_on_a_fresh_checkout_exits_0_with_the_rouge_table(tmp_path):
    if not shutil.which("git") or not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("needs a git checkout to copy")
    checkout_copy(tmp_path)
    # an earlier run's base-model scores in that output_dir: --overwrite_output_dir (the demo's) scores anew
    stale = tmp_path / "outputs" / "tiny_qlora_summarize" / "base_eval.json"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"rouge1": 99.0, "rouge2": 99.0, "rougeL": 99.0, "rougeLsum": 99.0}))
    venv = os.path.dirname(os.path.dirname(sys.executable))
    # the demo's own command line and recipe; only the venv is this one (-o: never reinstall it)
    proc = subprocess.run(["make", "demo", f"VENV={venv}", "-o", f"{venv}/.installed"], cwd=tmp_path,
                          env=script_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "--overwrite_output_dir true" in proc.stdout and "recipes/tiny/qlora_summarize.yaml" in proc.stdout
    # a first run reads as its results: no launcher defaults listed, no launcher's kill to warn of (one process runs
    # as `python`), no checkpoint save in six lines, no library notices
    noise = ("were not passed to `accelerate launch`", "[ftkit] warning", "Saving current state",
             "Using default tokenizer", "is deprecated", "kernels-community")
    assert not [n for n in noise if n in proc.stderr], proc.stderr[-4000:]
    assert "saved checkpoint outputs/tiny_qlora_summarize/checkpoints/step_100" in proc.stderr
    table = re.search(r"ROUGE on 12 test dialogues, base vs fine-tuned:\nmetric +base +tuned +delta\n"
                      r"((?:rouge\w+ +[-\d.]+ +[-\d.]+ +[-+\d.]+\n?){4})", proc.stdout)
    assert table, proc.stdout[-2000:]
    result = json.load(open(tmp_path / "outputs" / "tiny_qlora_summarize" / "metrics.json"))
    assert result["global_step"] == 100 and result["tuned"]["rougeL"] > result["base"]["rougeL"]
    assert result["base"]["rouge1"] < 99.0
