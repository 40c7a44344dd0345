"""Training defaults, one per hyperparameter.

A student's distillation (``autoskd distill``, a search's trials, a stage plan's entries, the
engine's :class:`~autoskd.engine.trainer.Stage`) and a teacher's fine-tuning (a team YAML's
``finetune``) all train with AdamW under a linear warm-up and decay; when the user names no
value they start from these, so a setting left out means the same everywhere. 1e-4 suits the
small students and few-layer teachers this package trains (the bundled teams fine-tune their
teachers at 2e-4 to 5e-4); a full-size BERT teacher wants its own ``finetune.lr`` (2e-5 to 5e-5).
"""

from __future__ import annotations

#: AdamW's peak learning rate of a training stage.
DEFAULT_LR = 1e-4
#: The fraction of a stage's optimiser steps spent warming the learning rate up from 0.
DEFAULT_WARMUP_RATIO = 0.1
#: AdamW's decoupled weight decay (not applied to biases and LayerNorm weights).
DEFAULT_WEIGHT_DECAY = 0.01
#: Training rows per batch.
DEFAULT_BATCH_SIZE = 32

__all__ = ["DEFAULT_LR", "DEFAULT_WARMUP_RATIO", "DEFAULT_WEIGHT_DECAY", "DEFAULT_BATCH_SIZE"]
