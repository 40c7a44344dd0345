"""Teachers with their own tokenizer: next-token distillation across two vocabularies.

A teacher whose tokenizer differs from the student's reads the *same text* as the student,
tokenised its own way, and teaches at the positions where the two tokenisations agree.

Text. Every token id maps to the exact bytes it stands for (:func:`token_bytes`): byte-level
BPE pieces through GPT-2's byte alphabet (``Ġthe`` -> ``b" the"``), SentencePiece-style pieces
by ``▁`` -> space and ``<0xNN>`` -> that byte, added tokens by their text; special tokens
(EOS, BOS, pad, ...) have no bytes. A student row is cut into text runs and runs of special
tokens. Each text run is decoded to a string, tokenised by the teacher (no special tokens
added), and each run of specials becomes the teacher's own: its EOS where the student has an
EOS, then its BOS when the teacher's tokenizer starts documents with one (also at the row start).

Alignment rule. Positions live in one coordinate: characters of the text runs, and two units
per run of specials (end of document, start of the next). A token's *end* is where its text
ends; a piece that ends inside a character (a byte-level split of a multi-byte character) has
no end, and inside a run of specials only the last token ends the run (an EOS followed by a
BOS ends the first unit). Student position ``t`` predicts token ``t + 1`` after reading up to
``end(t)``; it is **aligned** with teacher position ``j`` when

* ``align="token"`` (default): ``end_T(j) == end_S(t)`` and ``end_T(j + 1) == end_S(t + 1)``:
  both read exactly the same text and their next tokens cover the same next text (the gold next
  token is the same string, an EOS standing for the end of the document on both sides);
* ``align="context"``: ``end_T(j) == end_S(t)`` only (same text read; next tokens may differ).

Unaligned positions get no loss from this teacher. ``"token"`` is the default: where the two
next tokens differ (``" unbeliev"`` vs ``" un"``) the teacher's mass sits on a split the
student's tokenizer never produces, which would pull against the student's own next-token loss.

Vocabulary. Token strings are matched exactly on their bytes, so ``Ġthe`` and ``▁the`` are
the same ``" the"`` (:func:`shared_vocab`); EOS and BOS match by role, other special tokens by
their text. The loss (``uld_hybrid``, :mod:`.cross_tokenizer_loss`) compares the teacher's
probability with the student's on these shared strings (forward KL, one bucket for the rest)
and handles the remainder with ULD (Boizard et al. 2024, the L1 distance of the sorted
probabilities), as GOLD's hybrid loss in TRL does. Why: exact matches keep token identity where
it exists (and make the loss plain forward KL when the tokenizers are the same), and ULD needs
no mapping for the rest. Not chosen: DSKD (Zhang et al. 2024) learns projections between the
two models' hidden spaces and cross-model attention to align tokens; it adds trained modules
and reads hidden states, which a top-k cache cannot serve.

The teacher's top-k at aligned positions is cached per student row on disk, keyed on the
teacher's weights, the split, and the teacher's own tokenisation (its tokenizer's fingerprint
and the alignment rule), one table per temperature, like :class:`~.teachers.LMTeacher`'s.

Modules: :mod:`.cross_tokenizer_align` (bytes, shared vocabulary, alignment),
:mod:`.cross_tokenizer_loss` (``uld_hybrid``), this one (the teacher); every public name is
importable from here, and importing this module registers ``uld_hybrid``.
"""


from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..engine.batches import output_logits
from ..engine.teacher_cache import sequential_loader
from ..engine.teachers import Teacher
from ..errors import AutoSKDError
from .cross_tokenizer_align import (ALIGN_RULES, AlignedRows, CrossTokenizerAligner, shared_vocab,  # noqa: F401
                                    token_bytes)
from .cross_tokenizer_loss import AlignedSet, AlignedTeacher, SharedVocab, uld_hybrid  # noqa: F401
from .teachers import LMTeacher
from .topk_cache import PAD_LOGPROB, TopKTable, check_dense_size

logger = logging.getLogger(__name__)

