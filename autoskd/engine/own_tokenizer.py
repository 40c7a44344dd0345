"""Teachers with their own tokenizer (a RoBERTa or MPNet teacher beside a BERT student).

Logit-level methods only compare one vector per example, so such a teacher can take part:
:class:`OwnTokenizerTeacher` reads the raw texts of the split it is asked about (every
:class:`~autoskd.data.collate.TokenizedSplit` keeps them beside its token ids), tokenises them
itself and returns its logits by ``idx`` -- from the on-disk cache when the split has a
``data_id`` (keyed by the teacher, its tokenizer and the data), else computed once per split.
Feature-level methods compare token positions, which do not line up across tokenizers: they
refuse such a teacher before training (:func:`check_logit_level`), in one line that says why.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import torch

from ..errors import AutoSKDError
from .batches import output_logits
from .teacher_cache import loader_rows
from .teachers import Teacher

LOGIT_LEVEL = "kd, pd, annealing_kd, continuation_kd, takd, tmkd, uncertainty, dgkd, rl_kd (warm-up), AutoSKD's search"


class OwnTokenizerTeacher(Teacher):
    """A frozen teacher that tokenises each row's text itself.

    The texts come from the split's loader (``loader.dataset.texts``); ``texts``/``pairs``
    (the training split's, in ``idx`` order) serve batches from a loader without them."""

    def __init__(self, name: str, model, tokenizer, texts: Sequence[str] | None = None, max_length: int = 128,
                 pairs: Sequence[str] | None = None, fingerprint: str | None = None):
        super().__init__(name, model, fingerprint)
        self.tokenizer, self.max_length = tokenizer, max_length
        self.texts = list(texts) if texts is not None else None
        self.pairs = list(pairs) if pairs is not None else None

    @property
    def fingerprint(self) -> str:  # the tokenizer is part of what the cached logits depend on
        vocab = hashlib.sha256(repr(sorted(self.tokenizer.get_vocab().items())).encode()).hexdigest()[:12]
        return f"{super().fingerprint}-tok{vocab}-L{self.max_length}"

    @torch.no_grad()
    def _logits(self, first: list[str], second: list[str] | None, device) -> torch.Tensor:
        enc = self.tokenizer(first, second, truncation=True, max_length=self.max_length, padding=True,
                             return_tensors="pt")
        inputs = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        model = self.model
        if "token_type_ids" in inputs and "token_type_ids" not in model.forward.__code__.co_varnames:
            inputs.pop("token_type_ids")
        out = model(**inputs)
        return output_logits(out).float()

    def _split_texts(self, loader) -> tuple[list[str], list[str] | None, list[int]]:
        """(texts, pairs, idx) of the loader's rows, in dataset order."""
        ds = loader.dataset
        texts = getattr(ds, "texts", None)
        pairs = getattr(ds, "pairs", None)
        n = len(ds)
        idx = list(ds.columns["idx"]) if hasattr(ds, "columns") and "idx" in ds.columns else list(range(n))
        if texts is None:
            if self.texts is None or n > len(self.texts):
                raise AutoSKDError(f"teacher {self.name!r} tokenises text itself but the split's loader carries no "
                                   "texts; build it with autoskd.data.collate.tokenize_split")
            return [self.texts[i] for i in idx], [self.pairs[i] for i in idx] if self.pairs else None, idx
        return list(texts), list(pairs) if pairs is not None else None, idx

    def _table(self, loader, device) -> torch.Tensor:
        texts, pairs, idx = self._split_texts(loader)
        rows = torch.cat([self._logits(texts[s:s + 64], pairs[s:s + 64] if pairs else None, device).cpu()
                          for s in range(0, len(texts), 64)])
        table = torch.empty_like(rows)
        table[torch.tensor(idx)] = rows
        return table

    def logits_for(self, loader, data_id, cache, device="cpu", progress=True) -> torch.Tensor:
        if cache is None or data_id is None:
            return self._table(loader, device)
        table = cache.load(self.fingerprint, data_id, loader_rows(loader), self.num_classes)  # a wrong shape: rebuilt
        if table is None:
            table = self._table(loader, device)
            cache.store(self.fingerprint, data_id, table)
        return table

    def prepare(self, loader, data_id, cache, device="cpu", progress=True) -> None:
        """Unlike a shared-tokenizer teacher, always hold a table: a batch has token ids of
        the student's tokenizer only, so this teacher answers from its own pass over the texts."""
        has_texts = getattr(loader.dataset, "texts", None) is not None or self.texts is not None
        self.logits_table = self.logits_for(loader, data_id, cache, device, progress) if has_texts else None

    def features(self, batch: dict, names: Iterable[str]) -> dict[str, torch.Tensor]:
        names = set(names)
        if names - {"logits"}:
            raise AutoSKDError(
                f"teacher {self.name!r} uses its own tokenizer, so its {', '.join(sorted(names - {'logits'}))} "
                f"features do not line up with the student's tokens; use a logit-level method ({LOGIT_LEVEL})")
        if self.logits_table is not None:
            idx = batch["idx"].to(self.logits_table.device)
            return {"logits": self.logits_table.index_select(0, idx).to(batch["input_ids"].device)}
        if self.texts is None:
            raise AutoSKDError(f"teacher {self.name!r} tokenises text itself and has no texts for this batch; "
                               "prepare it on the split first (Teacher.prepare)")
        idx = batch["idx"].tolist()
        return {"logits": self._logits([self.texts[i] for i in idx],
                                       [self.pairs[i] for i in idx] if self.pairs else None,
                                       batch["input_ids"].device)}


def teacher_feature_kinds(method) -> set[str]:
    """The teacher features a method compares (``logits``, ``hidden``, ...), over its parts."""
    parts = getattr(method, "methods", None)
    if isinstance(parts, dict):  # a combination: each part's own features
        return set().union(*(teacher_feature_kinds(m) for m in parts.values()))
    kinds = {loss.teacher.split(":")[0] for loss in method.spec.losses}
    if method.spec.extra.get("needs_teacher_modules"):
        kinds.add("layers")
    return kinds


def check_logit_level(method, own: Iterable[str]) -> None:
    """Refuse, before any training, a method that compares token-level features of a teacher
    with its own tokenizer (its token positions do not line up with the student's)."""
    own = list(own)
    kinds = sorted(teacher_feature_kinds(method) - {"logits"})
    if own and kinds:
        raise AutoSKDError(
            f"method {method.spec.name!r} compares the teacher's {', '.join(kinds)} token by token, but teacher "
            f"{own[0]!r} uses its own tokenizer, so its tokens do not line up with the student's; use a logit-level "
            f"method ({LOGIT_LEVEL}) or a teacher that shares the student's tokenizer")


def team_teacher(team, name: str, model, fingerprint: str | None = None, max_length: int | None = None) -> Teacher:
    """The engine teacher for team member ``name``: it tokenises text itself when the team says
    it has its own tokenizer (``team.own_tokenizers``), else it reads the student's batches."""
    own = getattr(team, "own_tokenizers", None) or {}
    if name in own:
        return OwnTokenizerTeacher(name, model, own[name], max_length=max_length or team.max_length,
                                   fingerprint=fingerprint)
    return Teacher(name, model, fingerprint)
