"""Shared test helpers: run the real scripts as subprocesses (python, accelerate launch), import them."""

import atexit
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
TINY_SUMMARIZE = os.path.join(ROOT, "recipes", "tiny", "qlora_summarize.yaml")
TINY_QA = os.path.join(ROOT, "recipes", "tiny", "t5_qa.yaml")


def script_env():
    env = dict(os.environ)
    env.update({"PYTHONPATH": ROOT, "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    return env


def free_port() -> int:
    """A TCP port nobody listens on now, for one run's rendezvous (tests run in parallel, see the Makefile). Taken
    outside the kernel's ephemeral range: a port from there (``bind(0)``) may go, before the launcher binds it, to
    one of the many outgoing connections gloo makes in the other worker's runs. Below the range (from 20000), or
    above it where the range starts too low to leave room below; bind(0) where neither has room."""
    import random

    try:
        low, high = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[:2])
    except (OSError, ValueError):
        low, high = 32768, 60999
    spans = [span for span in ((20000, low), (high + 1, 65536)) if span[1] - span[0] >= 1000]
    rng = random.Random()
    for _ in range(100 if spans else 0):
        port = rng.randrange(*rng.choice(spans))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, args: list[str], num_processes: int = 1, timeout: int = 600, check: bool = True,
           launcher_config: str | None = None, launcher: bool | None = None, fresh: bool = False):
    """Run a script from scripts/ (or at an absolute path) as users do; returns the CompletedProcess. Several
    processes, a launcher config or ``launcher=True``: ``accelerate launch``. One process otherwise: ``python
    scripts/X.py``, which the README gives for one process too; the launcher's own start-up (it imports torch and
    transformers before it starts the script: 4 s of CPU here) is then not paid by every test. Each script's
    end-to-end run and the SLURM jobs go through the launcher (the demo runs ``python``, as the README does).
    ``fresh``: see ``run_python``."""
    if launcher is None:
        launcher = num_processes > 1 or bool(launcher_config)
    if not launcher:
        proc = run_python(script, args, timeout=timeout, fresh=fresh)
    else:
        if launcher_config:
            how = ["--config_file", launcher_config]
        elif num_processes > 1:  # one process per rank, DDP over gloo (see the config's comment)
            how = ["--config_file", os.path.join(ROOT, "launch", "accelerate", "cpu_2proc.yaml")]
        else:
            how = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        cmd = [os.path.join(BIN, "accelerate"), "launch", *how, "--num_processes", str(num_processes),
               "--main_process_port", str(free_port()), os.path.join(ROOT, "scripts", script), *args]
        proc = subprocess.run(cmd, cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def run_python(script: str, args: list[str], timeout: int = 300, env: dict | None = None, fresh: bool = False,
               cwd: str = ROOT):
    """``python scripts/<script>`` (or at an absolute path) in ``cwd``, unchecked; ``env`` overrides variables. The
    process is forked from this worker's zygote (tests/zygote.py: the libraries imported once, 5-6 s of each run's
    start-up saved), unless ``env`` is given (some are read at import) or ``fresh``: a new interpreter, with its own
    hash seed, for runs compared exactly with another process's (resume), where a shared seed could hide an order
    that differs between processes."""
    argv = [sys.executable, os.path.join(ROOT, "scripts", script), *args]
    if env or fresh:
        return subprocess.run(argv, cwd=cwd, env={**script_env(), **(env or {})}, capture_output=True, text=True,
                              timeout=timeout)
    return _ZYGOTE.run(argv, timeout, cwd)


class Zygote:
    """This test worker's tests/zygote.py, started at its first run; its socket, log and runs' output in a folder."""

    def __init__(self):
        self.process = self.folder = None
        self.runs = 0

    def start(self):
        self.stop()  # one that ended (its folder with it)
        self.folder = tempfile.mkdtemp(prefix="zygote")
        self.process = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "zygote.py"), self.path("socket")],
                                        cwd=ROOT, env=script_env(), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=open(self.path("zygote.log"), "w"))

    def stop(self):
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            shutil.rmtree(self.folder, ignore_errors=True)

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def connect(self, conn: socket.socket):
        deadline = time.monotonic() + 300  # the zygote's imports: seconds, more on a busy machine
        while True:
            try:
                return conn.connect(self.path("socket"))
            except (FileNotFoundError, ConnectionRefusedError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("tests/zygote.py did not start: " + open(self.path("zygote.log")).read()[-3000:])
                time.sleep(0.1)

    def answer(self, stream) -> dict:
        line = stream.readline()
        if not line:
            raise RuntimeError("tests/zygote.py ended: " + open(self.path("zygote.log")).read()[-3000:])
        return json.loads(line)

    def run(self, argv: list[str], timeout: float, cwd: str = ROOT) -> subprocess.CompletedProcess:
        if self.process is None or self.process.poll() is not None:
            self.start()
        self.runs += 1
        out, err = self.path(f"{self.runs}.out"), self.path(f"{self.runs}.err")
        with socket.socket(socket.AF_UNIX) as conn:
            self.connect(conn)
            with conn.makefile("rw") as stream:
                stream.write(json.dumps({"argv": argv[1:], "cwd": cwd, "env": script_env(), "stdout": out,
                                         "stderr": err}) + "\n")
                stream.flush()
                pid = self.answer(stream)["pid"]
                conn.settimeout(timeout)
                try:
                    returncode = self.answer(stream)["returncode"]
                except TimeoutError:
                    os.kill(pid, 9)
                    raise subprocess.TimeoutExpired(argv, timeout, open(out).read(), open(err).read())
        stdout, stderr = open(out).read(), open(err).read()
        os.remove(out)
        os.remove(err)
        return subprocess.CompletedProcess(argv, returncode, stdout, stderr)


_ZYGOTE = Zygote()
atexit.register(_ZYGOTE.stop)


def load_script(name: str):
    """Import scripts/<name>.py as a module (its config class and helpers)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def tensorboard_scalars(folder) -> dict:
    """tag -> the steps of its scalar events, as TensorBoard shows them, in one run folder of event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """The byte-level BPE tokenizer the tiny recipes train on the sample dialogues."""
    from ftkit.modeling import build_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    return build_tokenizer([os.path.join(ROOT, "data", "dialogsum_sample_train.jsonl")], 600, str(out))


# `make test` runs whole files on 2 workers (pytest-xdist, --dist loadfile), each file on one worker so that its
# module fixtures (a trained model, a SLURM cluster) are made once. The longest files go first: one started last
# would leave the other worker idle at the end.
LONGEST_FIRST = ["test_preflight.py", "test_scale_out.py", "test_slurm.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order
