"""ftkit/rundir.py's output_dir lock, on its own (live runs against each other are in test_faults.py)."""

import errno
import fcntl
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
