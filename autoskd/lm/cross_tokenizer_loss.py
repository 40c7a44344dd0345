"""``uld_hybrid``: the token-level distance for a teacher whose tokenizer is not the student's.

The teacher side is an :class:`AlignedTeacher` (built by
:class:`~autoskd.lm.cross_tokenizer.CrossTokenizerTeacher`): for every student position, the
teacher's top-k next-token log-probabilities at the teacher position that read the same text,
a flag saying whether such a position exists, and the :class:`SharedVocab` that maps teacher
token ids to student token ids of the same string. At each aligned, counted position the loss
is

    shared_weight * tau^2 * KL(p_T || p_S) over the buckets {shared tokens of the teacher's
        top-k, mapped to the student's ids} + one bucket for the rest of each distribution
  + uld_weight * sum_i |sort_desc(p_T on its unshared top-k)_i - sort_desc(p_S on its unshared
        tokens, top uld_k)_i|            (ULD, Boizard et al. 2024, zero-padded to one length)

averaged over the positions that are both counted (``mask``) and aligned. The first term keeps
token identity where the two vocabularies agree; the second needs no mapping for the rest (it
compares the shapes of the two remainders), as the hybrid loss of GOLD (TRL) does. With the
same tokenizer on both sides every token is shared, the ULD term is exactly 0 and the loss is
``forward_kl`` on a top-k cache (``k + 1`` buckets). A plain ``TopK`` or dense-logits teacher
(one sharing the student's tokenizer, e.g. in a team that mixes tokenizers) is accepted and
gets exactly that: ``shared_weight * forward_kl``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..engine.losses import DISTANCES
from ..engine.token_losses import FILL_LOGIT, LOG_TINY, TopK, scaled_logits, forward_kl
from ..errors import AutoSKDError

_TINY = torch.finfo(torch.float32).tiny
_LOG_REST = math.log(1e-7)


@dataclass
class SharedVocab:
    """Exact string matches between two vocabularies: ``teacher_to_student[i]`` is the student id
    of the teacher token ``i`` (``-1``: no student token has its string) and ``student_shared``
    marks the student ids some teacher token maps to. The map is one-to-one."""

    teacher_to_student: Tensor
    student_shared: Tensor

    @property
    def size(self) -> int:
        return int((self.teacher_to_student >= 0).sum())

    def share(self) -> dict:
        """How much of each vocabulary is shared (counts and fractions)."""
        n, vt, vs = self.size, int(self.teacher_to_student.numel()), int(self.student_shared.numel())
        return {"shared": n, "teacher_vocab": vt, "student_vocab": vs,
                "teacher_share": n / max(1, vt), "student_share": n / max(1, vs)}

    def to(self, device) -> SharedVocab:
        if self.teacher_to_student.device == torch.device(device):
            return self
        return SharedVocab(self.teacher_to_student.to(device), self.student_shared.to(device))

    def student_ids(self, teacher_ids: Tensor) -> Tensor:
        """Student ids of ``teacher_ids`` (any shape), ``-1`` where the string is not shared."""
        table = self.teacher_to_student.to(teacher_ids.device)
        inside = (teacher_ids >= 0) & (teacher_ids < table.numel())
        return torch.where(inside, table[teacher_ids.clamp(0, table.numel() - 1)], torch.full_like(teacher_ids, -1))

    def student_mask(self, width: int, device) -> Tensor:
        """``student_shared`` cut or padded (with False) to a logits width of ``width``."""
        mask = self.student_shared.to(device)
        if mask.numel() >= width:
            return mask[:width]
        return torch.cat([mask, mask.new_zeros(width - mask.numel())])


@dataclass
class AlignedTeacher:
    """A teacher's top-k next-token distribution at each *student* position: ``ids`` (teacher
    vocabulary) and ``logprobs`` ``[B, T, k]`` under its full softmax at ``temperature``,
    ``aligned`` ``[B, T]`` (False: no teacher position read the same text; no loss there)."""

    ids: Tensor
    logprobs: Tensor
    aligned: Tensor
    vocab: SharedVocab
    temperature: float = 1.0

    def at(self, temperature: float) -> AlignedTeacher:
        if abs(float(temperature) - float(self.temperature)) > 1e-6:
            raise AutoSKDError(f"the cross-tokenizer teacher was read at temperature {self.temperature:g}, not "
                               f"{temperature:g}; give the teacher the loss term's temperatures")
        return self


class AlignedSet:
    """One :class:`AlignedTeacher` per temperature (a method may read the teacher at several)."""

    def __init__(self, by_temperature: dict):
        self.by_temperature = by_temperature

    def at(self, temperature: float) -> AlignedTeacher:
        for tau, aligned in self.by_temperature.items():
            if abs(tau - float(temperature)) < 1e-6:
                return aligned
        have = ", ".join(f"{t:g}" for t in self.by_temperature)
        raise AutoSKDError(f"the cross-tokenizer teacher holds temperatures {have}, not {temperature:g}; a loss "
                           "term's temperature changed after the teacher was prepared (schedules need top_k=0)")


def sorted_l1(p: Tensor, q: Tensor) -> Tensor:
    """ULD's distance per row: ``sum_i |sort_desc(p)_i - sort_desc(q)_i|``, the shorter of the two
    zero-padded to the longer (Boizard et al. 2024)."""
    p, q = p.sort(-1, descending=True).values, q.sort(-1, descending=True).values
    width = max(p.shape[-1], q.shape[-1])
    p = torch.nn.functional.pad(p, (0, width - p.shape[-1]))
    q = torch.nn.functional.pad(q, (0, width - q.shape[-1]))
    return (p - q).abs().sum(-1)


def _chunk_parts(temperature: float, uld_k: int, s: Tensor, t_lp: Tensor, t_sid: Tensor,
                 shared: Tensor) -> tuple[Tensor, Tensor]:
    """(sum of KL over the shared buckets + rest, sum of the ULD term) over one chunk of rows."""
    z = scaled_logits(s, temperature)                                   # [n, V_s] fp32
    lse = z.logsumexp(-1, keepdim=True)
    is_sh = t_sid >= 0
    ids = t_sid.clamp_min(0)
    # teacher: renormalised if its stored probabilities sum past 1 (fp16)
    lp = t_lp.float()
    p_t = lp.exp()
    lp = lp - p_t.sum(-1, keepdim=True).clamp_min(1.0).log()
    p_t = lp.exp()
    p_t_sh = torch.where(is_sh, p_t, 0.0)
    t_rest = (1.0 - p_t_sh.sum(-1)).clamp_min(_TINY)
    # student: its log-probability at the shared ids, and the rest as a log-sum-exp of the others
    log_s_ids = z.gather(-1, ids) - lse
    taken = torch.zeros_like(z).scatter_add_(-1, ids, is_sh.to(z.dtype)) > 0
    # floored at 1e-7 as forward_kl's top-k path is: a rest both sides lack (all tokens shared and
    # in the top k) then costs ~0 instead of the teacher's rounding noise times log(noise / tiny)
    log_s_rest = (z.masked_fill(taken, FILL_LOGIT).logsumexp(-1, keepdim=True) - lse).clamp_min(_LOG_REST).squeeze(-1)
    kl = (p_t_sh * (lp.clamp_min(LOG_TINY) - log_s_ids)).sum(-1) + t_rest * (t_rest.log() - log_s_rest)
    # ULD on what the exact matches leave: the teacher's unshared top-k vs the student's unshared top uld_k
    t_un = torch.where(is_sh, 0.0, p_t)
    p_s_un = (z - lse).exp().masked_fill(shared, 0.0)
    s_un = p_s_un.topk(min(uld_k, p_s_un.shape[-1]), dim=-1).values
    uld = sorted_l1(t_un, s_un)
    return kl.sum(), uld.sum()


def uld_hybrid_parts(student: Tensor, teacher, *, temperature: float = 1.0, mask: Tensor | None = None,
                     uld_k: int | None = None, chunk_tokens: int = 512) -> tuple[Tensor, Tensor, int]:
    """(mean KL part, mean ULD part, number of positions) over counted, aligned positions."""
    if not temperature > 0:
        raise AutoSKDError(f"distance 'uld_hybrid': temperature must be > 0 (got {temperature})")
    if isinstance(teacher, AlignedSet):
        teacher = teacher.at(temperature)
    if not isinstance(teacher, AlignedTeacher):
        raise AutoSKDError("distance 'uld_hybrid' needs a cross-tokenizer teacher (AlignedTeacher), a TopK or "
                           f"dense logits; got {type(teacher).__name__}")
    teacher.at(temperature)
    lead = tuple(student.shape[:-1])
    if tuple(teacher.ids.shape[:-1]) != lead or tuple(teacher.aligned.shape) != lead:
        raise AutoSKDError(f"distance 'uld_hybrid': teacher rows {tuple(teacher.ids.shape)} / aligned "
                           f"{tuple(teacher.aligned.shape)} do not fit student logits {tuple(student.shape)}")
    keep = teacher.aligned.to(student.device).bool()
    if mask is not None:
        if tuple(mask.shape) != lead:
            raise AutoSKDError(f"distance 'uld_hybrid': mask {tuple(mask.shape)} does not fit student logits "
                               f"{tuple(student.shape)}")
        keep = keep & mask.to(student.device).bool()
    rows = keep.reshape(-1).nonzero().squeeze(1)
    n = int(rows.numel())
    zero = (student.sum() * 0).float()
    if n == 0:
        return zero, zero, 0
    width = student.shape[-1]
    s = student.reshape(-1, width).index_select(0, rows)
    t_ids = teacher.ids.reshape(-1, teacher.ids.shape[-1]).to(student.device).index_select(0, rows).long()
    t_lp = teacher.logprobs.reshape(-1, teacher.ids.shape[-1]).to(student.device).index_select(0, rows)
    t_sid = teacher.vocab.student_ids(t_ids)
    t_sid = torch.where(t_sid < width, t_sid, torch.full_like(t_sid, -1))
    shared = teacher.vocab.student_mask(width, student.device)
    k_u = int(uld_k) if uld_k else int(t_ids.shape[-1])
    grads = torch.is_grad_enabled() and student.requires_grad
    kl_sum, uld_sum = zero.clone(), zero.clone()
    step = max(1, int(chunk_tokens))
    for chunk in zip(s.split(step), t_lp.split(step), t_sid.split(step)):
        args = (float(temperature), k_u, *chunk, shared)
        kl, uld = checkpoint(_chunk_parts, *args, use_reentrant=False) if grads else _chunk_parts(*args)
        kl_sum, uld_sum = kl_sum + kl, uld_sum + uld
    return kl_sum / n, uld_sum / n, n


@DISTANCES.register("uld_hybrid")
def uld_hybrid(student: Tensor, teacher, *, temperature: float = 1.0, mask: Tensor | None = None,
               shared_weight: float = 1.0, uld_weight: float = 1.0, uld_k: int | None = None,
               chunk_tokens: int = 512) -> Tensor:
    """``shared_weight * tau^2 * KL`` over exactly matched tokens (+ a rest bucket) ``+ uld_weight
    * ULD`` over the unmatched remainder, mean over counted aligned positions (module doc).
    ``uld_k``: how many of the student's unshared probabilities enter the sorted L1 (default:
    the teacher's k). A ``TopK``/dense teacher (same tokenizer) gives ``shared_weight * forward_kl``."""
    if isinstance(teacher, (TopK, Tensor)):
        return forward_kl(student, teacher, temperature=temperature, mask=mask,
                          chunk_tokens=chunk_tokens) * float(shared_weight)
    kl, uld, _ = uld_hybrid_parts(student, teacher, temperature=temperature, mask=mask, uld_k=uld_k,
                                  chunk_tokens=chunk_tokens)
    return float(shared_weight) * kl * temperature**2 + float(uld_weight) * uld


uld_hybrid.on_logits = True  # type: ignore[attr-defined]
uld_hybrid.token_level = True  # type: ignore[attr-defined]
uld_hybrid.cross_vocab = True  # type: ignore[attr-defined]  (no width check against the student's vocabulary)
