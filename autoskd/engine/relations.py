"""Relation transforms (registered in ``TRANSFORMS``): features -> relations compared by a distance.

Pair-wise, cross-layer, token-window angle and span relations used by MiniLMv2, CKD, PKD,
MGSKD and the feature-distance analysis. Each takes ``x`` and the batch's ``[B, T]``
attention ``mask`` and carries the attributes the auxiliary model reads: ``pairwise``
(output is a relation, widths may differ), ``distribution`` (rows are probabilities, handed
to ``kl``/``ce`` as log-probabilities), ``merges_heads`` (per-head features re-split, so
head counts may differ) and ``own_mask`` (padding already handled; no mask at the distance).
A transform with an argument is written ``name:arg`` (``relation_heads:48``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import AutoSKDError
from .losses import TRANSFORMS, _f32


def _attrs(fn, pairwise=False, distribution=False, merges_heads=False, own_mask=False, takes_arg=False):
    fn.pairwise, fn.distribution, fn.merges_heads, fn.own_mask, fn.takes_arg = (
        pairwise, distribution, merges_heads, own_mask, takes_arg)
    return fn


def get_transform(name: str | None):
    """The transform for ``name`` (``"kind:arg"`` binds the argument); ``None`` -> identity."""
    kind, _, arg = str(name or "identity").partition(":")
    fn = TRANSFORMS.get(kind)
    if not getattr(fn, "takes_arg", False):
        if arg:
            raise AutoSKDError(f"transform {kind!r} takes no argument (got {name!r})")
        return fn
    bound = lambda x, *, mask=None: fn(x, mask=mask, arg=arg)  # noqa: E731
    return _attrs(bound, fn.pairwise, fn.distribution, fn.merges_heads, fn.own_mask)


def masked_mean_pool(x: Tensor, mask: Tensor | None) -> Tensor:
    """[B, T, H] -> [B, H], averaging real tokens only."""
    x = _f32(x)
    if mask is None:
        return x.mean(1)
    m = mask.to(x.device, x.dtype)[:, :, None]
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


def _merge_heads(x: Tensor) -> Tensor:
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1) if x.dim() == 4 else x


def _mask_keys(scores: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return scores
    keys = (mask == 0).to(scores.device).view(mask.shape[0], *([1] * (scores.dim() - 2)), mask.shape[1])
    return scores.masked_fill(keys, torch.finfo(scores.dtype).min)


def cos_matrix(x: Tensor) -> Tensor:
    """Cosine similarity between the rows of ``x`` (last two dims [N, d] -> [N, N])."""
    x = F.normalize(_f32(x), dim=-1)
    return x @ x.transpose(-1, -2)


def angles_at(gram: Tensor, anchor: Tensor, others: Tensor, eps: float = 1e-12) -> Tensor:
    """Angles at anchor points from a Gram matrix: ``<e_ai, e_al>`` with
    ``e_ai = normalize(x_i - x_a)`` (``F.normalize``: a zero difference gives 0) for ``i, l`` in
    ``others``; ``gram`` [B, N, N] is ``x x^T``, ``anchor`` [B, M] and ``others`` [B, M, k] index
    rows of x -> [B, M, k, k].

    Why: CKD's window angles and MGSKD's top-k angles normalised the [B, M, k, H] differences
    ``x_i - x_a`` and multiplied them, the largest tensors of their steps (and of the backward).
    The same dot products and norms come from the Gram matrix,
    ``(x_i - x_a).(x_l - x_a) = (G_il - G_ia) - (G_la - G_aa)``, divided by the norms after the
    dot instead of before: the values of normalising first, up to float rounding
    (tests/test_method_speedups.py)."""
    b, n, _ = gram.shape
    gram = (gram + gram.transpose(-1, -2)) * 0.5  # exactly symmetric: a zero difference stays exactly 0
    flat = gram.reshape(b, n * n)

    def at(rows: Tensor, cols: Tensor) -> Tensor:
        rows, cols = torch.broadcast_tensors(rows, cols)
        return flat.gather(1, (rows * n + cols).reshape(b, -1)).view(rows.shape)

    a = anchor[..., None]                                                       # [B, M, 1]
    g_il = at(others[..., :, None], others[..., None, :])                       # [B, M, k, k]
    g_ia = at(others, a)                                                        # [B, M, k]
    g_aa = at(anchor, anchor)[..., None]                                        # [B, M, 1]
    dots = (g_il - g_ia[..., :, None]) - (g_ia[..., None, :] - g_aa[..., None])
    sq = (g_il.diagonal(dim1=-2, dim2=-1) - g_ia) - (g_ia - g_aa)               # |x_i - x_a|^2
    norms = sq.clamp_min(eps * eps).sqrt()                                      # max(|d|, eps), as F.normalize
    return dots / (norms[..., :, None] * norms[..., None, :])


def angle_tensor(x: Tensor) -> Tensor:
    """RKD/CKD angle relation among the rows of ``x`` [.., N, d]: cos of the angle at j
    between i and k, ``<e_ji, e_jk>`` with ``e_ji = normalize(x_i - x_j)`` -> [.., N, N, N]."""
    diff = F.normalize(_f32(x).unsqueeze(-2) - _f32(x).unsqueeze(-3), dim=-1)  # [.., N(j), N(i), d]
    return diff @ diff.transpose(-1, -2)


# --------------------------------------------------------------------------- sentence vectors
@TRANSFORMS.register("cls")
def cls(x: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """The [CLS] vector of a token feature: [B, T, H] -> [B, H]."""
    return x[:, 0]


@TRANSFORMS.register("cls_l2")
def cls_l2(x: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """PKD's L2-normalised [CLS] vector."""
    return F.normalize(_f32(x[:, 0]), dim=-1)


