"""A frozen causal-LM teacher whose next-token distributions come from a top-k cache.

A teacher forward over the training split is the same every epoch, in every arm and trial, so
it is run once per (weights, tokenised split, temperature) and its top-k next-token
distribution stored (:mod:`.topk_cache`). A method's loss terms may read the teacher at more
than one temperature (GLMD: 15 in its first stage, 1 in its second), so the teacher keeps one
table per temperature and hands the loss a :class:`TopKSet`; the loss picks the table made at
its own temperature. A term on other per-token features (DistilBERT's cosine on the last hidden
state) reads them from the teacher's outputs kept per row after one in-order pass over the split
(:class:`~autoskd.engine.teachers.TeacherRows`, logits left to the cache), so such a method runs
no teacher forward in its steps either. Batches neither can serve (on-policy text the student
just wrote, attention features, a partitioned teacher's other features) run the teacher live.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch.utils.data import DataLoader

from ..engine.teachers import AverageTeachers, SampledTeacher, Teacher, TeacherRows, theta_logit_scale
from ..errors import AutoSKDError
from .topk_cache import TopKCache, TopKTable, check_dense_size, compute_topk_table


class TopKSet:
    """The teacher's cached top-k rows of one batch, one :class:`TopK` per temperature."""

    def __init__(self, by_temperature: dict):
        self.by_temperature = by_temperature

    def at(self, temperature: float):
        for tau, rows in self.by_temperature.items():
            if abs(tau - temperature) < 1e-6:
                return rows
        have = ", ".join(f"{t:g}" for t in self.by_temperature)
        raise AutoSKDError(f"the teacher cache holds temperatures {have}, not {temperature:g}; a loss term's "
                           "temperature changed after the cache was planned (temperature schedules need top_k=0)")


class LMTeacher(Teacher):
    """``top_k`` > 0: cache that many tokens per position (``top_k`` >= the vocabulary: the
    exact dense distribution, refused past ``dense_limit_bytes``); 0: run the teacher live."""

    def __init__(self, name, model, fingerprint: str | None = None, *, top_k: int = 64,
                 temperatures: Iterable[float] = (), cache: TopKCache | None = None,
                 dense_limit_bytes: int = 2 * 1024**3):
        super().__init__(name, model, fingerprint)
        self.top_k = int(top_k)
        self.temperatures = sorted({float(t) for t in temperatures})
        self.topk_cache = cache
        self.dense_limit_bytes = dense_limit_bytes
        self.tables: dict[float, TopKTable] = {}
        #: GLMD vocabulary compression: the kept token ids; the cache then holds the teacher's
        #: distribution over the kept tokens only, in their new order (:mod:`.vocab`).
        self.kept: torch.Tensor | None = None

    def vocab_size(self) -> int:
        config = getattr(self.shape_model, "config", None)
        size = getattr(config, "vocab_size", None)
        return int(size) if size else int(self.model.get_output_embeddings().weight.shape[0])

    def prepare(self, loader: DataLoader, data_id: str | None, cache=None, device="cpu", progress: bool = True) -> None:
        """Top-k tables of this split at every temperature the method reads (none: live teacher),
        and a per-row store of its other per-token features, filled on the first step that asks.
        A partitioned teacher (ZeRO-3, tensor parallel) keeps no rows: its ranks compute in
        lockstep, and a row one rank served while another ran live would stall the gather."""
        self.tables = self.tables_for(loader, data_id, device=device, progress=progress)
        if data_id is None or not self.tables or self._partitioned():
            self.rows = None
        elif self.rows is None or self._rows_id != data_id:
            self.rows = TeacherRows(loader, keep_logits=False)
        self._rows_id = data_id

    def _partitioned(self) -> bool:
        if not self.loaded:  # partitioning loads a teacher: one not loaded yet is whole
            return False
        from ..engine.backends import is_dtensor

        return any(hasattr(p, "ds_id") or is_dtensor(p) for p in self.model.parameters())

    def tables_for(self, loader: DataLoader, data_id: str | None, device="cpu", progress: bool = True) -> dict:
        """``{temperature: TopKTable}`` of one split (cached), without changing the split the
        teacher serves training batches from (the AutoSKD θ step reads the val split's too).
        Empty when the teacher runs live."""
        if data_id is None or self.top_k <= 0 or not self.temperatures:
            return {}
        vocab = self.vocab_size()
        k = min(self.top_k, vocab)
        if k == vocab:  # the dense distribution, stored exactly: refuse it past the size limit
            sample = loader.dataset[0]["input_ids"]
            check_dense_size(len(loader.dataset), len(sample), vocab, self.dense_limit_bytes)
        fingerprint = self.fingerprint
        if self.kept is not None:
            k = min(k, int(self.kept.numel()))
            fingerprint = f"{fingerprint}|kept-{hash(tuple(self.kept.tolist()))}"

        def model():  # read only to compute a table: a lazily held teacher served by the cache never loads
            from .vocab import SlicedLogits

            return SlicedLogits(self.model, self.kept) if self.kept is not None else self.model

        tables = {}
        for tau in self.temperatures:
            desc = f"teacher {self.name} top-{k} (tau {tau:g})"
            if self.topk_cache is None:
                tables[tau] = compute_topk_table(model(), loader, k, tau, device, progress, desc=desc)
                continue
            tables[tau] = self.topk_cache.load(fingerprint, data_id, k, tau, expected_rows=len(loader.dataset))
            if tables[tau] is None:
                tables[tau] = self.topk_cache.get_or_compute(fingerprint, data_id, model(), loader, k,
                                                             tau, device=device, progress=progress)
        return tables

    @staticmethod
    def rows_of(tables: dict, batch: dict) -> "TopKSet":
        """The cached rows of ``batch`` (its ``idx``) from ``tables``, trimmed to its length."""
        idx = batch["idx"]
        length = batch["input_ids"].shape[1]  # a padded batch is trimmed to its longest row
        return TopKSet({tau: table.rows(idx, length).to(batch["input_ids"].device) for tau, table in tables.items()})

    @torch.no_grad()
    def features(self, batch: dict, names: Iterable[str]) -> dict:
        names = list(names)
        if not (self.tables and "lm_logits" in names and "idx" in batch and not batch.get("on_policy")):
            return super().features(batch, names)
        others = [n for n in names if n != "lm_logits"]
        if others and self.rows is None:  # a partitioned teacher: one live forward serves them all
            return super().features(batch, names)
        out = super().features(batch, others) if others else {}  # from the kept rows (or live)
        out["lm_logits"] = self.rows_of(self.tables, batch)
        return out


