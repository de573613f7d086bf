"""Loading with clear errors, exact prompt masking, over-long dropping, padding, batching."""

import json
import os

import pytest

from conftest import ROOT, TINY_SUMMARIZE, load_script
from ftkit import config as cfg, data
from ftkit.config import ConfigError

qs = load_script("qlora_summarize")
TRAIN = os.path.join(ROOT, "data", "dialogsum_sample_train.jsonl")


def tiny_config(**overrides):
    return cfg.build(qs.SummarizeConfig, cfg.load_yaml_recipe(TINY_SUMMARIZE), overrides)


def test_sample_data_has_dialogsum_fields_and_is_what_the_generator_writes(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen", os.path.join(ROOT, "data", "make_dialogsum_sample.py"))
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.main(str(tmp_path))
    total = 0
    for split in ("train", "validation", "test"):
        committed = open(os.path.join(ROOT, "data", f"dialogsum_sample_{split}.jsonl")).read()
        assert committed == (tmp_path / f"dialogsum_sample_{split}.jsonl").read_text()
        rows = [json.loads(line) for line in committed.splitlines()]
        total += len(rows)
        for row in rows:
            assert set(row) == {"id", "dialogue", "summary", "topic"}
            assert row["dialogue"].startswith("#Person1#: ") and "\n#Person2#: " in row["dialogue"]
    assert total == 60


def test_prompt_tokens_are_masked_and_summary_tokens_are_not(tiny_tokenizer):
    config = tiny_config()
    prompt = qs.prompt_of(config, "#Person1#: Hi there.\n#Person2#: Hello.")
    completion = qs.completion_of(config, "#Person1# greets #Person2#.")
    enc = data.tokenize_prompt_completion(tiny_tokenizer, [prompt], [completion], train_on_prompt=False)
    ids, labels = enc["input_ids"][0], enc["labels"][0]
    n_prompt = len(tiny_tokenizer(prompt)["input_ids"])
    assert ids[:n_prompt] == tiny_tokenizer(prompt)["input_ids"]  # tokenized whole = prompt tokens first
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tiny_tokenizer.eos_token_id  # the model learns to stop
    assert tiny_tokenizer.decode(ids[n_prompt:-1]) == completion


def test_train_on_prompt_learns_every_token(tiny_tokenizer):
    enc = data.tokenize_prompt_completion(tiny_tokenizer, ["a prompt\n"], ["the answer"], train_on_prompt=True)
    assert enc["labels"][0] == enc["input_ids"][0]


def test_overlong_examples_are_dropped_and_counted(tiny_tokenizer):
    config = tiny_config()
    ds = data.load_local_file(TRAIN)
    full, _ = qs.tokenize_split(ds, tiny_tokenizer, config, 10_000, "train")
    limit = sorted(full["length"])[len(full) // 2]
    kept, counts = qs.tokenize_split(ds, tiny_tokenizer, config, limit, "train")
    expected_dropped = sum(1 for n in full["length"] if n >= limit)
    assert counts == {"dropped": expected_dropped, "truncated": 0} and expected_dropped > 0
    assert len(kept) == len(ds) - expected_dropped and max(kept["length"]) < limit


def test_overlong_truncate_keeps_every_example_within_the_limit(tiny_tokenizer):
    config = tiny_config(overlong="truncate")
    ds = data.load_local_file(TRAIN)
    full, _ = qs.tokenize_split(ds, tiny_tokenizer, config, 10_000, "train")
    limit = sorted(full["length"])[len(full) // 2]
    kept, counts = qs.tokenize_split(ds, tiny_tokenizer, config, limit, "train")
    # every example that was too long had its dialogue cut (and is counted), none dropped
    assert counts == {"dropped": 0, "truncated": sum(1 for n in full["length"] if n >= limit)}
    assert len(kept) == len(ds) and max(kept["length"]) < limit
    # the summary survives intact: its tokens are still all labelled
    assert all(sum(1 for t in lab if t != -100) > 5 for lab in kept["labels"])


def test_everything_too_long_is_one_clear_error(tiny_tokenizer):
    ds = data.load_local_file(TRAIN)
    with pytest.raises(ConfigError, match=r"train: no examples left: all 36 have >= max_length=20 tokens"):
        qs.tokenize_split(ds, tiny_tokenizer, tiny_config(), 20, "train")


def test_dynamic_padding_pads_to_the_longest_in_the_batch():
    collate = data.PadCollator(pad_token_id=0)
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    left = data.PadCollator(pad_token_id=0, pad_to_multiple_of=4, padding_side="left")
    assert left([{"input_ids": [5, 6, 7]}])["input_ids"].tolist() == [[0, 5, 6, 7]]


def _padded(rows: list[list[int]], fill: int, multiple: int | None, side: str) -> list[list[int]]:
    longest = -(-max(map(len, rows)) // (multiple or 1)) * (multiple or 1)
    return [([fill] * (longest - len(r)) + r) if side == "left" else (r + [fill] * (longest - len(r))) for r in rows]


@pytest.mark.parametrize("packing", [False, True])
def test_loaders_give_the_dataset_rows_padded(tiny_tokenizer, packing):
    """The loaders read a split through data.TokenRows (numpy views, not Arrow rows): every batch of the training
    loader (sampled, length-grouped, padded to a multiple) and of the evaluation loader is the rows of the
    dataset's own order (here after a shuffle and a select), padded key by key."""
    from types import SimpleNamespace

    ds, _ = qs.tokenize_split(data.load_local_file(TRAIN), tiny_tokenizer, tiny_config(), 10_000, "train")
    ds = ds.shuffle(seed=3).select(range(0, len(ds), 2))
    if packing:
        ds = data.pack(ds, 256)
    rows = ds.to_list()  # the reference: Arrow's rows as Python lists
    config = SimpleNamespace(per_device_train_batch_size=3, per_device_eval_batch_size=4, seed=5,
                             group_by_length=True, dataloader_drop_last=False, pad_to_multiple_of=8,
                             torch_compile=False, dataloader_num_workers=0, dataloader_pin_memory=False)
    loader, sampler = data.train_loader(ds, tiny_tokenizer.pad_token_id, config)
    batches = list(zip(sampler, loader)) + list(zip([range(i, min(i + 4, len(ds))) for i in range(0, len(ds), 4)],
                                                    data.eval_loader(ds, tiny_tokenizer.pad_token_id, config)))
    assert len(batches) == len(sampler) + -(-len(ds) // 4) > 4
    fills = {"input_ids": tiny_tokenizer.pad_token_id, "labels": -100, "position_ids": 0}
    for indices, batch in batches:
        expected = {key: _padded([rows[i][key] for i in indices], fill, 8, "right") for key, fill in fills.items()
                    if key in rows[0]}
        expected["attention_mask"] = _padded([[1] * len(rows[i]["input_ids"]) for i in indices], 0, 8, "right")
        assert {key: batch[key].tolist() for key in expected} == expected
        assert batch["length"].tolist() == [rows[i]["length"] for i in indices]
    left = data.PadCollator(0, 8, "left")([data.TokenRows(ds)[i] for i in (0, 1)])
    assert left["input_ids"].tolist() == _padded([rows[i]["input_ids"] for i in (0, 1)], 0, 8, "left")


def test_token_rows_read_chunked_and_mapped_tables_without_copying(tmp_path):
    """TokenRows over a table of several chunks (a concatenation), a slice that starts inside a chunk, and a
    dataset memory-mapped from disk: every row equals Arrow's, and the ids are views of Arrow's buffers."""
    import datasets
    import numpy as np

    parts = [datasets.Dataset.from_dict({"input_ids": [[r * 10 + k for k in range(r % 4 + 1)] for r in range(lo, hi)],
                                         "label": list(range(lo, hi))}) for lo, hi in ((0, 5), (5, 6), (6, 13))]
    joined = datasets.concatenate_datasets(parts)
    joined.save_to_disk(str(tmp_path / "saved"))
    mapped = datasets.load_from_disk(str(tmp_path / "saved"))
    for ds in (joined, joined.select(range(3, 11)), joined.select([12, 0, 7, 5]), mapped):
        rows = data.TokenRows(ds)
        assert [{k: (v.tolist() if k == "input_ids" else v) for k, v in rows[i].items()} for i in range(len(rows))] \
            == ds.to_list()
    table = joined.with_format("arrow")[:].column("input_ids")
    assert table.num_chunks == 3
    assert np.shares_memory(data.TokenRows(joined)[6]["input_ids"], table.chunks[2].values.to_numpy())


def test_batch_sampler_is_a_function_of_seed_and_epoch():
    lengths = list(range(100))
    a = data.TrainBatchSampler(lengths, 4, seed=1)
    b = data.TrainBatchSampler(lengths, 4, seed=1)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert sorted(i for batch in first for i in batch) == list(range(100))


def test_length_grouping_cuts_padding():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(400)]

    def padding_efficiency(sampler):
        real = padded = 0
        for batch in sampler:
            real += sum(lengths[i] for i in batch)
            padded += max(lengths[i] for i in batch) * len(batch)
        return real / padded

    plain = padding_efficiency(data.TrainBatchSampler(lengths, 8, seed=0))
    grouped = data.TrainBatchSampler(lengths, 8, seed=0, group_by_length=True)
    assert padding_efficiency(grouped) > 0.9 > plain
    first = list(grouped)[0]
    assert max(lengths[i] for i in first) == max(lengths)  # longest batch first


def test_missing_column_lists_the_columns_that_exist():
    ds = data.load_local_file(TRAIN)
    with pytest.raises(ConfigError, match=r"dialogue_column: column 'text' not in train.jsonl \(columns: id, dialogue, summary, topic\)"):
        data.require_columns(ds, {"dialogue_column": "text"}, "train.jsonl")


@pytest.mark.parametrize("name, content, message", [
    ("a.txt", "hello", r"train_file: unsupported file extension '.txt'"),
    ("b.jsonl", '{"a": 1}\n{"a": 2\n', r"b.jsonl:2: malformed JSON line"),
    ("c.jsonl", '{"a": 1}\n[1, 2]\n', r"c.jsonl:2: each JSON line must be an object"),
    ("d.csv", b"text,label\nok,1\nbad \xff\xfe,0\n", r"d.csv:3: not UTF-8 \(byte offset 20"),
    ("e.jsonl", "", r"e.jsonl: holds no examples"),
    ("f.json", '{\n  "dialogue": ["A: hi"],\n  "summary": ["greeting"]\n}', r"f.json: one JSON object of columns, not rows"),
    ("g.json", '[{"a": 1}, [1]]', r"g.json: a JSON array of rows must hold objects only"),
])
def test_bad_files_give_one_clear_error(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError, match=message):
        data.load_local_file(str(path), "train_file")


def test_missing_file_is_named():
    with pytest.raises(ConfigError, match="validation_file: file not found: nope.jsonl"):
        data.load_local_file("nope.jsonl", "validation_file")


def test_json_rows_load_in_every_common_layout(tmp_path):
    # lines, with a byte-order mark (Windows editors), an array, {"data": rows} (as datasets' field="data"), pretty
    # printed or not, and a .json file of JSON lines: the same rows; {"data": ...} in SQuAD's layout stays SQuAD's
    rows = [{"dialogue": "A: hi", "summary": "greeting"}, {"dialogue": "B: bye", "summary": "farewell"}]
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    layouts = {"lines.jsonl": lines, "bom.jsonl": "\ufeff" + lines, "lines.json": lines,
               "array.json": json.dumps(rows, indent=2), "data.json": json.dumps({"version": 2, "data": rows}, indent=2),
               "data_bom.json": "\ufeff" + json.dumps({"data": rows})}
    for name, text in layouts.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        ds = data.load_local_file(str(tmp_path / name))
        assert ds.column_names == ["dialogue", "summary"] and ds.to_list() == rows, name
    squad = {"data": [{"title": "t", "paragraphs": [{"context": "c", "qas": [{"id": "1", "question": "q"}]}]}]}
    (tmp_path / "squad.json").write_text(json.dumps(squad))
    with pytest.raises(ConfigError, match=r"not SQuAD JSON: data\[0\]\.paragraphs\[0\]\.qas\[0\] has no 'answers'"):
        data.load_local_file(str(tmp_path / "squad.json"))


def test_tsv_with_stray_quotes_loads_verbatim(tmp_path):
    path = tmp_path / "spam.tsv"
    path.write_text('label\ttext\nham\t"Hi" she said\nspam\tWIN "free prize\n')
    ds = data.load_local_file(str(path))
    assert ds["text"] == ['"Hi" she said', 'WIN "free prize']


@pytest.mark.parametrize("ext", ["csv", "tsv"])
def test_only_an_empty_field_is_missing_not_the_words_pandas_reads_as_na(tmp_path, ext):
    # pandas' defaults read NA, N/A, None, null, nan... as missing: a message "N/A" became no text, a class named
    # "None" no label
    sep = "," if ext == "csv" else "\t"
    path = tmp_path / f"d.{ext}"
    path.write_text("".join(sep.join(row) + "\n" for row in [
        ("text", "label"), ("N/A", "ham"), ("None", "None"), ("null", "NA"), ("nan", "spam"), ("", "ham"), ("hi", "")]))
    ds = data.load_local_file(str(path))
    assert ds["text"] == ["N/A", "None", "null", "nan", None, "hi"]
    assert ds["label"] == ["ham", "None", "NA", "spam", "ham", None]


@pytest.mark.parametrize("content,fields,fitting", [("hello there\nWIN cash\n", 1, ["text"]),
                                                    ("1\tham\thi\n", 3, ["id", "label", "text"]),
                                                    ('"two\nlines",ham,x\n', 3, ["text", "label", "x"])])
def test_a_headerless_file_needs_a_field_for_each_column_name(tmp_path, content, fields, fitting):
    # pandas filled the missing column with nothing (or made extra leading ones the index): texts read as labels
    path = tmp_path / ("texts.csv" if "," in content else "texts.tsv")  # a CSV record may span lines
    path.write_text(content)
    with pytest.raises(ConfigError, match=rf"^input_file: {path}:1 has {fields} fields?, but column_names names 2 "
                                          rf"\(label, text\); give this file's columns with --column_names$"):
        data.load_local_file(str(path), "input_file", ["label", "text"])
    assert data.load_local_file(str(path), "input_file", fitting).column_names == fitting


def test_pad_multiple_defaults_to_8_only_on_a_gpu_and_pinning_needs_one():
    from types import SimpleNamespace

    import torch

    gpu = torch.cuda.is_available()
    assert data.pad_multiple(SimpleNamespace(pad_to_multiple_of=None)) == (8 if gpu else None)
    assert data.pad_multiple(SimpleNamespace(pad_to_multiple_of=64)) == 64
    assert data.pin_memory(SimpleNamespace(dataloader_pin_memory=True)) is gpu
    assert data.pin_memory(SimpleNamespace(dataloader_pin_memory=False)) is False
    batch = data.PadCollator(0, data.pad_multiple(SimpleNamespace(pad_to_multiple_of=8)))(
        [{"input_ids": [1, 2, 3]}, {"input_ids": [4]}])
    assert batch["input_ids"].shape == (2, 8) and batch["attention_mask"].sum() == 4
