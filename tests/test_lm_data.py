"""The language-modelling data module: corpus loading and splits, token rows, cache keys, loaders.

A tiny word-level tokenizer is built offline, so every token id in the checks below is known.
"""

from __future__ import annotations

import hashlib
import json

import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast

from autoskd.errors import AutoSKDError
from autoskd.lm.data import (IGNORE, LMCorpus, ensure_pad_token, lm_data_id, load_corpus, make_lm_loader,
                             tokenize_lm_split)

WORDS = "the cat sat on mat a dog ran far q answer is yes no".split()
DOCS = [f"the cat sat on mat {i}" if i % 2 else f"a dog ran far {i}" for i in range(40)]


def make_tokenizer(extra: tuple[str, ...] = (), bos: bool = False, eos: bool = True):
    """Word-level tokenizer: ids 0..2 are [UNK], </s>, <s>, then WORDS (+ extra) and digits 0..39;
    optionally adds BOS itself (like Llama). No pad token, to exercise ensure_pad_token."""
    words = ["[UNK]", "</s>", "<s>"] + WORDS + list(extra) + [str(i) for i in range(40)]
    vocab = {w: i for i, w in enumerate(words)}
    model = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    model.pre_tokenizer = Whitespace()
    if bos:
        model.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=model, unk_token="[UNK]", eos_token="</s>" if eos else None,
                                   bos_token="<s>" if bos else None)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def assert_one_line_error(fn, match: str):
    with pytest.raises(AutoSKDError, match=match) as err:
        fn()
    assert "\n" not in str(err.value)


# --- loading -------------------------------------------------------------------------------------

def test_txt_is_one_document_per_non_empty_line(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(DOCS[:20]) + "\n\n   \n" + "\n".join(DOCS[20:]) + "\n", encoding="utf-8")
    corpus = load_corpus(str(path))
    assert corpus.kind == "text"
    assert sorted(corpus.split("train_full") + corpus.split("dev") + corpus.split("test")) == sorted(DOCS)


@pytest.mark.parametrize("suffix", ["csv", "tsv", "jsonl", "json", "parquet"])
def test_table_files_read_the_text_column(tmp_path, suffix):
    df = pd.DataFrame({"id": range(40), "body": DOCS[:39] + [""], "text": ["x"] * 40})
    path = tmp_path / f"corpus.{suffix}"
    {"csv": lambda: df.to_csv(path, index=False), "tsv": lambda: df.to_csv(path, sep="\t", index=False),
     "jsonl": lambda: df.to_json(path, orient="records", lines=True),
     "json": lambda: df.to_json(path, orient="records"), "parquet": lambda: df.to_parquet(path)}[suffix]()
    corpus = load_corpus(str(path), text_column="body")
    assert sum(corpus.sizes().values()) == 39  # the empty document is dropped
    assert set(corpus.split("train")) <= set(DOCS)
    assert set(load_corpus(str(path)).split("train")) == {"x"}  # default column: text


def test_rotten_tomatoes_is_the_builtin_corpus():
    corpus = load_corpus("rotten_tomatoes")
    assert corpus.kind == "text" and sum(corpus.sizes().values()) > 10_000
    assert all(isinstance(doc, str) and doc.strip() for doc in corpus.split("dev"))


def test_the_genre_corpora_are_synopses_and_synopses_with_reviews():
    reviews, plots, both = (set(load_corpus(n).split("train_full") + load_corpus(n).split("dev")
                                + load_corpus(n).split("test"))
                            for n in ("rotten_tomatoes", "rotten_tomatoes_plots", "rotten_tomatoes_all"))
    assert 1000 < len(plots) < 1200 and not plots & reviews and both == plots | reviews
    mean_chars = sum(map(len, plots)) / len(plots)
    assert mean_chars > 3 * sum(map(len, reviews)) / len(reviews)  # synopses: a longer, other genre