def average_topk(parts: list, vocab_size: int, weights=None):
    """The probability-space mean of sparse teacher distributions: each id of the union gets the
    mean of its probabilities (0 where a teacher's top-k lacks it), so the tail of the mean is the
    mean of the tails and the result is again a proper (k'+1)-bucket distribution. ``weights``
    (summing to 1; default equal) makes it a θ-mixture."""
    from ..engine.token_losses import TopK

    n = len(parts)
    weights = [1.0 / n] * n if weights is None else [float(w) for w in weights]
    lead = parts[0].ids.shape[:-1]
    ids = torch.cat([p.ids.reshape(-1, p.k) for p in parts], -1)
    probs = torch.cat([p.logprobs.reshape(-1, p.k).float().exp() * w for p, w in zip(parts, weights)], -1)
    dense = torch.zeros(ids.shape[0], vocab_size, dtype=torch.float32, device=ids.device)
    dense.scatter_add_(1, ids, probs)
    values, union = dense.topk(min(ids.shape[-1], vocab_size), dim=-1)  # the whole union (zeros past its size)
    logprobs = values.clamp_min(torch.finfo(torch.float32).tiny).log()
    return TopK(union.reshape(*lead, -1), logprobs.reshape(*lead, -1), parts[0].temperature)


class AverageLMTeachers(AverageTeachers):
    """AvgKD for language models: the student learns the mean of the teachers' next-token
    *distributions* (averaging logits, as for a classifier, would weight a confident teacher more)."""

    def features(self, name: str, batch: dict, names: Iterable[str]) -> dict:
        if set(names) - {"lm_logits"}:
            raise AutoSKDError("AvgKD averages next-token distributions only; use a next-token method such as kd")
        parts = [t.features(batch, ["lm_logits"])["lm_logits"] for t in self.teachers.values()]
        vocab = max(t.vocab_size() for t in self.teachers.values())
        return {"lm_logits": mixture_of(parts, [1.0 / len(parts)] * len(parts), vocab)}


def mixture_of(parts: list, weights: list[float], vocab_size: int):
    """``Σ w_j p_j`` of next-token distributions: sparse (TopKSet) or dense logits (returned as
    the mixture's log-probabilities, a valid logits tensor)."""
    if all(isinstance(p, TopKSet) for p in parts):
        return TopKSet({tau: average_topk([p.at(tau) for p in parts], vocab_size, weights)
                        for tau in parts[0].by_temperature})
    if any(isinstance(p, TopKSet) for p in parts):
        raise AutoSKDError("a mixture of teachers needs every teacher cached or every teacher live; set top_k for all")
    vocab = min(p.shape[-1] for p in parts)
    logp = torch.stack([torch.log_softmax(p[..., :vocab].float(), -1) + math.log(max(w, 1e-30))
                        for p, w in zip(parts, weights)])
    return torch.logsumexp(logp, 0)


def tempered(part, scale, vocab_size: int):
    """A teacher's next-token distribution with its logits scaled by ``scale`` (SSWO)."""
    from ..engine.token_losses import temper_topk

    if isinstance(part, TopKSet):
        return TopKSet({tau: temper_topk(rows, scale, vocab_size) for tau, rows in part.by_temperature.items()})
    return part * torch.as_tensor(scale).to(part.dtype)


class SampledLMTeachers(SampledTeacher):
    """AutoSKD's sampled teacher for language models: each step draws teacher i ~ Cat(θ); SSWO's
    θ-scaling (``scaling`` other than ``none``) tempers its next-token distribution (logits times
    the scale: :func:`tempered`); the CR search's mixture is the θ-weighted mixture of the
    teachers' *distributions*, as AvgKD for LMs averages them (:class:`AverageLMTeachers`)."""

    def vocab_size(self) -> int:
        return max(t.vocab_size() for t in self.teachers.values())

    def features(self, name: str, batch: dict, names: Iterable[str]) -> dict:
        names = list(names)
        if name == self.MIXTURE:
            if set(names) - {"lm_logits"}:
                raise AutoSKDError("the CR search mixes next-token distributions only; use a next-token method such as kd")
            theta = self.theta.detach().double()
            live = [j for j in range(len(self.names)) if float(theta[j]) > 0]
            if not live:
                raise AutoSKDError("the teacher distribution has no positive weight; nothing to distil from")
            parts = [self.teachers[self.names[j]].features(batch, ["lm_logits"])["lm_logits"] for j in live]
            weights = (theta[live] / theta[live].sum()).tolist()
            return {"lm_logits": mixture_of(parts, weights, self.vocab_size())}
        feats = dict(self.teachers[name].features(batch, names))
        if self.scaling != "none" and "lm_logits" in feats:
            scale = theta_logit_scale(self.theta.detach(), self.names.index(name), self.scaling)
            feats["lm_logits"] = tempered(feats["lm_logits"], scale.float(), self.vocab_size())
        return feats
