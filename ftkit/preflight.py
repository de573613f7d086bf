"""Preflight (``--preflight true``): what a run will need, known before it is queued: the data kept, dropped and
truncated, the schedule, memory per device (one training step of the real model code on fake tensors: shapes,
no weights: fakestep.py), time, a verdict and the cheapest change that fits. Not here: loading weights or training
(scripts)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys

import torch

from ftkit import data, distributed, loop, optim, rundir, tracking
from ftkit.fakestep import fake_step

logger = logging.getLogger("ftkit")

EXIT_FITS, EXIT_DOES_NOT_FIT = 0, 3
GB = 2**30
HEADROOM = 0.9  # a run fits when its estimate is at most this share of the device (allocator slack, context)


# --- Data and schedule ----------------------------------------------------------------------------


def batches_of(lengths: list[int], config) -> list[list[int]]:
    """The first epoch's micro-batches (example indices) as the training sampler draws them."""
    return data.train_sampler(lengths, config).batches()


def padded_length(n: int, config) -> int:
    return data.round_up(n, data.pad_multiple(config))


def data_section(splits: dict, counts: dict, config) -> dict:
    """Per split: examples kept, dropped and truncated, token-length percentiles; for training, the padding
    efficiency of the configured batching (dynamic padding, length grouping, packing)."""
    out = {}
    for name, ds in splits.items():
        unsorted = list(ds["length"])
        lengths = sorted(unsorted)
        entry = {"examples": len(ds), **counts.get(name, {}),
                 "tokens": {f"p{q}": lengths[min(len(lengths) - 1, int(q / 100 * len(lengths)))] for q in (50, 90, 99)}
                 | {"max": lengths[-1], "total": sum(lengths)}}
        if name == "train":
            batches = batches_of(unsorted, config)
            padded = sum(padded_length(max(unsorted[i] for i in b), config) * len(b) for b in batches)
            entry["padding_efficiency"] = sum(lengths) / max(padded, 1)
            if "examples" in ds.column_names:  # packed rows
                entry["packed_examples"] = sum(ds["examples"])
        out[name] = entry
    return out


def schedule_section(config, num_batches: int, num_processes: int, windows_per_epoch: int, total_steps: int,
                     resumes_at: int = 0) -> dict:
    """Micro-batches and optimizer steps per epoch for ``num_processes``, total and warmup steps, the steps left after
    the checkpoint the run resumes (``resumes_at``), and the steps after it at which the run evaluates and saves (from
    loop.planned, the loop's own cadence)."""
    plan = {k: [s for s in v if s > resumes_at] if isinstance(v, list) else v
            for k, v in loop.planned(config, total_steps, windows_per_epoch).items()}
    return {"processes": num_processes, "micro_batches_per_epoch": num_batches,
            "micro_batches_per_epoch_per_process": math.ceil(num_batches / num_processes),
            "optimizer_steps_per_epoch": windows_per_epoch, "epochs": total_steps / windows_per_epoch,
            "total_steps": total_steps, "resumes_at_step": resumes_at, "steps_left": total_steps - resumes_at,
            "warmup_steps": optim.warmup_steps(config, total_steps),
            "examples_per_step": config.per_device_train_batch_size * config.gradient_accumulation_steps * num_processes,
            "early_stopping_patience": getattr(config, "early_stopping_patience", None), **plan}


# --- Memory ---------------------------------------------------------------------------------------


def _zero_number(zero: dict, key: str, auto: float, default: float) -> float:
    value = zero.get(key, default)
    return auto if value == "auto" else float(value)


