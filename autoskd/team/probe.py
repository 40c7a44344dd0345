"""Tokenizer probing: do two tokenizers cut text the same way, and how wide is a module's output?

Team members must agree on token ids for feature-level distillation (token positions are
compared one to one). Comparing vocab files is brittle (the same WordPiece vocab is shipped in
several formats), so members are compared by what matters: the vocabulary size and the ids
they give one probe sentence with punctuation, digits and a word that splits into pieces.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..engine.batches import output_logits
from ..errors import AutoSKDError

#: Sentence whose token ids must agree between team members' tokenizers.
PROBE_SENTENCE = "The film's unexpectedly moving finale, 2 hours in, won over 97% of critics!"


def tokenizer_fingerprint(tok) -> dict:
    """What a tokenizer contributes to a teacher's cache key."""
    return {"vocab": len(tok), "probe": list(tok(PROBE_SENTENCE)["input_ids"])}


def tokenizer_difference(other, reference) -> str | None:
    """Why ``other`` tokenises differently from ``reference`` (None when they agree)."""
    if len(other) != len(reference):
        return f"vocab {len(other)} vs {len(reference)}"
    if list(other(PROBE_SENTENCE)["input_ids"]) != list(reference(PROBE_SENTENCE)["input_ids"]):
        return "same vocab size but different token ids"
    return None


def first_param_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def probe_num_labels(module: nn.Module, tok: Any) -> int:
    """Output width of a module without a config, from one forward on the probe sentence."""
    device = first_param_device(module)
    batch = {k: v.to(device) for k, v in tok([PROBE_SENTENCE], return_tensors="pt").items()
             if k in ("input_ids", "attention_mask", "token_type_ids")}
    was_training = module.training
    module.eval()
    try:
        try:
            out = module(**batch)
        except TypeError:
            batch.pop("token_type_ids", None)
            out = module(**batch)
    except Exception as err:  # a user's module we cannot call: report, don't guess
        raise AutoSKDError(f"cannot run {type(module).__name__} on a tokenised batch ({type(err).__name__}: "
                           f"{str(err).splitlines()[0][:120] if str(err) else ''}); its forward must accept "
                           "input_ids and attention_mask and return logits") from err
    finally:
        module.train(was_training)
    logits = output_logits(out)
    if not torch.is_tensor(logits) or logits.dim() < 2:
        raise AutoSKDError(f"{type(module).__name__} must return logits [batch, labels] or an object "
                           "with .logits")
    return int(logits.shape[-1])
