"""Data: local/hub loading with one-line errors, tokenization helpers, batch sampler, padding, packing.
Not here: what is recipe-specific (prompt text, which columns form the input): the scripts."""

from __future__ import annotations

import bisect
import csv
import json
import math
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from ftkit.config import ConfigError, check_datasets_cache, not_found, path_like

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


# --- Loading --------------------------------------------------------------------------------------


def _check_local_file(path: str, key: str, file_format: str | None = None) -> str:
    if not os.path.isfile(path):
        raise not_found(f"{key}: file not found", path)
    if file_format:
        return "." + file_format
    ext = os.path.splitext(path)[1].lower()
    if ext not in LOCAL_FORMATS:
        raise ConfigError(f"{key}: unsupported file extension {ext!r} in {path} (use {', '.join(LOCAL_FORMATS)}, "
                          f"or set file_format)")
    return ext


def _scan_text_file(path: str, ext: str):
    """Find the exact place a text file is broken (encoding, JSON line) to report it in one line; returns a .json
    file's document when it is one (not JSON lines)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (Windows editors write one) is not data
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 (byte offset {e.start}: {raw[e.start:e.start + 1]!r})") from None
    if ext == ".json":
        try:  # one document, however laid out: an array of rows, {"data": rows}, one row
            doc = json.loads(text)
        except json.JSONDecodeError:
            doc = None  # else JSON lines, checked line by line
        if isinstance(doc, dict) and "data" not in doc and doc and all(isinstance(v, (list, dict)) for v in doc.values()):
            raise ConfigError(f"{path}: one JSON object of columns, not rows; write JSON lines, an array of objects or "
                              f"{{\"data\": [objects]}} (pandas: to_json(orient='records'))")
        if isinstance(doc, list) and not all(isinstance(row, dict) for row in doc):
            raise ConfigError(f"{path}: a JSON array of rows must hold objects only")
        if doc is not None:
            return doc
    if ext in (".json", ".jsonl"):
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{number}: malformed JSON line ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise ConfigError(f"{path}:{number}: each JSON line must be an object, got {type(obj).__name__}")


def _check_field_count(path: str, key: str, ext: str, names: list) -> None:
    """A headerless file's first record needs a field per name (pandas leaves missing ones empty, extra ones index)."""
    with open(path, encoding="utf-8-sig", newline="") as f:  # a CSV record may hold quoted line breaks
        rows = (line.rstrip("\r\n").split("\t") for line in f) if ext == ".tsv" else csv.reader(f)
        number, first = next(((n, row) for n, row in enumerate(rows, 1) if any(field.strip() for field in row)), (1, []))
    fields = len(first)
    if fields != len(names):
        raise ConfigError(f"{key}: {path}:{number} has {fields} field{'s' * (fields != 1)}, but column_names names "
                          f"{len(names)} ({', '.join(map(str, names))}); give this file's columns with --column_names")


def load_squad_json(path: str, doc: dict):
    """``doc``, read from ``path`` in the official SQuAD layout (``data -> paragraphs -> qas -> answers``), as
    one row per question: ``id, title, context, question, answers`` (list of answer texts) and ``answer_start``."""
    import datasets

    rows = {k: [] for k in ("id", "title", "context", "question", "answers", "answer_start")}

    def need(obj, key, where, kind):
        if not isinstance(obj, dict) or key not in obj or not isinstance(obj[key], kind):
            raise ConfigError(f"{path}: not SQuAD JSON: {where} has no {key!r} {kind.__name__}")
        return obj[key]

    for a, article in enumerate(need(doc, "data", "the top level", list)):
        for p, paragraph in enumerate(need(article, "paragraphs", f"data[{a}]", list)):
            where = f"data[{a}].paragraphs[{p}]"
            context = need(paragraph, "context", where, str)
            for q, qa in enumerate(need(paragraph, "qas", where, list)):
                at = f"{where}.qas[{q}]"
                answers = need(qa, "answers", at, list)
                rows["id"].append(str(qa.get("id", f"{a}-{p}-{q}")))
                rows["title"].append(str(article.get("title", "")))
                rows["context"].append(context)
                rows["question"].append(need(qa, "question", at, str))
                rows["answers"].append([need(x, "text", f"{at}.answers[{i}]", str) for i, x in enumerate(answers)])
                rows["answer_start"].append([int(x.get("answer_start", -1)) for x in answers])
    if not rows["id"]:
        raise ConfigError(f"{path}: holds no questions")
    return datasets.Dataset.from_dict(rows)


