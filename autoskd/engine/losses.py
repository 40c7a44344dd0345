"""Distances and feature transforms, registered by name (TextBrewer/torchdistill style).

A :class:`~autoskd.engine.spec.FeatureLoss` names one distance and, optionally, one
transform; the auxiliary model looks them up here.

Distances
    ``fn(student, teacher, *, temperature=1.0, mask=None) -> Tensor`` (a scalar, float32).

    ``mse``, ``huber`` (smooth L1, beta 1)
        element-wise, averaged over the elements of real tokens.
    ``cosine``
        ``1 - cos`` along the last dim, averaged over the real vectors (rows).
    ``kl``
        ``tau^2 * KL(p_T || p_S)`` with ``p = softmax(x / tau)`` over the last dim: summed over
        that dim, averaged over every other position (for logits ``[B, C]`` that is
        PyTorch's ``batchmean``; for attention ``[B, heads, T, T]`` it is MiniLM's mean over
        heads and real query rows). Inputs are *logits*.
    ``ce``
        soft cross-entropy ``-tau^2 * sum p_T log p_S`` (same softmax, reduction and inputs as
        ``kl``). It differs from ``kl`` by the teacher's entropy, a constant for the student,
        so the gradients are the same; TinyBERT's prediction-layer loss is ``ce`` at tau=1.
        The ``tau^2`` factor (Hinton et al. 2015) keeps gradient sizes independent of tau.

    ``mask`` is the batch's ``attention_mask`` ``[B, T]`` (1 = real token) or a 0/1 weight
    tensor already broadcastable to the inputs (what the auxiliary model passes, because it
    knows each feature's layout). A ``[B, T]`` mask is read by shape: ``[B, T, H]`` ->
    token rows; ``[B, heads, T, T]`` -> real query rows x real keys; ``[B, heads, T, d]`` ->
    token rows; ``[B, C]`` (sentence-level) -> no masking. Row-wise distances (``kl``,
    ``ce``, ``cosine``) keep a row when any of its weights is non-zero.

Transforms
    ``fn(x, *, mask=None) -> Tensor``, applied to both sides before the distance.

    ``identity``
        ``x``.
    ``pairwise_sdp``
        the pair-wise scaled dot-product ``softmax(x x^T / sqrt(d))`` over the last dim,
        padded keys masked: ``[B, heads, T, d] -> [B, heads, T, T]`` (MiniLM's value
        relation; ``[B, T, H] -> [B, T, T]`` for hidden states). Its rows are
        distributions: the auxiliary model hands them to ``kl``/``ce`` as log-probabilities.

Each transform carries two attributes the auxiliary model reads: ``pairwise`` (the output
is ``[.., T, T]``) and ``distribution`` (the output rows are probabilities).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import AutoSKDError
from ..registry import Registry

Distance = Callable[..., Tensor]
Transform = Callable[..., Tensor]

DISTANCES: Registry[Distance] = Registry("distance")
TRANSFORMS: Registry[Transform] = Registry("transform")

#: TinyBERT's threshold: attention scores at or below it are masked positions.
MASKED_SCORE_THRESHOLD = -1e2
#: Logits are clamped from below to this before a softmax, so ``finfo.min`` masks (and
#: their division by a temperature) never produce ``-inf``/NaN.
_LOGIT_FLOOR = -1e9


# --------------------------------------------------------------------------- helpers
def _f32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_shapes(student: Tensor, teacher: Tensor, name: str) -> None:
    if student.shape != teacher.shape:
        raise AutoSKDError(
            f"distance {name!r}: student feature has shape {tuple(student.shape)} but the teacher's is "
            f"{tuple(teacher.shape)}; give the loss term projection='linear' or a relation transform"
        )


def broadcast_mask(x: Tensor, mask: Tensor | None) -> Tensor | None:
    """0/1 weights broadcastable to ``x`` from a ``[B, T]`` attention mask (see module doc)."""
    if mask is None:
        return None
    if x.dim() <= 2:  # sentence-level (logits): nothing to mask
        return None
    m = mask.to(device=x.device, dtype=torch.float32)
    if m.dim() == x.dim():
        return m
    if m.dim() != 2:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit a feature of shape {tuple(x.shape)}")
    b, t = m.shape
    if x.shape[0] != b:
        raise ValueError(f"mask batch {b} does not match feature shape {tuple(x.shape)}")
    if x.dim() == 3 and x.shape[1] == t:
        return m[:, :, None]
    if x.dim() == 4 and x.shape[2] == t:
        if x.shape[3] == t:
            return m[:, None, :, None] * m[:, None, None, :]
        return m[:, None, :, None]
    raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit a feature of shape {tuple(x.shape)}")


def _masked_mean(values: Tensor, weights: Tensor | None) -> Tensor:
    if weights is None:
        return values.mean()
    weights = weights.expand_as(values)
    return (values * weights).sum() / weights.sum().clamp_min(1e-12)


def _row_weights(weights: Tensor | None) -> Tensor | None:
    """Weights per vector (last dim reduced): a row counts when any of its entries is real."""
    return None if weights is None else weights.amax(dim=-1)


def _scaled_logits(x: Tensor, temperature: float) -> Tensor:
    return (_f32(x) / temperature).clamp_min(_LOGIT_FLOOR)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise AutoSKDError(f"temperature must be > 0 (got {temperature})")


def zero_masked_scores(scores: Tensor, threshold: float = MASKED_SCORE_THRESHOLD) -> Tensor:
    """TinyBERT: attention scores ``<= -1e2`` (masked keys) become 0 before an MSE."""
    return torch.where(scores <= threshold, torch.zeros_like(scores), scores)


def probs_to_logits(p: Tensor) -> Tensor:
    """Log-probabilities whose softmax is ``p`` again (zeros -> ~-87, no ``-inf``)."""
    p = _f32(p)
    return p.clamp_min(torch.finfo(p.dtype).tiny).log()


# --------------------------------------------------------------------------- distances
@DISTANCES.register("mse")
def mse(student: Tensor, teacher: Tensor, *, temperature: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """Mean squared error over the elements of real tokens."""
    _check_shapes(student, teacher, "mse")
    s, t = _f32(student), _f32(teacher)
    return _masked_mean((s - t).pow(2), broadcast_mask(s, mask))


@DISTANCES.register("huber")
def huber(student: Tensor, teacher: Tensor, *, temperature: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """Smooth L1 (Huber with beta 1): 0.5 d^2 for |d| < 1, |d| - 0.5 otherwise; masked mean."""
    _check_shapes(student, teacher, "huber")
    s, t = _f32(student), _f32(teacher)
    return _masked_mean(F.smooth_l1_loss(s, t, reduction="none", beta=1.0), broadcast_mask(s, mask))


@DISTANCES.register("cosine")
def cosine(student: Tensor, teacher: Tensor, *, temperature: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """1 - cosine similarity along the last dim, averaged over real rows."""
    _check_shapes(student, teacher, "cosine")
    s, t = _f32(student), _f32(teacher)
    per_row = 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
    return _masked_mean(per_row, _row_weights(broadcast_mask(s, mask)))


def _softmax_distance(name: str, student: Tensor, teacher: Tensor, temperature: float, mask: Tensor | None,
                      per_row: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """``tau^2`` times the mean over real rows of ``per_row(log softmax(s/tau), t/tau)``, the row
    reduced over the last dim (``kl`` and ``ce``)."""
    _check_shapes(student, teacher, name)
    _check_temperature(temperature)
    log_p_s = F.log_softmax(_scaled_logits(student, temperature), dim=-1)
    rows = per_row(log_p_s, _scaled_logits(teacher, temperature))
    return _masked_mean(rows, _row_weights(broadcast_mask(log_p_s, mask))) * temperature**2


#: Below this log-probability ``exp`` is under float32's smallest normal number (log 1.18e-38).
_LOG_TINY = -87.33


def _probs(log_p: Tensor) -> Tensor:
    """``exp(log_p)``, with the probabilities below float32's smallest normal number (1.2e-38) set
    to 0. Why: masked keys of attention/relation rows have log-probabilities ~ -87.3 (a zero
    probability through :func:`probs_to_logits`) or -1e9 (a masked score), and ``aten::exp``
    takes a slow path for results that underflow: ~30x the time of the rest of the row (most
    of MiniLM's and MiniLMv2's loss). Those entries weigh < 1.2e-38 in the KL's sums, which
    leaves every row's float32 value as it was."""
    return log_p.clamp_min(_LOG_TINY).exp().masked_fill(log_p < _LOG_TINY, 0.0)