_LIVE_K = 256  # top_k=0 (live teacher): how many teacher tokens per position the loss sees

__all__ = ["ALIGN_RULES", "AlignedRows", "AlignedSet", "AlignedTeacher", "CrossTokenizerAligner",
           "CrossTokenizerTeacher", "SharedVocab", "shared_vocab", "token_bytes", "uld_hybrid"]


class CrossTokenizerTeacher(LMTeacher):
    """An LM teacher with its own tokenizer; ``features(batch, ["lm_logits"])`` gives an
    :class:`AlignedSet` (one :class:`AlignedTeacher` per temperature) for the ``uld_hybrid``
    distance. ``top_k`` teacher tokens per aligned position are kept (cached per split when
    prepared with a ``data_id``; 0: live, with the top ``256``)."""

    own_tokenizer = True

    def __init__(self, name, model, tokenizer, student_tokenizer, fingerprint: str | None = None, *,
                 top_k: int = 64, temperatures: Iterable[float] = (1.0,), cache=None, align: str = "token",
                 max_length: int | None = None, micro_batch: int = 4, dense_limit_bytes: int = 2 * 1024**3):
        super().__init__(name, model, fingerprint, top_k=top_k, temperatures=list(temperatures) or [1.0],
                         cache=cache, dense_limit_bytes=dense_limit_bytes)
        if max_length is None:
            config = getattr(Teacher.shape_model.fget(self), "config", None)
            max_length = getattr(config, "max_position_embeddings", None)
        self.tokenizer, self.student_tokenizer = tokenizer, student_tokenizer
        self.aligner = CrossTokenizerAligner(student_tokenizer, tokenizer, align, max_length)
        self.micro_batch = max(1, int(micro_batch))
        self.vocab = shared_vocab(student_tokenizer, tokenizer, teacher_size=self.vocab_size())
        self.stats: dict = {"vocab": self.vocab.share()}

    def vocab_size(self) -> int:
        model = Teacher.shape_model.fget(self)
        size = getattr(getattr(model, "config", None), "vocab_size", None)
        return int(size) if size else int(model.get_output_embeddings().weight.shape[0])

    def _k(self) -> int:
        return min(self.top_k if self.top_k > 0 else _LIVE_K, self.vocab_size())

    @torch.no_grad()
    def aligned_topk(self, batch: dict, k: int) -> tuple[dict, torch.Tensor]:
        """{tau: (ids, logprobs)} ``[B, T, k]`` at every student position (0 / ``PAD_LOGPROB`` where
        unaligned) and the aligned flags ``[B, T]``, on the CPU; the teacher runs in micro-batches."""
        rows = self.aligner.align(batch["input_ids"].cpu(), batch.get("attention_mask", None))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids, mask = rows.padded(pad)
        shape = (*rows.positions.shape, k)
        out = {tau: (torch.zeros(shape, dtype=torch.long), torch.full(shape, PAD_LOGPROB)) for tau in self.temperatures}
        device = next(self.model.parameters()).device
        for start in range(0, ids.shape[0], self.micro_batch):
            part = slice(start, start + self.micro_batch)
            logits = output_logits(self.model(input_ids=ids[part].to(device), attention_mask=mask[part].to(device)))
            pos = rows.positions[part]
            where = (pos >= 0).nonzero()
            # only the aligned teacher positions: one [n, V] row each, never the padded [B, T, V] softmax
            picked = logits[where[:, 0].to(device), pos[where[:, 0], where[:, 1]].to(device)]
            picked = picked[:, : self.vocab_size()].float()
            del logits
            for tau in self.temperatures:
                lp, top = torch.log_softmax(picked / tau, dim=-1).topk(k, dim=-1)
                rows_ids, rows_lp = out[tau]
                rows_ids[part][where[:, 0], where[:, 1]] = top.cpu()
                rows_lp[part][where[:, 0], where[:, 1]] = lp.cpu()
        return out, rows.positions >= 0

    def prepare(self, loader, data_id: str | None, cache=None, device="cpu", progress: bool = True) -> None:
        """One top-k table per temperature over the split's rows (from the cache when stored)."""
        if self.kept is not None:
            raise AutoSKDError(f"teacher {self.name!r} has its own tokenizer; vocabulary compression (GLMD "
                               "vocab_alpha < 1) slices a teacher that shares the student's; set vocab_alpha: 1")
        self.tables = {}
        if data_id is None or self.top_k <= 0:
            return
        k, n = self._k(), len(loader.dataset)
        if k == self.vocab_size():
            check_dense_size(n, len(loader.dataset[0]["input_ids"]), k, self.dense_limit_bytes)
        key = f"{data_id}|{self.aligner.key}"
        if self.topk_cache is not None:
            found = {tau: self.topk_cache.load(self.fingerprint, key, k, tau, expected_rows=n)
                     for tau in self.temperatures}
            if all(v is not None for v in found.values()):
                self.tables = found
                targets = getattr(loader.dataset, "target_ids", None)
                if targets is not None:
                    flags = next(iter(found.values())).logprobs[:, : targets.shape[1], 0] > PAD_LOGPROB / 2
                    counted = targets[:, : flags.shape[1]] != -100
                    self.stats["aligned_share"] = int((flags & counted).sum()) / max(1, int((targets != -100).sum()))
                return
        ids_rows, lp_rows = {tau: {} for tau in self.temperatures}, {tau: {} for tau in self.temperatures}
        counted = aligned = 0
        for batch in tqdm(sequential_loader(loader), desc=f"teacher {self.name} (own tokenizer) top-{k}",
                          disable=not progress, leave=False):
            out, flags = self.aligned_topk(batch, k)
            targets = batch["target_ids"] != -100 if "target_ids" in batch else batch["attention_mask"].bool()
            counted, aligned = counted + int(targets.sum()), aligned + int((targets & flags).sum())
            for tau, (ids, lp) in out.items():
                for i, r_ids, r_lp in zip(batch["idx"].tolist(), ids, lp):
                    ids_rows[tau][i], lp_rows[tau][i] = r_ids, r_lp
        self.stats["aligned_share"] = aligned / max(1, counted)  # of the positions with a target
        for tau in self.temperatures:
            width = max(v.shape[0] for v in ids_rows[tau].values())
            table_ids = torch.zeros(n, width, k, dtype=torch.int32)
            table_lp = torch.full((n, width, k), PAD_LOGPROB, dtype=torch.float16)
            for i in range(n):
                t = ids_rows[tau][i].shape[0]
                table_ids[i, :t], table_lp[i, :t] = ids_rows[tau][i], lp_rows[tau][i]
            table = TopKTable(ids=table_ids, logprobs=table_lp, temperature=float(tau), k=k)
            if self.topk_cache is not None:
                self.topk_cache.store(self.fingerprint, key, table)
            self.tables[tau] = table

    @torch.no_grad()
    def features(self, batch: dict, names: Iterable[str]) -> dict:
        names = set(names)
        if names - {"lm_logits"}:
            raise AutoSKDError(f"teacher {self.name!r} uses its own tokenizer, so its "
                               f"{', '.join(sorted(names - {'lm_logits'}))} do not line up with the student's tokens; "
                               "only next-token distillation (lm_logits with the uld_hybrid distance) can use it")
        device = batch["input_ids"].device
        if self.tables and "idx" in batch and not batch.get("on_policy"):
            length = batch["input_ids"].shape[1]
            by_tau = {}
            for tau, table in self.tables.items():
                top = table.rows(batch["idx"], length)
                flags = top.logprobs[..., 0] > PAD_LOGPROB / 2
                by_tau[tau] = AlignedTeacher(top.ids.to(device), top.logprobs.to(device), flags.to(device),
                                             self.vocab, tau)
            return {"lm_logits": AlignedSet(by_tau)}
        out, flags = self.aligned_topk(batch, self._k())
        return {"lm_logits": AlignedSet({tau: AlignedTeacher(ids.to(device), lp.to(device), flags.to(device),
                                                             self.vocab, tau) for tau, (ids, lp) in out.items()})}
