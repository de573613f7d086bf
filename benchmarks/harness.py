"""What every benchmark shares: the machine's description, alternating repeats of contenders,
medians and ratios, ``results/<name>.json`` and the ``benchmarks/README.md`` tables.

Contenders run as separate processes (a fresh interpreter each, as users run them) and are
alternated ``A B C, C B A, ...`` so that a slow phase of the machine hits each of them alike.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
REAL = os.path.join(ROOT, "..", "shared", "realdata")
RESULTS = os.path.join(ROOT, "benchmarks", "results")
README = os.path.join(ROOT, "benchmarks", "README.md")
BIN = os.path.dirname(sys.executable)


def machine() -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {gpu}"


def env() -> dict:
    out = dict(os.environ)
    out.update({"PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
                "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
                # the same threads for every contender (accelerate launch would otherwise pick 1)
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))})
    return out


def run(cmd: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def probe(script: str, kind: str, args: list, tiny: bool, here: dict | None = None) -> dict:
    """``script --probe KIND JSON`` in a fresh interpreter (one model per process): the JSON its last line prints.
    ``here``: the script's probes, run in this process instead (a check of the code path on tiny models: one
    interpreter's imports instead of one per probe, about 8 s each on a CPU); arguments and result still pass
    through JSON, as between processes."""
    if here is not None:
        return json.loads(json.dumps(here[kind](*json.loads(json.dumps(args)), tiny=tiny)))
    proc = run([sys.executable, os.path.abspath(script), *(["--tiny"] if tiny else []), "--probe", kind, json.dumps(args)])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def probe_cli(doc: str, tiny_help: str, probes: dict):
    """A GPU benchmark's command line: ``--tiny``, and the hidden ``--probe KIND JSON`` that :func:`probe` runs: it
    prints ``probes[KIND](*JSON, tiny=...)`` as JSON and exits. Returns the parsed arguments otherwise."""
    import argparse

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help=tiny_help)
    p.add_argument("--probe", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.probe:
        print(json.dumps(probes[args.probe[0]](*json.loads(args.probe[1]), tiny=args.tiny)), flush=True)
        sys.exit(0)
    return args


def accelerate_launch(script: str, args: list[str]) -> subprocess.CompletedProcess:
    """One CPU/GPU process through ``accelerate launch``, as the README runs the recipes."""
    return run([os.path.join(BIN, "accelerate"), "launch", "--num_processes", "1", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", os.path.join(ROOT, "scripts", script), *args])


def alternate(contenders: dict, repeats: int) -> dict[str, list[dict]]:
    """Run each contender (name -> callable(repeat) -> dict of measures) ``repeats`` times, alternating, the order
    reversed every other repeat (``A B C, C B A, ...``), so that no contender always runs right after the same other
    one (training_speed's ftkit / bare loop ratio was 0.966 with ftkit always after the HF Trainer's runs, and 0.990
    over 8 pairs of the two alone)."""
    results = {name: [] for name in contenders}
    for r in range(repeats):
        for name, fn in (list(contenders.items()) if r % 2 == 0 else list(contenders.items())[::-1]):
            t = time.perf_counter()
            measure = fn(r)
            results[name].append(measure)
            shown = ", ".join(f"{k} {v:.4g}" for k, v in measure.items() if isinstance(v, (int, float)))
            print(f"  repeat {r + 1}/{repeats} {name:<28} {shown}  ({time.perf_counter() - t:.0f} s)", flush=True)
    return results


def median(runs: list[dict], key: str) -> float:
    return statistics.median(m[key] for m in runs)


def paired_ratio(runs: list[dict], baseline: list[dict], key: str) -> float:
    """The median over repeats of ``runs[r][key] / baseline[r][key]``: each repeat's two runs were made close in time
    (``alternate``), so a machine that is slower for a while slows both and the ratio stays."""
    return statistics.median(a[key] / b[key] for a, b in zip(runs, baseline))


def write_results(name: str, payload: dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"benchmark": name, "machine": machine(), "when": time.strftime("%Y-%m-%d"), **payload}, f, indent=2)
    return path


def write_table(name: str, title: str, lines: list[str]) -> None:
    """Replace (or append) this benchmark's block in benchmarks/README.md."""
    text = open(README).read() if os.path.isfile(README) else "# Benchmarks\n"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = "\n".join([start, f"Machine: {machine()}.", "", *lines, end])
    if start in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + f"\n\n## {title}\n\n" + block + "\n"
    with open(README, "w") as f:
        f.write(text)


def verdict(value: float, target: float) -> str:
    return "meets" if value >= target else "MISSES"


def command_line(doc: str, probe, repeats: int = 2):
    """A benchmark's command line: ``--repeats N``; or, inside one of its own processes, ``--probe A B``,
    which prints ``probe(A, json.loads(B))`` as JSON and returns None."""
    import argparse

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--probe", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe[0], json.loads(args.probe[1]))), flush=True)
        return None
    return args
