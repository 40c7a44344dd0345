"""Token-level divergences for generative LMs (registered in ``DISTANCES``).

The student's next-token logits ``[B, T, V]`` are compared with a teacher's, position by
position, for vocabularies of 50k-260k entries, where one fp32 ``[B*T, V]`` softmax alone can
be gigabytes. So every distance here

* keeps only the counted positions (``mask``; the caller passes ``target_ids != -100``),
* works through them ``chunk_tokens`` rows at a time, each chunk under
  ``torch.utils.checkpoint`` when gradients are needed, so only one chunk's fp32 ``[chunk, V]``
  intermediates are alive at a time, in the forward and in the backward pass,
* takes softmaxes in fp32 whatever the input dtype, and returns a float32 scalar: the mean
  over counted positions of the per-position divergence (``tau^2`` times it for the KLs and
  the JSD, the Hinton convention the rest of the engine uses; ``tvd`` is not scaled).

The teacher is dense logits ``[B, T, V']`` (``V' >= V``: a teacher whose embedding has extra
padding rows is sliced to the student's ``V``) or a :class:`TopK` (a cache of the teacher's
top-k log-probabilities). A ``TopK`` teacher is compared over ``k + 1`` buckets, the k ids and
one tail bucket holding the rest of the mass, on both sides, so both are proper distributions
and every divergence keeps its meaning (and is 0 for identical models).

Distances: ``forward_kl`` KL(p_T || p_S), ``reverse_kl`` KL(p_S || p_T), ``jsd`` (GKD's
generalised JSD, Agarwal et al. 2024, as TRL's ``generalized_jsd_loss``: with
``M = beta p_T + (1 - beta) p_S``, ``beta KL(p_T || M) + (1 - beta) KL(p_S || M)``; beta 0 is
forward KL and beta 1 reverse KL by definition) and ``tvd`` (``0.5 sum |p_T - p_S|``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..errors import AutoSKDError
from .losses import _LOGIT_FLOOR, DISTANCES

#: log of the smallest normal fp32: the floor for a bucket's log-probability (no ``-inf``).
LOG_TINY = math.log(torch.finfo(torch.float32).tiny)
#: Fill for the top-k ids when summing the student's remaining mass: finite, so a tail with
#: no entries left (k = V) gives a finite log-sum-exp and gradients without NaN.
FILL_LOGIT = -1e30

PerRow = Callable[[Tensor, Tensor], Tensor]


@dataclass
class TopK:
    """A sparse teacher: its top-k ids and their log-probabilities under its full softmax at
    ``temperature``; ``ids`` ``[..., k]`` (int64) and ``logprobs`` ``[..., k]`` (float)."""

    ids: Tensor
    logprobs: Tensor
    temperature: float = 1.0

    @property
    def k(self) -> int:
        return int(self.ids.shape[-1])

    @property
    def tail(self) -> Tensor:
        """The teacher mass outside the top k, ``1 - sum exp(logprobs)`` clamped at 0."""
        return (1.0 - self.logprobs.float().exp().sum(-1)).clamp_min(0.0)

    def index_select(self, dim0_idx: Tensor) -> TopK:
        """These rows (dim 0) in this order, e.g. a batch's rows of a cached table."""
        dim0_idx = dim0_idx.to(self.ids.device).long()
        return TopK(self.ids.index_select(0, dim0_idx), self.logprobs.index_select(0, dim0_idx), self.temperature)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TopK:
        return TopK(self.ids.to(device, non_blocking=non_blocking),
                    self.logprobs.to(device, non_blocking=non_blocking), self.temperature)


# --------------------------------------------------------------------------- buckets
def scaled_logits(x: Tensor, temperature: float) -> Tensor:
    """fp32 logits / tau, floored so ``-inf``/``finfo.min`` masks never give NaN."""
    return (x.float() / temperature).clamp_min(_LOGIT_FLOOR)


