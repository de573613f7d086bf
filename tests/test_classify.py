"""scripts/classify.py pieces: metrics, labels, balancing and splitting, pooling, freezing, data files."""

import importlib.util
import os

import pytest
import torch

from conftest import ROOT, load_script
from ftkit import config as cfg, data, metrics, modeling, optim
from ftkit.config import ConfigError

cl = load_script("classify")
TINY = {name: os.path.join(ROOT, "recipes", "tiny", f"{name}.yaml") for name in ("spam", "mrpc", "imdb")}


def tiny_config(name="spam", **overrides):
    return cfg.build(cl.ClassifyConfig, cfg.load_yaml_recipe(TINY[name]), overrides)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def test_binary_f1_is_of_the_positive_class_and_the_confusion_matrix_is_true_by_predicted():
    # true 1 1 1 0 0, predicted 1 0 1 1 0: tp 2, fp 1, fn 1 -> precision 2/3, recall 2/3, F1 2/3
    result = metrics.classification([1, 0, 1, 1, 0], [1, 1, 1, 0, 0], 2)
    assert result["accuracy"] == pytest.approx(3 / 5)
    assert result["f1"] == pytest.approx(2 / 3)
    assert result["confusion"] == [[1, 1], [1, 2]]
    assert result["examples"] == 5


def test_multiclass_f1_is_the_macro_mean_and_matches_scikit_learn():
    from sklearn.metrics import f1_score

    preds, labels = [0, 2, 1, 2, 2, 0, 1], [0, 1, 1, 2, 0, 0, 2]
    result = metrics.classification(preds, labels, 3)
    assert result["f1"] == pytest.approx(f1_score(labels, preds, average="macro"))
    assert metrics.classification([0, 0], [0, 0], 2)["f1"] == 0.0  # no positive class at all


# ---------------------------------------------------------------------------------------------
# Data files, balancing and splitting
# ---------------------------------------------------------------------------------------------


def test_sample_files_are_what_the_generator_writes(tmp_path):
    spec = importlib.util.spec_from_file_location("gen", os.path.join(ROOT, "data", "make_classification_samples.py"))
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    gen.main(str(tmp_path))
    for name in ("spam_sample.tsv", "imdb_sample.csv", "mrpc_sample.tsv"):
        assert (tmp_path / name).read_text() == open(os.path.join(ROOT, "data", name)).read(), name


def test_headerless_tsv_with_unbalanced_quotes_loads_every_line():
    path = os.path.join(ROOT, "data", "spam_sample.tsv")
    lines = open(path).read().splitlines()
    assert sum(line.count('"') % 2 for line in lines) > 0  # the sample does hold unbalanced quotes
    ds = data.load_local_file(path, column_names=["label", "text"])
    assert len(ds) == len(lines)
    assert ds["text"] == [line.split("\t", 1)[1] for line in lines]


def test_tsv_byte_order_mark_is_not_part_of_the_first_column_name(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_bytes("\ufeffQuality\t#1 String\n1\tA \"quoted start\n".encode("utf-8"))
    ds = data.load_local_file(str(path))
    assert ds.column_names == ["Quality", "#1 String"] and ds["#1 String"] == ['A "quoted start']


def test_file_format_reads_a_file_without_extension(tmp_path):
    path = tmp_path / "SMSSpamCollection"
    path.write_text("ham\tok see you\nspam\tWIN now\n")
    ds = data.load_local_file(str(path), column_names=["label", "text"], file_format="tsv")
    assert ds["label"] == ["ham", "spam"]


def test_undersampling_keeps_the_rarest_class_count_of_every_class_deterministically():
    ds = data.load_local_file(os.path.join(ROOT, "data", "spam_sample.tsv"), column_names=["label", "text"])
    spam = ds["label"].count("spam")
    a = data.undersample(ds, "label", seed=123)
    b = data.undersample(ds, "label", seed=123)
    c = data.undersample(ds, "label", seed=7)
    assert a["label"].count("ham") == a["label"].count("spam") == spam
    assert a["text"] == b["text"] and a["text"] != c["text"]


def test_split_ratios_cut_disjoint_parts_of_exact_size():
    import datasets

    ds = datasets.Dataset.from_dict({"i": list(range(60))})
    parts = data.split_by_ratios(ds, [0.7, 0.1, 0.2], seed=123)
    assert [len(parts[n]) for n in ("train", "validation", "test")] == [42, 6, 12]
    seen = [i for n in ("train", "validation", "test") for i in parts[n]["i"]]
    assert sorted(seen) == list(range(60))  # disjoint and complete
    assert data.split_by_ratios(ds, [0.7, 0.1, 0.2], seed=123)["test"]["i"] == parts["test"]["i"]


def test_recipe_splits_of_the_spam_sample_are_balanced_70_10_20():
    splits = cl.load_classification_splits(tiny_config())
    sizes = {n: len(ds) for n, ds in splits.items()}
    assert sizes == {"train": 42, "validation": 6, "test": 12}
    assert sum(ds["label"].count("spam") for ds in splits.values()) == 30


def test_subsets_drawn_with_a_seed_are_random_but_reproducible():
    import datasets

    ds = datasets.Dataset.from_dict({"i": list(range(100))})
    assert data.take_first(ds, 5)["i"] == [0, 1, 2, 3, 4]
    drawn = data.take_first(ds, 5, seed=42)["i"]
    assert drawn != [0, 1, 2, 3, 4] and drawn == data.take_first(ds, 5, seed=42)["i"]


# ---------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------


def _labels(values):
    import datasets

    return datasets.Dataset.from_dict({"text": ["x"] * len(values), "label": values})


def test_string_labels_without_a_map_are_inferred_sorted():
    config = tiny_config(label_map=None)
    names = cl.label_names(config, _labels(["spam", "ham", "spam"]))
    assert names == ["ham", "spam"]
    assert cl.label_ids(config, _labels(["spam", "ham"]), names, "train") == [1, 0]


def test_a_label_outside_the_map_names_its_split_and_row():
    config = tiny_config()
    with pytest.raises(ConfigError, match=r"label 'eggs' in the test data \(row 2\) is not in label_map: ham, spam"):
        cl.label_ids(config, _labels(["ham", "eggs"]), ["ham", "spam"], "test")


def test_an_integer_label_outside_num_labels_is_an_error():
    config = tiny_config(label_map=None)
    with pytest.raises(ConfigError, match=r"label 5 in the validation data \(row 3\) is outside 0..1"):
        cl.label_ids(config, _labels([0, 1, 5]), ["0", "1"], "validation")


def test_label_map_ids_must_be_0_to_n_minus_1():
    with pytest.raises(ConfigError, match="label_map: class ids must be 0..N-1"):
        tiny_config(label_map={"ham": 0, "spam": 2})


# ---------------------------------------------------------------------------------------------
# Models: pooling at the last real token, freezing
# ---------------------------------------------------------------------------------------------


def _tiny_gpt2_classifier(pad_token_id=0):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=64, num_labels=2,
                        pad_token_id=pad_token_id, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    return GPT2ForSequenceClassification(config).eval()


def test_gpt2_right_padded_batch_gives_each_sequence_its_unpadded_logits():
    model = _tiny_gpt2_classifier(pad_token_id=0)
    sequences = [[5, 9, 13, 22, 7, 31], [8, 3], [40, 41, 42, 43]]
    batch = data.PadCollator(pad_token_id=0)([{"input_ids": s} for s in sequences])
    with torch.no_grad():
        padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for i, s in enumerate(sequences):
            alone = model(input_ids=torch.tensor([s])).logits[0]
            assert torch.allclose(padded[i], alone, atol=1e-5), (i, padded[i], alone)
        # ... while S003's "last position" reads a pad token for the short ones
        last = model.transformer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0][:, -1]
        assert not torch.allclose(model.score(last)[1], padded[1], atol=1e-3)


