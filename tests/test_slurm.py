"""Real SLURM on this machine (tests/slurm/cluster.sh: slurmctld + two slurmd nodes): the sbatch
launchers run the recipes on one node and across two, a preempted job checkpoints, is requeued
and finishes with the weights of an uninterrupted run, one warned while starting is requeued with
nothing saved, and one warned after its last step ends without a requeue."""

import json
import os
import shutil
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, launch, read_jsonl, script_env

pytestmark = pytest.mark.slow
CLUSTER = os.path.join(ROOT, "tests", "slurm", "cluster.sh")
SPAM = os.path.join(ROOT, "recipes", "tiny", "spam.yaml")
SUMMARIZE = os.path.join(ROOT, "recipes", "tiny", "qlora_summarize.yaml")
# this machine's nodes have no GPUs and a couple of cores: override the launchers' GPU defaults
SMALL = ["--gpus-per-node=0", "--cpus-per-task=1"]


def unavailable(reason):
    """Skip, except under CI (which runs as root and must run these): there a skip is a failure."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"SLURM test could not run under CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if not (shutil.which("slurmctld") or os.geteuid() == 0):
        unavailable("slurm-wlm is not installed and installing it needs root")
    state = tmp_path_factory.mktemp("slurm")
    proc = subprocess.run(["bash", CLUSTER, "start", str(state)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        unavailable(f"cluster did not start: {proc.stderr[-2000:]}")
    env = script_env()
    env["SLURM_CONF"] = str(state / "slurm.conf")
    yield env, state
    subprocess.run(["bash", CLUSTER, "stop", str(state)], capture_output=True, timeout=60)


def sbatch(slurm, launcher: str, options: list[str], script_args: list[str], extra_env=None, cwd=ROOT) -> str:
    """Submit from the repository root (the launcher's relative path), or from ``cwd`` (its absolute path)."""
    env, state = slurm
    env = {**env, **(extra_env or {})}
    cmd = ["sbatch", "--parsable", *SMALL, f"--output={state}/%j.out", *options,
           os.path.join("launch", "slurm", launcher) if cwd == ROOT else os.path.join(ROOT, "launch", "slurm", launcher),
           *script_args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_info(slurm, job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job], env=slurm[0], capture_output=True, text=True).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


# states a job ends in; on its way it may be PENDING, CONFIGURING, RUNNING, COMPLETING (its steps ending, also when it
# is requeued) or REQUEUED
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def still_going(slurm, job: str) -> bool:
    return job_info(slurm, job).get("JobState") not in ENDED


def wait_for(slurm, job: str, restarts: int = 0, timeout: int = 420) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(slurm, job)
        state = info.get("JobState")
        if state in ENDED and (state != "COMPLETED" or int(info.get("Restarts", 0)) >= restarts):
            return info
        time.sleep(2)
    raise AssertionError(f"job {job} not done after {timeout}s: {job_info(slurm, job)}\n{job_log(slurm, job)[-3000:]}")


def job_log(slurm, job: str) -> str:
    path = slurm[1] / f"{job}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def test_single_node_job_warned_before_its_first_step_is_requeued_and_one_warned_after_its_last_step_is_not(
        slurm, tmp_path):
    # start 1: USR1 as soon as the job runs, while the node's task and the training process are still starting
    # (job.sh passes it on once the task ignores it; the training process ignores it until ftkit installs its
    # handler, and job.sh says it again every FTKIT_RESIGNAL_S seconds): it stops before its first optimizer step,
    # with nothing to save, and the job is requeued. Every bash here first sources BASH_ENV, which sleeps: the
    # task is slow to reach its `trap` (as on a node with a slow file system), and a USR1 passed on at once kills it.
    out = tmp_path / "run"
    slow_start = tmp_path / "slow_start.sh"
    slow_start.write_text("sleep 2\n")
    job = sbatch(slurm, "single_node.sbatch", [], [
        "scripts/qlora_summarize.py", "--config", SUMMARIZE, "--output_dir", str(out), "--max_steps", "4",
        "--num_eval_generate", "0", "--max_new_tokens", "128", "--merge_adapter", "true"],
        extra_env={"FTKIT_RESIGNAL_S": "1", "BASH_ENV": str(slow_start)})
    deadline = time.time() + 300
    while "start 1," not in job_log(slurm, job):  # printed once job.sh's trap is set
        assert time.time() < deadline and still_going(slurm, job), job_log(slurm, job)
        time.sleep(0.1)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm[0], check=True)
    # start 2: USR1 once the final evaluation is logged (the last step is done): the run goes on through the ROUGE
    # comparison, the export and the merge, and the job ends there; a requeue would only redo them
    while not any("eval/loss" in r for r in (read_jsonl(out / "metrics.jsonl") if (out / "metrics.jsonl").exists()
                                              else [])):
        assert time.time() < deadline and still_going(slurm, job), job_log(slurm, job)
        time.sleep(0.2)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm[0], check=True)
    info = wait_for(slurm, job, restarts=1)
    log = job_log(slurm, job)
    first, second = log.split("start 2,")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-3000:]
    assert "USR1 received, training will stop before its first optimizer step" in first, first[-3000:]
    assert "stopped by SIGUSR1 before the first optimizer step of this run: nothing new to save" in first
    assert "the run stopped at step 0; requeueing job" in first, first[-3000:]
    assert "resumed from" not in second  # start 1 saved no checkpoint: start 2 trains from the beginning
    assert "USR1 received, training has ended" in second, second[-3000:]  # it reached the training process in time
    assert "not requeued" in second and "requeueing" not in second and "stopped by" not in second, second[-3000:]
    assert json.load(open(out / "metrics.json"))["global_step"] == 4
    assert os.path.isfile(out / "final" / "adapter_model.safetensors")
    assert os.path.isfile(out / "final_merged" / "model.safetensors")
    assert "1 node(s)" in log