def load_local_file(path: str, key: str = "train_file", column_names: list | None = None,
                    file_format: str | None = None):
    """Load one local file as a ``datasets.Dataset`` (TSV read with quoting disabled). ``column_names`` names
    the columns of a csv/tsv file without a header row (the UCI SMS Spam Collection is ``label<TAB>text``);
    ``file_format`` reads a file whose name tells no format (``SMSSpamCollection``) as that format."""
    import datasets

    ext = _check_local_file(path, key, file_format)
    doc = _scan_text_file(path, ext) if ext in (".json", ".jsonl", ".csv", ".tsv") else None
    doc = doc if isinstance(doc, dict) and "data" in doc else None  # {"data": ...}: rows, or SQuAD's articles
    rows = doc is not None and isinstance(doc["data"], list) and doc["data"] and all(
        isinstance(row, dict) and "paragraphs" not in row and not set(row) <= {"title"} for row in doc["data"])
    if doc is not None and not rows:  # the official SQuAD layout (a malformed one is named as such)
        return load_squad_json(path, doc)
    if ext != ".parquet":
        with open(path, "rb") as f:
            if not f.read(65536).strip():
                raise ConfigError(f"{path}: holds no examples (empty file)")
    kwargs = {"encoding": "utf-8-sig"} if ext != ".parquet" else {}  # a byte-order mark is not a column name
    if ext in (".csv", ".tsv"):  # only an empty field is missing: pandas would also erase NA, None, null, n/a, nan...
        kwargs.update(keep_default_na=False, na_values=[""])  # (a text, or a class named None)
    if ext == ".tsv":  # real TSV corpora (MRPC, SMS spam) hold stray quote characters: no quoting at all
        kwargs.update(sep="\t", quoting=csv.QUOTE_NONE)
    if column_names and ext in (".csv", ".tsv"):
        _check_field_count(path, key, ext, list(column_names))
        kwargs["column_names"] = list(column_names)
    if rows:  # {"data": [{...}, ...]}: the rows under "data"
        kwargs["field"] = "data"
    check_datasets_cache()
    try:
        ds = datasets.load_dataset(LOCAL_FORMATS[ext], data_files={"data": path}, split="data", **kwargs)
    except Exception as e:  # datasets wraps parser errors in several types
        raise ConfigError(f"{path}: cannot be read as {ext[1:]}: {str(e).splitlines()[0][:200]}") from None
    if len(ds) == 0:
        raise ConfigError(f"{path}: holds no examples")
    return ds


def load_splits(config, splits=("train", "validation", "test")) -> dict:
    """``{split: Dataset}`` for the splits available: from local files, else the hub dataset (network or a warm cache)."""
    files = {"train": config.train_file, "validation": config.validation_file, "test": config.test_file}
    out = {}
    if config.train_file:
        for split in splits:
            if files[split]:
                out[split] = load_local_file(files[split], f"{split}_file", config.column_names, config.file_format)
        return out
    import datasets

    hub = "" if path_like(config.dataset_name) else " (not cached and the hub is unreachable?)"
    if not hub and not os.path.isdir(config.dataset_name):  # a folder in a hub dataset's layout
        raise not_found("dataset_name: no such directory", config.dataset_name)
    check_datasets_cache()
    try:
        dd = datasets.load_dataset(config.dataset_name, config.dataset_config_name)
    except Exception as e:
        raise ConfigError(f"dataset_name: cannot load {config.dataset_name!r}{hub}: "
                          f"{str(e).splitlines()[0][:200]}") from None
    names = {"train": config.train_split, "validation": config.validation_split, "test": config.test_split}
    for split in splits:
        if names[split] is not None and names[split] in dd:
            out[split] = dd[names[split]]
    if "train" not in out:
        raise ConfigError(f"train_split: {config.train_split!r} not in {config.dataset_name} (has {list(dd)})")
    return out


def require_columns(ds, columns: dict, source: str, complete: tuple = ()) -> None:
    """``columns`` maps option name -> column name; a missing column is one clear error, and so is a row without a
    value (null: an empty CSV/TSV field, a JSON null or missing key) in a column whose option is in ``complete``: the
    first such row (counted from 1 in the order read) and how many there are."""
    import pyarrow.compute as pc

    for option, column in columns.items():
        if column not in ds.column_names:
            raise ConfigError(f"{option}: column {column!r} not in {source} (columns: {', '.join(ds.column_names)})")
        values = ds.with_format("arrow")[column] if option in complete else None
        if values is not None and values.null_count:
            row = pc.index(pc.is_null(values), True).as_py() + 1
            raise ConfigError(f"{option}: column {column!r} has no value in row {row} of {source} "
                              f"({values.null_count} of {len(values)} rows have none)")


