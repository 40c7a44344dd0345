"""Scoring a language model: perplexity, agreement with a teacher, and a few greedy samples.

Perplexity is token-weighted (exp of the summed next-token cross-entropy over the number of
target tokens of the whole split), not a mean of per-batch perplexities, so batches with more
tokens count more, as they should.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from ..engine.batches import output_logits, to_device
from ..engine.metrics import Metric
from ..errors import AutoSKDError


def _logits(model: nn.Module, batch: dict) -> torch.Tensor:
    return output_logits(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))


@torch.no_grad()
def evaluate_lm(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu") -> dict:
    """``{"perplexity", "loss" (mean CE per target token), "tokens"}`` over ``loader``."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for batch in loader:
        batch = to_device(batch, device)
        logits = _logits(model, batch)
        targets = batch["target_ids"]
        total += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                       ignore_index=-100, reduction="sum"))
        tokens += int((targets != -100).sum())
    model.train(was_training)
    if tokens == 0:
        raise AutoSKDError("evaluation data has no target tokens; check the dev/test split is not empty")
    loss = total / tokens
    return {"perplexity": math.exp(min(loss, 700.0)), "loss": loss, "tokens": tokens}


def perplexity_metric() -> Metric:
    """Language modelling: dev perplexity, lower is better."""
    return Metric("perplexity", "dev_ppl", False, evaluate_lm)


@torch.no_grad()
def top1_agreement(student: nn.Module, teacher: nn.Module, loader: DataLoader,
                   device: torch.device | str = "cpu") -> float:
    """Share of target positions where the student's most likely next token is the teacher's."""
    agree, tokens = 0, 0
    for model in (student, teacher):
        model.eval()
    for batch in loader:
        batch = to_device(batch, device)
        mask = batch["target_ids"] != -100
        s, t = _logits(student, batch), _logits(teacher, batch)
        v = min(s.shape[-1], t.shape[-1])  # a teacher may carry padding rows past the vocabulary
        s, t = s[..., :v].argmax(-1), t[..., :v].argmax(-1)
        agree += int(((s == t) & mask).sum())
        tokens += int(mask.sum())
    return agree / max(tokens, 1)


@torch.no_grad()
def greedy_samples(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 24,
                   device: torch.device | str = "cpu", vocab=None) -> list[dict]:
    """``[{"prompt", "continuation"}]``: what the model writes after each prompt (greedy).
    ``vocab`` (a GLMD-compressed student): ids are mapped in, and the written ids back out."""
    from .generation import continue_prompts

    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
        if vocab is not None:
            ids = vocab.remap(ids)
        eos = getattr(model.config, "eos_token_id", None) if hasattr(model, "config") else None
        eos = eos[0] if isinstance(eos, list) else eos
        written, mask, _ = continue_prompts(model, ids, max_new_tokens, eos, pad_id=eos if eos is not None else 0)
        new = written[0, ids.shape[1]:][mask[0, ids.shape[1]:].bool()]
        if vocab is not None:
            new = vocab.kept.to(new.device)[new]
        out.append({"prompt": prompt, "continuation": tokenizer.decode(new, skip_special_tokens=True)})
    return out
