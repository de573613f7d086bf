"""Exact resume for every script: N steps straight == k steps, stop, resume for N - k steps (logged
losses identical and final weights bitwise in one process; within 1e-6 with two)."""

import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, launch, read_jsonl, run_python, tensorboard_scalars

pytestmark = pytest.mark.slow
TINY = os.path.join(ROOT, "recipes", "tiny")

# Each: recipe args, the final weights file, and where step 3 lands (epoch, micro-batches into it).
SCRIPTS = {
    # 42 examples, batch 8, drop_last: 5 micro-batches an epoch = 2 windows of 2; step 3 is mid-epoch 1
    "classify.py": (["--config", os.path.join(TINY, "spam.yaml"), "--gradient_accumulation_steps", "2",
                     "--eval_strategy", "steps", "--eval_steps", "1000", "--load_best_model_at_end", "false",
                     "--weight_decay", "0.1", "--learning_rate", "1e-3"],
                    "model.safetensors", (1, 2)),
    # 63 questions, batch 8: 8 micro-batches = 4 windows of 2 (AdamW); step 3 is mid-epoch 0
    "t5_qa.py": (["--config", os.path.join(TINY, "t5_qa.yaml"), "--gradient_accumulation_steps", "2",
                  "--eval_steps", "1000", "--max_eval_samples", "2", "--load_best_model_at_end", "false",
                  "--group_by_length", "true"],
                 "model.safetensors", (0, 6)),
}


def _run(script, args, out, steps, processes):
    return launch(script, args + ["--output_dir", str(out), "--max_steps", str(steps), "--save_steps", "3",
                           "--logging_steps", "1", "--save_total_limit", "5"], num_processes=processes, fresh=True)


@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_resume_mid_epoch_gives_the_uninterrupted_run(tmp_path, script, processes):
    args, weights_file, position = SCRIPTS[script]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(script, args, straight, 6, processes)
    state = json.load(open(straight / "checkpoints" / "step_3" / "trainer_state.json"))
    files = os.listdir(straight / "checkpoints" / "step_3")
    assert "scheduler.json" in files and not [f for f in files if f.startswith("custom_checkpoint")]
    if processes == 1:
        assert (state["epoch"], state["batches_in_epoch"]) == position
    # a run killed during step 5, after its step-3 checkpoint: that checkpoint and its log up to step 5, the last
    # line cut short; the resumed run keeps the log up to step 3 and logs steps 4-6 once
    shutil.copytree(straight / "checkpoints" / "step_3", resumed / "checkpoints" / "step_3")
    with open(resumed / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in read_jsonl(straight / "metrics.jsonl") if r["step"] <= 5)
        f.write('{"step": 5, "train/lo')
    # resumed with the tokenization in 2 processes: the same rows in the same order (the data check would refuse others)
    proc = _run(script, args + ["--preprocessing_num_workers", "2"], resumed, 6, processes)
    assert "tokenize train (num_proc=2)" in proc.stderr

    def losses(out):
        logged = [(r["step"], r["train/loss"]) for r in read_jsonl(out / "metrics.jsonl") if "train/loss" in r]
        assert [step for step, _ in logged] == [1, 2, 3, 4, 5, 6]
        return {step: loss for step, loss in logged if step > 3}

    a, b = losses(straight), losses(resumed)
    counted = [json.load(open(out / "metrics.json")) for out in (straight, resumed)]
    assert counted[0]["tokens_seen"] == counted[1]["tokens_seen"] > 0
    assert counted[0]["samples_seen"] == counted[1]["samples_seen"] > state["samples_seen"] > 0
    assert sorted(b) == [4, 5, 6]
    wa, wb = load_file(straight / "final" / weights_file), load_file(resumed / "final" / weights_file)
    if processes == 1:
        assert all(a[s] == b[s] for s in b), (a, b)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    else:
        assert all(abs(a[s] - b[s]) <= 1e-6 * abs(a[s]) for s in b), (a, b)
        scale = max(v.abs().max().item() for v in wa.values())
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6 * scale


