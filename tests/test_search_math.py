"""The categorical-distribution maths of the AutoSKD search: simplex, eq. 8, SSWO/CR, unrolled θ-gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoskd.errors import AutoSKDError
from autoskd.search.bilevel import (
    cr_teacher_logits,
    exact_unrolled_theta_grad,
    make_loss_fn,
    named_trainable_params,
    sswo_teacher_logits,
    unrolled_theta_grad,
)
from autoskd.search.distribution import (
    TeacherDistribution,
    ThetaOptimizer,
    ineffective_teacher_count,
    select_teachers,
)


def assert_on_simplex(dist: TeacherDistribution, tol: float = 1e-6) -> None:
    t = dist.probs()
    assert torch.isfinite(t).all()
    assert (t >= 0).all(), t
    assert abs(float(t.sum()) - 1.0) < tol, float(t.sum())
    assert (t[~dist.active] == 0).all(), t  # exactly zero


# --------------------------------------------------------------------------- TeacherDistribution
def test_construction_is_a_distribution_and_round_trips_state_dict():
    d = TeacherDistribution.from_list([1.0, 2.0, 1.0])
    assert torch.allclose(d.probs(), torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64))
    assert isinstance(d.theta, nn.Parameter) and d.active.dtype == torch.bool and d.active.all()
    u = TeacherDistribution.uniform(4)
    assert torch.allclose(u.probs(), torch.full((4,), 0.25, dtype=torch.float64))
    # probs() is a detached copy
    p = u.probs()
    p[0] = 7.0
    assert float(u.theta.detach()[0]) == 0.25 and not p.requires_grad

    d.select_(1)  # drops index 0 (tie with index 2, lower index first)
    e = TeacherDistribution.uniform(3)
    e.load_state_dict(d.state_dict())
    assert torch.equal(e.probs(), d.probs()) and torch.equal(e.active, d.active)
    assert e.active.tolist() == [False, True, True]

    for bad in ([-0.1, 1.1], [0.0, 0.0], [float("nan"), 1.0], []):
        with pytest.raises(AutoSKDError):
            TeacherDistribution.from_list(bad)


def test_sample_only_from_active_teachers_and_follows_theta():
    d = TeacherDistribution.from_list([0.1, 0.2, 0.3, 0.4], active=[True, False, True, True])
    assert d.probs()[1] == 0 and abs(float(d.probs().sum()) - 1) < 1e-12
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([d.sample(g) for _ in range(4000)])
    assert (draws != 1).all()
    freq = torch.bincount(draws, minlength=4).double() / len(draws)
    assert torch.allclose(freq, d.probs(), atol=0.03)
    # reproducible with the same seed
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [d.sample(g1) for _ in range(20)] == [d.sample(g2) for _ in range(20)]


def test_project_clamps_zeroes_inactive_and_falls_back_to_uniform():
    d = TeacherDistribution.from_list([0.25] * 4, active=[True, True, False, True])
    with torch.no_grad():
        d.theta.copy_(torch.tensor([-0.5, 1.0, 3.0, 1.0]))
    d.project_()
    assert d.probs().tolist() == [0.0, 0.5, 0.0, 0.5]
    with torch.no_grad():
        d.theta.copy_(torch.tensor([-1.0, 0.0, 5.0, float("nan")]))  # nothing positive among active
    d.project_()
    assert torch.allclose(d.probs(), torch.tensor([1 / 3, 1 / 3, 0.0, 1 / 3], dtype=torch.float64))
    assert_on_simplex(d)


# --------------------------------------------------------------------------- eq. 8
def test_select_teachers_hand_worked():
    theta = torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=torch.float64)
    new, dropped = select_teachers(theta, 2)
    assert dropped == [0, 2]
    assert torch.allclose(new, torch.tensor([0.0, 4 / 7, 0.0, 3 / 7], dtype=torch.float64), atol=1e-15)
    assert torch.equal(theta, torch.tensor([0.1, 0.4, 0.2, 0.3], dtype=torch.float64))  # not modified

    new, dropped = select_teachers(theta, 0)
    assert dropped == [] and torch.allclose(new, theta)

    new, dropped = select_teachers(theta, 3)
    assert dropped == [0, 2, 3] and new.tolist() == [0.0, 1.0, 0.0, 0.0]

    # p = 2: divide by the Euclidean norm of the survivors [0.4, 0.3] -> 0.5
    new, _ = select_teachers(theta, 2, p=2.0)
    assert torch.allclose(new, torch.tensor([0.0, 0.8, 0.0, 0.6], dtype=torch.float64))


def test_select_teachers_ties_lower_index_first():
    theta = torch.tensor([0.2, 0.3, 0.2, 0.3])
    new, dropped = select_teachers(theta, 1)
    assert dropped == [0]
    assert torch.allclose(new, torch.tensor([0.0, 0.375, 0.25, 0.375]))
    _, dropped = select_teachers(theta, 3)
    assert dropped == [0, 1, 2]  # then among the 0.3s, index 1 before 3
    _, dropped = select_teachers(torch.full((5,), 0.2), 2)
    assert dropped == [0, 1]


def test_select_teachers_bad_m_and_eps():
    theta = torch.tensor([0.5, 0.5])
    for m in (2, 3, -1, 1.5):
        with pytest.raises(AutoSKDError, match="0 <= m < 2|integer"):
            select_teachers(theta, m)
    # all survivors zero: eps guards the division, result stays finite
    new, dropped = select_teachers(torch.tensor([0.0, 0.0, 1.0]), 1)
    assert dropped == [0] and new.tolist() == [0.0, 0.0, 1.0]
    new, _ = select_teachers(torch.tensor([0.0, 0.0, 0.0]), 1)
    assert torch.isfinite(new).all() and new.tolist() == [0.0, 0.0, 0.0]


def test_select_respects_already_inactive_teachers():
    d = TeacherDistribution.from_list([0.1, 0.4, 0.2, 0.3])
    assert d.select_(1) == [0]
    assert torch.allclose(d.probs(), torch.tensor([0.0, 4 / 9, 2 / 9, 3 / 9], dtype=torch.float64))
    # m counts among the 3 active teachers only; index 0 (already 0) is not a candidate
    assert d.select_(1) == [2]
    assert d.active.tolist() == [False, True, False, True]
    assert_on_simplex(d)
    with pytest.raises(AutoSKDError):
        d.select_(2)  # only 2 active teachers left


# --------------------------------------------------------------------------- appendix A.1
def test_ineffective_teacher_count():
    scores = [70.0, 82.5, 79.0, 85.0, 88.0]
    assert ineffective_teacher_count(scores, 80.0) == 2
    assert ineffective_teacher_count(scores, 80.0, count_student_as_weak=True) == 3
    assert ineffective_teacher_count(scores, 60.0) == 0
    assert ineffective_teacher_count(scores, 60.0, count_student_as_weak=True) == 1
    assert ineffective_teacher_count(scores, 79.0) == 1  # ties are not "below"
    assert ineffective_teacher_count(scores, 99.0) == 4  # capped at n - 1
    assert ineffective_teacher_count(scores, 99.0, count_student_as_weak=True) == 4
    assert ineffective_teacher_count([0.9], 0.95, count_student_as_weak=True) == 0
    with pytest.raises(AutoSKDError):
        ineffective_teacher_count([], 1.0)


# --------------------------------------------------------------------------- ThetaOptimizer
@pytest.mark.parametrize("strategy", ["sswo", "cr"])
def test_theta_stays_on_simplex_over_random_steps(strategy):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    d = TeacherDistribution.uniform(5)
    opt = ThetaOptimizer(d, strategy=strategy, lr=0.2)  # large lr: exercises the clamping
    hit_zero = False
    for step in range(200):
        if step == 100:
            d.select_(2)
            opt.reset()
            assert d.active.sum() == 3
        i = d.sample(gen)
        assert bool(d.active[i])
        grad = torch.randn(5, dtype=torch.float64) * 10 ** torch.empty(1).uniform_(-3, 2)
        opt.step(grad, sampled=i)
        assert_on_simplex(d)
        hit_zero |= bool(((d.probs() == 0) & d.active).any())
    assert hit_zero  # the clamp-to-0 branch of the projection was exercised
    assert not d.theta.requires_grad or d.theta.grad is None


def test_sswo_moves_only_the_sampled_weight():
    d = TeacherDistribution.from_list([0.1, 0.2, 0.3, 0.4])
    opt = ThetaOptimizer(d, strategy="sswo", lr=0.01)
    # build up Adam momentum on other entries first (as if other teachers had been updated)
    for i in (0, 1, 3):
        opt.step(torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64), sampled=i)
    assert (opt.exp_avg[[0, 1, 3]] != 0).all() and opt.exp_avg[2] == 0
    moments = (opt.exp_avg.clone(), opt.exp_avg_sq.clone())

    before = d.probs()
    opt.step(torch.tensor([5.0, 5.0, -3.0, 5.0], dtype=torch.float64), sampled=2)
    after = d.probs()
    assert_on_simplex(d)
    others = [0, 1, 3]
    # the sampled weight grew (negative gradient), relative to everyone else
    assert after[2] / after[0] > before[2] / before[0] * 1.01
    # the others were only rescaled by one common factor: their ratios are unchanged
    r_before = before[others] / before[others].sum()
    r_after = after[others] / after[others].sum()
    assert torch.allclose(r_after, r_before, rtol=0, atol=1e-14)
    # equivalently: before renormalisation only index 2 changed
    scale = after[0] / before[0]
    unnorm = after / scale
    assert torch.allclose(unnorm[others], before[others], rtol=1e-12)
    assert not torch.isclose(unnorm[2], before[2])
    # and only index 2's Adam state advanced
    assert torch.equal(opt.exp_avg[[0, 1, 3]], moments[0][[0, 1, 3]])
    assert torch.equal(opt.exp_avg_sq[[0, 1, 3]], moments[1][[0, 1, 3]])

    with pytest.raises(ValueError):
        opt.step(torch.zeros(4), sampled=None)
    d.select_(1)
    with pytest.raises(ValueError):
        opt.step(torch.zeros(4), sampled=0)  # inactive


def test_cr_moves_several_weights():
    d = TeacherDistribution.from_list([0.1, 0.2, 0.3, 0.4])
    opt = ThetaOptimizer(d, strategy="cr", lr=0.01)
    before = d.probs()
    opt.step(torch.tensor([1.0, -2.0, 0.5, -0.5], dtype=torch.float64))
    after = d.probs()
    assert_on_simplex(d)
    ratios = after / before
    # not a common rescaling: the pairwise ratios changed
    assert ratios.max() - ratios.min() > 0.05
    assert after[1] / after[0] > before[1] / before[0]  # descending the gradient
    with pytest.raises(AutoSKDError):
        ThetaOptimizer(d, strategy="gumbel")


def test_theta_optimizer_defaults_follow_the_paper():
    d = TeacherDistribution.uniform(3)
    opt = ThetaOptimizer(d)
    assert opt.weight_decay == 1e-3 and 3e-4 <= opt.lr <= 1e-3 and opt.betas == (0.9, 0.999)
    assert opt.strategy == "sswo"


# --------------------------------------------------------------------------- θ in the losses
def test_sswo_and_cr_teacher_logits():
    z = torch.randn(3, 2, 4, dtype=torch.float64)
    theta = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64, requires_grad=True)
    assert torch.allclose(sswo_teacher_logits(z, theta, 1), 0.5 * z[1])
    assert torch.allclose(sswo_teacher_logits(list(z), theta, 2), 0.3 * z[2])
    mix = cr_teacher_logits(z, theta)
    assert torch.allclose(mix, 0.2 * z[0] + 0.5 * z[1] + 0.3 * z[2])
    active = torch.tensor([True, False, True])
    zs = [z[0], None, z[2]]  # an inactive teacher may be missing entirely
    assert torch.allclose(cr_teacher_logits(zs, theta, active), 0.2 * z[0] + 0.3 * z[2])
    (g,) = torch.autograd.grad(cr_teacher_logits(z, theta, active).sum(), theta)
    assert g[1] == 0 and torch.allclose(g[0], z[0].sum())
    # float32 logits with float64 theta stay float32
    assert cr_teacher_logits(z.float(), theta).dtype == torch.float32


# --------------------------------------------------------------------------- unrolled gradient
TAU = 2.0


def kd_loss(student_logits, target_logits, tau=TAU):
    """KL(softmax(target/τ) ‖ softmax(student/τ)) · τ²."""
    return F.kl_div(
        F.log_softmax(student_logits / tau, -1), F.log_softmax(target_logits / tau, -1),
        log_target=True, reduction="batchmean",
    ) * tau**2


def tiny_problem(seed=0, mode="cr"):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    n = 3
    x_tr, x_val = torch.randn(16, 4, dtype=torch.float64), torch.randn(12, 4, dtype=torch.float64)
    y_val = torch.randint(0, 3, (12,))
    z_tr = 3 * torch.randn(n, 16, 3, dtype=torch.float64)
    z_val = 3 * torch.randn(n, 12, 3, dtype=torch.float64)
    theta = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    i = 2

    def target(z, th):
        return cr_teacher_logits(z, th) if mode == "cr" else sswo_teacher_logits(z, th, i)

    def train_out(out, batch, th):
        return kd_loss(out, target(z_tr, th))

    def val_out(out, batch, th):
        return kd_loss(out, target(z_val, th)) + F.cross_entropy(out, batch[1])

    train_fn = make_loss_fn(model, x_tr, train_out)
    val_fn = make_loss_fn(model, (x_val, y_val), val_out)
    return model, theta, train_fn, val_fn


def fd_unrolled(model, theta, train_fn, val_fn, xi, h=1e-5):
    """Central differences of θ ↦ L_val(w − ξ ∇_w L_train(w, θ), θ)."""
    params = {k: v.detach() for k, v in named_trainable_params(model).items()}

    def f(th):
        w = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        gw = torch.autograd.grad(train_fn(w, th), list(w.values()))
        w2 = {k: params[k] - xi * g for k, g in zip(w, gw)}
        with torch.no_grad():
            return float(val_fn(w2, th))

    out = torch.zeros_like(theta)
    for j in range(theta.numel()):
        e = torch.zeros_like(theta)
        e[j] = h
        out[j] = (f(theta + e) - f(theta - e)) / (2 * h)
    return out


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("mode", ["cr", "sswo"])
def test_unrolled_theta_grad_matches_finite_differences(mode):
    model, theta, train_fn, val_fn = tiny_problem(mode=mode)
    xi = 0.5
    ref = fd_unrolled(model, theta, train_fn, val_fn, xi)
    second = unrolled_theta_grad(model, theta, train_fn, val_fn, xi, order="second")
    exact = exact_unrolled_theta_grad(model, theta, train_fn, val_fn, xi)
    first = unrolled_theta_grad(model, theta, train_fn, val_fn, xi, order="first")
    assert second.shape == theta.shape and second.dtype == theta.dtype
    assert rel(second, ref) < 1e-2
    assert rel(exact, ref) < 1e-6
    assert rel(second, exact) < 1e-4
    # the second-order term matters here: first order is measurably different
    assert rel(first, exact) > 0.02  # (vs ~1e-7 agreement of second order)
    if mode == "sswo":  # only the sampled weight enters the losses
        assert torch.all(second[:2] == 0) and second[2] != 0


def test_xi_zero_is_plain_first_order_darts():
    model, theta, train_fn, val_fn = tiny_problem(seed=1)
    th = theta.clone().requires_grad_(True)
    params = named_trainable_params(model)
    (plain,) = torch.autograd.grad(val_fn(params, th), th)
    for order in ("first", "second"):
        g = unrolled_theta_grad(model, theta, train_fn, val_fn, xi=0.0, order=order)
        assert torch.allclose(g, plain, rtol=1e-12, atol=1e-15)
    assert torch.allclose(exact_unrolled_theta_grad(model, theta, train_fn, val_fn, 0.0), plain)
    # and with xi > 0 the first-order gradient is taken at the virtual step, not at w
    g1 = unrolled_theta_grad(model, theta, train_fn, val_fn, xi=0.5, order="first")
    assert not torch.allclose(g1, plain)
    with pytest.raises(AutoSKDError):
        unrolled_theta_grad(model, theta, train_fn, val_fn, xi=0.1, order="third")
    with pytest.raises(AutoSKDError):
        unrolled_theta_grad(model, theta, train_fn, val_fn, xi=-1.0)


def test_gradient_calls_leave_the_model_untouched():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()
    model[0].bias.requires_grad_(False)  # a frozen parameter is used from the model, not stepped
    model.train()  # BatchNorm updates running stats in place during the forward
    x = torch.randn(10, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    z = torch.randn(2, 10, 3, dtype=torch.float64)
    theta = nn.Parameter(torch.tensor([0.4, 0.6], dtype=torch.float64))

    def loss_out(out, batch, th):
        return kd_loss(out, cr_teacher_logits(z, th)) + F.cross_entropy(out, y)

    train_fn = make_loss_fn(model, {"x": x}, loss_out, model_inputs=lambda b: ((b["x"],), {}))
    val_fn = make_loss_fn(model, x, loss_out)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert set(named_trainable_params(model)) == {"0.weight", "1.weight", "1.bias", "3.weight", "3.bias"}

    for order in ("first", "second"):
        g = unrolled_theta_grad(model, theta, train_fn, val_fn, xi=0.3, order=order)
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    exact_unrolled_theta_grad(model, theta, train_fn, val_fn, xi=0.3)

    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # bitwise, parameters and buffers
    assert all(p.grad is None for p in model.parameters())
    assert theta.grad is None
    assert model.training


def test_make_loss_fn_dict_batch_uses_model_input_keys():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, input_ids, attention_mask=None):
            h = self.lin(input_ids)
            return h * attention_mask[:, None] if attention_mask is not None else h

    model = Toy()
    batch = {"input_ids": torch.randn(4, 3), "attention_mask": torch.ones(4), "labels": torch.tensor([0, 1, 0, 1]),
             "idx": torch.arange(4)}
    fn = make_loss_fn(model, batch, lambda out, b, th: F.cross_entropy(out, b["labels"]) * th.sum())
    params = named_trainable_params(model)
    expected = F.cross_entropy(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])
    assert torch.allclose(fn(params, torch.ones(1)), expected)
    shifted = {k: v + torch.randn_like(v) for k, v in params.items()}
    assert not torch.allclose(fn(shifted, torch.ones(1)), expected)