def take_first(ds, n: int | None, seed: int | None = None):
    """The first ``n`` examples, or ``n`` drawn at random with ``seed`` (S002: shuffle(42), select)."""
    if n is None or n >= len(ds):
        return ds
    return (ds if seed is None else ds.shuffle(seed=seed)).select(range(n))


def undersample(ds, label_column: str, seed: int):
    """Balance classes by drawing, for every class, as many examples as the rarest class has (S003);
    deterministic for a seed, the original row order kept."""
    import numpy as np

    labels = np.asarray(ds[label_column], dtype=object)
    classes = sorted(set(labels.tolist()), key=str)
    count = min(int((labels == c).sum()) for c in classes)
    rng = np.random.default_rng(seed)
    keep = [i for c in classes for i in rng.choice(np.flatnonzero(labels == c), size=count, replace=False).tolist()]
    return ds.select(sorted(keep))


def check_split_ratios(ratios: list[float], validation_file: str | None = None) -> None:
    if validation_file:
        raise ConfigError("split_ratios: splits one train_file; remove it or validation_file")
    if len(ratios) not in (2, 3) or not all(isinstance(r, (int, float)) and r > 0 for r in ratios):
        raise ConfigError(f"split_ratios: give 2 or 3 positive fractions (train, validation[, test]), got {ratios}")


def split_by_ratios(ds, ratios: list[float], seed: int) -> dict:
    """Shuffle once with ``seed`` and cut into train/validation[/test] by ``ratios`` (S003: 70/10/20). Sizes are
    ``floor(ratio * n)`` but for the last part, which takes the rest: no example lost or shared between parts."""
    import numpy as np

    check_split_ratios(ratios)
    names = ["train", "validation", "test"][: len(ratios)]
    order = np.random.default_rng(seed).permutation(len(ds)).tolist()
    total = sum(ratios)
    out, start = {}, 0
    for i, (name, ratio) in enumerate(zip(names, ratios)):
        end = len(ds) if i == len(ratios) - 1 else start + int(len(ds) * ratio / total)
        if end == start:
            raise ConfigError(f"split_ratios: {ratios} leaves the {name} split of {len(ds)} examples empty")
        out[name], start = ds.select(order[start:end]), end
    return out


# --- Tokenization ---------------------------------------------------------------------------------


def tokenize_prompt_completion(tokenizer, prompts: list[str], completions: list[str], train_on_prompt: bool):
    """Tokenize ``prompt + completion`` as one text and mask the prompt's tokens in the labels. The text is tokenized
    whole (so tokens are exactly those generation will see) and a token belongs to the prompt when it starts before
    the prompt's last character: the character offsets of a fast tokenizer make the split exact."""
    texts = [p + c for p, c in zip(prompts, completions)]
    enc = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True, truncation=False)
    eos = tokenizer.eos_token_id
    input_ids, labels = [], []
    for ids, offsets, prompt in zip(enc["input_ids"], enc["offset_mapping"], prompts):
        ids = list(ids)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)  # so generation learns to stop
        if train_on_prompt:
            lab = list(ids)
        else:
            # First token that starts at or after the prompt's end: from there on, everything is
            # the completion (trailing special tokens included); a token straddling the boundary
            # belongs to the prompt. Leading special tokens have (0, 0) offsets: prompt.
            cut = len(prompt)
            first = next((i for i, (s, e) in enumerate(offsets) if s >= cut and e > s), len(offsets))
            lab = [-100] * first + ids[first:]
        input_ids.append(ids)
        labels.append(lab)
    return {"input_ids": input_ids, "labels": labels, "length": [len(x) for x in input_ids]}


def fit_text(tokenizer, text: str, length_with, max_length: int) -> str:
    """The longest prefix of ``text``, cut at one of its own token boundaries, for which the whole input
    fits: ``length_with(prefix) <= max_length`` ("" when nothing does). Cuts one field (a dialogue, a
    context) and keeps the rest of the input whole."""
    if length_with(text) <= max_length:
        return text
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    for n in range(min(max_length - length_with(""), len(offsets)), 0, -1):
        kept = text[: offsets[n - 1][1]]
        if length_with(kept) <= max_length:  # re-tokenizing the cut text can add a token at the seam
            return kept
    return ""


# --- Batching -------------------------------------------------------------------------------------


