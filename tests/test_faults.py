"""Faults with real processes and signals: kill -9 at random moments (training or saving), SIGTERM /
SIGUSR1 / Ctrl-C (finish the step or stop the evaluation, save, exit 0 or 130; a second Ctrl-C quits at once), the
crash of one rank in a 2-process run."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import BIN, ROOT, free_port, script_env

pytestmark = pytest.mark.slow
SPAM = os.path.join(ROOT, "recipes", "tiny", "spam.yaml")
RUN = ["--config", SPAM, "--max_steps", "60", "--save_steps", "2", "--save_total_limit", "2", "--logging_steps", "1",
       "--eval_strategy", "no", "--load_best_model_at_end", "false"]


def start(out, extra=(), env=None, stderr=subprocess.PIPE):
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "classify.py"), *RUN, "--output_dir", str(out), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env={**script_env(), **(env or {})}, stdout=subprocess.PIPE, stderr=stderr,
                            text=True)


def logged_steps(out):
    """Steps logged so far by a run that is still writing: a line being written (no newline yet) is skipped."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines(keepends=True) if line.endswith("\n") and line.strip()]
    return [r["step"] for r in map(json.loads, lines) if "train/loss" in r]


def wait_until_step(proc, out, step, timeout=120, alive=True):
    """Until the run has logged ``step``; by then it must still run (``alive``), or its error is the failure."""
    deadline = time.time() + timeout
    while (max(logged_steps(out), default=0) < step) and proc.poll() is None:
        assert time.time() < deadline, "training did not get going"
        time.sleep(0.02)
    if alive and proc.poll() is not None:
        raise EndedEarly(proc.returncode, proc.stderr.read() if proc.stderr else "", step)


class EndedEarly(AssertionError):
    """A run that ended before the step a test waited for; the message has every rank's one-line error (two ranks'
    tracebacks would push the first one out of a tail) and then the tail of stderr."""

    def __init__(self, returncode, stderr, step):
        self.stderr = stderr
        errors = [line[line.index("error: "):] for line in stderr.splitlines() if "error: " in line]
        super().__init__(f"the run ended ({returncode}) by step {step}: {errors}\n{stderr[-3000:]}")


