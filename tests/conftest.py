"""Fixtures shared by the test files: the real MiniLM tokenizer and tiny random BERTs saved
as local checkpoints (so nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import BertModel, BertTokenizer

from autoskd.models.loading import load_tokenizer
from helpers import tiny_bert, tiny_config


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


SENTIMENT_WORDS = ["movie", "film", "story", "plot", "cast", "scene", "actor", "script"]


@pytest.fixture(scope="module")
def sentiment_csv(tmp_path_factory) -> Path:
    """A task a tiny model learns: the label is whether the text says 'good' or 'bad'."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(480):
        label = i % 2
        words = [SENTIMENT_WORDS[int(j)] for j in torch.randint(len(SENTIMENT_WORDS), (3,), generator=gen)]
        rows.append({"text": f"{'good' if label else 'bad'} {' '.join(words)}", "label": label})
    path = tmp_path_factory.mktemp("data") / "sentiment.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture()
def tiny_team_yaml(real_tokenizer, tmp_path) -> Path:
    """A two-teacher team (random 1- and 2-layer tiny BERTs, fine-tuned by the team build) and a
    1-layer random student, as local checkpoints: a whole search runs in seconds."""
    models = tmp_path / "models"
    for name, layers in (("t1", 1), ("t2", 2)):
        tiny_bert(real_tokenizer, layers, seed=layers).save_pretrained(models / name)
        real_tokenizer.save_pretrained(models / name)
    team = {"name": "tiny", "student": {"source": str(models / "t1"), "layers": 1, "init": "random"},
            "teachers": [{"name": f"T{k}", "source": str(models / f"t{k}"),
                          "finetune": {"epochs": 2, "lr": 3e-3, "batch_size": 16}} for k in (1, 2)],
            "max_length": 16}
    path = tmp_path / "team.yaml"
    path.write_text(yaml.safe_dump(team))
    return path
