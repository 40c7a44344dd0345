"""Fixtures shared by the test files: the real MiniLM tokenizer and tiny random BERTs saved
as local checkpoints (so nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch
from transformers import BertModel, BertTokenizer

from autoskd.models.loading import load_tokenizer
from helpers import tiny_config


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core box they make a
    file ~10x slower (threads spin-waiting for each other)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def real_tokenizer():
    return load_tokenizer("minilm-l6")


@pytest.fixture(scope="session")
def tok(real_tokenizer):
    return real_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, real_tokenizer):
    """A 4-layer random BERT body (no classifier head, like the MiniLM checkpoint) + tokenizer."""
    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(1234)  # not a seed the tests use for init="random"
    BertModel(tiny_config()).save_pretrained(path)
    real_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def other_vocab_dir(tmp_path_factory):
    """A tiny BERT with its own 12-token WordPiece vocabulary (a different tokenizer)."""
    path = tmp_path_factory.mktemp("other-vocab")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "film", "good", "bad", "a", "##s", "!"]
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    BertModel(tiny_config(vocab=len(words))).save_pretrained(path)
    return path
