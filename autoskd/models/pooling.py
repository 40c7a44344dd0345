"""How a classifier's head pools a row into one vector, read from the checkpoint, and the code a
saved mean-pooled model reloads with.

A sentence-transformers checkpoint (all-MiniLM-L6-v2) was trained to average its tokens; its
[CLS] pooler was never trained. :func:`checkpoint_pooling` reads which one a checkpoint uses,
:class:`MeanPooler` is the averaging head (:func:`~autoskd.models.loading.use_mean_pooling`
fits it), and :func:`write_pooling_code` makes a saved copy reload with it through transformers'
remote code. Why it matters: ``autoskd/models/loading.py``'s module doc.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: ``cls``: the checkpoint's own [CLS] pooler; ``mean``: the average of the real tokens
POOLING_CHOICES = ("cls", "mean")


class MeanPooler(nn.Module):
    """Mean of the last hidden states over the real tokens of each row: the sentence vector a
    sentence-transformers checkpoint was trained to produce, in place of BERT's [CLS] pooler
    (whose dense layer such a checkpoint never trained). The encoder's ``attention_mask`` reaches
    it through :meth:`capture_mask`, a forward pre-hook on the encoder (the pooler itself is
    called with the hidden states only); without a mask every position counts."""

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def capture_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        self.mask = args[1] if mask is None and len(args) > 1 else mask

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = self.mask
        if mask is None or mask.dim() != 2 or tuple(mask.shape) != tuple(hidden_states.shape[:2]):
            return hidden_states.mean(1)
        weights = mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def _checkpoint_file(resolved: str, name: str) -> Path | None:
    """``name`` inside a local folder, or inside a hub model already in the local cache (never
    downloaded: a checkpoint read offline pools the same way as online)."""
    path = Path(resolved) / name
    if Path(resolved).is_dir():
        return path if path.is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(resolved, name)
    except Exception:  # noqa: BLE001 - not a repo id: nothing cached
        return None
    return Path(found) if isinstance(found, (str, os.PathLike)) else None


def checkpoint_pooling(resolved: str, config: Any = None) -> str:
    """How the checkpoint at ``resolved`` pools a row into one vector: ``classifier_pooling`` of
    its config when set (a model autoskd saved), else ``mean`` for a sentence-transformers
    checkpoint whose ``Pooling`` module averages the tokens and nothing else (``modules.json``
    -> ``<path>/config.json``: ``pooling_mode_mean_tokens`` only), else ``cls``."""
    import json

    recorded = getattr(config, "classifier_pooling", None)
    if recorded in POOLING_CHOICES:
        return recorded
    modules_file = _checkpoint_file(resolved, "modules.json")
    if modules_file is None:
        return "cls"
    try:
        modules = json.loads(modules_file.read_text())
        pooling = next((m for m in modules if str(m.get("type", "")).endswith("models.Pooling")), None)
        if pooling is None:
            return "cls"
        pool_file = _checkpoint_file(resolved, f"{pooling.get('path', '')}/config.json".lstrip("/"))
        modes = json.loads(pool_file.read_text()) if pool_file is not None else {}
    except (OSError, ValueError, AttributeError, TypeError):
        return "cls"
    on = {k for k, v in modes.items() if k.startswith("pooling_mode_") and v is True}
    return "mean" if on == {"pooling_mode_mean_tokens"} else "cls"


#: The module ``save_student`` writes beside a mean-pooled model's weights (transformers' remote code).
POOLING_CODE_FILE = "modeling_autoskd_pooling.py"
_POOLED_CLASS = "BertMeanPooledForSequenceClassification"


def write_pooling_code(out_dir: str | os.PathLike) -> Path:
    """Make a saved mean-pooled BERT classifier reload with its head through transformers: the
    :class:`MeanPooler` code in :data:`POOLING_CODE_FILE` and ``auto_map`` in ``config.json``, so
    ``AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)``
    builds the same model (the code imports only torch and transformers)."""
    import inspect
    import json

    out = Path(out_dir)
    code = "\n".join([
        '"""Written by autoskd: a BERT sequence classifier whose head is the mean of the last hidden states',
        "over real tokens (how a sentence-transformers checkpoint pools), in place of the [CLS] pooler.",
        'Load with AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)."""',
        "", "from __future__ import annotations", "", "import torch", "from torch import nn", "from transformers import BertForSequenceClassification",
        "", "", inspect.getsource(MeanPooler), "",
        f"class {_POOLED_CLASS}(BertForSequenceClassification):",
        "    def __init__(self, config):",
        "        super().__init__(config)",
        "        pooler = MeanPooler()",
        "        self.bert.pooler = pooler",
        "        self.bert.register_forward_pre_hook(pooler.capture_mask, with_kwargs=True)", ""])
    (out / POOLING_CODE_FILE).write_text(code)
    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": f"{POOLING_CODE_FILE[:-3]}.{_POOLED_CLASS}"}
    config["classifier_pooling"] = "mean"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out / POOLING_CODE_FILE
