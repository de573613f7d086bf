"""Tracking: W&B/TensorBoard via accelerate, the always-on metrics.jsonl and eval_samples.jsonl (an evaluation's
generated texts, also as tracker tables), curves, throughput and MFU.
Not here: when to log (loop.py)."""

from __future__ import annotations

import json
import os
import re
import time

import torch

from ftkit import distributed
from ftkit.config import ConfigError, RunError, check_writable, to_dict

SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSWORD", re.IGNORECASE)


def without_secrets(values: dict) -> dict:
    """Drop every entry whose name looks like a credential (recursively)."""
    return {k: without_secrets(v) if isinstance(v, dict) else v for k, v in values.items() if not SECRET.search(str(k))}


def check_trackers(trackers: list[str]) -> None:
    """``report_to`` needs each tracker's package (accelerate would drop a missing one with a warning) and, for W&B,
    a data folder it can write and, unless offline, credentials and a server whose name resolves: say how to fix it."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    for name, available in (("wandb", is_wandb_available), ("tensorboard", is_tensorboard_available)):
        if name in trackers and not available():
            other = next((t for t in trackers if t != name), "none")
            raise ConfigError(f"report_to: {name} is not installed (pip install 'ftkit[tracking]'), or use "
                              f"report_to: {other}")
    if "wandb" in trackers:  # its tables are staged there (kept until `wandb sync` when offline)
        from wandb.env import get_data_dir

        check_writable(get_data_dir(), "report_to: wandb: W&B's data folder", "WANDB_DATA_DIR")
    offline = os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun")
    if "wandb" not in trackers or offline:
        return
    server, key = wandb_server()
    environment = os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE")
    if not (environment or key or _netrc_has(server)):
        raise ConfigError("report_to: wandb has no credentials: run `wandb login` or set WANDB_API_KEY, "
                          "or log locally with WANDB_MODE=offline")
    if unreachable := _unresolved(server):
        raise ConfigError(f"report_to: wandb: {unreachable}: {OFFLINE_ADVICE}")


OFFLINE_ADVICE = ("on a machine without internet, log offline with WANDB_MODE=offline (then `wandb sync "
                  "output_dir/wandb/offline-run-*` from one with internet), or use report_to: tensorboard")


def wandb_server() -> tuple[str | None, str | None]:
    """W&B's server URL and any API key in its settings, read as W&B reads them: WANDB_BASE_URL, else the settings file
    that `wandb login --host` writes, else W&B's default (api.wandb.ai once, another host in later versions). (None,
    None) where another W&B version's settings cannot be read this way."""
    try:
        from wandb.sdk.wandb_settings import Settings

        settings = Settings()
        folder = os.environ.get("WANDB_CONFIG_DIR") or os.path.join("~", ".config", "wandb")
        settings.settings_system = os.path.join(os.path.expanduser(folder), "settings")
        settings.update_from_system_settings()
        settings.update_from_env_vars(dict(os.environ))
        return settings.base_url, settings.api_key
    except Exception:
        return None, None


def _netrc_has(server: str | None) -> bool:
    """An API key for ``server`` in the netrc file where `wandb login` writes it (NETRC, else ~/.netrc); any W&B host's
    where the server is not known."""
    import netrc
    from urllib.parse import urlsplit

    path = os.path.expanduser(os.environ.get("NETRC") or os.path.join("~", ".netrc"))
    try:
        hosts = netrc.netrc(path).hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return urlsplit(server).netloc in hosts if server else any("wandb" in h or "coreweave" in h for h in hosts)


def _unresolved(server: str | None) -> str | None:
    """Why W&B's ``server`` cannot be reached, where that is certain before anything is loaded: its name does not
    resolve (a compute node without internet; W&B would try for 90 s once the model is loaded, then fail with a
    traceback). None otherwise: with a proxy, where the lookup gives no answer within 10 s, or where the server is
    not known, W&B tries itself (and a failure then is one line too, see :func:`start`)."""
    import socket
    import threading
    from urllib.parse import urlsplit

    host = urlsplit(server).hostname if server else None
    if not host or any(v for k, v in os.environ.items() if k.upper().endswith("_PROXY") and k.upper() != "NO_PROXY"):
        return None
    found = []

    def lookup():
        try:
            socket.getaddrinfo(host, urlsplit(server).port or 443)
        except socket.gaierror as e:
            found.append(f"W&B's server {server} cannot be found ({e.strerror})")
        except OSError:
            pass

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(10)
    return found[0] if found else None