def _dense_logprobs(s: Tensor, t: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(log p_T, log p_S) over the student's vocabulary; extra teacher rows are dropped."""
    log_s = torch.log_softmax(scaled_logits(s, temperature), dim=-1)
    log_t = torch.log_softmax(scaled_logits(t[:, : s.shape[-1]], temperature), dim=-1)
    return log_t, log_s


# --------------------------------------------------------------------------- per-row divergences
def _forward_kl_rows(log_t: Tensor, log_s: Tensor) -> Tensor:
    return (log_t.exp() * (log_t - log_s)).sum(-1)


def _reverse_kl_rows(log_t: Tensor, log_s: Tensor) -> Tensor:
    return (log_s.exp() * (log_s - log_t)).sum(-1)


def _jsd_rows(log_t: Tensor, log_s: Tensor, beta: float) -> Tensor:
    log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log(1.0 - beta))
    return beta * _forward_kl_rows(log_t, log_m) + (1.0 - beta) * _forward_kl_rows(log_s, log_m)


def _tvd_rows(log_t: Tensor, log_s: Tensor) -> Tensor:
    return 0.5 * (log_t.exp() - log_s.exp()).abs().sum(-1)


# --------------------------------------------------------------------------- driver
def _chunk_sum(rows: PerRow, temperature: float, s: Tensor, t: Tensor) -> Tensor:
    """Sum over one chunk of the per-position divergence (the unit that is checkpointed)."""
    log_t, log_s = _dense_logprobs(s, t, temperature)
    return rows(log_t, log_s).sum()


def _check_inputs(student: Tensor, teacher: Tensor | TopK, temperature: float, name: str) -> None:
    if not temperature > 0:
        raise AutoSKDError(f"distance {name!r}: temperature must be > 0 (got {temperature})")
    lead = tuple(student.shape[:-1])
    if isinstance(teacher, TopK):
        if not math.isclose(float(teacher.temperature), float(temperature), rel_tol=1e-6):
            raise AutoSKDError(
                f"distance {name!r}: the teacher's top-k cache was made at temperature {teacher.temperature:g} "
                f"but the loss uses {temperature:g}; rebuild the top-k cache with temperature={temperature:g}")
        if tuple(teacher.ids.shape[:-1]) != lead or teacher.logprobs.shape != teacher.ids.shape:
            raise AutoSKDError(
                f"distance {name!r}: teacher top-k ids {tuple(teacher.ids.shape)} / logprobs "
                f"{tuple(teacher.logprobs.shape)} do not fit student logits {tuple(student.shape)}")
        if teacher.ids.numel() and int(teacher.ids.max()) >= student.shape[-1]:
            raise AutoSKDError(
                f"distance {name!r}: the teacher's top-k holds token id {int(teacher.ids.max())} but the student's "
                f"vocabulary has {student.shape[-1]} entries; use a student with the teacher's tokenizer")
        return
    if tuple(teacher.shape[:-1]) != lead:
        raise AutoSKDError(f"distance {name!r}: teacher logits {tuple(teacher.shape)} do not fit student "
                           f"logits {tuple(student.shape)}")
    if teacher.shape[-1] < student.shape[-1]:
        raise AutoSKDError(
            f"distance {name!r}: the teacher's vocabulary ({teacher.shape[-1]}) is smaller than the student's "
            f"({student.shape[-1]}); use a student with the teacher's tokenizer")


def _counted_rows(x: Tensor, keep: Tensor | None) -> Tensor:
    """``x`` as ``[N, last]`` rows of the counted positions (a view when all count)."""
    flat = x.reshape(-1, x.shape[-1])
    return flat if keep is None else flat.index_select(0, keep.to(flat.device))


def token_divergence(rows: PerRow, student: Tensor, teacher: Tensor | TopK, *, temperature: float,
                     mask: Tensor | None, chunk_tokens: int, name: str) -> Tensor:
    """Mean over counted positions of ``rows(log p_T, log p_S)``, chunked and checkpointed."""
    _check_inputs(student, teacher, temperature, name)
    keep = None
    if mask is not None:
        if tuple(mask.shape) != tuple(student.shape[:-1]):
            raise AutoSKDError(f"distance {name!r}: mask {tuple(mask.shape)} does not fit student logits "
                               f"{tuple(student.shape)}")
        flags = mask.reshape(-1).bool()
        keep = None if bool(flags.all()) else flags.nonzero().squeeze(1)
    if isinstance(teacher, TopK):
        return _topk_divergence(rows, student, teacher, temperature, mask)
    s = _counted_rows(student, keep)
    n = s.shape[0]
    if n == 0:
        return (student.sum() * 0).float()
    parts = (_counted_rows(teacher, keep),)
    step = max(1, int(chunk_tokens))
    fn = partial(_chunk_sum, rows, float(temperature))
    grads = torch.is_grad_enabled() and (student.requires_grad or any(p.requires_grad for p in parts))
    total = student.new_zeros((), dtype=torch.float32)
    # split (not slicing) so the backward pass concatenates the chunks' gradients once
    for chunk in zip(s.split(step), *(p.split(step) for p in parts)):
        total = total + (checkpoint(fn, *chunk, use_reentrant=False) if grads else fn(*chunk))
    return total / n


