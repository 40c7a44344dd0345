"""Speed-ups that change the order of a method's computation, never its losses: each one is
checked against the computation it replaced, on the same batch (tiny random models).

* word predictions only at the positions a loss reads (``Method.mlm_rows``);
* a frozen teacher's outputs kept per row of the split (``TeacherRows``) instead of a forward
  per step;
* CKD's window angles and MGSKD's top-k angles from the Gram matrix (``relations.angles_at``);
* the KL's teacher probabilities without underflowing ``exp`` (``losses._probs``)."""

from __future__ import annotations

import copy

import pytest
import torch

from autoskd.engine.mlm import adapt_teacher_mlm
from autoskd.engine.multi_teacher import AllTeachers, MultiTeacherMethod
from autoskd.engine.teachers import SingleTeacher, Teacher
from autoskd.engine.trainer import Distiller
from autoskd.methods import get_method
from helpers import tiny_bert
from test_methods_all import TINY_OPTIONS, loader


@pytest.fixture(scope="module")
def team(tok):
    teachers = {"t4": tiny_bert(tok, layers=4, seed=1, dropout=0.0),
                "t2": tiny_bert(tok, layers=2, seed=2, dropout=0.0)}
    for model in teachers.values():
        adapt_teacher_mlm(model, loader(tok, masked=True), steps=2, lr=1e-2)
    return teachers


def setup(name, tok, team):
    method = get_method(name, **TINY_OPTIONS.get(name, {}))
    student = tiny_bert(tok, layers=2, seed=3).eval()  # no dropout: two passes must see the same student
    teachers = {n: Teacher(n, copy.deepcopy(m)) for n, m in team.items()}
    policy = AllTeachers(teachers) if isinstance(method, MultiTeacherMethod) else SingleTeacher(teachers["t4"])
    return method, Distiller(student, method, policy, progress=False, checkpoint=False), policy


def step_losses(trainer, stage, batch) -> dict[str, torch.Tensor]:
    """One step's loss terms as Distiller.train_step computes them, without the update."""
    ctx, method = trainer.ctx, trainer.method
    ctx.stage, ctx.step, ctx.total_steps = stage, 0, 4
    states = {k: g.get_state() for k, g in vars(method).items() if isinstance(g, torch.Generator)}
    method.on_step(ctx)
    name = trainer.policy.choose(0)
    ctx.teacher_name = name
    student_req, teacher_req = method.feature_requests(ctx, name)
    trainer.extractor.set_features(student_req)
    teacher = method.teacher_features(ctx, trainer.policy, name, batch, teacher_req)
    out = method.losses(ctx, method.student_forward(ctx, trainer.extractor, batch), teacher, name, batch)
    for k, g in vars(method).items():  # the same random draws (DIITO's intervention) for the next call
        if isinstance(g, torch.Generator):
            g.set_state(states[k])
    return out


# ---------------------------------------------------------------- word predictions at read rows only
@pytest.mark.parametrize("name,stage,reads", [("distilbert", "pretrain", "masked"), ("pd", "pretrain", "masked"),
                                              ("diito", "pretrain", "masked"), ("lrc_bert", "pretrain", "masked"),
                                              ("glmd", "task_mlm", "real"), ("glmd", "pretrain", "real")])
def test_mlm_rows_give_the_full_vocabulary_losses(name, stage, reads, tok, team):
    """``mlm_logits`` at the rows a loss reads ([N, V]) give the same terms (and gradients) as the
    [B, T, V] logits with their masks (Method.mlm_rows)."""
    method, trainer, _ = setup(name, tok, team)
    batch = next(iter(loader(tok, masked=True, seed=1)))
    trainer.ctx.stage = stage
    rows = method.mlm_rows(trainer.ctx, batch)
    masked, real = batch["mlm_labels"] != -100, batch["attention_mask"].bool()
    assert torch.equal(rows, masked if reads == "masked" else real | masked)
    assert rows.sum() < rows.numel()  # something is left out
    full = step_losses(trainer, stage, batch)
    grads_full = torch.autograd.grad(sum(full.values()), list(trainer.student.parameters()), allow_unused=True)
    part = step_losses(trainer, stage, {**batch, "mlm_rows": rows})
    grads_part = torch.autograd.grad(sum(part.values()), list(trainer.student.parameters()), allow_unused=True)
    assert full.keys() == part.keys()
    for key in full:
        assert float(part[key].detach()) == pytest.approx(float(full[key].detach()), rel=1e-5, abs=1e-6), key
    for a, b in zip(grads_full, grads_part):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_mlm_rows_only_where_word_predictions_are_read(tok, team):
    method, trainer, _ = setup("distilbert", tok, team)
    masked = next(iter(loader(tok, masked=True)))
    trainer.ctx.stage = "task"  # fine-tuning reads no word prediction
    assert method.mlm_rows(trainer.ctx, masked) is None
    trainer.ctx.stage = "pretrain"
    assert method.mlm_rows(trainer.ctx, next(iter(loader(tok, masked=False)))) is None  # no MLM targets

    class Full(type(method)):
        select_mlm_rows = False

    assert Full().mlm_rows(trainer.ctx, masked) is None