def test_max_documents_keeps_the_first_documents(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("\n".join(DOCS), encoding="utf-8")
    corpus = load_corpus(str(path), max_documents=10)
    assert sorted(corpus.split("train_full") + corpus.split("dev") + corpus.split("test")) == sorted(DOCS[:10])


# --- splits and fingerprints -----------------------------------------------------------------------

def corpus_of(tmp_path, seed=0, docs=DOCS, **kwargs) -> LMCorpus:
    path = tmp_path / "docs.jsonl"
    pd.DataFrame({"text": docs}).to_json(path, orient="records", lines=True)
    return load_corpus(str(path), seed=seed, **kwargs)


def test_splits_are_disjoint_cover_everything_and_follow_the_seed(tmp_path):
    corpus = corpus_of(tmp_path, val_fraction=0.2)
    parts = [corpus.split(role) for role in ("train", "val", "dev", "test")]
    assert [len(p) for p in parts] == [24, 8, 4, 4]
    assert sorted(sum(parts, [])) == sorted(DOCS)  # disjoint and complete (DOCS are distinct)
    assert all(p == sorted(p, key=DOCS.index) for p in parts)  # source order inside a split
    assert corpus.split("train_full") == parts[0] + parts[1]
    assert corpus_of(tmp_path, val_fraction=0.2).splits == corpus.splits
    assert corpus_of(tmp_path, seed=1, val_fraction=0.2).splits != corpus.splits


def test_fingerprint_is_a_content_hash(tmp_path):
    corpus = corpus_of(tmp_path)
    digest = hashlib.sha256(b"autoskd-lm-split-v1|text\n")
    for doc in corpus.split("dev"):
        digest.update(json.dumps(doc).encode() + b"\n")
    assert corpus.fingerprint("dev") == digest.hexdigest()  # no hash(), so the same in every process
    changed = LMCorpus("x", {**corpus.splits, "dev": corpus.split("dev")[:-1] + ["other"]})
    assert changed.fingerprint("dev") != corpus.fingerprint("dev")
    assert changed.fingerprint("train") == corpus.fingerprint("train")


def test_subsample_keeps_order_and_limits(tmp_path):
    corpus = corpus_of(tmp_path)
    small = corpus.subsample(max_train=5, max_eval=None, seed=3)
    assert small.sizes() == {"train": 5, "val": 4, "dev": 4, "test": 4}
    assert small.split("train") == [d for d in corpus.split("train") if d in small.split("train")]


# --- token rows ------------------------------------------------------------------------------------

def test_ensure_pad_token_reuses_eos_else_adds_pad():
    tok = ensure_pad_token(make_tokenizer())
    assert tok.pad_token == "</s>" and tok.pad_token_id == tok.eos_token_id
    bare = ensure_pad_token(make_tokenizer(eos=False))
    assert bare.pad_token == "<pad>" and bare.pad_token_id == len(bare) - 1


def test_packed_rows_are_full_blocks_with_eos_between_documents(tok):
    docs = ["the cat sat", "a dog", "q is yes no"]
    rows = tokenize_lm_split(docs, tok, block_size=4)
    eos = tok.eos_token_id
    stream = ids(tok, docs[0]) + [eos] + ids(tok, docs[1]) + [eos] + ids(tok, docs[2]) + [eos]  # 12 tokens
    assert len(rows) == 3 and rows.input_ids.shape == (3, 4)
    assert rows.input_ids.flatten().tolist() == stream
    assert bool(rows.attention_mask.eq(1).all())
    assert torch.equal(rows.target_ids[:, :-1], rows.input_ids[:, 1:])
    assert rows.target_ids[:, -1].eq(IGNORE).all() and rows.num_target_tokens == 9
    assert [rows[i]["idx"] for i in range(3)] == [0, 1, 2]
    assert len(tokenize_lm_split(docs, tok, block_size=5)) == 2  # remainder dropped


def test_tokenizer_bos_is_kept_and_eos_not_doubled():
    tok = make_tokenizer(bos=True)
    rows = tokenize_lm_split(["the cat", "a dog"], tok, block_size=8)
    assert rows.input_ids[0].tolist() == [2, *ids(tok, "the cat"), 1, 2, *ids(tok, "a dog"), 1]


def test_padded_rows_mask_padding(tok):
    docs = ["the cat sat on mat", "a dog"]
    rows = tokenize_lm_split(docs, tok, block_size=5, layout="padded")
    eos = tok.eos_token_id
    assert rows.input_ids[0].tolist() == ids(tok, docs[0])  # truncated: no room for EOS
    assert rows.input_ids[1].tolist()[:3] == ids(tok, docs[1]) + [eos]
    assert rows.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    first, second = rows.target_ids.tolist()
    assert first == rows.input_ids[0, 1:].tolist() + [IGNORE]
    assert second == [ids(tok, "dog")[0], eos, IGNORE, IGNORE, IGNORE]


def test_prompt_completion_targets_only_completion_tokens(tok):
    pairs = [("q the cat", "yes"), ("q dog", "no no")]
    rows = tokenize_lm_split(pairs, tok, block_size=6, layout="packed", kind="prompt_completion")
    eos, yes, no = tok.eos_token_id, *ids(tok, "yes no")
    assert rows.input_ids[0, :5].tolist() == ids(tok, "q the cat") + [yes, eos]
    # position t predicts token t+1: only t whose next token is a completion token (or EOS) has a target
    assert rows.target_ids.tolist() == [[IGNORE, IGNORE, yes, eos, IGNORE, IGNORE],
                                        [IGNORE, no, no, eos, IGNORE, IGNORE]]
    assert rows.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0]]
    assert rows.num_target_tokens == 5


