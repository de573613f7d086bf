"""Tracking and telemetry: the real W&B client (offline) and TensorBoard record what the loop logs,
a resumed run continues the same W&B run, secrets stay out, curves.png, MFU, --debug."""

import glob
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

from conftest import ROOT, launch, read_jsonl, run_python, script_env, tensorboard_scalars
from ftkit import tracking

SPAM = os.path.join(ROOT, "recipes", "tiny", "spam.yaml")
SECRET_VALUE = "s3cr3t-value-that-must-not-leak"


def wandb_records(path):
    """Protobuf records of a .wandb file: a LevelDB-style log of 32 KiB blocks, 7-byte record headers
    (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) after a 7-byte file header."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", data[:8]
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0:  # zero padding up to the end of the block
            pos += (block - pos % block) % block
            continue
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def wandb_run(output_dir):
    """(run id, tags, group, history rows) of each offline W&B run under output_dir/wandb."""
    runs = []
    for path in sorted(glob.glob(os.path.join(output_dir, "wandb", "offline-run-*", "run-*.wandb"))):
        run, history = None, []
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = (record.run.run_id, list(record.run.tags), record.run.run_group)
            elif kind == "history":
                history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                for item in record.history.item})
        runs.append((*run, history))
    return runs


def steps_with(history, key):
    return [row["_step"] for row in history if key in row]


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    out = tmp_path_factory.mktemp("tracked") / "run"
    os.environ["FTKIT_TEST_API_KEY"] = SECRET_VALUE  # a credential in the environment of the run
    try:
        launch("classify.py", ["--config", SPAM, "--output_dir", str(out), "--max_steps", "10", "--logging_steps", "2",
                               "--eval_strategy", "steps", "--eval_steps", "5", "--save_steps", "5",
                               "--report_to", "all", "--tags", "[tiny, spam]", "--group", "sweep-1"])
    finally:
        del os.environ["FTKIT_TEST_API_KEY"]
    return out


def test_wandb_offline_run_records_train_eval_and_recipe_metrics_at_their_steps(tracked):
    (run_id, tags, group, history), = wandb_run(tracked)
    assert run_id == json.load(open(tracked / "checkpoints" / "step_10" / "trainer_state.json"))["tracker_run_id"]
    assert (tags, group) == (["tiny", "spam"], "sweep-1")
    assert steps_with(history, "train/loss") == [2, 4, 6, 8, 10]
    assert steps_with(history, "train/lr") == [2, 4, 6, 8, 10]
    assert steps_with(history, "eval/loss") == [5, 10]
    assert steps_with(history, "eval/accuracy") == [5, 10]  # the recipe's metric_for_best_model
    logged = {r["step"]: r["train/loss"] for r in read_jsonl(tracked / "metrics.jsonl") if "train/loss" in r}
    assert all(row["train/loss"] == pytest.approx(logged[row["_step"]]) for row in history if "train/loss" in row)


def test_tensorboard_event_file_has_the_scalars(tracked):
    files = glob.glob(str(tracked / "tensorboard" / "**" / "events.out.tfevents.*"), recursive=True)
    assert files
    scalars = tensorboard_scalars(os.path.dirname(files[0]))
    assert {"train/loss", "train/lr", "eval/loss", "eval/accuracy"} <= set(scalars)
    assert scalars["train/loss"] == [2, 4, 6, 8, 10]


def test_every_log_event_carries_the_telemetry(tracked):
    train = [r for r in read_jsonl(tracked / "metrics.jsonl") if "train/loss" in r]
    for row in train:
        for key in ("train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/samples_per_s", "perf/step_time_s",
                    "perf/padding_efficiency", "perf/peak_memory_gb", "perf/eta_s"):
            assert key in row, key
        assert 0 < row["perf/padding_efficiency"] <= 1 and row["perf/peak_memory_gb"] > 0
    assert train[-1]["perf/eta_s"] == 0 and train[0]["perf/eta_s"] > 0
    assert "perf/mfu" not in train[0]  # no peak FLOP/s known on a CPU


def test_curves_png_is_written(tracked):
    assert (tracked / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_secret_reaches_logs_trackers_or_saved_files(tracked):
    for path in glob.glob(str(tracked / "**" / "*"), recursive=True):
        if os.path.isfile(path):
            assert SECRET_VALUE.encode() not in open(path, "rb").read(), path


def test_resumed_run_continues_the_same_wandb_run_and_tensorboard_log(tracked, tmp_path):
    """A run that ended after step 10 resumed from its step-5 checkpoint (its TensorBoard log kept): W&B continues
    the same run id, and TensorBoard shows each step once, steps 6-10 from the resumed run."""
    resumed = tmp_path / "resumed"
    shutil.copytree(tracked / "checkpoints" / "step_5", resumed / "checkpoints" / "step_5")
    shutil.copytree(tracked / "tensorboard", resumed / "tensorboard")
    scalars = str(resumed / "tensorboard" / "*" / "events.out.tfevents.*")  # the project's scalars (hparams: below)
    old_files = set(glob.glob(scalars))
    launch("classify.py", ["--config", SPAM, "--output_dir", str(resumed), "--max_steps", "10", "--logging_steps", "2",
                           "--eval_strategy", "steps", "--eval_steps", "5", "--save_steps", "5",
                           "--report_to", "all", "--tags", "[tiny, spam]", "--group", "sweep-1"])
    (first_id, _, _, _), = wandb_run(tracked)
    (run_id, _, _, history), = wandb_run(resumed)
    assert run_id == first_id
    assert steps_with(history, "train/loss") == [6, 8, 10]
    new_file, = set(glob.glob(scalars)) - old_files
    shown = tensorboard_scalars(os.path.dirname(new_file))
    assert (shown["train/loss"], shown["eval/loss"]) == ([2, 4, 6, 8, 10], [5, 10])


def test_an_evaluations_generated_answers_are_logged_beside_its_scores(tmp_path):
    # every answer of each evaluation in eval_samples.jsonl; the first TRACKED_SAMPLES in a W&B table and in a
    # TensorBoard text table, at the evaluation's step
    out = tmp_path / "run"
    launch("t5_qa.py", ["--config", os.path.join(ROOT, "recipes", "tiny", "t5_qa.yaml"), "--output_dir", str(out),
                        "--max_steps", "4", "--eval_steps", "2", "--val_split", "0.5", "--report_to", "all"])
    rows = read_jsonl(out / "eval_samples.jsonl")
    questions = sum(r["step"] == 2 for r in rows)
    assert questions > tracking.TRACKED_SAMPLES and [r["step"] for r in rows] == [2] * questions + [4] * questions
    assert list(rows[0]) == ["step", "id", "question", "prediction", "answers"]
    (_, _, _, history), = wandb_run(out)
    assert steps_with(history, "eval/samples/nrows") == [2, 4]
    assert [row["eval/samples/nrows"] for row in history if "eval/samples/nrows" in row] == [32, 32]
    tables = sorted(glob.glob(str(out / "wandb" / "offline-run-*" / "files" / "media" / "table" / "eval" /
                                  "samples_*.table.json")))
    assert [os.path.basename(t).split("_")[1] for t in tables] == ["2", "4"]
    table = json.load(open(tables[0]))
    assert table["columns"] == ["id", "question", "prediction", "answers"]
    assert [row[:3] for row in table["data"]] == [[r["id"], r["question"], r["prediction"]] for r in rows[:32]]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard" / "ftkit"), size_guidance={"tensors": 0})
    events.Reload()
    texts = events.Tensors("eval/samples/text_summary")
    assert [e.step for e in texts] == [2, 4]
    lines = texts[0].tensor_proto.string_val[0].decode().split("\n")  # (an untrained model's answers hold \x1c...)
    assert lines[0] == "| id | question | prediction | answers |" and len(lines) == 2 + tracking.TRACKED_SAMPLES


# ---------------------------------------------------------------------------------------------
# MFU arithmetic and --debug
# ---------------------------------------------------------------------------------------------


def test_flops_per_token_by_hand():
    from transformers import GPT2Config, T5Config

    decoder = GPT2Config(n_layer=2, n_embd=64)
    # 6 x 1000 trainable + 4 x 9000 frozen + 12 x 2 layers x 64 hidden x 128 tokens
    assert tracking.flops_per_token(decoder, 1000, 9000, 128) == 6000 + 36000 + 196608
    t5 = T5Config(num_layers=3, num_decoder_layers=2, d_model=32)
    assert tracking.flops_per_token(t5, 10, 0, 10) == 60 + 12 * 5 * 32 * 10


@pytest.mark.parametrize("hidden, report_to, message", [
    ("tensorboard,tensorboardX", "tensorboard", "tensorboard is not installed (pip install 'ftkit[tracking]'), or use "
                                                "report_to: none"),
    ("wandb", "all", "wandb is not installed (pip install 'ftkit[tracking]'), or use report_to: tensorboard")])
def test_a_tracker_that_is_not_installed_is_an_error_before_the_model(tmp_path, hidden, report_to, message):
    """accelerate drops a tracker whose package is missing with a Python warning: the run trained without TensorBoard."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "hide_packages.py"), hidden,
                           os.path.join(ROOT, "scripts", "classify.py"), "--config", SPAM, "--output_dir", str(out),
                           "--report_to", report_to], cwd=ROOT, env=script_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == f"error: report_to: {message}", proc.stderr
    assert not os.path.exists(out / "checkpoints") and "trainable params" not in proc.stderr