def start(accelerator, config, state: dict) -> "MetricsLog":
    """Initialise the configured trackers (their files under output_dir); returns the run's log. The W&B run
    id is kept in the trainer state (so in every checkpoint): a resumed run (a requeued job) continues it. A
    resumed run's log, metrics.jsonl and TensorBoard's, holds each step once (see :class:`MetricsLog`)."""
    log = MetricsLog(accelerator, config, state["global_step"])
    if not accelerator.log_with:
        return log
    import uuid

    state.setdefault("tracker_run_id", uuid.uuid4().hex[:12])
    run_name = config.run_name or os.path.basename(os.path.normpath(config.output_dir))
    init_kwargs = {"wandb": {"name": run_name, "dir": config.output_dir, "id": state["tracker_run_id"],
                             "resume": "allow", "tags": list(config.tags or []), "group": config.group}}
    if state["global_step"]:  # resumed: TensorBoard hides the interrupted run's events after the checkpoint
        init_kwargs["tensorboard"] = {"purge_step": state["global_step"] + 1}
    safe = {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
            for k, v in without_secrets(to_dict(config)).items()}
    try:
        accelerator.init_trackers(config.project_name, config=safe, init_kwargs=init_kwargs)
    except Exception as e:  # W&B unreachable (a firewall), its init_timeout passed: one line, not W&B's traceback
        if not type(e).__module__.startswith("wandb"):
            raise
        raise RunError(f"report_to: wandb: the W&B run did not start ({str(e).strip().splitlines()[0][:200]}): "
                       f"{OFFLINE_ADVICE}") from None
    return log


class MetricsLog:
    """Writes each log event to ``output_dir/metrics.jsonl`` (main process) and to the trackers;
    at the end draws ``output_dir/curves.png`` and, in ``--debug``, prints a summary."""

    def __init__(self, accelerator, config, step: int = 0):
        self.accelerator, self.config = accelerator, config
        self.path = os.path.join(config.output_dir, "metrics.jsonl")
        self.samples_path = os.path.join(config.output_dir, SAMPLES_FILE)
        for path in (self.path, self.samples_path):
            if accelerator.is_main_process and step and os.path.isfile(path):  # a fresh run's is set aside first
                _continue_at(path, step)

    def log(self, metrics: dict, step: int) -> None:
        metrics = {k: (float(v) if hasattr(v, "item") else v) for k, v in metrics.items()}
        if self.accelerator.is_main_process:
            _append(self.path, [{"step": step, **metrics}])
        if self.accelerator.log_with:
            self.accelerator.log(metrics, step=step)

    def log_samples(self, rows: list[dict], step: int) -> None:
        """An evaluation's generated texts beside their inputs and references: every row to ``eval_samples.jsonl``,
        the first :data:`TRACKED_SAMPLES` to the trackers (a W&B table, a TensorBoard text table) at ``step``."""
        if not self.accelerator.is_main_process or not rows:
            return
        _append(self.samples_path, [{"step": step, **row} for row in rows])
        columns = list(rows[0])
        cells = [[row[c] if isinstance(row[c], str) else json.dumps(row[c]) for c in columns]
                 for row in rows[:TRACKED_SAMPLES]]
        for tracker in self.accelerator.trackers:
            if tracker.name == "wandb":
                tracker.log_table("eval/samples", columns=columns, data=cells, step=step)
            elif tracker.name == "tensorboard":  # markdown: a row per example, cells on one line
                escape = lambda text: text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")  # noqa: E731
                table = [f"| {' | '.join(columns)} |", "|" + "---|" * len(columns)]
                tracker.log({"eval/samples": "\n".join(table + [f"| {' | '.join(map(escape, r))} |" for r in cells])},
                            step=step)

    def finish(self, state: dict) -> None:
        """Close the trackers, draw the curves, and in debug mode say what the run did."""
        distributed.end(self.accelerator)
        if not self.accelerator.is_main_process or not os.path.isfile(self.path):
            return
        with open(self.path) as f:
            events = [json.loads(line) for line in f if line.strip()]
        plot_curves(events, os.path.join(self.config.output_dir, "curves.png"))
        if self.config.debug:
            print(debug_summary(events, state), flush=True)


SAMPLES_FILE = "eval_samples.jsonl"
TRACKED_SAMPLES = 32  # of an evaluation's generated texts, shown by the trackers (eval_samples.jsonl holds all)


def _append(path: str, rows: list[dict]) -> None:
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    except OSError as e:  # e.g. the disk is full
        raise RunError(f"cannot write {path}: {e.strerror or e}") from None