def test_only_the_trainable_modules_change_in_an_optimizer_step():
    model = _tiny_gpt2_classifier().train()
    patterns = ["transformer.h.1", "transformer.ln_f", "score"]
    modeling.freeze_except(model, patterns)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = tiny_config(learning_rate=1e-2, weight_decay=0.1)
    optimizer = optim.build_optimizer(model, config)
    logits = model(input_ids=torch.tensor([[5, 9, 13], [8, 3, 4]])).logits
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    optimizer.step()
    for name, p in model.named_parameters():
        trainable = name.startswith(("transformer.h.1.", "transformer.ln_f.", "score."))
        assert p.requires_grad == trainable, name
        assert (not torch.equal(p, before[name])) == trainable, name


def test_an_unknown_trainable_module_lists_the_model_modules():
    from transformers import AutoModelForSequenceClassification, GPT2Config

    model_cfg = GPT2Config(vocab_size=50, n_embd=32, n_layer=3, n_head=4, num_labels=2)
    with pytest.raises(ConfigError, match=r"'transformer.h.7' matches no parameter .*transformer.h.0-2, transformer.ln_f, score"):
        modeling.check_trainable_modules(model_cfg, AutoModelForSequenceClassification, ["transformer.h.7"])


def test_built_bert_tokenizer_encodes_pairs_with_token_types(tmp_path):
    tok = modeling.build_tokenizer([os.path.join(ROOT, "data", "mrpc_sample.tsv")], 300, str(tmp_path),
                                   modeling.special_tokens_for("bert"))
    enc = tok("the company", "shares rose", return_token_type_ids=True)
    tokens = tok.convert_ids_to_tokens(enc["input_ids"])
    assert tokens[0] == "[CLS]" and tokens.count("[SEP]") == 2 and tokens[-1] == "[SEP]"
    first_sep = tokens.index("[SEP]")
    assert enc["token_type_ids"] == [0] * (first_sep + 1) + [1] * (len(tokens) - first_sep - 1)


# ---------------------------------------------------------------------------------------------
# The real corpora (../shared/realdata, when present): every row loads as the recipes read them
# ---------------------------------------------------------------------------------------------

REALDATA = os.path.join(ROOT, "..", "shared", "realdata")


@pytest.mark.skipif(not os.path.isdir(os.path.join(REALDATA, "sms_spam")), reason="../shared/realdata absent")
def test_real_sms_spam_collection_loads_balances_and_splits_as_s003():
    path = os.path.join(REALDATA, "sms_spam", "SMSSpamCollection")
    lines = open(path, encoding="utf-8").read().splitlines()
    config = cfg.build(cl.ClassifyConfig, cfg.load_yaml_recipe(os.path.join(ROOT, "recipes", "gpt2_spam.yaml")),
                       {"train_file": path})
    raw = data.load_local_file(path, column_names=config.column_names, file_format=config.file_format)
    assert len(raw) == len(lines) and raw["label"].count("spam") == 747
    splits = cl.load_classification_splits(config)
    assert {n: len(ds) for n, ds in splits.items()} == {"train": 1045, "validation": 149, "test": 300}


@pytest.mark.skipif(not os.path.isdir(os.path.join(REALDATA, "mrpc")), reason="../shared/realdata absent")
def test_real_mrpc_tsv_with_bom_and_unbalanced_quotes_loads_every_pair():
    path = os.path.join(REALDATA, "mrpc", "dev.tsv")
    ds = data.load_local_file(path, "validation_file")
    assert len(ds) == 408 and ds.column_names[0] == "Quality"
    assert sorted(set(ds["Quality"])) == [0, 1]