def _topk_divergence(rows: PerRow, student: Tensor, teacher: TopK, temperature: float,
                     mask: Tensor | None) -> Tensor:
    """The top-k path: no ``[N, V]`` log-softmax is ever materialised (one log-sum-exp and a
    gather over the student's logits), so it needs neither chunking nor checkpointing, and it
    costs what the next-token cross-entropy costs. Every position is computed and the mask
    weights them: selecting the counted rows would copy the whole ``[N, V]`` logits."""
    log_t, log_s = bucket_logprobs(student, teacher, temperature)
    return _masked_mean(rows(log_t, log_s), mask, student)


def bucket_logprobs(student: Tensor, teacher: TopK, temperature: float) -> tuple[Tensor, Tensor]:
    """``(log p_T, log p_S)``, each ``[N, k + 1]``: both distributions over the teacher's k ids
    and one tail bucket, from one log-sum-exp and a gather over the student's logits."""
    z = student.reshape(-1, student.shape[-1]).float()
    if temperature != 1.0:
        z = z / temperature
    ids = teacher.ids.reshape(-1, teacher.ids.shape[-1]).to(z.device).long()
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    log_s_ids = z.gather(-1, ids) - lse
    s_mass = log_s_ids.exp().sum(-1, keepdim=True)
    log_s_rest = torch.log1p(-s_mass.clamp_max(1.0 - 1e-7)).clamp_min(LOG_TINY)
    lp = teacher.logprobs.reshape(ids.shape).to(z.device).float()
    mass = lp.exp().sum(-1, keepdim=True)
    log_t = torch.cat([lp - mass.clamp_min(1.0).log(), (1.0 - mass).clamp_min(torch.finfo(torch.float32).tiny).log()], -1)
    return log_t, torch.cat([log_s_ids, log_s_rest], -1)


def _masked_mean(per_row: Tensor, mask: Tensor | None, student: Tensor) -> Tensor:
    if mask is None:
        return per_row.mean()
    weights = mask.reshape(-1).to(per_row.device, per_row.dtype)
    if not bool(weights.any()):
        return (student.sum() * 0).float()
    return (per_row * weights).sum() / weights.sum()


def temper_topk(teacher: TopK, scale: Tensor | float, vocab_size: int) -> TopK:
    """The top-k teacher with its logits multiplied by ``scale`` (SSWO's θ-scaling of a teacher,
    AutoSKD eq. 3, on a cached LM teacher): ``p^scale`` renormalised, differentiable in ``scale``.

    Scaling the logits by c raises every probability to the power c before renormalising. The
    cache does not know how the tail mass spreads over the other ``V - k`` tokens, so it is taken
    as even: exact at ``scale = 1`` (the teacher unchanged) and for a flat tail; the result is
    again a TopK whose tail bucket (1 minus its mass) is the tempered tail."""
    lp = teacher.logprobs.float()
    rest = max(int(vocab_size) - teacher.k, 0)
    scale = torch.as_tensor(scale, dtype=torch.float32, device=lp.device)
    tail = (1.0 - lp.exp().sum(-1, keepdim=True)).clamp_min(torch.finfo(torch.float32).tiny)
    parts = [scale * lp]
    if rest > 0:  # the tail bucket: rest tokens of probability tail / rest each, tempered alike
        parts.append(math.log(rest) + scale * (tail.log() - math.log(rest)))
    logits = torch.cat(parts, -1)
    logprobs = torch.log_softmax(logits, -1)[..., : teacher.k]
    return TopK(teacher.ids, logprobs, teacher.temperature)


