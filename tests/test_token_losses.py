"""Token-level LM divergences: values against float64 references, chunking, top-k, dtypes."""

from __future__ import annotations

import pytest
import torch

from autoskd.engine.losses import DISTANCES, on_logits
from autoskd.engine.token_losses import TopK, forward_kl, jsd, reverse_kl, token_level, tvd
from autoskd.errors import AutoSKDError

NAMES = ("forward_kl", "reverse_kl", "jsd", "tvd")
B, T, V = 2, 5, 37


def _logits(seed: int, shape=(B, T, V), scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _mask() -> torch.Tensor:
    m = torch.ones(B, T, dtype=torch.bool)
    m[0, :2] = False
    m[1, 4] = False
    return m


def _ref(name: str, s: torch.Tensor, t: torch.Tensor, mask=None, tau: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """Direct float64 reference on the full dense distributions."""
    ls = torch.log_softmax(s.double() / tau, -1)
    lt = torch.log_softmax(t.double() / tau, -1)
    ps, pt = ls.exp(), lt.exp()
    if name == "forward_kl":
        per = (pt * (lt - ls)).sum(-1) * tau**2
    elif name == "reverse_kl":
        per = (ps * (ls - lt)).sum(-1) * tau**2
    elif name == "jsd":
        m = beta * pt + (1 - beta) * ps
        per = (beta * (pt * (lt - m.log())).sum(-1) + (1 - beta) * (ps * (ls - m.log())).sum(-1)) * tau**2
    else:
        per = 0.5 * (pt - ps).abs().sum(-1)
    if mask is None:
        return per.mean()
    return per[mask.bool()].mean()


def _topk(t: torch.Tensor, k: int, tau: float = 1.0) -> TopK:
    lp = torch.log_softmax(t.float() / tau, -1)
    vals, ids = lp.topk(k, dim=-1)
    return TopK(ids=ids, logprobs=vals, temperature=tau)


def test_registered_with_attributes():
    for name in NAMES:
        fn = DISTANCES.get(name)
        assert on_logits(fn) and token_level(fn)
    assert not token_level(DISTANCES.get("kl"))


@pytest.mark.parametrize("name", NAMES)
def test_identical_distributions_give_zero(name):
    s = _logits(0)
    fn = DISTANCES.get(name)
    assert fn(s, s.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert fn(s, _topk(s, V)).item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("name,beta", [("forward_kl", None), ("reverse_kl", None), ("tvd", None),
                                       ("jsd", 0.3), ("jsd", 0.5), ("jsd", 0.9)])
def test_matches_float64_reference(name, beta, tau):
    s, t, m = _logits(1), _logits(2), _mask()
    kw = {} if beta is None else {"beta": beta}
    for mask in (None, m, m.long()):
        got = DISTANCES.get(name)(s, t, temperature=tau, mask=mask, **kw)
        assert got.dtype == torch.float32 and got.dim() == 0
        want = _ref(name, s, t, mask, tau, beta or 0.5)
        assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)


def test_temperature_factor():
    s, t = _logits(3), _logits(4)
    for fn in (forward_kl, reverse_kl, jsd):
        raw = fn(s / 2.0, t / 2.0, temperature=1.0)
        assert fn(s, t, temperature=2.0).item() == pytest.approx(4.0 * raw.item(), rel=1e-5)
    assert tvd(s, t, temperature=2.0).item() == pytest.approx(tvd(s / 2.0, t / 2.0).item(), rel=1e-5)


def test_jsd_limits_and_symmetry():
    s, t, m = _logits(5), _logits(6), _mask()
    assert torch.equal(jsd(s, t, beta=0.0, mask=m), forward_kl(s, t, mask=m))
    assert torch.equal(jsd(s, t, beta=1.0, mask=m), reverse_kl(s, t, mask=m))
    assert jsd(s, t, beta=0.5).item() == pytest.approx(jsd(t, s, beta=0.5).item(), rel=1e-5)
    with pytest.raises(AutoSKDError):
        jsd(s, t, beta=1.5)


def _grads(name: str, s: torch.Tensor, teacher, mask, chunk: int, **kw):
    x = s.clone().requires_grad_(True)
    loss = DISTANCES.get(name)(x, teacher, mask=mask, chunk_tokens=chunk, temperature=1.5, **kw)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("name", NAMES)
def test_chunked_equals_unchunked_and_reference_gradients(name):
    s, t, m = _logits(7), _logits(8), _mask()
    l_small, g_small = _grads(name, s, t, m, 3)
    l_big, g_big = _grads(name, s, t, m, 10_000)
    assert l_small.item() == pytest.approx(l_big.item(), rel=1e-5, abs=1e-7)
    assert torch.allclose(g_small, g_big, atol=1e-6)
    x = s.double().requires_grad_(True)
    _ref(name, x, t, m, tau=1.5).backward()
    assert torch.allclose(g_small.double(), x.grad, atol=1e-5)
    assert g_small[~m].abs().max() == 0  # positions that do not count get no gradient


@pytest.mark.parametrize("name", NAMES)
def test_topk_chunked_gradients(name):
    s, t, m = _logits(9), _logits(10), _mask()
    top = _topk(t, 6, tau=1.5)
    l_small, g_small = _grads(name, s, top, m, 3)
    l_big, g_big = _grads(name, s, top, m, 10_000)
    assert l_small.item() == pytest.approx(l_big.item(), rel=1e-5, abs=1e-7)
    assert torch.allclose(g_small, g_big, atol=1e-6)
    assert torch.isfinite(g_small).all() and g_small.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_topk_with_full_vocab_equals_dense(name):
    s, t, m = _logits(11), _logits(12), _mask()
    dense = DISTANCES.get(name)(s, t, mask=m, temperature=2.0)
    sparse = DISTANCES.get(name)(s, _topk(t, V, tau=2.0), mask=m, temperature=2.0)
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-4, abs=1e-5)


def _bucket_ref(name: str, s: torch.Tensor, top: TopK, beta: float = 0.5) -> torch.Tensor:
    """Hand computation over the k + 1 buckets, in float64, per position then mean."""
    ps_full = torch.softmax(s.double(), -1)
    ps_ids = ps_full.gather(-1, top.ids)
    ps = torch.cat([ps_ids, (1 - ps_ids.sum(-1, keepdim=True))], -1)
    pt_ids = top.logprobs.double().exp()
    pt = torch.cat([pt_ids, (1 - pt_ids.sum(-1, keepdim=True))], -1)
    if name == "forward_kl":
        per = (pt * (pt.log() - ps.log())).sum(-1)
    elif name == "reverse_kl":
        per = (ps * (ps.log() - pt.log())).sum(-1)
    elif name == "jsd":
        mm = beta * pt + (1 - beta) * ps
        per = beta * (pt * (pt / mm).log()).sum(-1) + (1 - beta) * (ps * (ps / mm).log()).sum(-1)
    else:
        per = 0.5 * (pt - ps).abs().sum(-1)
    return per.mean()


@pytest.mark.parametrize("name", NAMES)
def test_topk_small_k_matches_bucket_hand_computation(name):
    s, t = _logits(13, scale=1.0), _logits(14)
    top = _topk(t, 4)
    got = DISTANCES.get(name)(s, top, beta=0.3) if name == "jsd" else DISTANCES.get(name)(s, top)
    assert got.item() == pytest.approx(_bucket_ref(name, s, top, beta=0.3).item(), rel=1e-5, abs=1e-6)
    assert top.tail.shape == (B, T) and (top.tail > 0).all()


def test_topk_helpers():
    top = _topk(_logits(15), 3)
    sub = top.index_select(torch.tensor([1, 0]))
    assert torch.equal(sub.ids[0], top.ids[1]) and sub.k == 3
    assert sub.to("cpu").temperature == top.temperature


@pytest.mark.parametrize("name", NAMES)
def test_bf16_student_gives_fp32_close_to_fp32(name):
    s, t = _logits(16), _logits(17)
    full = DISTANCES.get(name)(s, t)
    half = DISTANCES.get(name)(s.bfloat16(), t.bfloat16())
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), rel=5e-2, abs=1e-3)
    x = s.bfloat16().requires_grad_(True)
    DISTANCES.get(name)(x, t, chunk_tokens=4).backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


