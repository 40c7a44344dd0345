"""What "better" means for a run: the metric the trainer scores dev with, and its direction.

Best-epoch restore, early stopping (ASHA) and the search all need one number per epoch and to
know whether higher or lower wins. A classifier is scored by accuracy (higher is better); a
language model by perplexity (lower is better). A task kind hands its :class:`Metric` to the
:class:`~autoskd.engine.trainer.Distiller`, so none of those callers reads ``dev_acc`` by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn
from torch.utils.data import DataLoader


@dataclass(frozen=True)
class Metric:
    """``evaluate(model, loader, device) -> {name: value, "loss": ..., ...}``; ``key`` is the name
    of the dev score in the run's history (``dev_acc``, ``dev_ppl``)."""

    name: str
    key: str
    higher_is_better: bool
    evaluate: Callable[[nn.Module, DataLoader, object], dict]

    def better(self, new: float, best: float | None) -> bool:
        """Whether ``new`` beats ``best`` (``None``: nothing scored yet)."""
        if best is None:
            return True
        return new > best if self.higher_is_better else new < best

    def score(self, scores: dict) -> float:
        return float(scores[self.name])


def accuracy_metric() -> Metric:
    """Classification: accuracy on dev, higher is better (the engine's default)."""
    from .trainer import evaluate

    return Metric("accuracy", "dev_acc", True, evaluate)
