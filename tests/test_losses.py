"""Distances and transforms against values worked out by hand (math/numpy, not torch)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from autoskd.engine.losses import (
    DISTANCES,
    TRANSFORMS,
    broadcast_mask,
    hard_label_ce,
    probs_to_logits,
    zero_masked_scores,
)
from autoskd.errors import AutoSKDError


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def kl_rows(student_rows, teacher_rows, tau=1.0):
    """Per-row KL(p_T || p_S) of softmax(x/tau), written out."""
    out = []
    for s, tt in zip(student_rows, teacher_rows):
        ps, pt = softmax([x / tau for x in s]), softmax([x / tau for x in tt])
        out.append(sum(b * (math.log(b) - math.log(a)) for a, b in zip(ps, pt) if b > 0))
    return out


def approx(x, rel=1e-5, abs=1e-6):
    return pytest.approx(x, rel=rel, abs=abs)


def test_registries_have_the_names():
    engine = ["ce", "cos_nce", "cosine", "forward_kl", "huber", "jsd", "kl", "mse", "reverse_kl", "soft_ce", "tvd"]
    # the LM package adds its cross-tokenizer loss when it is imported (test order decides when)
    assert set(engine) <= set(DISTANCES.names()) and set(DISTANCES.names()) - set(engine) <= {"uld_hybrid"}
    assert {"identity", "pairwise_sdp", "relation_heads", "token_relation", "window_angle", "span_relation",
            "sample_angle"} <= set(TRANSFORMS.names())
    with pytest.raises(AutoSKDError, match="unknown distance 'l3'.*mse"):
        DISTANCES.get("l3")


def test_mse_by_hand():
    s, tt = t([[1, 2], [3, 4]]), t([[0, 2], [5, 1]])
    # squared differences 1, 0, 4, 9 -> mean 14 / 4
    assert float(DISTANCES.get("mse")(s, tt)) == approx(3.5)


def test_mse_masks_padded_tokens():
    s = t([[[1, 2], [3, 4], [100, -100]]])
    tt = t([[[0, 2], [5, 1], [0, 0]]])
    mask = torch.tensor([[1, 1, 0]])
    # only the two real tokens count: (1 + 0 + 4 + 9) / 4
    assert float(DISTANCES.get("mse")(s, tt, mask=mask)) == approx(3.5)
    # temperature does not change an element-wise distance
    assert float(DISTANCES.get("mse")(s, tt, mask=mask, temperature=5.0)) == approx(3.5)


def test_mse_masks_attention_rows_and_keys():
    # [B=1, heads=1, T=2, T=2]; token 1 is padding: only element (0, 0) is real
    s = t([[[[1.0, 7.0], [9.0, 9.0]]]])
    tt = t([[[[4.0, 0.0], [0.0, 0.0]]]])
    mask = torch.tensor([[1, 0]])
    assert float(DISTANCES.get("mse")(s, tt, mask=mask)) == approx((1 - 4) ** 2)


def test_huber_by_hand():
    s, tt = t([0.5, 2.0, -3.0]), t([0.0, 0.0, 0.0])
    # |d| < 1: 0.5 d^2 ; otherwise |d| - 0.5
    expected = (0.5 * 0.25 + (2 - 0.5) + (3 - 0.5)) / 3
    assert float(DISTANCES.get("huber")(s, tt)) == approx(expected)


def test_cosine_by_hand_and_masked():
    s = t([[[1, 0], [0, 2], [5, 5]]])
    tt = t([[[1, 1], [0, 3], [-5, -5]]])
    rows = [1 - 1 / math.sqrt(2), 1 - 1.0, 1 - (-1.0)]
    assert float(DISTANCES.get("cosine")(s, tt)) == approx(sum(rows) / 3)
    mask = torch.tensor([[1, 1, 0]])
    assert float(DISTANCES.get("cosine")(s, tt, mask=mask)) == approx((rows[0] + rows[1]) / 2)


def test_kl_batchmean_by_hand():
    s = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]
    tt = [[3.0, 2.0, 1.0], [1.0, 0.0, -1.0]]
    expected = sum(kl_rows(s, tt)) / 2  # batchmean: summed over classes, mean over the batch
    assert float(DISTANCES.get("kl")(t(s), t(tt))) == approx(expected)


def test_kl_temperature_scaling():
    s = [[1.0, 2.0, 3.0], [0.5, 0.0, -0.5]]
    tt = [[3.0, 2.0, 1.0], [1.0, 0.0, -1.0]]
    tau = 2.0
    expected = tau**2 * sum(kl_rows(s, tt, tau)) / 2
    assert float(DISTANCES.get("kl")(t(s), t(tt), temperature=tau)) == approx(expected)
    # tau^2 scaling: not the same as the plain KL of the softened distributions
    assert expected == approx(4 * sum(kl_rows(s, tt, 2.0)) / 2)
    assert float(DISTANCES.get("kl")(t(tt), t(tt), temperature=tau)) == approx(0.0)


def test_ce_by_hand_and_relation_to_kl():
    s = [[1.0, 2.0, 3.0]]
    tt = [[3.0, 2.0, 1.0]]
    for tau in (1.0, 3.0):
        ps, pt = softmax([x / tau for x in s[0]]), softmax([x / tau for x in tt[0]])
        ce = -sum(b * math.log(a) for a, b in zip(ps, pt))
        entropy = -sum(b * math.log(b) for b in pt)
        got = float(DISTANCES.get("ce")(t(s), t(tt), temperature=tau))
        assert got == approx(tau**2 * ce)
        # CE = KL + H(p_T)
        assert got == approx(float(DISTANCES.get("kl")(t(s), t(tt), temperature=tau)) + tau**2 * entropy)


def test_kl_on_masked_attention_scores():
    """Per head and query row; finfo.min keys get no mass and produce no NaN; padded rows
    are excluded when a mask is given."""
    neg = torch.finfo(torch.float32).min
    s_rows = [[0.0, 1.0], [2.0, 0.0], [5.0, 5.0]]
    t_rows = [[1.0, 0.0], [0.0, 0.0], [0.0, 9.0]]
    s = t([[[[*r, neg] for r in s_rows]]])  # [1, 1, 3, 3], key 2 masked
    tt = t([[[[*r, neg] for r in t_rows]]])
    s.requires_grad_(True)
    mask = torch.tensor([[1, 1, 0]])
    per_row = kl_rows(s_rows, t_rows)
    got = DISTANCES.get("kl")(s, tt, mask=mask)
    assert float(got.detach()) == approx((per_row[0] + per_row[1]) / 2)
    got.backward()
    assert torch.isfinite(s.grad).all()
    # without a mask every row counts; a small temperature must not overflow to NaN either
    assert float(DISTANCES.get("kl")(s.detach(), tt)) == approx(sum(per_row) / 3)
    assert torch.isfinite(DISTANCES.get("kl")(s.detach(), tt, temperature=0.5))


def test_distribution_inputs_via_log_probs():
    p_s = [[0.5, 0.5, 0.0], [0.25, 0.75, 0.0]]
    p_t = [[0.8, 0.2, 0.0], [0.5, 0.5, 0.0]]
    expected = np.mean([sum(b * math.log(b / a) for a, b in zip(r_s, r_t) if b > 0) for r_s, r_t in zip(p_s, p_t)])
    got = DISTANCES.get("kl")(probs_to_logits(t(p_s)), probs_to_logits(t(p_t)))
    assert float(got) == approx(float(expected))


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(AutoSKDError, match="projection='linear'"):
        DISTANCES.get("mse")(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))


def test_zero_masked_scores_like_tinybert():
    x = t([[-1e4, -100.0, -99.0, 3.0]])
    assert zero_masked_scores(x).tolist() == [[0.0, 0.0, -99.0, 3.0]]


def test_broadcast_mask_layouts():
    m = torch.tensor([[1, 0, 1]])
    assert broadcast_mask(torch.zeros(1, 3, 5), m).shape == (1, 3, 1)
    assert broadcast_mask(torch.zeros(1, 2, 3, 4), m).shape == (1, 1, 3, 1)
    pair = broadcast_mask(torch.zeros(1, 2, 3, 3), m)
    assert pair.shape == (1, 1, 3, 3) and pair[0, 0].tolist() == [[1, 0, 1], [0, 0, 0], [1, 0, 1]]
    assert broadcast_mask(torch.zeros(1, 2), m) is None  # logits: nothing to mask


def test_pairwise_sdp_by_hand():
    x = t([[[[1.0, 0.0], [1.0, 1.0]]]])  # [1, 1, 2, 2], d = 2
    r = 1 / math.sqrt(2)
    # x x^T = [[1, 1], [1, 2]] / sqrt(2)
    expected = [softmax([1 * r, 1 * r]), softmax([1 * r, 2 * r])]
    got = TRANSFORMS.get("pairwise_sdp")(x)
    assert got.shape == (1, 1, 2, 2)
    np.testing.assert_allclose(got[0, 0].numpy(), np.array(expected), rtol=1e-6)
    assert expected[1][1] == approx(math.exp(r) / (1 + math.exp(r)))
    # padded key 1 gets no mass
    masked = TRANSFORMS.get("pairwise_sdp")(x, mask=torch.tensor([[1, 0]]))
    np.testing.assert_allclose(masked[0, 0].numpy(), np.array([[1.0, 0.0], [1.0, 0.0]]), atol=1e-7)
    assert TRANSFORMS.get("identity")(x) is x


def test_pairwise_sdp_on_hidden_states():
    x = t([[[2.0], [0.0]]])  # [1, T=2, H=1]
    got = TRANSFORMS.get("pairwise_sdp")(x)
    np.testing.assert_allclose(got[0].numpy(), np.array([softmax([4.0, 0.0]), [0.5, 0.5]]), rtol=1e-6)


def test_hard_label_ce_by_hand():
    logits = t([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    expected = (-math.log(softmax([2.0, 0.0])[0]) - math.log(softmax([0.0, 1.0])[0])) / 2
    assert float(hard_label_ce(logits, labels)) == approx(expected)
    # ignored labels (-100) do not count
    assert float(hard_label_ce(logits, torch.tensor([0, -100]))) == approx(-math.log(softmax([2.0, 0.0])[0]))
    # one-output regression: MSE
    assert float(hard_label_ce(t([[1.0], [3.0]]), t([0.0, 1.0]))) == approx((1 + 4) / 2)
