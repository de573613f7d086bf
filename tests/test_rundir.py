"""ftkit/rundir.py on its own: the output_dir lock (live runs against each other are in test_faults.py), the data a
resume is checked against, what --predict prints."""

import errno
import fcntl
import json
import logging
import subprocess
import sys
from types import SimpleNamespace

import pytest

from ftkit import rundir
from ftkit.config import ConfigError

HOLD = """import sys, time
from types import SimpleNamespace
from ftkit import rundir
rundir.lock(SimpleNamespace(output_dir=sys.argv[1]), True)
print("locked", flush=True)
time.sleep(60)
"""


@pytest.fixture(autouse=True)
def no_lock_held(monkeypatch):
    monkeypatch.setattr(rundir, "_LOCK", [])  # this test process holds none of its own
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)


def test_a_second_run_is_refused_while_the_first_holds_the_lock_and_may_start_once_it_ends(tmp_path):
    from conftest import ROOT, script_env

    config = SimpleNamespace(output_dir=str(tmp_path / "run"))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, config.output_dir], cwd=ROOT, env=script_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=rf"is in use by another run \(pid {holder.pid} on .*, started "):
            rundir.lock(config, True)
        assert not rundir._LOCK
        rundir.lock(config, False)  # other ranks never take it
        assert not rundir._LOCK
    finally:
        holder.kill()
        holder.wait()
    rundir.lock(config, True)  # the OS released the killed holder's lock
    assert len(rundir._LOCK) == 1
    rundir._LOCK.pop().close()


def test_a_filesystem_without_locks_gets_a_warning_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    def no_locks(f, operation):  # what flock raises on e.g. an NFS mount without a lock manager
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    config = SimpleNamespace(output_dir=str(tmp_path / "run"))
    with caplog.at_level(logging.WARNING, logger="ftkit"):
        rundir.lock(config, True)
    assert not rundir._LOCK
    assert f"output_dir: {config.output_dir} cannot be locked (No locks available): a second run started there is not " \
           "refused" in caplog.text


def test_a_resume_checks_the_training_data_and_warns_of_other_validation_data(tmp_path, caplog):
    import json

    from datasets import Dataset

    def rows(*tokens):
        return Dataset.from_dict({"input_ids": [list(t) for t in tokens], "labels": [0] * len(tokens)})

    train, validation = rows([5, 6], [7, 8, 9]), rows([10, 11])
    config = SimpleNamespace(output_dir=str(tmp_path / "run"), resume_from_checkpoint=None, overwrite_output_dir=False,
                             ignore_data_skip=False)
    fresh = rundir.check_data(config, train, validation)  # nothing to resume: the fingerprints to keep
    assert fresh == {"train_data": rundir.data_fingerprint(train), "eval_data": rundir.data_fingerprint(validation)}
    step = tmp_path / "run" / "checkpoints" / "step_4"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text(json.dumps({"global_step": 4, "scores": {"2": 0.5, "4": 0.4},
                                                         "best_step": 4, **fresh}))
    with caplog.at_level(logging.WARNING, logger="ftkit"):
        assert rundir.check_data(config, train, validation) == fresh
        assert not caplog.text
        other_validation = rows([10, 12])
        rundir.check_data(config, train, other_validation)  # resumes, with a warning
    assert (f"the validation data differs from the one the 2 evaluation(s) before {step} scored (1 rows, other values: "
            f"digest {fresh['eval_data']['digest']} then, {rundir.data_fingerprint(other_validation)['digest']} now): "
            "the best checkpoint (step 4) and early stopping compare scores of both") in caplog.text

    longer = rows([5, 6], [7, 8, 9], [1, 2])
    with pytest.raises(ConfigError, match=r"was trained on other training data \(2 rows then, 3 now\)"):
        rundir.check_data(config, longer, validation)
    config.ignore_data_skip = True
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ftkit"):
        assert rundir.check_data(config, longer, validation)["train_data"]["rows"] == 3
    assert "(2 rows then, 3 now); ignore_data_skip: this epoch restarts from its first batch" in caplog.text

    # a checkpoint of an ftkit that recorded no fingerprints resumes on any data, silently
    (step / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    config.ignore_data_skip = False
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ftkit"):
        rundir.check_data(config, longer, other_validation)
    assert not caplog.text


def test_predictions_print_a_line_per_row_and_the_scores_apart(tmp_path, capsys):
    # a generated text may hold line breaks: printed, line i is still row i; the jsonl file keeps the text as it is
    lines = ["two\nlines", "a\r\nwindows one", "plain"]
    rundir.write_or_print(None, [], lines, "answers", "exact match 50.00")
    out, err = capsys.readouterr()
    assert out == "two\\nlines\na\\r\\nwindows one\nplain\n" and err == "exact match 50.00\n"
    path = tmp_path / "new" / "p.jsonl"
    rundir.write_or_print(str(path), [{"prediction": line} for line in lines], lines, "answers", "exact match 50.00")
    out, err = capsys.readouterr()
    assert out == f"wrote 3 answers to {path}\nexact match 50.00\n" and not err
    assert [json.loads(row)["prediction"] for row in path.read_text().splitlines()] == lines