def test_prompt_completion_corpus_from_two_columns(tmp_path, tok):
    path = tmp_path / "qa.csv"
    pd.DataFrame({"prompt": [f"q {i}" for i in range(20)], "answer": ["yes", ""] * 10}).to_csv(path, index=False)
    corpus = load_corpus(str(path), prompt_column="prompt", completion_column="answer")
    assert corpus.kind == "prompt_completion" and sum(corpus.sizes().values()) == 10  # empty answers dropped
    assert all(c == "yes" for _, c in corpus.split("train"))
    rows = tokenize_lm_split(corpus.split("train"), tok, block_size=8, kind=corpus.kind)
    assert rows.num_target_tokens == 2 * len(rows)  # "yes" and EOS per row


def test_lm_data_id_changes_with_tokenizer_block_size_layout_and_data(tmp_path, tok):
    corpus = corpus_of(tmp_path)
    base = lm_data_id(corpus, "train", tok, 16, "packed")
    assert base == lm_data_id(corpus, "train", make_tokenizer(), 16, "packed")
    others = [lm_data_id(corpus, "train", make_tokenizer(extra=("zebra",)), 16, "packed"),
              lm_data_id(corpus, "train", make_tokenizer(bos=True), 16, "packed"),
              lm_data_id(corpus, "train", tok, 32, "packed"),
              lm_data_id(corpus, "train", tok, 16, "padded"),
              lm_data_id(corpus, "val", tok, 16, "packed")]
    assert len({base, *others}) == 6


# --- loaders ---------------------------------------------------------------------------------------

def test_loader_batches_and_seeded_order(tok):
    rows = tokenize_lm_split(DOCS, tok, block_size=4)
    loader = make_lm_loader(rows, batch_size=8, shuffle=True, seed=5)
    batch = next(iter(loader))
    assert set(batch) == {"input_ids", "attention_mask", "target_ids", "idx"}
    assert batch["input_ids"].shape == batch["target_ids"].shape == (8, 4) and batch["idx"].dtype == torch.long
    assert torch.equal(batch["input_ids"], rows.input_ids[batch["idx"]])
    order = [b["idx"].tolist() for b in make_lm_loader(rows, 8, shuffle=True, seed=5)]
    assert order == [b["idx"].tolist() for b in make_lm_loader(rows, 8, shuffle=True, seed=5)]
    assert order != [b["idx"].tolist() for b in make_lm_loader(rows, 8, shuffle=True, seed=6)]
    assert loader.sampler.generator is not None


def test_padded_batches_trim_to_their_longest_row(tok):
    rows = tokenize_lm_split(["a dog", "the cat sat", "q"], tok, block_size=10, layout="padded")
    batches = list(make_lm_loader(rows, batch_size=2, shuffle=False))
    assert [b["input_ids"].shape[1] for b in batches] == [4, 2]
    assert batches[1]["idx"].tolist() == [2]


# --- errors ----------------------------------------------------------------------------------------

def test_bad_inputs_give_one_line_errors(tmp_path, tok):
    table = tmp_path / "t.csv"
    pd.DataFrame({"body": DOCS}).to_csv(table, index=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    cases = [(lambda: load_corpus(str(tmp_path / "missing.txt")), "not found"),
             (lambda: load_corpus(str(tmp_path / "nope" / "c.parquet")), "not found"),
             (lambda: load_corpus("./no/such/dir"), "not found"),
             (lambda: load_corpus(str(table)), r"column 'text' not in .*columns: body"),
             (lambda: load_corpus(str(table), text_column="txt"), "columns: body"),
             (lambda: load_corpus(str(empty)), "no non-empty documents"),
             (lambda: load_corpus(str(table), prompt_column="body"), "needs both"),
             (lambda: load_corpus(str(table), text_column="body", completion_column="body"), "cannot be combined"),
             (lambda: load_corpus(str(table), text_column="body", val_fraction=0), "between 0 and 1"),
             (lambda: load_corpus(str(table), text_column="body", val_fraction=0.5, dev_fraction=0.5),
              "below 1"),
             (lambda: load_corpus(str(table), text_column="body", max_documents=3), "too few documents"),
             (lambda: load_corpus(str(table), text_column="body", max_documents=0), "at least 1"),
             (lambda: LMCorpus("x", {}).split("training"), "unknown split"),
             (lambda: tokenize_lm_split([], tok, 8), "split is empty"),
             (lambda: tokenize_lm_split(["a"], tok, 1), "at least 2"),
             (lambda: tokenize_lm_split(["a"], tok, 8, layout="ragged"), "unknown layout"),
             (lambda: tokenize_lm_split(["a dog"], tok, 8), "fewer than one block"),
             (lambda: tokenize_lm_split([("q the cat", "yes")], tok, 3, kind="prompt_completion"), "no tokens"),
             (lambda: make_lm_loader(tokenize_lm_split(DOCS, tok, 4), 0, False), "batch-size")]
    for fn, match in cases:
        assert_one_line_error(fn, match)