def test_a_resumed_run_logs_the_loss_means_of_the_uninterrupted_one(tmp_path):
    # logging every 4 steps, resumed from step 3: the mean logged at step 4 still covers steps 1-4 (the checkpoint
    # keeps the loss summed since the last log event), not step 4 alone
    args = SCRIPTS["classify.py"][0] + ["--max_steps", "6", "--save_steps", "3", "--logging_steps", "4"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch("classify.py", args + ["--output_dir", str(straight)], fresh=True)
    assert json.load(open(straight / "checkpoints" / "step_3" / "trainer_state.json"))["loss_since_log"][1] > 0
    shutil.copytree(straight / "checkpoints" / "step_3", resumed / "checkpoints" / "step_3")
    launch("classify.py", args + ["--output_dir", str(resumed)], fresh=True)

    def logged(out):
        return [(r["step"], r["train/loss"]) for r in read_jsonl(out / "metrics.jsonl") if "train/loss" in r]

    assert [step for step, _ in logged(straight)] == [4, 6] and logged(resumed) == logged(straight)


def test_a_finished_run_extends_with_a_longer_schedule_and_refuses_a_batch_change(tmp_path):
    from ftkit import optim

    classify = SCRIPTS["classify.py"][0] + ["--lr_scheduler_type", "linear", "--warmup_steps", "0"]
    out = tmp_path / "run"
    latest = ["--resume_from_checkpoint", "latest"]  # what a run does in its output_dir anyway; said once when fresh
    first = _run("classify.py", classify + latest, out, 3, 1)
    assert first.stderr.count(f"resume_from_checkpoint=latest: no checkpoint in {out} yet, starting fresh") == 1
    extended = launch("classify.py", classify + latest + ["--output_dir", str(out), "--max_steps", "6", "--save_steps",
                                                          "3", "--logging_steps", "1", "--eval_steps", "2",
                                                          "--save_total_limit", "5"])
    assert f"resumed from {out / 'checkpoints' / 'step_3'} (step 3" in extended.stderr
    assert f"saved checkpoint {out / 'checkpoints' / 'step_6'}" in extended.stderr  # what the rerun below must not say
    assert "max_steps: 3 -> 6" in extended.stderr and "eval_steps: 1000 -> 2" in extended.stderr
    assert "re-planned from the checkpoint's step" in extended.stderr
    assert json.load(open(out / "metrics.json"))["global_step"] == 6
    log = read_jsonl(out / "metrics.jsonl")
    lrs = {r["step"]: r["train/lr"] for r in log if "train/lr" in r}
    # steps 4-6 follow a 6-step linear plan (the logged rate is the one set for the next step)
    plan = SimpleNamespace(lr_scheduler_type="linear", warmup_steps=0, warmup_ratio=0.0)
    sched = optim.build_scheduler(torch.optim.SGD([torch.zeros(1)], lr=1e-3), plan, 6)
    expected = {}
    for step in range(1, 7):
        sched.optimizer.step()
        sched.step()
        expected[step] = sched.get_last_lr()[0]
    assert [lrs[s] for s in (4, 5, 6)] == pytest.approx([expected[s] for s in (4, 5, 6)])
    assert [r["step"] for r in log if "eval/loss" in r and r["step"] > 3] == [4, 6]

    # the same command again: the finished run is evaluated and exported again; its checkpoint is not rewritten
    saved = {p: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("*")}
    before = json.load(open(out / "metrics.json"))
    # (with a smaller evaluation batch: an evaluation that ran out of memory may go on with one)
    again = launch("classify.py", classify + ["--output_dir", str(out), "--max_steps", "6", "--save_steps", "3",
                                              "--logging_steps", "1", "--eval_steps", "2", "--save_total_limit", "5",
                                              "--per_device_eval_batch_size", "3"])
    assert "saved checkpoint" not in again.stderr and json.load(open(out / "metrics.json"))["global_step"] == 6
    after = json.load(open(out / "metrics.json"))
    assert after["validation"]["accuracy"] == before["validation"]["accuracy"]
    assert after["validation"]["loss"] == pytest.approx(before["validation"]["loss"], rel=1e-5)
    assert {p: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("*")} == saved

    # a resume cannot shorten the run: refused by max_steps before anything is loaded, by epochs once the data is
    step_6 = out / "checkpoints" / "step_6"
    for option, value, end in (("--max_steps", "4", 4), ("--num_train_epochs", "1", 2)):
        shorter = run_python("classify.py", classify + ["--output_dir", str(out), "--max_steps", "-1", option, value]
                             if option == "--num_train_epochs" else classify + ["--output_dir", str(out), option, value])
        name = option[2:]
        assert shorter.returncode == 2 and shorter.stderr.strip().splitlines()[-1] == (
            f"error: {name}: this run ends at step {end}, but the checkpoint it would resume, {step_6}, is at step 6; a "
            f"resume can only extend a run: raise {name}, or start over in another output_dir or with "
            "--overwrite_output_dir true"), shorter.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in (out / "checkpoints").rglob("*")} == saved

    refused = run_python("classify.py", classify + ["--output_dir", str(out), "--max_steps", "9",
                                                    "--per_device_train_batch_size", "4"])
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and "per_device_train_batch_size: 8 -> 4" in lines[-1], lines[-3:]
    assert "max_steps" not in lines[-1].split("a resume may change only")[0]