ONLINE = {"WANDB_MODE": "online", "WANDB_API_KEY": "0" * 40}  # credentials in the form W&B checks


@pytest.mark.parametrize("server, before_the_model", [
    ("https://wandb.invalid", True),  # a name no resolver knows (RFC 2606): a compute node without internet
    ("http://127.0.0.1:{port}", False)])  # found, but nothing answers (a firewall): W&B tries, then gives up
def test_a_wandb_server_out_of_reach_is_one_line_with_the_offline_advice(tmp_path, server, before_the_model):
    """W&B online from a node without internet tried for 90 s once the model was loaded, then a traceback."""
    from conftest import free_port

    out = tmp_path / "run"
    env = {**ONLINE, "WANDB_BASE_URL": server.format(port=free_port()), "WANDB_INIT_TIMEOUT": "5"}
    proc = run_python("classify.py", ["--config", SPAM, "--output_dir", str(out), "--report_to", "wandb"], env=env)
    said = ("W&B's server https://wandb.invalid cannot be found (" if before_the_model else "the W&B run did not start (")
    line = next((line for line in proc.stderr.splitlines() if line.startswith("error: ")), "")
    assert proc.returncode == (2 if before_the_model else 1) and line.startswith(f"error: report_to: wandb: {said}"), \
        proc.stderr[-3000:]
    assert line.endswith("log offline with WANDB_MODE=offline (then `wandb sync output_dir/wandb/offline-run-*` from "
                         "one with internet), or use report_to: tensorboard") and "Traceback" not in proc.stderr
    assert ("trainable params" in proc.stderr) != before_the_model and not os.path.exists(out / "checkpoints")


