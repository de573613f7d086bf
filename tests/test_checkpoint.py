"""ftkit.checkpoint: rotation keeps the last N and the best; weights-only loads; re-planned learning rates."""

import os
from types import SimpleNamespace

import pytest

from ftkit import checkpoint


def _fake_checkpoints(root, steps):
    for step in steps:
        os.makedirs(root / "checkpoints" / f"step_{step}")
        (root / "checkpoints" / f"step_{step}" / checkpoint.STATE_FILE).write_text("{}")


def test_rotation_keeps_the_last_n_and_the_best_n_by_metric(tmp_path):
    _fake_checkpoints(tmp_path, [10, 20, 30, 40, 50])
    losses = {"10": 0.3, "20": 0.9, "30": 0.2, "50": 0.8}  # step 40 was a plain save, never scored
    checkpoint._rotate(str(tmp_path / "checkpoints"), 2, losses, greater=False)
    assert [s for s, _ in checkpoint.list_checkpoints(str(tmp_path))] == [10, 30, 40, 50]
    checkpoint._rotate(str(tmp_path / "checkpoints"), 1, {"10": 0.3, "30": 0.2}, greater=True)
    assert [s for s, _ in checkpoint.list_checkpoints(str(tmp_path))] == [10, 50]
    checkpoint._rotate(str(tmp_path / "checkpoints"), 1)
    assert [s for s, _ in checkpoint.list_checkpoints(str(tmp_path))] == [50]


def test_half_written_checkpoints_are_never_listed(tmp_path):
    _fake_checkpoints(tmp_path, [10])
    os.makedirs(tmp_path / "checkpoints" / ".tmp_step_20")
    os.makedirs(tmp_path / "checkpoints" / "step_30")  # no trainer_state.json: incomplete
    assert [s for s, _ in checkpoint.list_checkpoints(str(tmp_path))] == [10]


class _NotPlainData:
    def __reduce__(self):  # what a tampered checkpoint would do: run a command on unpickling
        return (os.system, ("echo pwned",))


def test_checkpoint_loads_never_unpickle_arbitrary_objects(tmp_path):
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from ftkit.config import RunError

    plain = tmp_path / "optim_states.pt"  # what DeepSpeed's ZeRO optimizer files hold
    torch.save({"loss_scaler": LossScaler(2.0 ** 8), "zero_stage": ZeroStageEnum.gradients,
                "state": {"exp_avg": torch.ones(3)}}, plain)
    tampered = tmp_path / "tampered.pt"
    torch.save({"state": _NotPlainData()}, tampered)
    with checkpoint._weights_only_loads(str(tmp_path)):
        # DeepSpeed's engine asks for weights_only=False; the request is overridden
        loaded = torch.load(plain, map_location="cpu", weights_only=False)
        with pytest.raises(RunError, match="not plain data.*does not unpickle arbitrary objects"):
            torch.load(tampered, map_location="cpu", weights_only=False)
    assert loaded["loss_scaler"].cur_scale == 2.0 ** 8 and loaded["zero_stage"] == ZeroStageEnum.gradients
    assert torch.load is not None and "load_weights_only" not in torch.load.__qualname__  # restored afterwards


def test_a_kill_while_rotating_never_leaves_a_half_deleted_checkpoint(tmp_path):
    """SIGKILL lands in the middle of deleting an old checkpoint (20,000 files)."""
    import signal
    import subprocess
    import sys
    import time

    _fake_checkpoints(tmp_path, [10, 20])
    old = tmp_path / "checkpoints" / "step_10"
    files = 20000
    for i in range(files):
        (old / f"shard_{i}").write_bytes(b"x")
    code = ("import sys; from ftkit import checkpoint; print('go', flush=True); "
            f"checkpoint._rotate({str(tmp_path / 'checkpoints')!r}, 1)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "go"
    trash = tmp_path / "checkpoints" / ".trash_step_10"
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until the deletion is under way, then kill
        folder = trash if trash.exists() else old
        try:
            left = len(os.listdir(folder))
        except FileNotFoundError:
            continue
        if 0 < left < files:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < left < files, "the kill did not land inside the deletion"
    for name in os.listdir(tmp_path / "checkpoints"):
        if name.startswith("step_"):
            assert (tmp_path / "checkpoints" / name / checkpoint.STATE_FILE).exists(), name
    assert [s for s, _ in checkpoint.list_checkpoints(str(tmp_path))] == [20]


def test_a_resume_with_more_steps_sets_the_optimizer_to_the_new_plans_rate(tmp_path):
    import torch

    from ftkit import optim

    def run(total, state=None):
        weight = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([weight], lr=1.0)
        sched = optim.build_scheduler(opt, SimpleNamespace(lr_scheduler_type="linear", warmup_steps=0,
                                                           warmup_ratio=0.0), total)
        if state:  # what a resume loads: the optimizer's state, then the scheduler's (JSON)
            opt.load_state_dict(state[0])
            sched.load_state_dict(state[1])
            checkpoint._replan_learning_rates(sched)
        return opt, sched

    opt, sched = run(3)
    for _ in range(3):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 0.0  # a finished 3-step linear plan
    unchanged, _ = run(3, (opt.state_dict(), sched.state_dict()))
    assert unchanged.param_groups[0]["lr"] == 0.0
    extended, sched = run(6, (opt.state_dict(), sched.state_dict()))
    assert extended.param_groups[0]["lr"] == sched.get_last_lr()[0] == pytest.approx(0.5)  # step 4 of 6


def test_the_data_fingerprint_follows_every_value_and_the_row_order():
    from datasets import Dataset

    from ftkit.rundir import data_fingerprint

    rows = {"input_ids": [[5, 6, 7], [8, 9], [10, 11, 12, 13]], "labels": [1, 0, 1], "length": [3, 2, 4]}
    base = data_fingerprint(Dataset.from_dict(rows))
    assert base == data_fingerprint(Dataset.from_dict({k: list(v) for k, v in rows.items()}))
    assert base["rows"] == 3 and len(base["digest"]) == 16
    changed = [{**rows, "input_ids": [[5, 6, 7], [8, 9], [10, 11, 12, 14]]},  # one token
               {**rows, "labels": [1, 1, 1]},  # one label
               {**rows, "input_ids": [[5, 6], [7, 8, 9], [10, 11, 12, 13]]},  # the same tokens, split elsewhere
               {k: v[::-1] for k, v in rows.items()},  # another order
               {k: v[:2] for k, v in rows.items()}]  # a row fewer
    digests = {data_fingerprint(Dataset.from_dict(r))["digest"] for r in changed}
    assert len(digests) == len(changed) and base["digest"] not in digests
    # a selection (an indices mapping over a larger table) reads as the same rows stored on their own
    larger = Dataset.from_dict({k: v + v[:1] for k, v in rows.items()}).select([0, 1, 2])
    assert data_fingerprint(larger) == base