@TRANSFORMS.register("mean_pool")
def mean_pool(x: Tensor, *, mask: Tensor | None = None) -> Tensor:
    return masked_mean_pool(x, mask)


# --------------------------------------------------------------------------- pair-wise relations
@TRANSFORMS.register("relation_heads")
def relation_heads(x: Tensor, *, mask: Tensor | None = None, arg: str = "") -> Tensor:
    """MiniLMv2's self-attention relation: heads concatenated then re-split into R relation
    heads, ``softmax(X_r X_r^T / sqrt(d_r))`` per relation head (padded keys masked):
    [B, heads, T, d] or [B, T, H] -> [B, R, T, T]."""
    r = int(arg or 48)
    x = _merge_heads(_f32(x))
    b, t, h = x.shape
    if h % r:
        raise AutoSKDError(f"relation_heads:{r}: width {h} is not divisible by {r} relation heads; "
                           f"set the method option relation_heads to a divisor of {h}")
    x = x.view(b, t, r, h // r).transpose(1, 2)
    scores = x @ x.transpose(-1, -2) / math.sqrt(h // r)
    return torch.softmax(_mask_keys(scores, mask), dim=-1)


@TRANSFORMS.register("token_relation")
def token_relation(x: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """CKD's word relation: softmax over each token's cosine similarities to the others
    (padded keys masked): [B, T, H] -> [B, T, T]."""
    return torch.softmax(_mask_keys(cos_matrix(x), mask), dim=-1)


@TRANSFORMS.register("token_cos")
def token_cos(x: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Plain token-token cosine matrix (MGSKD's pair relation), padded pairs zeroed."""
    rel = cos_matrix(x)
    if mask is not None:
        m = mask.to(rel.device, rel.dtype)
        rel = rel * m[:, :, None] * m[:, None, :]
    return rel


@TRANSFORMS.register("window_angle")
def window_angle(x: Tensor, *, mask: Tensor | None = None, arg: str = "") -> Tensor:
    """CKD's local angle relation: for each token j, the angles at j between the tokens of
    a window of w tokens centred on j (w = 21): [B, T, H] -> [B, T, w, w]; pairs touching
    padding or the sequence ends are zeroed on both sides."""
    w = int(arg or 21)
    x = _f32(x)
    b, t, h = x.shape
    half = w // 2
    padded = F.pad(x, (0, 0, half, half))                                    # [B, T+2h, H], zeros past the ends
    window = torch.arange(t, device=x.device)[:, None] + torch.arange(w, device=x.device)  # [T, w] padded positions
    anchor = torch.arange(t, device=x.device) + half
    # e_ji = normalize(x_i - x_j) for i in the window of j, angles <e_ji, e_jk>: from the Gram matrix
    angles = angles_at(padded @ padded.transpose(-1, -2), anchor.expand(b, t), window.expand(b, t, w))
    m = mask.to(x.device, x.dtype) if mask is not None else x.new_ones(b, t)
    mw = F.pad(m, (half, half)).unfold(1, w, 1) * m.unsqueeze(-1)            # [B, T, w]
    return angles * mw.unsqueeze(-1) * mw.unsqueeze(-2)


def span_means(x: Tensor, mask: Tensor | None, n: int) -> tuple[Tensor, Tensor]:
    """Mean vectors of consecutive n-token spans over real tokens, [B, T, H] -> [B, S, H]
    (S = ceil(T/n)), and which spans hold any real token, [B, S] (bool)."""
    x = _f32(x)
    b, t, h = x.shape
    m = mask.to(x.device, x.dtype) if mask is not None else x.new_ones(b, t)
    pad = (-t) % n
    xs = F.pad(x * m[..., None], (0, 0, 0, pad)).view(b, -1, n, h).sum(2)
    ms = F.pad(m, (0, pad)).view(b, -1, n).sum(2)
    return xs / ms.clamp_min(1.0)[..., None], ms > 0


@TRANSFORMS.register("span_relation")
def span_relation(x: Tensor, *, mask: Tensor | None = None, arg: str = "") -> Tensor:
    """MGSKD's span-level relation: mean vectors of consecutive n-token spans (n = 4), then
    their cosine matrix: [B, T, H] -> [B, S, S] (S = ceil(T/n)); empty spans contribute 0."""
    spans, real = span_means(x, mask, int(arg or 4))
    rel = cos_matrix(spans)
    real = real.to(rel.dtype)
    return rel * real[:, :, None] * real[:, None, :]


@TRANSFORMS.register("sample_angle")
def sample_angle(x: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """MGSKD's sample-level angle: mean-pooled sentence vectors of the batch, angle relation
    among every triple of samples: [B, T, H] -> [B, B, B]."""
    return angle_tensor(masked_mean_pool(x, mask) if x.dim() == 3 else x)


@TRANSFORMS.register("sample_relation")
def sample_relation(x: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Cosine matrix between the batch's mean-pooled sentence vectors: [B, T, H] -> [B, B]."""
    return cos_matrix(masked_mean_pool(x, mask) if x.dim() == 3 else x)


@TRANSFORMS.register("gram")
def gram(x: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """``X X^T / sqrt(d)`` (no softmax): the relation form of the feature-distance analysis."""
    x = _f32(x)
    rel = x @ x.transpose(-1, -2) / math.sqrt(x.shape[-1])
    if mask is not None:
        m = mask.to(rel.device, rel.dtype)
        pair = m[:, :, None] * m[:, None, :]
        rel = rel * (pair[:, None] if rel.dim() == 4 else pair)
    return rel


for _fn in (cls, cls_l2, mean_pool):
    _attrs(_fn)
_attrs(relation_heads, pairwise=True, distribution=True, merges_heads=True, takes_arg=True)
_attrs(token_relation, pairwise=True, distribution=True)
_attrs(token_cos, pairwise=True, own_mask=True)
_attrs(window_angle, pairwise=True, own_mask=True, takes_arg=True)
_attrs(span_relation, pairwise=True, own_mask=True, takes_arg=True)
_attrs(sample_angle, pairwise=True, own_mask=True)
_attrs(sample_relation, pairwise=True, own_mask=True)
_attrs(gram, pairwise=True, own_mask=True, merges_heads=False)


@TRANSFORMS.register("span_angle")
def span_angle(x: Tensor, *, mask: Tensor | None = None, arg: str = "") -> Tensor:
    """MGSKD's span triplet angles: angle relation among the n-token span vectors
    [B, T, H] -> [B, S, S, S]; triples touching an empty span are zeroed."""
    spans, real = span_means(x, mask, int(arg or 4))
    ang = angle_tensor(spans)
    real = real.to(ang.dtype)
    return ang * real[:, :, None, None] * real[:, None, :, None] * real[:, None, None, :]


_attrs(span_angle, pairwise=True, own_mask=True, takes_arg=True)