def test_the_credentials_wandb_login_writes_are_found_for_the_server_in_use(tmp_path):
    """W&B's default server moved from api.wandb.ai: a user who had just run `wandb login` was told to run it."""
    env = {"HOME": str(tmp_path), "WANDB_MODE": "online", "WANDB_API_KEY": "", "NETRC": "",
           "WANDB_BASE_URL": "https://wandb.invalid"}  # the server `wandb login --host` would name; it never resolves
    args = ["--config", SPAM, "--output_dir", str(tmp_path / "run"), "--report_to", "wandb"]
    before = run_python("classify.py", args, env=env)
    assert before.returncode == 2 and "error: report_to: wandb has no credentials" in before.stderr, before.stderr[-2000:]
    login = subprocess.run([os.path.join(os.path.dirname(sys.executable), "wandb"), "login", "--no-verify", "0" * 40],
                           env={**script_env(), **env}, capture_output=True, text=True, timeout=120)
    assert "machine wandb.invalid" in (tmp_path / ".netrc").read_text(), login.stdout + login.stderr
    after = run_python("classify.py", args, env=env)  # past the credentials, to the next check: the server's name
    assert after.returncode == 2 and "error: report_to: wandb: W&B's server https://wandb.invalid cannot be found" \
        in after.stderr, after.stderr[-2000:]


def test_mfu_is_reported_when_a_peak_is_given(tmp_path):
    out = tmp_path / "run"
    launch("classify.py", ["--config", SPAM, "--output_dir", str(out), "--max_steps", "4", "--logging_steps", "2",
                           "--peak_tflops", "0.001"])
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "train/loss" in r]
    assert all(0 < r["perf/mfu"] for r in rows), rows


@pytest.mark.parametrize("script,recipe", [("classify.py", "spam.yaml"), ("t5_qa.py", "t5_qa.yaml"),
                                           ("qlora_summarize.py", "qlora_summarize.yaml")])
def test_debug_run_finishes_with_eval_checkpoint_and_summary(tmp_path, script, recipe):
    out = tmp_path / "run"
    proc = run_python(script, ["--config", os.path.join(ROOT, "recipes", "tiny", recipe), "--output_dir", str(out),
                               "--debug"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "debug run ok: 4 steps" in proc.stdout, proc.stdout[-2000:]
    assert os.path.isdir(out / "checkpoints" / "step_2")
    log = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in log if "train/loss" in r] == [1, 2, 3, 4]
    assert all("perf/peak_memory_gb" in r for r in log if "train/loss" in r)
    assert any(r["step"] == 2 and "eval/loss" in r for r in log)
    assert not os.path.isdir(out / "wandb")