# ---------------------------------------------------------------- a frozen teacher's outputs kept per row
def kept_rows_loader(tok, batch_size: int):
    from autoskd.data.collate import DynamicPaddingCollator
    from test_methods_all import rows

    return torch.utils.data.DataLoader(rows(tok), batch_size=batch_size, shuffle=False,
                                       collate_fn=DynamicPaddingCollator(tok))


FEATURE_STAGES = [(n, s) for n in ["pkd", "tinybert", "minilm", "minilmv2", "alp_kd", "ckd", "lrc_bert",
                                   "universal_kd", "rail_kd", "mgskd", "sid", "mobilebert", "theseus",
                                   "continuation_kd", "mt_bert", "rl_kd", "tmkd", "uncertainty", "dgkd", "kd"]
                  for s in get_method(n, **TINY_OPTIONS.get(n, {})).spec.stages
                  if not get_method(n, **TINY_OPTIONS.get(n, {})).masked_stage(s)]


@pytest.mark.parametrize("name,stage", FEATURE_STAGES)
def test_kept_teacher_outputs_give_the_live_losses(name, stage, tok, team, tmp_path):
    """A batch whose rows the teacher has seen (in other batches, other padding) is served from
    the kept outputs without a teacher forward, with the losses of the live forward
    (TeacherRows)."""
    from autoskd.engine.teacher_cache import TeacherOutputCache

    method, trainer, policy = setup(name, tok, team)
    seen = kept_rows_loader(tok, 4)
    policy.prepare(seen, "split", TeacherOutputCache(tmp_path), "cpu", False)
    for batch in seen:  # the first epoch: live forwards, outputs kept
        step_losses(trainer, stage, batch)
    batch = next(iter(kept_rows_loader(tok, 3)))  # rows 0-2: another batch, padded to another length
    kept = {n: t.rows for n, t in policy.teachers.items()}
    for t in policy.teachers.values():
        t.rows = None
    live = step_losses(trainer, stage, batch)
    for n, t in policy.teachers.items():
        t.rows = kept[n]
    forwards = []
    hooks = [t.model.register_forward_pre_hook(lambda *a: forwards.append(1)) for t in policy.teachers.values()]
    try:
        served = step_losses(trainer, stage, batch)
    finally:
        for h in hooks:
            h.remove()
    if name != "theseus":  # Theseus runs its hybrid (teacher modules) as the student
        assert not forwards, "the teacher ran although every row was kept"
    assert live.keys() == served.keys()
    for key in live:
        assert float(served[key].detach()) == pytest.approx(float(live[key].detach()), rel=1e-4, abs=1e-6), key


# ---------------------------------------------------------------- angles from the Gram matrix
def window_angle_direct(x, mask, w=21):
    """CKD's window angles as first written: the [B, T, w, H] differences normalised, then multiplied."""
    import torch.nn.functional as F

    b, t, _ = x.shape
    half = w // 2
    windows = F.pad(x, (0, 0, half, half)).unfold(1, w, 1).transpose(-1, -2)
    e = F.normalize(windows - x.unsqueeze(2), dim=-1)
    m = mask.to(x.dtype)
    mw = F.pad(m, (half, half)).unfold(1, w, 1) * m.unsqueeze(-1)
    return (e @ e.transpose(-1, -2)) * mw.unsqueeze(-1) * mw.unsqueeze(-2)


def topk_angles_direct(student, teacher, valid, k):
    """MGSKD's top-k triplet angles as first written (normalised neighbour differences)."""
    import torch.nn.functional as F

    from autoskd.engine.relations import cos_matrix

    b, n, _ = teacher.shape
    k = min(int(k), n - 1)
    with torch.no_grad():
        sim = cos_matrix(teacher)
        eye = torch.eye(n, dtype=torch.bool)
        sim = sim.masked_fill(~valid[:, None, :], -3.0).masked_fill(eye, -4.0)
        idx = sim.topk(k, dim=-1).indices
        self_ = idx == torch.arange(n)[None, :, None]
        real = valid.gather(1, idx.flatten(1)).view(b, n, k) & valid[:, :, None] & ~self_
        wts = (real[..., :, None] & real[..., None, :] & ~torch.eye(k, dtype=torch.bool)).float()

    def angles(x):
        nb = x.gather(1, idx.flatten(1)[..., None].expand(-1, -1, x.shape[-1])).view(b, n, k, -1)
        e = F.normalize(nb - x[:, :, None], dim=-1)
        return e @ e.transpose(-1, -2)

    diff = F.smooth_l1_loss(angles(student), angles(teacher), reduction="none")
    return (diff * wts).sum() / wts.sum().clamp_min(1.0)


