"""The θ update of the search, checked against what it must equal: finite differences of the
unrolled objective for every accepted combination, the student's real training step, Adam
state per entry for SSWO, the paper's ξ, App. A.1's m and the phase-2 candidate points."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from autoskd.data.collate import make_loader, tokenize_split
from autoskd.data.tasks import load_task
from autoskd.engine.batches import model_inputs
from autoskd.engine.teachers import SampledTeacher, Teacher, theta_logit_scale
from autoskd.engine.trainer import Distiller
import autoskd.methods  # noqa: F401,E402 - registers "kd", which the engine looks up by name
from autoskd.errors import AutoSKDError
from autoskd.search.bilevel import named_trainable_params, unrolled_theta_grad
from autoskd.search.distribution import TeacherDistribution, ThetaOptimizer
from autoskd.search.theta_step import ThetaConfig, ThetaStep, candidate_steps
from helpers import tiny_bert


@pytest.fixture(scope="module")
def setup(tok, tmp_path_factory):
    """A tiny task, three tiny teachers, a tiny student and one train and one val batch."""
    path = tmp_path_factory.mktemp("data") / "d.jsonl"
    import json

    rows = [{"text": f"{'good' if i % 2 else 'bad'} film number {i}", "label": i % 2} for i in range(80)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = load_task(str(path), seed=0)
    train = make_loader(tokenize_split(task.split("train"), tok, 12), tok, 8, shuffle=False)
    val = make_loader(tokenize_split(task.split("val"), tok, 12), tok, 8, shuffle=False)
    teachers = {f"t{k}": Teacher(f"t{k}", tiny_bert(tok, layers=1, seed=10 + k, dropout=0.0)) for k in range(3)}
    return {"task": task, "train": train, "val": val, "teachers": teachers, "tok": tok}


def make_step(setup, config: ThetaConfig, theta=(0.2, 0.5, 0.3), alpha=0.5, temperature=2.0):
    dist = TeacherDistribution.from_list(list(theta))
    policy = SampledTeacher(setup["teachers"], dist.theta, seed=0, scaling=config.scaling)
    return ThetaStep(dist, policy, setup["val"], config, m=0, alpha=alpha, temperature=temperature)


def objective(student, step, batch, val_batch, i, xi, order, theta0):
    """θ -> L_val(w', θ), the function whose gradient the search descends (w' from θ0 for first order)."""
    train_loss, val_loss = step.loss_closures(student, batch, val_batch, i)
    params = {k: v.detach() for k, v in named_trainable_params(student).items()}

    def w_prime(theta):
        w = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        g = torch.autograd.grad(train_loss(w, theta), list(w.values()), allow_unused=True)
        return {k: params[k] - xi * (gk if gk is not None else 0) for k, gk in zip(w, g)}

    fixed = w_prime(theta0) if order == "first" else None

    def f(theta):
        return float(val_loss(fixed if fixed is not None else w_prime(theta), theta))

    return f


COMBOS = [c for c in itertools.product(("sswo", "cr", "expected"), ("first", "second"), ("distill", "task"),
                                       ("theta", "max", "n"))
          if not (c[2] == "task" and c[1] == "first") and not (c[0] == "cr" and c[3] != "theta")]


@pytest.mark.parametrize("strategy, order, objective_name, scaling", COMBOS)
def test_every_accepted_combination_matches_finite_differences(setup, strategy, order, objective_name, scaling):
    config = ThetaConfig(strategy=strategy, order=order, val_objective=objective_name, scaling=scaling, lr=0.5)
    step = make_step(setup, config)
    student = tiny_bert(setup["tok"], layers=1, seed=3, dropout=0.0).double().eval()  # float64: exact enough for FD
    batch, val_batch = next(iter(setup["train"])), next(iter(setup["val"]))
    i, xi = 0, config.lr  # the sampled teacher is not the argmax of theta (0.2 vs 0.5)
    train_loss, val_loss = step.loss_closures(student, batch, val_batch, i)
    theta0 = step.dist.theta.detach().clone()
    grad = unrolled_theta_grad(student, step.dist.theta, train_loss, val_loss, xi=xi, order=order, fd_eps=1e-3)
    f = objective(student, step, batch, val_batch, i, xi, order, theta0)
    eps = 1e-2  # central differences: error O(eps^2)
    fd = torch.zeros_like(theta0)
    for j in range(len(theta0)):
        e = torch.zeros_like(theta0)
        e[j] = eps
        fd[j] = (f(theta0 + e) - f(theta0 - e)) / (2 * eps)
    if strategy == "sswo":  # SSWO updates the sampled weight only: its entry is the gradient it uses
        grad, fd = grad[i:i + 1], fd[i:i + 1]
    scale = float(fd.abs().max())
    assert scale > 1e-6, fd  # a gradient that could be wrong: not identically zero
    assert torch.allclose(grad, fd, atol=2e-2 * scale, rtol=0), (grad, fd)


@pytest.mark.parametrize("strategy", ["cr", "expected"])
def test_teacher_mixture_objective_is_the_val_labels_likelihood_under_the_theta_mixture(setup, strategy):
    """``teacher_mixture``: θ's gradient is the (centred) direct gradient of −mean log Σ θ_j p_j(y)
    over the val batch (teachers' softmax at the true label), whatever ``order`` and ``xi`` say,
    and the student is not read (a different student gives the same gradient)."""
    config = ThetaConfig(strategy=strategy, scaling="theta", val_objective="teacher_mixture", order="second", lr=0.5,
                         center=True)
    step = make_step(setup, config)
    batch, val_batch = next(iter(setup["train"])), next(iter(setup["val"]))
    theta = step.dist.theta.detach().clone().requires_grad_(True)
    probs = torch.stack([torch.softmax(t.model(**model_inputs(val_batch)).logits.float(), -1)
                         .gather(-1, val_batch["labels"][:, None])[:, 0] for t in setup["teachers"].values()])
    want = torch.autograd.grad(-(theta[:, None] * probs).sum(0).log().mean(), theta)[0]
    grads = [step.theta_grad(tiny_bert(setup["tok"], layers=1, seed=s, dropout=0.0).eval(), batch, val_batch, None,
                             xi=0.3) for s in (3, 4)]
    want = want - want.mean()  # centred: the objective needs it (ThetaConfig)
    assert torch.allclose(grads[0], want.to(grads[0].dtype), atol=1e-5) and torch.equal(grads[0], grads[1])
    with pytest.raises(AutoSKDError, match="theta.center"):
        ThetaConfig(strategy=strategy, scaling="theta", val_objective="teacher_mixture")


def test_task_objective_with_first_order_is_refused():
    with pytest.raises(AutoSKDError, match="--order second"):
        ThetaConfig(val_objective="task", order="first")
    with pytest.raises(AutoSKDError, match="--order second"):
        ThetaConfig(val_objective="task", order="second", xi=0.0)
    ThetaConfig(val_objective="task", order="second")  # accepted


def test_virtual_step_is_the_students_real_training_step(setup):
    """w − ξ ∇_w L_train of the θ-step closure equals one SGD step of the engine's ``kd`` loss."""
    config = ThetaConfig(lr=0.1)
    step = make_step(setup, config, alpha=0.5, temperature=2.0)
    student = tiny_bert(setup["tok"], layers=1, seed=3, dropout=0.0).eval()
    batch = next(iter(setup["train"]))
    i = 2
    train_loss, _ = step.loss_closures(student, batch, next(iter(setup["val"])), i)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in named_trainable_params(student).items()}
    grads = torch.autograd.grad(train_loss(params, step.dist.theta.detach()), list(params.values()))
    expected = {k: params[k].detach() - config.lr * g for k, g in zip(params, grads)}

    engine = Distiller(student, "kd", step.policy, progress=False, method_options={"alpha": 0.5, "temperature": 2.0},
                       device="cpu")
    engine.ctx.stage = "task"  # what fit() sets before the first step
    step.policy.preselected = i
    engine.train_step(batch, torch.optim.SGD(student.parameters(), lr=config.lr), max_grad_norm=0.0)
    for name, p in student.named_parameters():
        assert torch.allclose(p.detach(), expected[name], atol=1e-6), name


