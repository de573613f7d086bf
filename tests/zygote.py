"""A warm interpreter that starts one-process script runs for the tests: ``python tests/zygote.py SOCKET``.

A run of a script spends about 6 of its 8-10 s here importing torch, transformers, peft, bitsandbytes, datasets,
accelerate and a model's module. This process imports them once, then for each request on the Unix socket forks a
child that takes the request's argv, working directory, environment, stdin (/dev/null), stdout and stderr (files)
and runs the script as ``__main__`` (``runpy``, as ``python SCRIPT ARGS`` would: ``sys.argv``, ``sys.path[0]``),
then ends as an interpreter does: uncaught exceptions printed, non-daemon threads joined, atexit handlers run, exit
status from ``SystemExit``. The zygote answers the child's pid, then its wait status.

The environment is the zygote's own (``conftest.script_env``), as some libraries read variables when imported:
``conftest.run_python`` sends a run here only without overrides. Children share the zygote's hash seed; Python's
``random`` is reseeded in each. The protocol: one JSON line per request and per answer."""

import json
import os
import random
import runpy
import socket
import sys
import threading

PRELOAD = ["torch", "transformers", "datasets", "accelerate", "peft", "bitsandbytes", "deepspeed",
           "transformers.models.phi.modeling_phi", "transformers.models.t5.modeling_t5",
           "transformers.models.bert.modeling_bert", "transformers.models.gpt2.modeling_gpt2",
           "ftkit.loop", "ftkit.preflight", "ftkit.modeling", "ftkit.data"]


def serve(path: str) -> dict:
    """Answer requests until the parent goes; returns (in a forked child only) the request the child is to run."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    listener.settimeout(5)
    parent = os.getppid()
    while True:
        try:
            conn, _ = listener.accept()
        except socket.timeout:
            if os.getppid() != parent:  # the test worker is gone
                os._exit(0)
            continue
        conn.settimeout(None)
        stream = conn.makefile("rw")
        request = json.loads(stream.readline())
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            stream.close()
            conn.close()
            listener.close()
            return request
        try:
            stream.write(json.dumps({"pid": pid}) + "\n")
            stream.flush()
        finally:
            _, status = os.waitpid(pid, 0)
        try:
            stream.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
            stream.close()
        except OSError:  # the test gave up on it (a timeout) and killed it
            pass
        conn.close()


def become(request: dict):
    """In the child: the request's process state, then the script as ``__main__``."""
    for fd, name, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_CREAT),
                            (2, request["stderr"], os.O_WRONLY | os.O_CREAT)):
        opened = os.open(name, flags)
        os.dup2(opened, fd)
        os.close(opened)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    random.seed()
    script = request["argv"][0]
    sys.argv = list(request["argv"])
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    for name in PRELOAD:
        __import__(name)
    assert threading.active_count() == 1, f"a thread before fork: {threading.enumerate()}"
    become(serve(sys.argv[1]))