def final_weights(out):
    return load_file(out / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    proc = start(out)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    return final_weights(out)


def test_kill_9_at_random_moments_never_loses_completed_work(uninterrupted, tmp_path):
    rng = random.Random(1234)
    out = tmp_path / "run"
    kills = 0
    for trial in range(10):
        proc = start(out)
        target = rng.randint(1, 55)
        wait_until_step(proc, out, target, alive=False)  # (a run resumed near the end may finish first)
        time.sleep(rng.uniform(0.0, 0.05))  # lands inside a step or inside a checkpoint save (every 2 steps)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=60)
        # whatever was interrupted, only complete checkpoints are there to resume from
        root = out / "checkpoints"
        for name in os.listdir(root) if root.exists() else []:
            if name.startswith("step_"):
                assert (root / name / "trainer_state.json").exists(), name
    assert kills >= 8
    proc = start(out)  # the last resume runs to the end
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    assert json.load(open(out / "metrics.json"))["global_step"] == 60
    weights = final_weights(out)
    assert all(torch.equal(weights[k], uninterrupted[k]) for k in uninterrupted)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_stop_signal_finishes_the_step_saves_and_exits(uninterrupted, tmp_path, signum):
    # SIGINT is Ctrl-C: the same stop, exit 130 (interrupted) rather than 0
    out = tmp_path / "run"
    proc = start(out, ["--save_steps", "1000"])  # no periodic checkpoint: the one saved is the signal's
    wait_until_step(proc, out, 10)
    proc.send_signal(signum)
    time.sleep(0.01)
    proc.send_signal(signum)  # a second signal, likely during the save, changes nothing (a Ctrl-C: torchrun's copy)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == (130 if signum == signal.SIGINT else 0), stderr[-3000:]
    assert "launcher kills" not in stderr and "[ftkit] warning" not in stderr  # (`python`: no launcher to kill it)
    name = signal.Signals(signum).name
    assert f"stopped by {name} at step" in stdout, stdout[-2000:]
    step = int(stdout.split(f"stopped by {name} at step ")[1].split(":")[0])
    assert os.path.isfile(out / "checkpoints" / f"step_{step}" / "trainer_state.json")
    assert not (out / "final").exists()
    # and the run goes on from there to the uninterrupted result
    proc = start(out, ["--save_steps", "1000"])
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    weights = final_weights(out)
    assert all(torch.equal(weights[k], uninterrupted[k]) for k in uninterrupted)


def test_a_stop_signal_in_the_last_step_saves_it_and_the_next_run_evaluates_and_exports(uninterrupted, tmp_path):
    # the loop checks for a signal before each step; one that arrives during the last step is found after the loop,
    # before the final evaluation (which may outlast SLURM's warning): the step is saved and the run stops there
    out = tmp_path / "run"
    proc = signalled_at("last_step", RUN + ["--output_dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stopped by SIGUSR1 at step 60:" in proc.stdout, proc.stdout[-2000:]
    assert os.path.isfile(out / "checkpoints" / "step_60" / "trainer_state.json")
    assert not (out / "final").exists() and not (out / "metrics.json").exists()  # nothing of the final phase ran
    proc = start(out)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "resumed from" in stdout + stderr and json.load(open(out / "metrics.json"))["global_step"] == 60
    weights = final_weights(out)
    assert all(torch.equal(weights[k], uninterrupted[k]) for k in uninterrupted)


def test_ctrl_c_before_training_or_a_second_one_quits_at_once_in_one_line(tmp_path):
    # nothing to save before training; a second Ctrl-C (a person's, not torchrun's copy of the first) does not wait
    # for the save the first one asked for. A Ctrl-C whose KeyboardInterrupt C code swallowed (Cython's module set-up
    # does) trained to the end: it quits where training would begin, or at the launcher's SIGTERM that passes it on.
    for where, signals, received in [("loading", "SIGINT", False), ("evaluation", "SIGINT,SIGINT", True),
                                     ("loading_swallowed", "SIGINT", False),
                                     ("loading_swallowed", "SIGINT,SIGTERM", False)]:
        out = tmp_path / f"{where}_{signals}"
        proc = signalled_at(where, RUN + ["--eval_strategy", "steps", "--eval_steps", "20", "--save_steps", "1000",
                                          "--output_dir", str(out)], signals)
        assert proc.returncode == 130, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines()[-1] == (
            "[ftkit] interrupted by Ctrl-C: stopped at once, nothing saved since the latest checkpoint in output_dir "
            "(the same command goes on from there)"), proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        assert ("SIGINT received, stopping after this optimizer step or evaluation batch (Ctrl-C again to quit at "
                "once, without saving)" in proc.stderr) == received
        assert "SIGTERM received" not in proc.stderr, proc.stderr[-3000:]
        assert not (out / "checkpoints").exists() or not os.listdir(out / "checkpoints")
        if where.startswith("loading"):  # not one step trained
            assert not (out / "metrics.jsonl").exists() or "train/loss" not in (out / "metrics.jsonl").read_text()


def signalled_at(where: str, args: list, signals: str = "SIGUSR1") -> subprocess.CompletedProcess:
    """classify.py, sent ``signals`` by itself at ``where`` (tests/signal_at.py)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "tests", "signal_at.py"), where, signals,
                           os.path.join(ROOT, "scripts", "classify.py"), *args], cwd=ROOT, env=script_env(),
                          capture_output=True, text=True, timeout=300)


def test_a_stop_signal_during_an_evaluation_saves_the_step_and_the_next_run_evaluates_it_first(tmp_path):
    # an evaluation (num_eval_generate summaries of a large model) may outlast SLURM's warning: it stops between two
    # batches, the step is saved with its evaluation pending, and the resumed run does that evaluation before going on
    evaluating = RUN + ["--eval_strategy", "steps", "--eval_steps", "20"]
    straight, out = tmp_path / "straight", tmp_path / "run"
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "classify.py"), *evaluating, "--output_dir",
                    str(straight)], cwd=ROOT, env=script_env(), capture_output=True, check=True, timeout=300)
    proc = signalled_at("evaluation", evaluating + ["--output_dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "USR1 received, stopping after this optimizer step or evaluation batch" in proc.stderr, proc.stderr[-3000:]
    assert "stopped by SIGUSR1 at step 20:" in proc.stdout, proc.stdout[-2000:]
    assert json.load(open(out / "checkpoints" / "step_20" / "trainer_state.json"))["evaluation_pending"] is True
    assert not any("eval/loss" in json.loads(line) for line in open(out / "metrics.jsonl"))  # none was finished
    # stopped again in that evaluation, before any new step: nothing to save, the checkpoint keeps it pending
    proc = signalled_at("evaluation", evaluating + ["--output_dir", str(out)])
    assert proc.returncode == 0 and "resumed from" in proc.stderr, proc.stderr[-3000:]
    assert ("stopped by SIGUSR1 before the first optimizer step of this run: nothing new to save; run the same "
            "command again to resume from step 20") in proc.stdout, proc.stdout[-2000:]
    assert json.load(open(out / "checkpoints" / "step_20" / "trainer_state.json"))["evaluation_pending"] is True
    proc = start(out, ["--eval_strategy", "steps", "--eval_steps", "20"])
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    evaluations = [[(r["step"], r["eval/loss"]) for r in map(json.loads, open(o / "metrics.jsonl")) if "eval/loss" in r]
                   for o in (straight, out)]
    assert evaluations[0] == evaluations[1] and [s for s, _ in evaluations[0]] == [20, 40, 60], evaluations
    assert "evaluation_pending" not in json.load(open(out / "metrics.json"))
    weights, expected = final_weights(out), final_weights(straight)
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


def test_a_second_run_in_the_same_output_dir_is_refused_while_the_first_runs(tmp_path):
    # a job submitted twice would resume the same checkpoint and overwrite the first one's files as they are written
    out, endless = tmp_path / "run", ["--max_steps", "100000"]
    first = start(out, endless)
    wait_until_step(first, out, 2)
    second = start(out, endless)
    _, stderr = second.communicate(timeout=120)
    last = stderr.strip().splitlines()[-1]
    assert second.returncode == 2 and last.startswith(
        f"error: output_dir: {out} is in use by another run (pid {first.pid} on "), stderr[-2000:]
    assert last.endswith("; wait for it to end, or choose another output_dir") and first.poll() is None
    first.send_signal(signal.SIGTERM)  # saves its step and ends; the lock goes with the process
    first.communicate(timeout=120)  # (reading its pipes, which its progress bar may have filled)
    assert first.returncode == 0
    saved = max(int(name.split("_")[1]) for name in os.listdir(out / "checkpoints") if name.startswith("step_"))
    again = start(out, endless)  # now the same command resumes there
    wait_until_step(again, out, saved + 1)
    again.send_signal(signal.SIGTERM)
    _, stderr = again.communicate(timeout=120)
    assert again.returncode == 0 and f"resumed from {out / 'checkpoints' / f'step_{saved}'}" in stderr, stderr[-3000:]


def test_a_requeued_slurm_job_waits_for_the_lock_its_earlier_run_still_holds(tmp_path):
    # after a node failure a network filesystem keeps the dead node's lock for a lease time; the requeued job (same
    # job id) waits for it instead of failing
    out, endless, job = tmp_path / "run", ["--max_steps", "100000"], {"SLURM_JOB_ID": "4242"}
    first = start(out, endless, job)
    wait_until_step(first, out, 2)
    with open(tmp_path / "second.err", "w") as err:
        second = start(out, endless, job, stderr=err)
        deadline = time.time() + 120
        while "still holds" not in (tmp_path / "second.err").read_text():
            assert second.poll() is None and time.time() < deadline, (tmp_path / "second.err").read_text()[-3000:]
            time.sleep(0.1)
        first.send_signal(signal.SIGTERM)
        stopped = first.communicate(timeout=120)[0]  # the second resumes at once: its own saves follow quickly
        saved = int(stopped.split("stopped by SIGTERM at step ")[1].split(":")[0])
        wait_until_step(second, out, saved + 1)
        second.send_signal(signal.SIGTERM)
        second.communicate(timeout=120)
    log = (tmp_path / "second.err").read_text()
    assert second.returncode == 0 and f"resumed from {out / 'checkpoints' / f'step_{saved}'}" in log, log[-3000:]
    assert "the earlier run of SLURM job 4242 (pid " in log


def test_a_crashed_rank_ends_the_two_process_run_promptly(tmp_path):
    out = tmp_path / "run"
    cmd = [os.path.join(BIN, "accelerate"), "launch", "--config_file",
           os.path.join(ROOT, "launch", "accelerate", "cpu_2proc.yaml"), "--main_process_port",
           str(free_port()), os.path.join(ROOT, "scripts", "classify.py"), *RUN,
           "--max_steps", "100000", "--output_dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until_step(proc, out, 3)
    ps = subprocess.run(["pgrep", "-f", f"classify.py.*{out}"], capture_output=True, text=True).stdout.split()
    workers = [int(p) for p in ps if int(p) != proc.pid and "accelerate" not in open(f"/proc/{p}/cmdline").read()]
    assert len(workers) == 2, workers
    victim = max(workers)  # one of the two ranks
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()
    stdout, stderr = proc.communicate(timeout=120)
    assert time.time() - killed_at < 60
    assert proc.returncode != 0
    assert "Signal 9" in stderr or "SIGKILL" in stderr or "exitcode  : -9" in stderr, stderr[-3000:]
    assert subprocess.run(["pgrep", "-f", f"classify.py.*{out}"], capture_output=True).returncode == 1  # none left


def test_ctrl_c_at_the_terminal_stops_a_launched_two_process_run_once(tmp_path):
    # the terminal sends SIGINT to the whole process group, the launcher's and both ranks'; torchrun then sends each
    # rank its own SIGINT: one stop, the step saved, no "quit at once"
    out = tmp_path / "run"
    cmd = [os.path.join(BIN, "accelerate"), "launch", "--config_file",
           os.path.join(ROOT, "launch", "accelerate", "cpu_2proc.yaml"), "--main_process_port",
           str(free_port()), os.path.join(ROOT, "scripts", "classify.py"), *RUN,
           "--max_steps", "100000", "--save_steps", "100000", "--output_dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # a process group of its own, as a terminal's job is
    wait_until_step(proc, out, 3)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert stdout.count("stopped by SIGINT at step ") == 1 and "interrupted by Ctrl-C" not in stderr, stderr[-3000:]
    step = int(stdout.split("stopped by SIGINT at step ")[1].split(":")[0])
    assert sorted(os.listdir(out / "checkpoints")) == [f"step_{step}"]
    assert json.load(open(out / "checkpoints" / f"step_{step}" / "trainer_state.json"))["global_step"] == step


def test_ctrl_c_to_one_launched_process_saves_its_step_and_names_the_launchers_kill(tmp_path):
    # accelerate 1.16's `accelerate launch` of one process passes a Ctrl-C (or SIGTERM) on, then kills the process 5 s
    # later (by hand: a 5 s step of a 152M GPT-2 was killed unsaved): the run says so when it starts, with the
    # `python` command that has no such limit, and again at the signal. A tiny step and its save fit in 5 s.
    from accelerate.commands import launch as accelerate_launch

    kills = hasattr(accelerate_launch, "_terminate_process_tree")
    out = tmp_path / "run"
    cmd = [os.path.join(BIN, "accelerate"), "launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", os.path.join(ROOT, "scripts", "classify.py"), *RUN,
           "--max_steps", "100000", "--save_steps", "100000", "--output_dir", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,  # a terminal's foreground job: its own group, Ctrl-C not ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_until_step(proc, out, 3)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    warned = ("[ftkit] warning: one process under `accelerate launch` is killed by the launcher 5 s after a Ctrl-C or "
              "SIGTERM, before a checkpoint that takes longer to save; `python " + os.path.join(ROOT, "scripts",
                                                                                                  "classify.py"))
    assert (warned in stderr) == kills, stderr[-3000:]
    # on stdout: the launcher pipes stderr, and drops what it has read of it when its own copy of the signal arrives
    assert ("; the launcher kills this process 5 s after the signal" in stdout) == kills, stdout[-3000:]
    assert stdout.count("stopped by SIGINT at step ") == 1, stderr[-3000:]
    step = int(stdout.split("stopped by SIGINT at step ")[1].split(":")[0])
    assert os.path.isfile(out / "checkpoints" / f"step_{step}" / "trainer_state.json")
    if kills:  # the launcher waited for the process it stopped, and ends as it did
        assert proc.returncode == 130, stderr[-3000:]


def test_ctrl_c_while_one_launched_process_loads_quits_in_one_line_on_stdout(tmp_path):
    # the launcher passes the Ctrl-C on as a SIGTERM, which said "SIGTERM received, training will stop before its
    # first optimizer step" after the process had quit; the quit's line is on stdout, as the line at a stop signal
    from accelerate.commands import launch as accelerate_launch

    if not hasattr(accelerate_launch, "_terminate_process_tree"):
        pytest.skip("this accelerate's launcher of one process neither pipes stderr nor passes a Ctrl-C on")
    cmd = [os.path.join(BIN, "accelerate"), "launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", os.path.join(ROOT, "scripts", "classify.py"), *RUN,
           "--output_dir", str(tmp_path / "run")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    stderr = ""
    while "[ftkit] warning: one process under `accelerate launch`" not in stderr:  # (then it loads the data)
        line = proc.stderr.readline()
        assert line, stderr[-3000:]
        stderr += line
    os.killpg(proc.pid, signal.SIGINT)
    stdout, rest = proc.communicate(timeout=120)
    stderr += rest
    assert proc.returncode == 130, stderr[-3000:]
    assert stdout.strip().splitlines()[-1] == (
        "[ftkit] interrupted by Ctrl-C: stopped at once, nothing saved since the latest checkpoint in output_dir (the "
        "same command goes on from there)"), stdout[-3000:]
    assert "received" not in stdout + stderr and "Traceback" not in stderr, stdout[-3000:] + stderr[-3000:]


def test_a_rank_waiting_past_ddp_timeout_stops_with_one_line_naming_it(tmp_path):
    # rank 0 paused (SIGSTOP) mid-run, as if busy: rank 1 waits at the next step's all-reduce for ddp_timeout. A short
    # timeout keeps the test short, but rank 1 also waits at set-up while rank 0 builds the tiny model (1-2 s on an idle
    # CPU here): where the machine is so busy that this alone takes longer, the run is repeated with twice the timeout.
    for ddp_timeout in (3, 6, 12, 24):
        out = tmp_path / f"run_{ddp_timeout}"
        cmd = [os.path.join(BIN, "accelerate"), "launch", "--config_file",
               os.path.join(ROOT, "launch", "accelerate", "cpu_2proc.yaml"), "--main_process_port",
               str(free_port()), os.path.join(ROOT, "scripts", "classify.py"), *RUN, "--save_steps", "100000",
               "--max_steps", "100000", "--ddp_timeout", str(ddp_timeout), "--output_dir", str(out)]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        try:
            wait_until_step(proc, out, 3)
            break
        except EndedEarly as early:
            if f"error: ddp_timeout: rank 1 waited more than {ddp_timeout} s" not in early.stderr:
                raise
            last = early.stderr
    else:
        raise AssertionError("even a 24 s ddp_timeout ran out at set-up: " + last[-3000:])
    ps = subprocess.run(["pgrep", "-f", f"classify.py.*{out}"], capture_output=True, text=True).stdout.split()
    ranks = {open(f"/proc/{p}/environ").read().split("\0RANK=")[1].split("\0")[0]: int(p) for p in ps
             if int(p) != proc.pid and "accelerate" not in open(f"/proc/{p}/cmdline").read()}
    os.kill(ranks["0"], signal.SIGSTOP)
    paused = time.time()
    try:
        while os.path.exists(f"/proc/{ranks['1']}") and time.time() - paused < ddp_timeout + 60:
            time.sleep(0.1)
        waited = time.time() - paused
    finally:
        os.kill(ranks["0"], signal.SIGCONT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0 and ddp_timeout <= waited < ddp_timeout + 27, (proc.returncode, waited, ddp_timeout)
    # (rank 0's progress bar may hold the line's start: the two ranks share the launcher's stderr)
    line = next((line for line in stderr.splitlines() if "error: ddp_timeout: rank 1 " in line), "")
    assert f"error: ddp_timeout: rank 1 waited more than {ddp_timeout} s for the other processes (" in line, \
        stderr[-3000:]
    assert "raise ddp_timeout" in line


# ---------------------------------------------------------------------------------------------
# Non-finite loss, full disk
# ---------------------------------------------------------------------------------------------


def test_non_finite_steps_are_skipped_then_the_run_stops_naming_the_step(tmp_path):
    out = tmp_path / "run"
    # SGD with an absurd learning rate: step 1 blows the weights up, the next losses are not finite
    proc = start(out, ["--optim", "sgd", "--learning_rate", "1e30", "--lr_scheduler_type", "constant",
                       "--max_grad_norm", "0", "--save_steps", "1", "--max_bad_steps", "2"])
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: loss or gradients not finite at step ") and "3 steps in a row (max_bad_steps 2)" in last
    assert stderr.count("optimizer step skipped") == 2
    assert "Traceback" not in stderr
    for name in os.listdir(out / "checkpoints"):
        weights = load_file(out / "checkpoints" / name / "model.safetensors")
        assert all(torch.isfinite(v).all() for v in weights.values()), name


def test_a_checkpoint_of_non_finite_weights_is_refused():
    from ftkit import checkpoint
    from ftkit.config import RunError

    model = torch.nn.Linear(3, 2)
    checkpoint.check_finite_weights(model, 5)
    with torch.no_grad():
        model.bias[1] = float("nan")
    with pytest.raises(RunError, match=r"weights not finite at step 5 \(bias\): checkpoint not saved"):
        checkpoint.check_finite_weights(model, 5)


def test_disk_full_while_saving_keeps_the_last_checkpoint_and_leaves_no_half_one(uninterrupted, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], check=True)
    try:
        out = disk / "run"
        proc = start(out, ["--save_steps", "4"])
        while not (out / "checkpoints" / "step_4" / "trainer_state.json").exists():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.02)
        filler = disk / "filler"  # the disk fills up: a few KiB stay free for the log, not for a checkpoint
        with open(filler, "wb", buffering=0) as f:  # to the last byte (the run may write meanwhile), then 64 KiB back
            try:
                while True:
                    f.write(b"\0" * 65536)
            except OSError:
                pass
            f.truncate(max(f.tell() - 64 * 1024, 0))
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 1, stderr[-3000:]
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and "No space left on device" in last, last
        assert "Traceback" not in stderr
        names = os.listdir(out / "checkpoints")
        assert not [n for n in names if n.startswith(".tmp")], names
        assert all((out / "checkpoints" / n / "trainer_state.json").exists() for n in names)
        os.remove(filler)  # space again: the run resumes from its last complete checkpoint and finishes
        proc = start(out, ["--save_steps", "4"])
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
        weights = final_weights(out)
        assert all(torch.equal(weights[k], uninterrupted[k]) for k in uninterrupted)
    finally:
        subprocess.run(["umount", "-l", str(disk)])