def test_xi_defaults_to_theta_lr(setup):
    step = make_step(setup, ThetaConfig(lr=3e-3))

    class Trainer:
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.0)  # warm-up: the student's lr is 0

    assert step.xi(Trainer()) == 3e-3
    assert make_step(setup, ThetaConfig(lr=3e-3, xi="student_lr")).xi(Trainer()) == 0.0
    assert make_step(setup, ThetaConfig(lr=3e-3, xi=0.25)).xi(Trainer()) == 0.25
    with pytest.raises(AutoSKDError, match="xi"):
        ThetaConfig(xi="sometimes")


def test_sswo_leaves_other_entries_adam_state_untouched():
    dist = TeacherDistribution.uniform(3)
    opt = ThetaOptimizer(dist, strategy="sswo", lr=0.1, weight_decay=1e-3)
    opt.step(torch.tensor([1.0, -2.0, 3.0]), sampled=1)
    opt.step(torch.tensor([0.5, -1.0, 0.5]), sampled=1)
    assert opt.steps.tolist() == [0, 2, 0]
    assert opt.exp_avg[0] == 0 and opt.exp_avg[2] == 0 and opt.exp_avg_sq[0] == 0 and opt.exp_avg_sq[2] == 0
    assert opt.exp_avg[1] != 0
    before = dist.probs()
    assert before[1] > before[0] == before[2]  # only the sampled weight moved (ratios of the others kept)
    opt.step(torch.tensor([1.0, 0.0, 0.0]), sampled=0)  # entry 0's first step: its own bias correction
    assert opt.steps.tolist() == [1, 2, 0]
    cr = ThetaOptimizer(TeacherDistribution.uniform(3), strategy="cr", lr=0.1)
    cr.step(torch.tensor([1.0, -2.0, 3.0]))
    assert cr.steps.tolist() == [1, 1, 1]


