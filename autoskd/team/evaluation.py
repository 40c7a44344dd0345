"""Scoring teachers on ``dev``: the number the team table shows and the search ranks them by."""

from __future__ import annotations

from torch import nn

from .probe import first_param_device


def dev_accuracy(model: nn.Module, dev_tok, tokenizer) -> float:
    """Accuracy of ``model`` on a tokenised dev split (through the engine's ``evaluate``)."""
    from ..data.collate import make_loader
    from ..engine.trainer import evaluate

    loader = make_loader(dev_tok, tokenizer, batch_size=64, shuffle=False)
    return evaluate(model, loader, first_param_device(model))["accuracy"]