def test_two_nodes_give_the_result_of_two_processes_on_one_node(slurm, tmp_path):
    args = ["scripts/classify.py", "--config", SPAM, "--max_steps", "10", "--logging_steps", "1",
            "--per_device_train_batch_size", "4"]
    two_nodes = sbatch(slurm, "multi_node.sbatch", ["--nodes=2"], args + ["--output_dir", str(tmp_path / "multi")])
    elsewhere = tmp_path / "submitted_here"  # not the repository root: the job still runs there (scripts/...)
    elsewhere.mkdir()
    one_node = sbatch(slurm, "single_node.sbatch", [], args + ["--output_dir", str(tmp_path / "single")],
                      extra_env={"NPROC_PER_NODE": "2"}, cwd=elsewhere)
    for job in (two_nodes, one_node):
        assert wait_for(slurm, job)["JobState"] == "COMPLETED", job_log(slurm, job)[-3000:]
    assert "2 node(s) node[1-2]" in job_log(slurm, two_nodes)
    assert f"submitted from {elsewhere}; runs in the repository root, {ROOT}" in job_log(slurm, one_node)
    # world size 2 in both: every rank saved its RNG state
    for run in ("multi", "single"):
        ranks = [f for f in os.listdir(tmp_path / run / "checkpoints" / "step_10") if f.startswith("rng_state_")]
        assert sorted(ranks) == ["rng_state_0.safetensors", "rng_state_1.safetensors"], run
    multi, single = ([r["train/loss"] for r in read_jsonl(tmp_path / run / "metrics.jsonl") if "train/loss" in r]
                     for run in ("multi", "single"))
    assert len(multi) == 10 and all(abs(a - b) <= 1e-6 * abs(b) for a, b in zip(multi, single)), (multi, single)


def test_preempted_job_checkpoints_requeues_and_ends_as_an_uninterrupted_run(slurm, tmp_path):
    args = ["--config", SPAM, "--max_steps", "1500", "--eval_strategy", "no",
            "--logging_steps", "50", "--load_best_model_at_end", "false"]
    out = tmp_path / "preempted"
    job = sbatch(slurm, "single_node.sbatch", [], ["scripts/classify.py", *args, "--output_dir", str(out)])
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() or len(read_jsonl(out / "metrics.jsonl")) < 3:
        assert time.time() < deadline and still_going(slurm, job), job_log(slurm, job)
        time.sleep(0.5)
    # what SLURM does <grace> seconds before the time limit (--signal=B:USR1@...): USR1 to the batch script
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm[0], check=True)
    info = wait_for(slurm, job, restarts=1)
    log = job_log(slurm, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-3000:]
    assert "stopped by SIGUSR1 at step" in log and "requeueing job" in log and "resumed from" in log
    stopped_at = int(log.split("stopped by SIGUSR1 at step ")[1].split(":")[0])
    assert 0 < stopped_at < 1500
    assert json.load(open(out / "metrics.json"))["global_step"] == 1500

    straight = tmp_path / "straight"
    launch("classify.py", args + ["--output_dir", str(straight)])
    a = load_file(out / "final" / "model.safetensors")
    b = load_file(straight / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