def per_device(parts: dict, num_processes: int, zero: dict | None, hidden: int, bf16: bool) -> dict:
    """The step's bytes by part on one device under DDP or DeepSpeed ZeRO (``zero``: its zero_optimization section),
    measured on CPU runs with 2 processes (tests/test_preflight.py): DeepSpeed keeps an fp32 copy of the trainable
    weights and the optimizer state partitioned (none with offload_optimizer), full gradients (stage 1: two copies)
    or fp32 partitions (stage 2: and the full ones as they are made, stage 3: only those), gradient buckets of
    ``reduce_bucket_size`` elements (two with overlap_comm, stage 1-2), and under stage 3 the weights partitioned plus
    those gathered for compute (up to ``stage3_max_live_parameters``); with bf16 it holds weights in bf16."""
    out = {k: parts[k] for k in ("weights", "gradients", "optimizer", "activations")}
    if zero is None:
        if num_processes > 1:
            out["gradients"] *= 2  # DDP's buckets hold a second copy of the gradients
        return out
    n, stage, trainable = num_processes, int(zero.get("stage", 0)), parts["trainable_params"]
    if bf16:  # the engine casts the model to bf16
        out["weights"] -= parts["fp32_bytes"] / 2
        out["gradients"] -= parts["fp32_trainable_bytes"] / 2
    offload = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    out["optimizer"] = 0 if offload else (parts["optimizer"] + 4 * trainable) / n
    grad_size = out["gradients"] / max(trainable, 1)
    bucket = _zero_number(zero, "reduce_bucket_size", hidden * hidden, 5e8) * grad_size
    if stage <= 2:
        overlap = zero.get("overlap_comm", False) not in (False, "false")
        out["buckets"] = bucket * (2 if overlap else 1) if zero.get("contiguous_gradients", True) else 0
        out["gradients"] = 2 * out["gradients"] if stage < 2 else out["gradients"] + 4 * trainable / n
    else:
        out["buckets"] = bucket
        out["gradients"] = 4 * trainable / n
        elements = parts["trainable_params"] + parts["frozen_params"]
        live = min(elements, _zero_number(zero, "stage3_max_live_parameters", 1e9, 1e9))
        out["weights"] = out["weights"] / n + out["weights"] * live / max(elements, 1)
    return out


@dataclasses.dataclass
class Generation:
    """What a script's evaluation generates: for each set of prompts (an evaluation's, the final comparison's), their
    token counts; new tokens and beams per prompt. Each set is sharded over the processes and generated
    ``per_device_eval_batch_size`` prompts at a time (``distributed.generate_in_order``)."""
    prompt_lengths: list[list[int]]
    max_new_tokens: int
    num_beams: int = 1