def soft_cross_entropy(student: Tensor, teacher: Tensor | TopK, *, temperature: float = 1.0,
                       mask: Tensor | None = None) -> Tensor:
    """``tau^2 * CE(p_T, p_S) = -tau^2 sum p_T log p_S`` per position, mean over counted ones
    (over k + 1 buckets for a TopK teacher). Its gradient in the student equals ``forward_kl``'s;
    in the teacher's weights (the AutoSKD θ step) it lacks KL's entropy term ``-H(p_T)``, which
    would reward sharpening every teacher (see :func:`autoskd.search.theta_step.distillation_loss`).
    Dense teachers are compared on the counted rows in one piece: this is the θ step's loss,
    evaluated on one batch, not the training loss's chunked path."""
    _check_inputs(student, teacher, temperature, "soft_cross_entropy")
    if isinstance(teacher, TopK):
        log_t, log_s = bucket_logprobs(student, teacher, temperature)
        return _masked_mean(-(log_t.exp() * log_s).sum(-1), mask, student) * temperature**2
    s = student.reshape(-1, student.shape[-1])
    t = teacher.reshape(-1, teacher.shape[-1])[:, : s.shape[-1]]
    log_s = torch.log_softmax(scaled_logits(s, temperature), -1)
    p_t = torch.softmax(scaled_logits(t, temperature), -1)
    return _masked_mean(-(p_t * log_s).sum(-1), mask, student) * temperature**2


def _mark(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    fn.on_logits = True  # type: ignore[attr-defined]
    fn.token_level = True  # type: ignore[attr-defined]
    return fn


# --------------------------------------------------------------------------- distances
@DISTANCES.register("forward_kl")
def forward_kl(student: Tensor, teacher: Tensor | TopK, *, temperature: float = 1.0, mask: Tensor | None = None,
               chunk_tokens: int = 1024) -> Tensor:
    """tau^2 * KL(p_T || p_S) per position (mode-covering; classic KD), mean over counted ones."""
    return token_divergence(_forward_kl_rows, student, teacher, temperature=temperature, mask=mask,
                            chunk_tokens=chunk_tokens, name="forward_kl") * temperature**2


@DISTANCES.register("reverse_kl")
def reverse_kl(student: Tensor, teacher: Tensor | TopK, *, temperature: float = 1.0, mask: Tensor | None = None,
               chunk_tokens: int = 1024) -> Tensor:
    """tau^2 * KL(p_S || p_T) per position (mode-seeking; MiniLLM), mean over counted ones."""
    return token_divergence(_reverse_kl_rows, student, teacher, temperature=temperature, mask=mask,
                            chunk_tokens=chunk_tokens, name="reverse_kl") * temperature**2


@DISTANCES.register("jsd")
def jsd(student: Tensor, teacher: Tensor | TopK, *, temperature: float = 1.0, mask: Tensor | None = None,
        beta: float = 0.5, chunk_tokens: int = 1024) -> Tensor:
    """tau^2 * generalised JSD (GKD): beta KL(p_T || M) + (1 - beta) KL(p_S || M) with
    M = beta p_T + (1 - beta) p_S; beta 0 is ``forward_kl`` and beta 1 ``reverse_kl`` exactly
    (the mixture formula itself would give 0 there)."""
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise AutoSKDError(f"distance 'jsd': beta must be in [0, 1] (got {beta:g})")
    if beta == 0.0:
        return forward_kl(student, teacher, temperature=temperature, mask=mask, chunk_tokens=chunk_tokens)
    if beta == 1.0:
        return reverse_kl(student, teacher, temperature=temperature, mask=mask, chunk_tokens=chunk_tokens)
    return token_divergence(partial(_jsd_rows, beta=beta), student, teacher, temperature=temperature, mask=mask,
                            chunk_tokens=chunk_tokens, name="jsd") * temperature**2


@DISTANCES.register("tvd")
def tvd(student: Tensor, teacher: Tensor | TopK, *, temperature: float = 1.0, mask: Tensor | None = None,
        chunk_tokens: int = 1024) -> Tensor:
    """Total variation 0.5 * sum |p_T - p_S| per position (bounded in [0, 1]; no tau^2)."""
    return token_divergence(_tvd_rows, student, teacher, temperature=temperature, mask=mask,
                            chunk_tokens=chunk_tokens, name="tvd")


for _fn in (forward_kl, reverse_kl, jsd, tvd):
    _mark(_fn)


def token_level(distance: Callable[..., Tensor]) -> bool:
    """Whether ``distance`` compares next-token distributions position by position."""
    return bool(getattr(distance, "token_level", False))
