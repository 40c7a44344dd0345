"""Small helpers for batches (dicts of tensors)."""

from __future__ import annotations

import torch

from ..data.collate import MODEL_INPUT_KEYS  # the batch keys a model's forward receives


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}


def output_logits(out):
    """The logits of a model's output: ``out.logits`` for a Hugging Face output, else ``out`` (a
    user's ``nn.Module`` that returns the logits tensor itself)."""
    return out.logits if hasattr(out, "logits") else out


def to_device(batch: dict, device: torch.device | str) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