def _kl_rows(log_p_s: Tensor, teacher: Tensor) -> Tensor:
    log_p_t = F.log_softmax(teacher, dim=-1)
    return (_probs(log_p_t) * (log_p_t - log_p_s)).sum(-1)


def _ce_rows(log_p_s: Tensor, teacher: Tensor) -> Tensor:
    return -(F.softmax(teacher, dim=-1) * log_p_s).sum(-1)


@DISTANCES.register("kl")
def kl(student: Tensor, teacher: Tensor, *, temperature: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """tau^2 * KL(softmax(t/tau) || softmax(s/tau)), summed over the last dim, mean elsewhere."""
    return _softmax_distance("kl", student, teacher, temperature, mask, _kl_rows)


@DISTANCES.register("ce")
def ce(student: Tensor, teacher: Tensor, *, temperature: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """Soft cross-entropy tau^2 * -sum softmax(t/tau) log softmax(s/tau); reduction as ``kl``."""
    return _softmax_distance("ce", student, teacher, temperature, mask, _ce_rows)


# Distances that read their inputs as logits (softmax inside): the auxiliary model keeps
# masked attention scores as they are for them and passes distributions as log-probs.
for _fn in (mse, huber, cosine):
    _fn.on_logits = False  # type: ignore[attr-defined]
for _fn in (kl, ce):
    _fn.on_logits = True  # type: ignore[attr-defined]


def on_logits(distance: Distance) -> bool:
    """Whether ``distance`` applies a softmax to its inputs (``kl``, ``ce``)."""
    return bool(getattr(distance, "on_logits", False))


def hard_label_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy with the gold labels (``-100`` ignored); MSE for one-output regression."""
    logits = _f32(logits)
    if logits.shape[-1] == 1 and labels.is_floating_point():
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
    return F.cross_entropy(logits, labels.long(), ignore_index=-100)


def next_token_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """A language model's cross-entropy on its next-token targets ``[B, T]`` (``-100``: no loss),
    averaged over target tokens; the logits ``[B, T, V]`` are upcast to fp32."""
    return F.cross_entropy(_f32(logits).reshape(-1, logits.shape[-1]), targets.reshape(-1).long(),
                           ignore_index=-100)


# --------------------------------------------------------------------------- transforms
@TRANSFORMS.register("identity")
def identity(x: Tensor, *, mask: Tensor | None = None) -> Tensor:
    return x


@TRANSFORMS.register("pairwise_sdp")
def pairwise_sdp(x: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """softmax(x x^T / sqrt(d)) over the last dim; keys where ``mask`` [B, T] is 0 get no mass."""
    x = _f32(x)
    scores = torch.matmul(x, x.transpose(-1, -2)) / math.sqrt(x.shape[-1])
    if mask is not None:
        if mask.dim() != 2:
            raise ValueError(f"pairwise_sdp expects a [B, T] mask, got shape {tuple(mask.shape)}")
        keys = (mask == 0).to(scores.device).view(mask.shape[0], *([1] * (x.dim() - 2)), mask.shape[1])
        scores = scores.masked_fill(keys, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1)


identity.pairwise = False  # type: ignore[attr-defined]
identity.distribution = False  # type: ignore[attr-defined]
pairwise_sdp.pairwise = True  # type: ignore[attr-defined]
pairwise_sdp.distribution = True  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- more distances
@DISTANCES.register("soft_ce")
def soft_ce(student: Tensor, teacher: Tensor, *, temperature: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """Soft cross-entropy *without* the tau^2 factor (GKD's CE_T): ``ce / tau^2``."""
    return ce(student, teacher, temperature=temperature, mask=mask) / temperature**2


@DISTANCES.register("cos_nce")
def cos_nce(student: Tensor, teacher: Tensor, *, temperature: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """LRC-BERT's contrastive COS-NCE over the batch: each sample's (mean-pooled) student
    vector should be closer in cosine distance to its own teacher vector than to the other
    samples' teacher vectors: ``-log softmax_j(-(1 - cos(s_i, t_j)) / tau)[i]``, mean over i.
    Needs a batch of at least two samples."""
    _check_shapes(student, teacher, "cos_nce")
    s, t = _f32(student), _f32(teacher)
    if s.dim() == 3:
        m = broadcast_mask(s, mask)
        m = torch.ones_like(s[..., :1]) if m is None else m
        s, t = (s * m).sum(1) / m.sum(1).clamp_min(1.0), (t * m).sum(1) / m.sum(1).clamp_min(1.0)
    if s.shape[0] < 2:
        raise AutoSKDError("cos_nce contrasts the samples of a batch; use a batch size of at least 2")
    sim = F.normalize(s, dim=-1) @ F.normalize(t, dim=-1).T            # [B, B] cosines
    logits = -(1.0 - sim) / temperature
    return F.cross_entropy(logits, torch.arange(s.shape[0], device=s.device))


soft_ce.on_logits = True  # type: ignore[attr-defined]
cos_nce.on_logits = False  # type: ignore[attr-defined]


from . import relations as _relations  # noqa: E402,F401  (registers the relation transforms)
from . import token_losses as _token_losses  # noqa: E402,F401  (registers the token-level LM distances)