def _continue_at(path: str, step: int) -> None:
    """A run resumed at ``step`` keeps the earlier run's lines up to its checkpoint's step and drops the later ones (it
    logs those steps again), and a line cut short when the process was killed."""
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except json.JSONDecodeError:
                pass
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def plot_curves(events: list[dict], path: str) -> None:
    """Train loss, eval loss and every other eval metric against the optimizer step (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = sorted({k for e in events for k in e if k.startswith("eval/") and k != "eval/loss"})
    fig, axes = plt.subplots(1, 1 + bool(others), figsize=(6 + 5 * bool(others), 4), squeeze=False)
    for ax, title, keys in zip(axes[0], ("loss", "evaluation"), (("train/loss", "eval/loss"), others)):
        for key in keys:
            points = [(e["step"], e[key]) for e in events if isinstance(e.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), marker=None if key == "train/loss" else "o", label=key)
        ax.set(xlabel="optimizer step", title=title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def debug_summary(events: list[dict], state: dict) -> str:
    losses = [e["train/loss"] for e in events if "train/loss" in e]
    evals = [e for e in events if "eval/loss" in e]
    memory = max((e.get("perf/peak_memory_gb", 0.0) for e in events), default=0.0)
    trained = f"train loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "no train loss logged"
    evaluated = f"last eval loss {evals[-1]['eval/loss']:.4f}" if evals else "none"
    return (f"debug run ok: {state['global_step']} steps, {trained}, {len(evals)} evaluations ({evaluated}), "
            f"checkpoint at step {state['global_step']}, peak memory {memory:.2f} GB")


def progress_fields(entry: dict) -> dict:
    """What the progress bar shows next to the step count."""
    fields = {"loss": f"{entry['train/loss']:.4f}", "lr": f"{entry['train/lr']:.2e}",
              "tok/s": f"{entry['perf/tokens_per_s']:.0f}", "mem": f"{entry['perf/peak_memory_gb']:.1f}G"}
    if "perf/mfu" in entry:
        fields["mfu"] = f"{100 * entry['perf/mfu']:.0f}%"
    return fields


def peak_memory_gb() -> float:
    """CUDA: the most memory tensors held on this device; CPU: the process's peak resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# Peak dense bf16 tensor throughput (TFLOP/s) by device name; --peak_tflops overrides.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def peak_tflops(config) -> float | None:
    """The device's peak bf16 TFLOP/s: ``--peak_tflops``, else the table for known GPUs; None on CPU."""
    if getattr(config, "peak_tflops", None):
        return config.peak_tflops
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def flops_per_token(model_config, trainable: int, frozen: int, seq_len: float) -> float:
    """Training FLOPs per token: 6 x trainable + 4 x frozen parameters + 12 x layers x hidden x T. Forward is 2 FLOPs
    per weight; backward 4 for a trained weight (input and weight gradients) and 2 for a frozen one (input gradients
    only); the attention score and value products add 12·L·H·T per token for a sequence of T tokens (PaLM's
    convention; encoder-decoders count both stacks)."""
    layers, hidden = model_dims(model_config)
    return 6.0 * trainable + 4.0 * frozen + 12.0 * layers * hidden * seq_len


def model_dims(model_config) -> tuple[int, int]:
    """(layers, hidden size) of a transformers config, whatever the model calls them (both stacks of an
    encoder-decoder); 0 when unknown."""
    layers = next((getattr(model_config, k) for k in ("num_hidden_layers", "n_layer", "num_layers")
                   if isinstance(getattr(model_config, k, None), int)), 0)
    if getattr(model_config, "is_encoder_decoder", False):
        layers += getattr(model_config, "num_decoder_layers", None) or layers
    hidden = next((getattr(model_config, k) for k in ("hidden_size", "n_embd", "d_model")
                   if isinstance(getattr(model_config, k, None), int)), 0)
    return layers, hidden


class Throughput:
    """Tokens (real and padded), rows and samples of all processes between log events, from the
    loop's per-step counts: tokens and samples per second, padding efficiency, step time and ETA;
    with ``model`` and a peak FLOP/s (:func:`peak_tflops`), the model FLOPs utilisation per device
    (``perf/mfu``) by :func:`flops_per_token`, counting real tokens only."""

    def __init__(self, model=None, peak: float | None = None, num_processes: int = 1):
        self.last_step, self.mfu_terms, self.num_processes = None, None, num_processes
        if model is not None and peak:
            from ftkit.modeling import parameter_counts

            trainable, total = parameter_counts(model)
            self.mfu_terms = (model.config, trainable, total - trainable, peak * 1e12)
        self.reset()
        if torch.cuda.is_available():  # the first log's peak is training's, not loading's or a base evaluation's
            torch.cuda.reset_peak_memory_stats()

    def reset(self) -> None:
        self.tokens = self.padded = self.rows = self.samples = 0
        self.start = time.perf_counter()

    def add(self, counts) -> None:
        """One optimizer step's counts (summed over processes, see ``loop.WindowCounts``)."""
        self.tokens += counts.tokens
        self.padded += counts.padded
        self.rows += counts.rows
        self.samples += counts.samples

    def report(self, step: int | None = None, total_steps: int | None = None) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {"perf/tokens_per_s": self.tokens / elapsed, "perf/samples_per_s": self.samples / elapsed,
               "perf/padding_efficiency": self.tokens / max(self.padded, 1), "perf/peak_memory_gb": peak_memory_gb()}
        if self.mfu_terms and self.rows:
            model_config, trainable, frozen, peak = self.mfu_terms
            per_token = flops_per_token(model_config, trainable, frozen, self.padded / self.rows)
            out["perf/mfu"] = self.tokens / self.num_processes * per_token / elapsed / peak
        if step is not None:
            steps = step - (self.last_step if self.last_step is not None else step - 1)
            out["perf/step_time_s"] = elapsed / max(steps, 1)
            if total_steps:
                out["perf/eta_s"] = out["perf/step_time_s"] * max(total_steps - step, 0)
            self.last_step = step
        self.reset()
        if torch.cuda.is_available():  # each log event's peak is its own window's
            torch.cuda.reset_peak_memory_stats()
        return out