def test_early_stopping_holds_across_a_resume_and_a_rerun_and_more_patience_trains_on(tmp_path):
    # threshold 100: no evaluation counts as an improvement; evaluations at steps 2, 4, 6 end the run at step 6
    early = ["--config", os.path.join(TINY, "spam.yaml"), "--max_steps", "20", "--eval_strategy", "steps",
             "--eval_steps", "2", "--save_steps", "2", "--save_total_limit", "5", "--logging_steps", "4",
             "--early_stopping_threshold", "100", "--load_best_model_at_end", "false"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    first = launch("classify.py", early + ["--output_dir", str(straight), "--early_stopping_patience", "2"], fresh=True)
    assert ("[ftkit] early stopping at step 6: eval/accuracy has not improved by more than 100 on 1 (step 2) for 2 "
            "evaluation(s)") in first.stdout
    result = json.load(open(straight / "metrics.json"))
    assert (result["global_step"], result["early_stopped_at"]) == (6, 6)
    assert [r["step"] for r in read_jsonl(straight / "metrics.jsonl") if "eval/loss" in r] == [2, 4, 6]
    train_losses = {r["step"]: r["train/loss"] for r in read_jsonl(straight / "metrics.jsonl") if "train/loss" in r}
    assert list(train_losses) == [4, 6]  # steps 5-6 are logged when the run stops, though 6 is no logging step

    # preempted after step 4 (one evaluation without improvement): the resumed run stops at step 6 too, where a
    # patience counter that restarts from 0 would train on to step 8
    shutil.copytree(straight / "checkpoints" / "step_4", resumed / "checkpoints" / "step_4")
    launch("classify.py", early + ["--output_dir", str(resumed), "--early_stopping_patience", "2"], fresh=True)
    assert json.load(open(resumed / "metrics.json"))["global_step"] == 6
    assert [r["step"] for r in read_jsonl(resumed / "metrics.jsonl") if "eval/loss" in r] == [6]
    assert [(r["step"], r["train/loss"]) for r in read_jsonl(resumed / "metrics.jsonl") if "train/loss" in r] == [
        (6, train_losses[6])]
    wa, wb = load_file(straight / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    # the same command again trains nothing and rewrites no checkpoint; a larger patience trains on
    saved = {p: p.stat().st_mtime_ns for p in (straight / "checkpoints").rglob("*")}
    again = launch("classify.py", early + ["--output_dir", str(straight), "--early_stopping_patience", "2"])
    assert "[ftkit] this run stopped early at step 6" in again.stdout and "saved checkpoint" not in again.stderr
    assert {p: p.stat().st_mtime_ns for p in (straight / "checkpoints").rglob("*")} == saved
    more = launch("classify.py", early + ["--output_dir", str(straight), "--early_stopping_patience", "3"])
    assert "[ftkit] early stopping at step 8" in more.stdout
    assert json.load(open(straight / "metrics.json"))["early_stopped_at"] == 8


def test_a_checkpoint_of_an_earlier_ftkit_resumes_and_one_of_another_config_is_refused(tmp_path):
    import yaml

    # an earlier ftkit wrote a config.yaml without the options added since and hashed only the options it had: a job
    # requeued after an upgrade resumes
    classify, out = SCRIPTS["classify.py"][0], tmp_path / "run"
    _run("classify.py", classify, out, 3, 1)
    saved = yaml.safe_load(open(out / "config.yaml"))
    for key in ("early_stopping_patience", "early_stopping_threshold", "save_strategy", "ddp_timeout", "subset_seed"):
        del saved[key]
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    state_file = out / "checkpoints" / "step_3" / "trainer_state.json"
    state = json.load(open(state_file))
    state = {k: v for k, v in state.items() if k not in ("train_data", "eval_data", "epoch_windows")}  # recorded since
    state_file.write_text(json.dumps({**state, "config_hash": "0123456789abcdef"}))
    _run("classify.py", classify, out, 6, 1)
    assert json.load(open(out / "metrics.json"))["global_step"] == 6

    # another run's checkpoint (another learning rate), named from a fresh output_dir: refused before anything loads
    other = tmp_path / "other"
    refused = run_python("classify.py", classify + ["--output_dir", str(other), "--learning_rate", "5e-4",
                                                    "--max_steps", "9", "--resume_from_checkpoint",
                                                    str(out / "checkpoints" / "step_6")])
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == (
        f"error: resume_from_checkpoint: {out / 'checkpoints' / 'step_6'} was written with a different config "
        "(compare the config.yaml of its output_dir); pass --overwrite_output_dir true to start over")
    assert not other.exists()


def test_a_resume_on_other_training_data_is_refused_unless_ignore_data_skip_restarts_the_epoch(tmp_path):
    # 42 training rows, batch 8, drop_last, accumulation 2: an epoch is 2 steps of 2 micro-batches
    train = tmp_path / "spam.tsv"
    shutil.copy(os.path.join(ROOT, "data", "spam_sample.tsv"), train)
    classify = SCRIPTS["classify.py"][0] + ["--train_file", str(train), "--tokenizer_files", str(train)]
    out = tmp_path / "run"
    _run("classify.py", classify, out, 4, 1)  # ends with epoch 1 complete
    state = lambda step: json.load(open(out / "checkpoints" / f"step_{step}" / "trainer_state.json"))  # noqa: E731
    assert (state(4)["epoch"], state(4)["batches_in_epoch"], state(4)["train_data"]["rows"]) == (1, 4, 42)
    saved = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    lines = train.read_text().splitlines(keepends=True)  # one message's label edited: after balancing, 43 rows
    first = next(i for i, line in enumerate(lines) if line.startswith("ham\t"))
    lines[first] = "spam" + lines[first][3:]
    train.write_text("".join(lines))
    refused = run_python("classify.py", classify + ["--output_dir", str(out), "--max_steps", "5"])
    step_4 = out / "checkpoints" / "step_4"
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == (
        f"error: resume_from_checkpoint: {step_4} was trained on other training data (42 rows then, 43 now); its "
        "position in the epoch would point at other examples: restore the data, pass --ignore_data_skip true to go on "
        "from its weights and step with this data (the epoch restarts from its first batch), or start over with "
        "--overwrite_output_dir true"), refused.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == saved  # refused before the model: nothing written

    # ignore_data_skip: the checkpoint's epoch was complete, so step 5 starts epoch 2 on the new data
    extended = launch("classify.py", classify + ["--output_dir", str(out), "--max_steps", "5", "--save_steps", "3",
                                                 "--ignore_data_skip", "true"])
    assert "(42 rows then, 43 now); ignore_data_skip: this epoch restarts" in extended.stderr
    assert (state(5)["epoch"], state(5)["batches_in_epoch"], state(5)["train_data"]["rows"]) == (2, 2, 43)
    # from a checkpoint inside its epoch, the same data: no warning; the epoch starts again from its first batch
    again = launch("classify.py", classify + ["--output_dir", str(out), "--max_steps", "6", "--save_steps", "3",
                                              "--ignore_data_skip", "true"])
    assert "other training data" not in again.stderr
    assert (state(6)["epoch"], state(6)["batches_in_epoch"], state(6)["global_step"]) == (2, 2, 6)
    assert state(6)["train_data"] == state(5)["train_data"]


def test_a_checkpoint_resumes_only_with_the_number_of_processes_that_wrote_it(tmp_path):
    # 2 processes x batch 8 made each step; 1 process would make steps of 8 and start elsewhere in the epoch
    classify, out = SCRIPTS["classify.py"][0], tmp_path / "run"
    _run("classify.py", classify, out, 3, 2)
    before = sorted(os.listdir(out / "checkpoints" / "step_3"))
    refused = run_python("classify.py", classify + ["--output_dir", str(out), "--max_steps", "6"])
    last = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 2 and last == (
        f"error: resume_from_checkpoint: {out / 'checkpoints' / 'step_3'} was written by 2 processes and this run has "
        "1: the examples per optimizer step (per_device_train_batch_size x gradient_accumulation_steps x processes) "
        "and the position in the epoch depend on it; resume with 2 processes, or start over with "
        "--overwrite_output_dir true"), refused.stderr[-2000:]
    assert sorted(os.listdir(out / "checkpoints")) == ["step_3"]
    assert sorted(os.listdir(out / "checkpoints" / "step_3")) == before
    assert json.load(open(out / "metrics.json"))["global_step"] == 3


def test_a_fresh_run_in_a_used_output_dir_sets_the_earlier_run_aside_whole(tmp_path):
    """A fresh run in a used output_dir (--overwrite_output_dir true) logs to a metrics.jsonl and a TensorBoard folder
    of its own (curves.png is drawn from its own log). The earlier run's files (config, checkpoints, logs, final model,
    metrics, predictions) are first moved together to earlier_runs/<N>, kept; so a new run that stops before its end
    leaves no final model or metrics of the earlier run to be taken for its own."""
    classify, out = SCRIPTS["classify.py"][0] + ["--report_to", "tensorboard"], tmp_path / "run"
    _run("classify.py", classify, out, 2, 1)
    first = sorted(os.listdir(out))
    _run("classify.py", classify + ["--learning_rate", "5e-4", "--overwrite_output_dir", "true"], out, 3, 1)

    def train_steps(path):
        if path.suffix == ".jsonl":
            return [r["step"] for r in read_jsonl(path) if "train/loss" in r]
        return tensorboard_scalars(path / "ftkit")["train/loss"]  # project_name's folder

    earlier = out / "earlier_runs" / "1"
    assert train_steps(out / "metrics.jsonl") == train_steps(out / "tensorboard") == [1, 2, 3]
    assert train_steps(earlier / "metrics.jsonl") == train_steps(earlier / "tensorboard") == [1, 2]
    assert os.listdir(earlier / "checkpoints") == ["step_2"]
    moved = sorted(os.listdir(earlier))
    assert {"config.yaml", "final", "metrics.json", "curves.png"} <= set(moved), moved
    assert [f for f in moved if f.startswith("predictions_")], moved
    # the built base model stays, and so does the lock file of the output_dir
    assert sorted(set(first) - set(moved)) == [".ftkit.lock", "base_model"], (first, moved)
    assert "learning_rate: 0.001" in (earlier / "config.yaml").read_text()
    assert "learning_rate: 0.0005" in (out / "config.yaml").read_text()
    weights = "final/model.safetensors"
    assert load_file(earlier / weights).keys() == load_file(out / weights).keys()

    # a third fresh run that fails at its second step (SGD at an absurd rate, no step skipped)
    failed = run_python("classify.py", classify + ["--output_dir", str(out), "--overwrite_output_dir", "true",
                                                   "--optim", "sgd", "--learning_rate", "1e30", "--max_grad_norm", "0",
                                                   "--lr_scheduler_type", "constant", "--max_bad_steps", "0"])
    last = failed.stderr.strip().splitlines()[-1]
    assert failed.returncode == 1 and "not finite at step 2" in last, failed.stderr[-2000:]
    left = set(os.listdir(out))
    assert not left & {"final", "metrics.json", "curves.png"} and not [f for f in left if f.startswith("predictions")]
    assert train_steps(out / "earlier_runs" / "2" / "metrics.jsonl") == [1, 2, 3]
    assert (out / "earlier_runs" / "2" / "final" / "model.safetensors").is_file()
