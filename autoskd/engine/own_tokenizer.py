"""Teachers with their own tokenizer (a RoBERTa or MPNet teacher beside a BERT student).

Logit-level methods only compare one vector per example, so such a teacher can take part:
:class:`OwnTokenizerTeacher` keeps the example texts of the training split (by ``idx``, the
key every batch carries), tokenises them itself and returns its logits -- from the on-disk
cache when the split has a ``data_id`` (keyed by the teacher, its tokenizer and the data),
else by a forward on the fly. Feature-level methods compare token positions, which do not
line up across tokenizers: asking such a teacher for any other feature fails in one line.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import torch
from torch import nn

from ..errors import AutoSKDError
from .teachers import Teacher

LOGIT_LEVEL = "kd, pd, annealing_kd, continuation_kd, takd, tmkd, uncertainty, dgkd, rl_kd (warm-up), AutoSKD's search"


class OwnTokenizerTeacher(Teacher):
    """A frozen teacher that tokenises ``texts[idx]`` itself (``texts``: the training split's
    texts in ``idx`` order; ``pairs``: second texts for sentence-pair tasks)."""

    def __init__(self, name: str, model: nn.Module, tokenizer, texts: Sequence[str], max_length: int = 128,
                 pairs: Sequence[str] | None = None, fingerprint: str | None = None):
        super().__init__(name, model, fingerprint)
        self.tokenizer, self.texts, self.pairs, self.max_length = tokenizer, list(texts), pairs, max_length

    @property
    def fingerprint(self) -> str:  # the tokenizer is part of what the cached logits depend on
        vocab = hashlib.sha256(repr(sorted(self.tokenizer.get_vocab().items())).encode()).hexdigest()[:12]
        return f"{super().fingerprint}-tok{vocab}-L{self.max_length}"

    def _encode(self, idx: Iterable[int]) -> dict:
        idx = list(idx)
        first = [self.texts[i] for i in idx]
        second = [self.pairs[i] for i in idx] if self.pairs is not None else None
        enc = self.tokenizer(first, second, truncation=True, max_length=self.max_length, padding=True,
                             return_tensors="pt")
        accepted = ("input_ids", "attention_mask", "token_type_ids")
        return {k: v for k, v in enc.items() if k in accepted}

    @torch.no_grad()
    def _logits(self, idx: list[int], device) -> torch.Tensor:
        inputs = {k: v.to(device) for k, v in self._encode(idx).items()}
        if "token_type_ids" in inputs and "token_type_ids" not in self.model.forward.__code__.co_varnames:
            inputs.pop("token_type_ids")
        out = self.model(**inputs)
        return (out.logits if hasattr(out, "logits") else out).float()

    def logits_for(self, loader, data_id, cache, device="cpu", progress=True) -> torch.Tensor:
        n = len(loader.dataset)
        if n > len(self.texts):
            raise AutoSKDError(f"teacher {self.name!r} has texts for {len(self.texts)} examples but the split has {n}")
        compute = lambda: torch.cat([self._logits(list(range(s, min(n, s + 64))), device).cpu()  # noqa: E731
                                     for s in range(0, n, 64)])
        if cache is None or data_id is None:
            return compute()
        table = cache.load(self.fingerprint, data_id)
        if table is None:
            table = compute()
            cache.store(self.fingerprint, data_id, table)
        return table

    def features(self, batch: dict, names: Iterable[str]) -> dict[str, torch.Tensor]:
        names = set(names)
        if names - {"logits"}:
            raise AutoSKDError(
                f"teacher {self.name!r} uses its own tokenizer, so its {', '.join(sorted(names - {'logits'}))} "
                f"features do not line up with the student's tokens; use a logit-level method ({LOGIT_LEVEL})")
        if self.logits_table is not None:
            idx = batch["idx"].to(self.logits_table.device)
            return {"logits": self.logits_table.index_select(0, idx).to(batch["input_ids"].device)}
        return {"logits": self._logits(batch["idx"].tolist(), batch["input_ids"].device)}