class Estimate:
    """Memory per device of a recipe's training step at its longest micro-batch, for this recipe or a variant: the
    script's model (``model_cfg``, ``auto_cls``, ``setup(model, config)``) and loss (``step_loss(model, batch)``)
    on ``train_ds`` with the run's processes and DeepSpeed config."""

    def __init__(self, acc, config, model_cfg, auto_cls, setup, step_loss, train_ds, pad_token_id: int,
                 generation: Generation | None = None):
        self.model_cfg, self.auto_cls, self.setup, self.step_loss = model_cfg, auto_cls, setup, step_loss
        self.train_ds, self.pad_token_id, self.generation = train_ds, pad_token_id, generation
        self.num_processes = distributed.planned_processes(acc, config)
        plugin = acc.state.deepspeed_plugin
        self.zero = dict(plugin.deepspeed_config.get("zero_optimization", {})) if plugin is not None else None
        self.device = config.preflight_device if config.preflight_device != "auto" else (
            "cuda" if torch.cuda.is_available() else "cpu")
        self.lengths, self.auto = list(train_ds["length"]), None  # auto: how an auto batch size was chosen
        self.eval_sets = []  # the splits evaluated between steps (set by run): their longest batch is estimated too

    def longest_batch(self, config) -> dict:
        """The micro-batch with the most (padded) tokens in the first epoch, collated as the run collates it."""
        rows = max(batches_of(self.lengths, config),
                   key=lambda b: (padded_length(max(self.lengths[i] for i in b), config) * len(b), len(b)))
        return data.PadCollator(self.pad_token_id, data.pad_multiple(config))([self.train_ds[i] for i in rows])

    def longest_eval_batch(self, config) -> dict | None:
        """The evaluation batch with the most (padded) tokens: batches of ``per_device_eval_batch_size`` in the
        data's order (data.eval_loader), over every split in ``eval_sets``."""
        size, best = config.per_device_eval_batch_size, None
        for ds in self.eval_sets:
            lengths = list(ds["length"])
            for start in range(0, len(lengths), size):
                rows = range(start, min(start + size, len(lengths)))
                tokens = padded_length(max(lengths[i] for i in rows), config) * len(rows)
                if best is None or tokens > best[0]:
                    best = tokens, ds, rows
        return None if best is None else data.PadCollator(self.pad_token_id, data.pad_multiple(config))(
            [best[1][i] for i in best[2]])

    def longest_generation(self, config) -> tuple[int, int, int, int] | None:
        """(prompts, prompt length, new tokens, beams) of the ``generate`` call with the most tokens on one process."""
        g, size, procs, best = self.generation, config.per_device_eval_batch_size, self.num_processes, None
        for lengths in [ls for ls in g.prompt_lengths if ls] if g is not None else []:
            per = -(-len(lengths) // procs)
            for rank in range(procs):  # a process short of prompts repeats the first (generate_in_order)
                mine = [lengths[i] for i in range(rank, len(lengths), procs)]
                mine += [lengths[0]] * (per - len(mine))
                for start in range(0, per, size):
                    rows, length = len(mine[start:start + size]), max(mine[start:start + size])
                    if best is None or rows * (length + g.max_new_tokens) > best[0] * (best[1] + g.max_new_tokens):
                        best = rows, length
        return None if best is None else (*best, g.max_new_tokens, g.num_beams)

    def __call__(self, config, zero: dict | None = ..., between_steps: bool = True) -> dict:
        """``total``: a training step's bytes per device; ``peak``: the most of that, an evaluation's (the weights,
        what stays beside the step and the evaluation forward of the longest evaluation batch) and its generation's
        (the same with ``generate`` of the longest prompts); without ``between_steps``, the training step's only."""
        batch = self.longest_batch(config)
        eval_batch = self.longest_eval_batch(config) if between_steps else None
        generation = self.longest_generation(config) if between_steps else None
        with torch.random.fork_rng(devices=[]):  # building the skeleton draws from it; the run's draws stay its own
            parts = fake_step(config, self.model_cfg, self.auto_cls, self.setup, self.step_loss, batch, self.device,
                              eval_batch, generation)
        on_device = per_device(parts, self.num_processes, self.zero if zero is ... else zero,
                               tracking.model_dims(self.model_cfg)[1], config.bf16)
        beside = on_device["optimizer"] + on_device.get("buckets", 0) + on_device["gradients"] - parts["gradients"]
        out = {"parts": on_device, "total": sum(on_device.values()), "longest_batch": list(batch["input_ids"].shape),
               "trainable_params": parts["trainable_params"], "frozen_params": parts["frozen_params"],
               "logits": parts["logits"], "beside_the_step": beside, "evaluation": None, "generation": None}
        if eval_batch is not None:
            out["evaluation"] = {"total": on_device["weights"] + beside + parts["evaluation_activations"],
                                 "activations": parts["evaluation_activations"],
                                 "longest_batch": list(eval_batch["input_ids"].shape)}
        if generation is not None:
            out["generation"] = {"total": on_device["weights"] + beside + parts["generation_activations"],
                                 "activations": parts["generation_activations"], "longest_batch": list(generation)}
        out["peak"] = max([out["total"]] + [out[k]["total"] for k in ("evaluation", "generation") if out[k]])
        return out


# --- Verdict and advice ---------------------------------------------------------------------------


def budget_bytes(config, num_processes: int) -> tuple[float, str]:
    """Memory of one device: ``device_memory_gb``, else the visible GPU's, else this machine's RAM per process."""
    if config.device_memory_gb:
        return config.device_memory_gb * GB, "device_memory_gb"
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, torch.cuda.get_device_name()
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / max(num_processes, 1), "RAM per process"


DS_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_configs")


def _zero_of(name: str) -> dict | None:
    """The zero_optimization section of ds_configs/<name> (None where the repository's configs are absent)."""
    path = os.path.join(DS_CONFIGS, name)
    return distributed.read_deepspeed_config(path, "deepspeed").get("zero_optimization", {}) if os.path.isfile(
        path) else None


def changes_to_try(config, num_processes: int, zero: dict | None, evaluation_too_big: bool = False
                   ) -> list[tuple[dict, dict, dict]]:
    """Changes that cut memory, cheapest first in lost speed: smaller evaluation batches (when an evaluation is what
    does not fit), DeepSpeed's gradient buckets sized to the model, 8-bit optimizer state, chunked loss, ZeRO-2, a
    smaller micro-batch with more accumulation (same effective batch), gradient checkpointing, ZeRO-3; as (what to
    tell the user, config options, zero_optimization keys)."""
    cheap, stage = [], int(zero.get("stage", 0)) if zero else -1
    batch = config.per_device_eval_batch_size
    while evaluation_too_big and batch > 1:
        batch //= 2
        cheap.append(({"per_device_eval_batch_size": batch}, {"per_device_eval_batch_size": batch}, {}))
    if 0 <= stage <= 2 and zero.get("reduce_bucket_size", 5e8) != "auto":
        cheap.append(({"zero_optimization.reduce_bucket_size": "auto"}, {}, {"reduce_bucket_size": "auto"}))
    if config.optim in ("adamw_torch", "adamw_torch_fused"):
        cheap.append(({"optim": "paged_adamw_8bit"}, {"optim": "paged_adamw_8bit"}, {}))
    if hasattr(config, "cross_entropy_chunk_tokens") and not config.cross_entropy_chunk_tokens:
        cheap.append(({"cross_entropy_chunk_tokens": 1024}, {"cross_entropy_chunk_tokens": 1024}, {}))
    zero2, zero3 = (_zero_of(name) if num_processes > 1 and stage < level else None
                    for name, level in (("zero2.json", 2), ("zero3.json", 3)))
    if zero2 is not None:
        cheap.append(({"deepspeed": "ds_configs/zero2.json"}, {}, zero2))
    batch, accumulate, slower = config.per_device_train_batch_size, config.gradient_accumulation_steps, []
    while batch > 1:
        batch, accumulate = batch // 2, accumulate * 2
        change = {"per_device_train_batch_size": batch, "gradient_accumulation_steps": accumulate}
        slower.append((change, change, {}))
    if not config.gradient_checkpointing:
        slower.append(({"gradient_checkpointing": True}, {"gradient_checkpointing": True}, {}))
    if zero3 is not None:
        slower.append(({"deepspeed": "ds_configs/zero3.json"}, {}, zero3))
    return cheap + slower


def cheapest_fix(config, estimate: Estimate, usable: float, evaluation_too_big: bool) -> dict | None:
    """The first change of :func:`changes_to_try` that fits; else the changes together, one after another, until
    the run fits (None if even all of them do not)."""

    def total(options: dict, zero_keys: dict, base: dict | None) -> float:
        zero = {**(base or {}), **zero_keys} if zero_keys else base
        return estimate(dataclasses.replace(config, **options), zero)["peak"]

    tried = changes_to_try(config, estimate.num_processes, estimate.zero, evaluation_too_big)
    for shown, options, zero_keys in tried:
        if (size := total(options, zero_keys, estimate.zero)) <= usable:
            return {"change": shown, "total_gb": size / GB}
    shown_all, combined, zero = {}, {}, estimate.zero
    for shown, options, zero_keys in tried:
        shown_all.update(shown)
        combined.update(options)
        zero = {**(zero or {}), **zero_keys} if zero_keys else zero
        if (size := total(combined, {}, zero)) <= usable:
            return {"change": dict(shown_all), "total_gb": size / GB}
    return None


# --- The report -----------------------------------------------------------------------------------


def time_section(config, model_cfg, memory: dict, data_info: dict, schedule: dict) -> dict:
    """FLOPs per optimizer step (tracking.flops_per_token over the real tokens of a mean step) and, with a peak
    FLOP/s (``peak_tflops`` or a known GPU) and ``assumed_mfu``, the time per epoch on all processes."""
    train = data_info["train"]
    per_token = tracking.flops_per_token(model_cfg, memory["trainable_params"], memory["frozen_params"],
                                         train["tokens"]["total"] / max(train["examples"], 1))
    tokens_per_epoch = train["tokens"]["total"]
    out = {"flops_per_step": per_token * tokens_per_epoch / schedule["optimizer_steps_per_epoch"],
           "peak_tflops": tracking.peak_tflops(config), "assumed_mfu": config.assumed_mfu}
    if out["peak_tflops"]:
        rate = out["peak_tflops"] * 1e12 * config.assumed_mfu * schedule["processes"]
        out["seconds_per_epoch"] = per_token * tokens_per_epoch / rate
        out["seconds_total"] = out["seconds_per_epoch"] * schedule["epochs"]
        out["seconds_left"] = out["seconds_total"] * schedule["steps_left"] / schedule["total_steps"]
    return out


def run(acc, config, estimate: Estimate, splits: dict, counts: dict) -> None:
    """``--preflight``: print the table, write ``output_dir/preflight.json`` and exit 0 if the run fits its device,
    3 if not (with the cheapest change that fits); nothing else is written. ``estimate`` holds the script's model
    and loss, ``splits`` the tokenized data, ``counts`` what each split dropped or truncated."""
    model_cfg, num_batches = estimate.model_cfg, len(batches_of(estimate.lengths, config))
    processes = estimate.num_processes
    windows_per_epoch = loop.windows_per_epoch(config, num_batches, processes, len(splits["train"]))
    total_steps = optim.total_optimizer_steps(config, windows_per_epoch)
    resume = rundir.resume_path(config)  # a checkpoint past the run's end is refused here too
    resumes_at = rundir.check_not_past(resume, total_steps, "max_steps" if config.max_steps > 0 else
                                       "num_train_epochs") if resume else 0
    device, zero = estimate.device, estimate.zero
    estimate.eval_sets = [ds for name, ds in splits.items() if name != "train"]
    memory = estimate(config)
    other = estimate(dataclasses.replace(config, gradient_checkpointing=not config.gradient_checkpointing),
                     between_steps=False)  # for its activations
    with_, without = (memory, other) if config.gradient_checkpointing else (other, memory)
    memory["activations_gb"] = {"with_checkpointing": with_["parts"]["activations"] / GB,
                                "without_checkpointing": without["parts"]["activations"] / GB,
                                "of_which_logits": memory["logits"] / GB}
    budget, source = budget_bytes(config, processes)
    fits, evaluation, generation = memory["peak"] <= HEADROOM * budget, memory["evaluation"], memory["generation"]
    report = {"device": device, "processes": processes, "zero_stage": (zero or {}).get("stage"),
              "batch_size": {"per_device_train_batch_size": config.per_device_train_batch_size,
                             "gradient_accumulation_steps": config.gradient_accumulation_steps, "auto": estimate.auto},
              "data": data_section(splits, counts, config)}
    report["schedule"] = schedule_section(config, num_batches, processes, windows_per_epoch, total_steps, resumes_at)
    report["memory"] = {"parts_gb": {k: v / GB for k, v in memory["parts"].items()}, "total_gb": memory["total"] / GB,
                        "activations_gb": memory["activations_gb"], "longest_batch": memory["longest_batch"],
                        "trainable_params": memory["trainable_params"], "frozen_params": memory["frozen_params"],
                        **{name: part and {"total_gb": part["total"] / GB, "activations_gb": part["activations"] / GB,
                                           "longest_batch": part["longest_batch"]}
                           for name, part in (("evaluation", evaluation), ("generation", generation))},
                        "peak_gb": memory["peak"] / GB, "budget_gb": budget / GB, "budget_from": source,
                        "headroom": HEADROOM, "fits": fits,
                        "advice": None if fits else cheapest_fix(
                            config, estimate, HEADROOM * budget,
                            any(part is not None and part["total"] > HEADROOM * budget
                                for part in (evaluation, generation)))}
    report["time"] = time_section(config, model_cfg, memory, report["data"], report["schedule"])
    report["exit_code"] = EXIT_FITS if fits else EXIT_DOES_NOT_FIT
    if acc.is_main_process:
        os.makedirs(config.output_dir, exist_ok=True)
        with open(os.path.join(config.output_dir, "preflight.json"), "w") as f:
            json.dump(report, f, indent=2)
        print(table(report), flush=True)
    acc.wait_for_everyone()
    sys.exit(report["exit_code"])


def _gb(x: float) -> str:
    return f"{x:.2f} GB" if x >= 0.1 else f"{x * 1024:.1f} MB"


def table(report: dict) -> str:
    """The report as the lines ``--preflight`` prints."""
    lines = [f"preflight: {report['processes']} process(es) on {report['device']}"
             + (f", ZeRO-{report['zero_stage']}" if report["zero_stage"] is not None else "")]
    b = report["batch_size"]
    if b["auto"]:
        lines.append(f"per_device_train_batch_size auto: {b['per_device_train_batch_size']} x gradient_accumulation_steps "
                     f"{b['gradient_accumulation_steps']} (estimated by micro-batch: " + ", ".join(
                         f"{k}: {_gb(v)}" for k, v in b["auto"]["estimates_gb"].items()) + ")")
    lines += ["", "data"]
    for name, d in report["data"].items():
        dropped = ", ".join(f"{k} {v}" for k, v in d.items() if k not in ("examples", "tokens", "padding_efficiency",
                                                                           "packed_examples"))
        t = d["tokens"]
        lines.append(f"  {name:<11} {d['examples']:>7} examples{' (' + dropped + ')' if dropped else ''}; tokens "
                     f"p50 {t['p50']} p90 {t['p90']} p99 {t['p99']} max {t['max']}"
                     + (f"; padding efficiency {100 * d['padding_efficiency']:.1f}%" if "padding_efficiency" in d else ""))
    s = report["schedule"]
    lines += ["", "schedule",
              f"  {s['micro_batches_per_epoch']} micro-batches per epoch ({s['micro_batches_per_epoch_per_process']} per "
              f"process), {s['optimizer_steps_per_epoch']} optimizer steps per epoch of {s['examples_per_step']} examples",
              f"  {s['total_steps']} steps ({s['epochs']:.2f} epochs), {s['warmup_steps']} warmup; "
              f"evaluations: {len(s['evaluation_steps'])} during training + the final one"
              + (" (early stopping may end it sooner)" if s.get("early_stopping_patience") else "")
              + "; checkpoints: "
              f"{len(s['save_steps'])} during training + the last (and one at each new best)"]
    if s["resumes_at_step"]:
        lines.append(f"  resumes its checkpoint at step {s['resumes_at_step']}: {s['steps_left']} steps left")
    m = report["memory"]
    lines += ["", f"memory per device (longest micro-batch {m['longest_batch'][0]} x {m['longest_batch'][1]} tokens; "
                  f"{m['trainable_params']:,} trainable of {m['trainable_params'] + m['frozen_params']:,} parameters)"]
    lines += [f"  {k:<34} {_gb(v):>10}" for k, v in m["parts_gb"].items()]
    lines += [f"  {'(activations ' + k.replace('_', ' ') + ')':<34} {_gb(v):>10}"
              for k, v in m["activations_gb"].items() if k != "of_which_logits"]
    lines.append(f"  {'(of the activations: logits)':<34} {_gb(m['activations_gb']['of_which_logits']):>10}")
    verdict = f" of {_gb(m['budget_gb'])} ({m['budget_from']}): " + (
        "fits" if m["fits"] else f"does NOT fit ({100 * m['headroom']:.0f}% usable)")
    between = m["evaluation"] or m.get("generation")
    lines.append(f"  {'total':<34} {_gb(m['total_gb']):>10}" + ("" if between else verdict))
    if m["evaluation"]:  # between steps: the weights, what stays beside the step, one evaluation batch's forward
        e = m["evaluation"]
        lines.append(f"  {'evaluation (batch ' + ' x '.join(map(str, e['longest_batch'])) + ')':<34} "
                     f"{_gb(e['total_gb']):>10}")
    if m.get("generation"):  # the same with the generate call of the longest prompts
        rows, length, new, beams = m["generation"]["longest_batch"]
        label = f"generation ({rows} x {length}+{new}" + (f", {beams} beams)" if beams > 1 else " tokens)")
        lines.append(f"  {label:<34} {_gb(m['generation']['total_gb']):>10}")
    if between:
        lines.append(f"  {'peak (the largest)':<34} {_gb(m['peak_gb']):>10}" + verdict)
    if not m["fits"]:
        fix = m["advice"]
        lines.append("  cheapest change that fits: " + (", ".join(f"{k}: {v}" for k, v in fix["change"].items())
                                                        + f" ({_gb(fix['total_gb'])})" if fix else "none found"))
    t = report["time"]
    lines += ["", f"time: {t['flops_per_step'] / 1e12:.3g} TFLOPs per optimizer step"
              + (f"; about {t['seconds_per_epoch'] / 60:.1f} min per epoch, {t['seconds_total'] / 60:.1f} min in all at "
                 f"{100 * t['assumed_mfu']:.0f}% of {t['peak_tflops']:.0f} TFLOP/s"
                 + (f", {t['seconds_left'] / 60:.1f} min left" if s["resumes_at_step"] else "") if "seconds_per_epoch" in t
                 else " (set --peak_tflops for a time estimate)")]
    return "\n".join(lines)