def test_sswo_first_step_matches_torch_adam_on_the_sampled_entry():
    """On the entry it updates, the per-entry Adam is torch's Adam (L2 weight decay)."""
    dist = TeacherDistribution.uniform(2)
    ours = ThetaOptimizer(dist, strategy="sswo", lr=0.05, weight_decay=1e-3)
    ref = nn.Parameter(torch.tensor([0.5], dtype=torch.float64))
    adam = torch.optim.Adam([ref], lr=0.05, weight_decay=1e-3)
    for g in (0.3, -0.1, 0.7):
        theta_before = float(dist.theta.detach()[0])
        ours.step(torch.tensor([g, 0.0]), sampled=0)
        with torch.no_grad():
            ref.copy_(torch.tensor([theta_before], dtype=torch.float64))
        ref.grad = torch.tensor([g], dtype=torch.float64)
        adam.step()
        raw = float(ref.detach()[0])  # unprojected value; ours is then renormalised with entry 1
        other = float(dist.theta.detach()[1]) / float(dist.theta.detach()[0]) * raw
        assert abs(raw / (raw + other) - float(dist.theta.detach()[0])) < 1e-9


def test_theta_logit_scalings():
    theta = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    assert float(theta_logit_scale(theta, 0, "theta")) == pytest.approx(0.2)
    assert float(theta_logit_scale(theta, 0, "max")) == pytest.approx(0.4)
    assert float(theta_logit_scale(theta, 1, "max")) == pytest.approx(1.0)
    assert float(theta_logit_scale(theta, 0, "n")) == pytest.approx(0.6)
    with pytest.raises(AutoSKDError):
        theta_logit_scale(theta, 0, "sqrt")