class TrainBatchSampler(Sampler):
    """Seeded batches of example indices; optionally grouped by length. The order is a pure function of ``(seed,
    epoch)`` so a resumed run sees exactly the batches the uninterrupted run saw. With ``group_by_length`` the
    shuffled indices are cut into mega-batches of ``mega_batch_mult`` batches, each sorted by length, so a batch holds
    similar lengths while the data order stays random; the longest batch goes first so memory problems show at step
    1."""

    def __init__(self, lengths, batch_size, seed, shuffle=True, group_by_length=False, drop_last=False,
                 mega_batch_mult=50):
        self.lengths, self.batch_size, self.seed, self.epoch = list(lengths), batch_size, seed, 0
        self.shuffle, self.group_by_length, self.drop_last = shuffle, group_by_length, drop_last
        self.mega = mega_batch_mult

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        n = len(self.lengths)
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        if self.group_by_length:
            size = self.batch_size * self.mega
            order = [i for s in range(0, n, size)
                     for i in sorted(order[s:s + size], key=lambda j: -self.lengths[j])]
        batches = [order[s:s + self.batch_size] for s in range(0, n, self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.group_by_length and len(batches) > 1:
            longest = max(range(len(batches)), key=lambda b: max(self.lengths[i] for i in batches[b]))
            batches[0], batches[longest] = batches[longest], batches[0]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


class TokenRows(torch.utils.data.Dataset):
    """A tokenized split as the loaders read it: each integer list column (``input_ids``, ``labels``, ...) as numpy
    views of Arrow's own buffers (the values and the row offsets, chunk by chunk, no copy: a memory-mapped dataset
    stays mapped and shared between processes), the other columns as Python lists. A row is a dict of array views,
    made in microseconds; an Arrow dataset formats every row it hands out, which cost the training loop about
    0.6 ms per batch of 8 here, a step's whole overhead over a bare loop (benchmarks/training_speed.py)."""

    def __init__(self, ds):
        import pyarrow as pa

        table = ds.with_format("arrow")[:]  # in the dataset's order, after any select or shuffle
        self.rows, self.arrays, self.values = table.num_rows, {}, {}
        for name in table.column_names:
            column = table.column(name)
            if (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)) and \
                    pa.types.is_integer(column.type.value_type) and column.null_count == 0 and \
                    all(chunk.values.null_count == 0 for chunk in column.chunks):
                starts = [0]
                for chunk in column.chunks:
                    starts.append(starts[-1] + len(chunk))
                # offsets index the chunk's whole values buffer (they account for a sliced chunk)
                self.arrays[name] = ([(c.values.to_numpy(), c.offsets.to_numpy()) for c in column.chunks], starts)
            else:
                self.values[name] = column.to_pylist()

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, i: int) -> dict:
        row = {}
        for name, (chunks, starts) in self.arrays.items():
            c = 0 if len(chunks) == 1 else bisect.bisect_right(starts, i) - 1
            values, offsets = chunks[c]
            j = i - starts[c]
            row[name] = values[offsets[j]:offsets[j + 1]]
        row.update({name: values[i] for name, values in self.values.items()})
        return row