def test_teacher_padding_rows_are_sliced():
    s, t, m = _logits(18), _logits(19), _mask()
    padded = torch.cat([t, _logits(20, shape=(B, T, 5))], -1)
    for name in NAMES:
        fn = DISTANCES.get(name)
        assert torch.allclose(fn(s, padded, mask=m), fn(s, t, mask=m))
    with pytest.raises(AutoSKDError, match="smaller than the student"):
        forward_kl(padded, t)


def test_mismatched_temperature_and_bad_inputs_raise():
    s, t = _logits(21), _logits(22)
    with pytest.raises(AutoSKDError, match="rebuild the top-k cache with temperature=2") as err:
        forward_kl(s, _topk(t, 5, tau=1.0), temperature=2.0)
    assert "\n" not in str(err.value)
    with pytest.raises(AutoSKDError):
        tvd(s[:, :4], t)
    with pytest.raises(AutoSKDError):
        forward_kl(s, t, temperature=0.0)
    with pytest.raises(AutoSKDError):
        forward_kl(s[..., :5], _topk(t, 8))  # ids beyond the student's vocabulary


def test_no_counted_positions_gives_zero_with_grad():
    s = _logits(23).requires_grad_(True)
    loss = reverse_kl(s, _logits(24), mask=torch.zeros(B, T, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert s.grad.abs().sum() == 0


def test_topk_path_saves_nothing_of_vocabulary_size_but_the_logits():
    """The top-k path never materialises a [N, V] log-softmax: for fp32 logits, the only tensor of
    vocabulary size kept for backward is the student's own logits (what cross-entropy keeps too)."""
    s, t = _logits(27).requires_grad_(True), _logits(28)
    saved: list[torch.Tensor] = []

    def pack(x):
        saved.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = jsd(s, _topk(t, 4), mask=torch.ones(B, T, dtype=torch.bool))
    big = [x for x in saved if x.numel() >= B * T * V and x.untyped_storage().data_ptr() != s.untyped_storage().data_ptr()]
    assert saved and not big
    loss.backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("teacher_kind", ["dense"])
def test_forward_keeps_no_fp32_intermediates_for_backward(teacher_kind):
    """Checkpointed chunks save only their inputs (views of the student/teacher rows), so
    nothing of size [chunk, V] in fp32 outlives a chunk's forward."""
    s, t = _logits(25).bfloat16().requires_grad_(True), _logits(26)
    teacher = t if teacher_kind == "dense" else _topk(t, 4)
    inputs = {s.untyped_storage().data_ptr()} | (
        {t.untyped_storage().data_ptr()} if teacher_kind == "dense"
        else {teacher.ids.untyped_storage().data_ptr(), teacher.logprobs.untyped_storage().data_ptr()})
    saved: list[torch.Tensor] = []

    def pack(x):
        saved.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = jsd(s, teacher, chunk_tokens=3)
    big = [x for x in saved if x.untyped_storage().data_ptr() not in inputs and x.numel() >= 3 * V]
    assert saved and not big
    loss.backward()
    assert torch.isfinite(s.grad.float()).all()


def test_chunked_backward_memory_is_bounded():
    """Peak extra memory of the chunked path stays well below the unchunked one (CUDA only)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA to measure peak memory")
    dev = "cuda"
    s = torch.randn(4, 256, 32_000, device=dev, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(4, 256, 32_000, device=dev, dtype=torch.bfloat16)

    def peak(chunk: int) -> int:
        s.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        jsd(s, t, chunk_tokens=chunk).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    assert peak(64) < 0.5 * peak(4096)