def test_candidates_cover_phase_two_one_per_segment():
    assert candidate_steps(100, 200, 4) == [124, 149, 174, 199]
    assert candidate_steps(100, 200, 1) == [199]
    assert len(set(candidate_steps(50, 100, 50))) == 50
    assert candidate_steps(100, 200, 2, span=0.5) == [174, 199]
    with pytest.raises(AutoSKDError, match="fewer than the 5 candidates"):
        candidate_steps(10, 14, 5)


@pytest.mark.parametrize("strategy", ["sswo", "cr", "expected"])
def test_first_order_without_virtual_step_is_one_val_forward(setup, strategy):
    """order first, xi 0 (the medium preset): exactly ∇_θ L_val(w, θ) (whose closures the
    finite-difference test above checks), the weights untouched, and the train loss never
    evaluated, so the step costs a val forward and not a train step as well."""
    config = ThetaConfig(strategy=strategy, order="first", xi=0.0, lr=0.5)
    step = make_step(setup, config)
    student = tiny_bert(setup["tok"], layers=1, seed=3, dropout=0.0).double().eval()
    batch, val_batch = next(iter(setup["train"])), next(iter(setup["val"]))
    i = 0
    train_loss, val_loss = step.loss_closures(student, batch, val_batch, i)
    calls = []

    def counted_train_loss(params, theta):
        calls.append(1)
        return train_loss(params, theta)

    before = {k: v.detach().clone() for k, v in student.state_dict().items()}
    grad = unrolled_theta_grad(student, step.dist.theta, counted_train_loss, val_loss, xi=0.0, order="first")
    assert calls == []
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    theta0 = step.dist.theta.detach().clone()
    th = theta0.clone().requires_grad_(True)
    params = {k: v.detach() for k, v in named_trainable_params(student).items()}
    (plain,) = torch.autograd.grad(val_loss(params, th), th)
    assert torch.allclose(grad, plain, rtol=1e-10, atol=1e-14)
    assert float(grad.abs().max()) > 0  # θ reaches the val loss through the targets


# ------------------------------------------------------------------------ centred θ-gradient
def own_loss_fd(step, student, batch, val_batch, theta0, eps=1e-2):
    """Entry j: the central difference in θ_j of teacher j's own val distillation loss (weights fixed)."""
    params = {k: v.detach() for k, v in named_trainable_params(student).items()}
    out = torch.zeros_like(theta0)
    for j in range(len(theta0)):
        _, val_loss = step.loss_closures(student, batch, val_batch, j)
        e = torch.zeros_like(theta0)
        e[j] = eps
        out[j] = (float(val_loss(params, theta0 + e)) - float(val_loss(params, theta0 - e))) / (2 * eps)
    return out


@pytest.mark.parametrize("order, xi", [("first", 0.0), ("first", 0.5), ("second", 0.5)])
@pytest.mark.parametrize("scaling", ["theta", "n"])
def test_centred_sswo_gradient_is_the_sampled_one_minus_the_teams_mean(setup, order, xi, scaling):
    config = ThetaConfig(order=order, xi=xi, scaling=scaling, center=True, lr=0.5)
    step = make_step(setup, config)
    student = tiny_bert(setup["tok"], layers=1, seed=3, dropout=0.0).double().eval()
    with torch.no_grad():  # logits of a useful size: θ-gradients well above float32 rounding in the FD
        student.classifier.weight.mul_(30)
    batch, val_batch = next(iter(setup["train"])), next(iter(setup["val"]))
    i = 0
    theta0 = step.dist.theta.detach().clone()
    got = step.theta_grad(student, batch, val_batch, i, xi)[i]
    f = objective(student, step, batch, val_batch, i, xi, order, theta0)
    e = torch.zeros_like(theta0)
    e[i] = 1e-2
    plain = (f(theta0 + e) - f(theta0 - e)) / 2e-2  # the uncentred gradient of the sampled entry
    baseline = own_loss_fd(step, student, batch, val_batch, theta0).mean()
    assert abs(float(baseline)) > 1e-6
    assert abs(float(got) - (plain - float(baseline))) < 2e-2 * max(abs(plain), abs(float(baseline)))


