"""tests/zygote.py, which starts the tests' one-process runs from a warm interpreter, against a fresh interpreter:
the same output, exit status, atexit handlers and joined threads for a script that exits each way; a timeout kills
the run and leaves the zygote serving."""

import json
import os
import subprocess
import time

import pytest

from conftest import run_python

PROBE = '''
import atexit, json, os, random, sys, threading, time
atexit.register(lambda: print("atexit ran"))
threading.Thread(target=lambda: (time.sleep(0.3), print("thread joined"))).start()
print(json.dumps({"name": __name__, "file": __file__, "argv": sys.argv, "path0": sys.path[0], "cwd": os.getcwd(),
                  "offline": os.environ.get("HF_HUB_OFFLINE"), "stdin": sys.stdin.read(), "random": random.random()}))
how = sys.argv[1]
if how == "exit 3":
    sys.exit(3)
if how == "message":
    sys.exit("error: a message")
if how == "raise":
    raise ValueError("boom")
if how == "signal":
    os.kill(os.getpid(), 15)
if how == "sleep":
    open(__file__ + ".pid", "w").write(str(os.getpid()))
    time.sleep(60)
'''


@pytest.fixture
def probe(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text(PROBE)
    return str(path)


@pytest.mark.parametrize("how, code", [("end", 0), ("exit 3", 3), ("message", 1), ("raise", 1), ("signal", -15)])
def test_a_run_through_the_zygote_is_a_run_of_its_own_interpreter(probe, how, code):
    warm, fresh = (run_python(probe, [how], fresh=fresh) for fresh in (False, True))
    assert warm.returncode == fresh.returncode == code, (warm, fresh)
    warm_state, fresh_state, again = (json.loads(run.stdout.splitlines()[0])
                                      for run in (warm, fresh, run_python(probe, [how])))
    assert again["random"] != warm_state.pop("random")  # each run from the zygote reseeds Python's random
    fresh_state.pop("random")
    assert warm_state == fresh_state and warm_state["name"] == "__main__" and warm_state["offline"] == "1"
    assert warm.stdout.splitlines()[1:] == fresh.stdout.splitlines()[1:]
    assert warm.stdout.endswith("thread joined\natexit ran\n") or how == "signal", warm.stdout
    assert warm.stderr.strip().splitlines()[-1:] == fresh.stderr.strip().splitlines()[-1:], (warm.stderr, fresh.stderr)


def test_a_run_past_its_timeout_is_killed_and_the_next_one_runs(probe):
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_python(probe, ["sleep"], timeout=5)
    assert time.monotonic() - start < 30
    pid = int(open(probe + ".pid").read())
    for _ in range(100):  # killed, then reaped by the zygote
        if not os.path.exists(f"/proc/{pid}"):
            break
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid}"), open(f"/proc/{pid}/status").read()
    assert run_python(probe, ["exit 3"]).returncode == 3