@dataclass
class PadCollator:
    """Pads each batch to its longest member (dynamic padding), key by key; labels are padded with -100.

    Keys are padded by their own value: ``input_ids`` with ``pad_token_id``, ``labels`` with
    -100, everything else (``attention_mask``, ``token_type_ids``) with 0. Rows may hold lists or numpy
    arrays (:class:`TokenRows`); without an ``attention_mask`` one is made from the ``input_ids``' lengths."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    padding_side: str = "right"

    def __call__(self, features: list[dict]) -> dict:
        first, batch = features[0], {}
        keys = [k for k, v in first.items() if isinstance(v, (list, tuple, np.ndarray))]
        for key in keys + ([] if "attention_mask" in first else ["attention_mask"]):
            source = key if key in first else "input_ids"  # a made attention mask: ones where the ids are
            lengths = [len(f[source]) for f in features]
            # each key to its own longest: seq2seq labels are shorter than the inputs
            longest = round_up(max(lengths), self.pad_to_multiple_of)
            fill = {"input_ids": self.pad_token_id, "labels": -100}.get(key, 0)
            out = np.full((len(features), longest), fill, dtype=np.int64)
            for row, f, n in zip(out, features, lengths):
                if self.padding_side == "left":
                    row[longest - n:] = f[key] if key == source else 1
                else:
                    row[:n] = f[key] if key == source else 1
            batch[key] = torch.from_numpy(out)
        for key, value in first.items():
            if key not in batch and isinstance(value, (int, float)):
                batch[key] = torch.tensor([f[key] for f in features])
        return batch


# --- Packing (causal LM): several examples per row, each attending only to itself -----------------


def best_fit_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices grouped into rows of at most ``capacity`` tokens: best-fit decreasing. Longest first, each into the
    open row whose free space fits it most tightly (a sorted list of free spaces and bisect: O(n log n)); examples are
    never split. Deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    free: list[tuple[int, int]] = []  # (free tokens, row), sorted
    rows: list[list[int]] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than the row capacity {capacity}")
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            rows.append([i])
            bisect.insort(free, (capacity - n, len(rows) - 1))
        else:
            space, row = free.pop(at)
            rows[row].append(i)
            bisect.insort(free, (space - n, row))
    return rows


def pack(ds, max_length: int):
    """Pack tokenized examples (``input_ids``, ``labels``) into rows of up to ``max_length`` tokens. Each row carries
    ``position_ids`` that restart at 0 for every example: given position ids and no attention mask, transformers
    builds a block-diagonal causal mask (sdpa/eager) or runs varlen flash attention, so no token attends across
    examples. The first label of every example is -100: in an unpacked row the first token is never a target, and in a
    packed one it would be predicted from the previous example's last token. Per-example losses are therefore
    unchanged. ``examples`` counts the examples of each row."""
    from datasets import Dataset

    bins = best_fit_bins(list(ds["length"]), max_length)
    ids, labels = ds["input_ids"], ds["labels"]
    rows = {"input_ids": [], "labels": [], "position_ids": [], "length": [], "examples": []}
    for members in bins:
        row_ids, row_labels, positions = [], [], []
        for i in members:
            row_ids += ids[i]
            row_labels += [-100] + list(labels[i][1:])
            positions += range(len(ids[i]))
        rows["input_ids"].append(row_ids)
        rows["labels"].append(row_labels)
        rows["position_ids"].append(positions)
        rows["length"].append(len(row_ids))
        rows["examples"].append(len(members))
    return Dataset.from_dict(rows)


def model_inputs(batch: dict) -> dict:
    """The model's inputs: packed rows give position ids and no mask (see :func:`pack`)."""
    if "position_ids" in batch:  # (transformers looks for packed rows only when there is no KV cache)
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def examples_in(batch: dict) -> int | torch.Tensor:
    """Examples in a batch: rows, or the packed examples they hold."""
    return batch["examples"].sum() if "examples" in batch else len(batch["input_ids"])


def pad_multiple(config) -> int | None:
    """``pad_to_multiple_of``, defaulting to 64 with ``torch_compile`` (few shapes to compile), else 8 on a GPU
    (tensor-core friendly shapes), none on a CPU."""
    if getattr(config, "torch_compile", False):
        return config.pad_to_multiple_of or 64
    return config.pad_to_multiple_of or (8 if torch.cuda.is_available() else None)


def round_up(n: int, multiple: int | None) -> int:
    """``n`` padded to a multiple of ``multiple`` (None: unchanged)."""
    return math.ceil(n / multiple) * multiple if multiple else n


def pin_memory(config) -> bool:
    """Pinned host memory for the training batches: only useful (and only used) with a GPU."""
    return config.dataloader_pin_memory and torch.cuda.is_available()


def train_sampler(lengths, config) -> TrainBatchSampler:
    """The training batch sampler the recipe asks for: seeded, optionally length-grouped, dropping the last batch."""
    return TrainBatchSampler(lengths, config.per_device_train_batch_size, config.seed,
                             group_by_length=config.group_by_length, drop_last=config.dataloader_drop_last)


def train_loader(ds, pad_token_id: int, config) -> tuple[torch.utils.data.DataLoader, TrainBatchSampler]:
    """The training DataLoader of every script: the seeded (optionally length-grouped) batch sampler
    over ``ds["length"]``, dynamic padding to :func:`pad_multiple`, workers and pinning from the config."""
    sampler = train_sampler(ds["length"], config)
    collate = PadCollator(pad_token_id, pad_multiple(config))
    loader = torch.utils.data.DataLoader(TokenRows(ds), batch_sampler=sampler, collate_fn=collate,
                                         num_workers=config.dataloader_num_workers, pin_memory=pin_memory(config))
    return loader, sampler


def eval_loader(ds, pad_token_id: int, config) -> torch.utils.data.DataLoader:
    """An evaluation DataLoader: the data's order, ``per_device_eval_batch_size``, dynamic padding."""
    return torch.utils.data.DataLoader(TokenRows(ds), batch_size=config.per_device_eval_batch_size,
                                       collate_fn=PadCollator(pad_token_id, pad_multiple(config)))