def test_centred_cr_gradient_sums_to_zero(setup):
    config = ThetaConfig(strategy="cr", order="second", center=True, lr=0.5)
    step = make_step(setup, config)
    student = tiny_bert(setup["tok"], layers=1, seed=3, dropout=0.0).double().eval()
    batch, val_batch = next(iter(setup["train"])), next(iter(setup["val"]))
    train_loss, val_loss = step.loss_closures(student, batch, val_batch, 0)
    plain = unrolled_theta_grad(student, step.dist.theta, train_loss, val_loss, xi=0.5, order="second")
    got = step.theta_grad(student, batch, val_batch, 0, 0.5)
    assert torch.allclose(got, plain - plain.mean(), atol=1e-6) and abs(float(got.sum())) < 1e-6
    assert float(plain.abs().max()) > 1e-6


def test_centring_the_task_objective_needs_an_every_entry_strategy():
    with pytest.raises(AutoSKDError, match="theta.center with --val-objective task needs --strategy cr or expected"):
        ThetaConfig(val_objective="task", order="second", center=True)
    for strategy in ("cr", "expected"):
        ThetaConfig(strategy=strategy, val_objective="task", order="second", center=True)  # accepted


def test_expected_task_gradient_is_each_teachers_val_loss_drop(setup):
    """``expected`` + task: entry j of the second-order θ-gradient is −ξ ∇_w CE_val(w') · ∇_w L_j(w),
    L_j the student's loss toward teacher j alone (SSWO's scale held constant); centred, it sums to 0."""
    config = ThetaConfig(strategy="expected", order="second", val_objective="task", lr=0.5)
    step = make_step(setup, config, alpha=1.0, temperature=1.0)
    student = tiny_bert(setup["tok"], layers=1, seed=3, dropout=0.0).double().eval()
    batch, val_batch = next(iter(setup["train"])), next(iter(setup["val"]))
    xi = 1e-4
    got = step.theta_grad(student, batch, val_batch, 0, xi)
    params = [p for p in student.parameters() if p.requires_grad]
    flat = lambda gs: torch.cat([g.reshape(-1) for g in gs])  # noqa: E731
    ce = torch.nn.functional.cross_entropy(student(**model_inputs(val_batch)).logits, val_batch["labels"])
    g_val = flat(torch.autograd.grad(ce, params))
    s_logits = student(**model_inputs(batch)).logits
    theta = step.dist.theta.detach()
    for j, teacher in enumerate(setup["teachers"].values()):
        with torch.no_grad():
            z = teacher.features(batch, ["logits"])["logits"].double()
        kd = -(torch.softmax(theta[j] * z, -1) * torch.log_softmax(s_logits, -1)).sum(-1).mean()
        a_j = float(g_val @ flat(torch.autograd.grad(kd, params, retain_graph=True)))
        assert float(got[j]) == pytest.approx(-xi * a_j, rel=2e-2, abs=1e-9)
    assert len({round(float(v), 12) for v in got}) == 3
    centred = ThetaStep(step.dist, step.policy, setup["val"], ThetaConfig(
        strategy="expected", order="second", val_objective="task", lr=0.5, center=True), m=0)
    c = centred.theta_grad(student, batch, val_batch, 0, xi)
    assert torch.allclose(c, got - got.mean(), atol=1e-12)


def test_expected_strategy_moves_every_active_entry():
    dist = TeacherDistribution.from_list([0.2, 0.5, 0.3])
    opt = ThetaOptimizer(dist, strategy="expected", lr=0.1)
    opt.step(torch.tensor([1.0, -1.0, 0.5]))
    assert opt.steps.tolist() == [1, 1, 1]
    theta = dist.theta.detach()
    assert float(theta[1]) > 0.5 and float(theta[0]) < 0.2
