"""Tiny random-init models for fast tests, and the benchmark scripts as importable modules."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from autoskd.engine.callbacks import Callback


def tiny_config(layers: int = 4, hidden: int = 32, vocab: int = 30522) -> BertConfig:
    return BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64)


def tiny_bert(tok, layers: int = 2, seed: int = 0, dropout: float = 0.1) -> BertForSequenceClassification:
    """A seeded 2-label tiny BERT classifier over ``tok``'s vocabulary."""
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


class OneClassTeacher(nn.Module):
    """The same answer, class 1 by ``margin``, whatever the input: a teacher no better than
    predicting one class. Its margin is its state, so each has its own teacher-cache entry."""

    def __init__(self, margin: float = 0.3):
        super().__init__()
        self.anchor = nn.Parameter(torch.tensor([0.0, margin]))

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return self.anchor.expand(input_ids.shape[0], 2)


class InterruptAt(Callback):
    """Simulates a kill: KeyboardInterrupt at the first step of ``epoch`` (after the previous
    epoch's checkpoint was written)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_step_begin(self, trainer, ctx, batch):
        if ctx.epoch == self.epoch:
            raise KeyboardInterrupt


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (the scripts are not a package; their own imports of
    ``_common`` need ``benchmarks/`` on the path)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # so pickle finds its functions (a process pool sends them by name)
    spec.loader.exec_module(mod)
    return mod