def hidden_like(seed, b=6, t=30, h=48):
    """LayerNorm-scale token states (norm ~ sqrt(h)), with a near-duplicate token and a repeated one."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, h, generator=g)
    x[:, 5] = x[:, 4] + 0.05 * torch.randn(b, h, generator=g)  # 1% apart
    x[:, 9] = x[:, 8]                                          # identical states
    mask = torch.ones(b, t)
    mask[1, 20:], mask[2, 7:] = 0, 0
    return x, mask


@pytest.mark.parametrize("seed", [0, 1])
def test_window_angles_from_the_gram_matrix_equal_normalised_differences(seed):
    from autoskd.engine.relations import window_angle

    xs, mask = hidden_like(seed)
    xt = hidden_like(seed + 10)[0] * 3
    a = xs.clone().requires_grad_(True)
    fast, slow = window_angle(a, mask=mask, arg="21"), window_angle_direct(xs.clone(), mask)
    # the Gram form loses ~|x|^2 / |x_i - x_a|^2 float epsilons: ~1e-6 for distinct states, 2.5e-5 for the
    # states 1% apart here
    torch.testing.assert_close(fast.detach(), slow, rtol=0, atol=1e-4)
    assert (fast[slow == 0] == 0).all()  # masked pairs and the anchor itself: exactly 0, as before
    b = xs.clone().requires_grad_(True)
    huber = torch.nn.functional.smooth_l1_loss
    loss_fast = huber(window_angle(a, mask=mask, arg="21"), window_angle(xt, mask=mask, arg="21"))
    loss_slow = huber(window_angle_direct(b, mask), window_angle_direct(xt, mask))
    assert float(loss_fast.detach()) == pytest.approx(float(loss_slow.detach()), rel=1e-5)
    (ga,), (gb,) = torch.autograd.grad(loss_fast, [a]), torch.autograd.grad(loss_slow, [b])
    assert torch.isfinite(ga).all()
    torch.testing.assert_close(ga, gb, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("seed", [0, 1])
def test_topk_angles_from_the_gram_matrix_equal_normalised_differences(seed):
    from autoskd.methods.mgskd import topk_angles

    xs, mask = hidden_like(seed)
    xt = hidden_like(seed + 10)[0]
    a, b = xs.clone().requires_grad_(True), xs.clone().requires_grad_(True)
    fast, slow = topk_angles(a, xt, mask.bool(), 20), topk_angles_direct(b, xt, mask.bool(), 20)
    assert float(fast.detach()) == pytest.approx(float(slow.detach()), rel=1e-5)
    (ga,), (gb,) = torch.autograd.grad(fast, [a]), torch.autograd.grad(slow, [b])
    assert torch.isfinite(ga).all()
    torch.testing.assert_close(ga, gb, rtol=1e-3, atol=1e-7)


# ---------------------------------------------------------------- KL rows without underflowing exp
def kl_direct(s, t, tau, mask):
    """``losses.kl`` as first written: exp of every teacher log-probability."""
    import torch.nn.functional as F

    from autoskd.engine.losses import _masked_mean, _row_weights, _scaled_logits, broadcast_mask

    log_p_s = F.log_softmax(_scaled_logits(s, tau), -1)
    log_p_t = F.log_softmax(_scaled_logits(t, tau), -1)
    rows = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return _masked_mean(rows, _row_weights(broadcast_mask(log_p_s, mask))) * tau**2


@pytest.mark.parametrize("kind", ["relation", "scores"])
def test_kl_over_masked_keys_equals_the_exp_of_every_entry(kind):
    """Masked keys (a zero probability read as log 1e-38, or a -1e9 score) underflow in exp; the
    KL that zeroes them (losses._probs) gives the same value and gradients."""
    from autoskd.engine.losses import kl, probs_to_logits
    from autoskd.engine.relations import relation_heads

    g = torch.Generator().manual_seed(0)
    mask = torch.ones(4, 9)
    mask[1, 5:], mask[3, 2:] = 0, 0
    pair = (mask[:, :, None] * mask[:, None, :])[:, None]
    xs, xt = torch.randn(4, 9, 48, generator=g), torch.randn(4, 9, 48, generator=g)
    if kind == "relation":  # MiniLMv2: distributions with exact zeros at masked keys
        s, t = (probs_to_logits(relation_heads(x, mask=mask, arg="12")) for x in (xs, xt))
    else:  # MiniLM/ALP-style scores: finfo.min at masked keys
        s, t = (x[:, None] @ x[:, None].transpose(-1, -2) for x in (xs, xt))
        s, t = (x.masked_fill(pair == 0, torch.finfo(torch.float32).min) for x in (s, t))
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    new, old = kl(a, t, temperature=1.0, mask=pair), kl_direct(b, t, 1.0, pair)
    assert torch.equal(new.detach(), old.detach())
    (ga,), (gb,) = torch.autograd.grad(new, [a]), torch.autograd.grad(old, [b])
    torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-12)
