"""The AutoSKD search as a callback on the one training loop (Algorithm 1 of the paper).

Before each student step on a ``train`` batch, :class:`ThetaStep` updates Cat(theta) on a
``val`` batch with the student frozen, by the one-step unrolled gradient
``grad_theta L_val(w - xi grad_w L_train(w, theta), theta)``; the student then learns from the
teacher the theta step drew (SSWO) with its logits scaled by theta_i. Halfway through, eq. 8
drops the m weakest teachers (phase 1 -> phase 2), and K candidate distributions are taken at
K evenly spaced points over phase 2 (one per epoch when phase 2 lasts K epochs, App. B.3).
"""

from __future__ import annotations

import functools

from dataclasses import asdict, dataclass
from itertools import cycle
from typing import Iterator

import torch
from torch.func import functional_call

from ..engine.batches import model_inputs, output_logits, to_device
from ..engine.callbacks import Callback
from ..engine.losses import ce, hard_label_ce
from ..engine.teacher_cache import TeacherOutputCache
from ..engine.teachers import THETA_SCALINGS, SampledTeacher, theta_logit_scale
from ..errors import AutoSKDError
from .bilevel import cr_teacher_logits, sswo_teacher_logits, unrolled_theta_grad
from .distribution import DEFAULT_THETA_LR, DEFAULT_THETA_WEIGHT_DECAY, STRATEGIES, TeacherDistribution, ThetaOptimizer

#: where the virtual step's size comes from (``ThetaConfig.xi``), besides a fixed number
XI_SOURCES = ("theta_lr", "student_lr")


@dataclass
class ThetaConfig:
    """Hyperparameters of the categorical-distribution optimisation (paper section 2.4, App. E).

    ``xi`` is the virtual step's size in ``w − ξ ∇_w L_train``: ``"theta_lr"`` (default) is the
    paper's α, θ's own learning rate (section 2.4.1); ``"student_lr"`` is the student's current
    scheduled rate (DARTS; 0 at the start of warm-up, where second order then equals first
    order); a number fixes it. ``val_objective``: ``distill`` (the paper's: the student's
    distillation loss on val data) or ``task`` (the student's cross-entropy on labelled val
    data; it reaches θ only through the virtual step, so it needs ``order="second"``) or
    ``teacher_mixture`` (not in the paper): the negative log-likelihood of the val labels (LM: the
    val text's next tokens) under the teachers' θ-mixture ``Σ_j θ_j p_j``, the held-out
    interpolation weights of Jelinek & Mercer (1980). It does not read the student, so ``order``
    and ``xi`` do not apply (each θ step is one direct gradient, no virtual step). Why: the
    one-step task gradient is linear in θ (``−ξ ∇L_val · Σ θ_j ∇L_j``), so it ranks teachers and
    drives θ to a vertex or an edge; this likelihood is concave in θ, and its maximum is inside the
    simplex exactly when the teachers are complementary (each better on part of the val text).
    It needs ``center``, taken over the teachers with θ_j > 0: at the maximum the gradient is the
    same for every teacher in the mixture (the simplex constraint's multiplier), so the centred
    gradient is 0 there; a teacher at 0 whose gradient is above that mean stays out, and one whose
    gradient falls below it comes back. (Centring over every active teacher would let one teacher
    held at 0 push the others' centred gradients to one sign, which Adam's per-entry step and the
    projection then cancel.)
    ``warmup`` is the fraction of phase 1 during which θ stays fixed while the student learns
    from the (uniform) team: the θ-gradient rewards teachers the student agrees with, which
    only means something once the student has learned anything (0 = the paper's Algorithm 1).
    ``scaling`` is how SSWO scales the sampled teacher's logits
    (:func:`~autoskd.engine.teachers.theta_logit_scale`; ``theta`` is the paper's θ_i).
    ``num_candidates`` distributions are taken at K evenly spaced points over phase 2, the last
    at its end; ``candidate_span`` < 1 squeezes them into the later part of phase 2 (an
    ablation: late candidates are close to one another).

    ``strategy``: ``sswo`` (the paper's: the θ step differentiates the sampled teacher's loss
    toward θ_i-scaled logits, and moves that entry only), ``cr`` (the student's target is the
    θ-weighted sum of every teacher's logits, in the θ step's virtual step *and* in the student's
    real step: :class:`ThetaStep` puts the policy in mixture mode, so the virtual step is the step
    the student takes, as DARTS's bilevel step assumes; the consistency gap the paper names for CR
    (section 2.4.1) is then where it puts it, between the search, which learns from the mixture,
    and the candidates' trainings, which sample one teacher), or ``expected`` (not in the paper): the θ step
    differentiates SSWO's student loss in expectation over the draw, ``Σ_j θ_j L_j``
    (:func:`expected_distillation_loss`), and moves every entry. Why: with the task objective its
    second-order gradient is, per teacher, how much a step on that teacher alone lowers the val
    loss, which ranks the teachers the way full trainings do where the distill objective's direct
    gradient ranks them in reverse. In a search it still ends on the most confident teacher, not
    the best one, so it is an option, not the default (both measured: ``benchmarks/README.md``).
    Its real student step samples one teacher, as SSWO's: in expectation over the draw that step
    is the virtual step's.

    ``center`` (not in the paper) subtracts from the θ-gradient the mean over the active teachers
    of each teacher's own direct gradient on the same val batch (one student forward; for CR, the
    gradient's own mean). Why: the distill objective's gradient has the same sign for every
    teacher the student mostly agrees with, and differs mainly in size (a good teacher's can be
    forty times a useless one's). Adam normalises each entry, so every sampled entry moves by
    about ``lr`` whatever its gradient's size, and the projection to the simplex cancels the
    common move: θ then tracks how often each teacher was drawn. Centred, the sign says whether
    a teacher helps more or less than the team's average, which is what Adam keeps.
    """

    strategy: str = "sswo"
    order: str = "second"
    lr: float = DEFAULT_THETA_LR
    weight_decay: float = DEFAULT_THETA_WEIGHT_DECAY
    xi: float | str = "theta_lr"
    val_objective: str = "distill"
    scaling: str = "theta"
    num_candidates: int = 25
    candidate_span: float = 1.0
    every: int = 1
    history_every: int = 1
    warmup: float = 0.0
    center: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise AutoSKDError(f"theta strategy {self.strategy!r} unknown; choose one of: {', '.join(STRATEGIES)}")
        if self.order not in ("first", "second"):
            raise AutoSKDError(f"unrolled-gradient order {self.order!r} unknown; choose first or second")
        if self.val_objective not in VAL_OBJECTIVES:
            raise AutoSKDError(f"val objective {self.val_objective!r} unknown; choose one of: {', '.join(VAL_OBJECTIVES)}")
        if self.scaling not in THETA_SCALINGS or (self.scaling == "none" and self.strategy == "sswo"):
            raise AutoSKDError(f"theta scaling {self.scaling!r} unknown for strategy {self.strategy}; choose one of: "
                               "theta, max, n (none: expected or cr only, where θ enters as the draw's or the "
                               "mixture's weights)")
        fixed = isinstance(self.xi, (int, float)) and not isinstance(self.xi, bool)
        if not (fixed and self.xi >= 0) and self.xi not in XI_SOURCES:
            raise AutoSKDError(f"xi {self.xi!r} must be theta_lr, student_lr or a number >= 0")
        if self.val_objective == "task" and (self.order == "first" or (fixed and self.xi == 0)):
            raise AutoSKDError("--val-objective task needs --order second (and xi > 0): the task loss reaches theta "
                               "only through the virtual step, so its first-order theta-gradient is exactly zero")
        if self.center and self.val_objective != "distill" and self.strategy == "sswo":
            raise AutoSKDError(f"theta.center with --val-objective {self.val_objective} needs --strategy cr or "
                               "expected: SSWO centres on each teacher's own distillation gradient, which that "
                               "objective does not have")
        if self.val_objective == "teacher_mixture" and not self.center:
            raise AutoSKDError("--val-objective teacher_mixture needs theta.center (--theta-center): its gradient is "
                               "negative for every teacher, Adam moves each entry by about lr and the simplex "
                               "projection cancels the common move, so uncentred θ would not move")
        if not self.lr > 0:
            raise AutoSKDError(f"the theta learning rate must be > 0 (got {self.lr})")
        if self.num_candidates < 1:
            raise AutoSKDError("num_candidates must be at least 1")
        if not 0 < self.candidate_span <= 1:
            raise AutoSKDError("candidate_span must be in (0, 1]: the later fraction of phase 2 candidates come from")
        if not 0 <= self.warmup < 1:
            raise AutoSKDError("theta warmup must be a fraction of phase 1 in [0, 1)")
        if self.every < 1 or self.history_every < 1:
            raise AutoSKDError("theta 'every' and 'history_every' must be at least 1")

    def to_dict(self) -> dict:
        return asdict(self)


#: θ's validation objectives (see :class:`ThetaConfig`)
VAL_OBJECTIVES = ("distill", "task", "teacher_mixture")


def mixture_nll(likelihoods: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``−mean_t log Σ_j θ_j p_j(y_t)``: ``likelihoods`` ``[n, N]`` is each teacher's probability
    of the true label (next token) of N val positions. Differentiable in θ; a dropped teacher
    (θ_j = 0) adds nothing."""
    mixed = (theta.to(likelihoods.dtype)[:, None] * likelihoods).sum(0)
    return -mixed.clamp_min(torch.finfo(likelihoods.dtype).tiny).log().mean()


def support_centred(grad: torch.Tensor, theta: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """``grad`` minus its mean over the active teachers with θ_j > 0 (every active one when none
    is): the centring of the ``teacher_mixture`` objective (:class:`ThetaConfig` says why)."""
    support = active & (theta.detach() > 0)
    return grad - grad[support if bool(support.any()) else active].mean()


def distillation_loss(student_logits: torch.Tensor, target_logits: torch.Tensor, labels: torch.Tensor | None,
                      alpha: float, temperature: float) -> torch.Tensor:
    """The student's training loss as the ``kd`` method computes it, in soft-CE form:
    ``alpha · T² · CE_T(target, student) + (1 − alpha) · CE(student, labels)``, from the engine's
    own distances (:func:`~autoskd.engine.losses.ce`, :func:`~autoskd.engine.losses.hard_label_ce`).

    Its gradient in the student's weights equals the engine's ``kd`` loss (KL form) exactly, so
    the virtual step ``w − ξ ∇_w L_train`` is the step the student really takes. For θ the two
    forms differ, and soft CE (TinyBERT's prediction-layer loss, the L_d AutoSKDBERT distils with)
    is the right one: KL = CE − H(p_T) adds an entropy term that penalises sharpening *every*
    teacher, while CE's θ-gradient rewards exactly the teachers whose predictions the student,
    after the virtual step, agrees with on held-out data.
    """
    loss = alpha * ce(student_logits, target_logits, temperature=temperature)
    if alpha < 1.0:
        if labels is None:
            raise AutoSKDError("a distillation loss with hard labels (alpha < 1) needs labelled batches")
        loss = loss + (1.0 - alpha) * hard_label_ce(student_logits, labels)
    return loss


def expected_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, theta: torch.Tensor,
                               scales: torch.Tensor, labels: torch.Tensor | None, alpha: float,
                               temperature: float) -> torch.Tensor:
    """SSWO's student loss in expectation over the draw: ``Σ_j θ_j · L(student, c_j · z_j)`` over the
    teachers with ``c_j > 0``, with SSWO's logit scales ``scales`` (``c_j``, taken at the current θ)
    held constant.

    θ reaches it only as the probability of drawing each teacher, so the second-order θ-gradient
    of a task objective is ``−ξ ∇_w L_val · ∇_w L_j`` per teacher: how much a step on teacher j
    alone lowers the val loss (``benchmarks/one_step_signal.py`` measures it)."""
    return sum(theta[j] * distillation_loss(student_logits, scales[j].to(teacher_logits.dtype) * teacher_logits[j],
                                            labels, alpha, temperature)
               for j in torch.nonzero(scales > 0).flatten().tolist())


def sswo_direct_grads(student_logits: torch.Tensor, teacher_logits: torch.Tensor, theta: torch.Tensor,
                      active: list[int], scaling: str, labels: torch.Tensor | None, alpha: float,
                      temperature: float) -> torch.Tensor:
    """``[n]``: entry j is ∂/∂θ_j of teacher j's own SSWO distillation loss (student logits held
    fixed), for every j in ``active`` (0 for the others): first-order SSWO's θ-gradient were
    teacher j drawn. ``teacher_logits`` is ``[n, B, C]``."""
    theta = theta.detach().clone().requires_grad_(True)
    loss = sum(distillation_loss(student_logits.detach(), sswo_teacher_logits(teacher_logits, theta, j, scaling),
                                 labels, alpha, temperature) for j in active)
    return torch.autograd.grad(loss, theta)[0]


def candidate_steps(selection_step: int, total: int, k: int, span: float = 1.0) -> list[int]:
    """The 0-based steps after which the K candidates are taken: the ends of K equal segments
    of (the later ``span`` of) phase 2, ``[selection_step, total)``; the last at the end."""
    selection_step = max(selection_step, total - int(round((total - selection_step) * span)))
    phase2 = total - selection_step
    if phase2 < k:
        raise AutoSKDError(f"phase 2 has {phase2} steps, fewer than the {k} candidates asked for; "
                           "train the search longer (--search-epochs) or ask for fewer --candidates")
    return [selection_step + (phase2 * (j + 1)) // k - 1 for j in range(k)]


class ThetaStep(Callback):
    """Alternates theta steps (val half) with the trainer's student steps (train half).

    ``alpha`` and ``temperature`` are the student's own ``kd`` options: the virtual step and the
    ``distill`` validation objective use the loss the student really trains with.
    """

    def __init__(self, distribution: TeacherDistribution, policy: SampledTeacher, val_loader,
                 config: ThetaConfig, m: int, cache: TeacherOutputCache | None = None, val_id: str | None = None,
                 alpha: float = 1.0, temperature: float = 1.0):
        if policy.theta is not distribution.theta:
            raise ValueError("the policy must sample from the distribution's own theta tensor")
        if policy.scaling != config.scaling:
            raise ValueError(f"the policy scales logits by {policy.scaling!r} but the search by {config.scaling!r}")
        if not 0 <= m < distribution.n:
            raise AutoSKDError(f"m (teachers dropped at selection) must be between 0 and {distribution.n - 1}; got {m}")
        if not 0.0 < alpha <= 1.0:
            raise AutoSKDError(f"the search distils with alpha in (0, 1] (got {alpha}): at 0 no teacher reaches the student")
        self.dist, self.policy, self.config, self.m = distribution, policy, config, m
        self.alpha, self.temperature = float(alpha), float(temperature)
        # CR: the student's real step learns from the θ-mixture its virtual step differentiates
        policy.mixture = config.strategy == "cr"
        self.optimizer = ThetaOptimizer(distribution, strategy=config.strategy, lr=config.lr,
                                        weight_decay=config.weight_decay)
        self.val_loader = val_loader
        self.val_tables = self.val_targets(val_loader, val_id, cache)
        self._val_batches: Iterator[dict] | None = None
        self.history: list[dict] = []
        self.candidates: list[dict] = []
        self.dropped: list[int] = []
        self.selected = False
        self.selection_step = 0
        self.warmup_steps = 0
        self.candidate_steps: set[int] = set()

    def val_targets(self, val_loader, val_id: str | None, cache: TeacherOutputCache | None) -> dict:
        """Every teacher's outputs on the val split, computed (or read from the cache) once."""
        return {name: teacher.logits_for(val_loader, val_id, cache, progress=False)
                for name, teacher in self.policy.teachers.items()}

    # ---------------------------------------------------------------- schedule
    def on_stage_start(self, trainer, ctx) -> None:
        total = ctx.total_steps
        self.selection_step = total // 2
        self.warmup_steps = int(self.selection_step * self.config.warmup)
        self.candidate_steps = set(candidate_steps(self.selection_step, total, self.config.num_candidates,
                                                   self.config.candidate_span))
        self._val_batches = cycle(self.val_loader)
        self._record(ctx.step, force=True)

    def on_step_begin(self, trainer, ctx, batch) -> None:
        step = ctx.step
        if step == self.selection_step and not self.selected:
            if self.m > 0:
                self.dropped = self.dist.select_(self.m)
                self.optimizer.reset()
            self.selected = True
            self._record(step, force=True)
        if step >= self.warmup_steps and step % self.config.every == 0:
            self._theta_step(trainer, batch)
        self._record(step + 1)

    def on_step_end(self, trainer, ctx, batch, losses) -> None:
        if ctx.step in self.candidate_steps:
            self.candidates.append({"step": ctx.step + 1, "theta": self.dist.probs().tolist()})

    def _record(self, step: int, force: bool = False) -> None:
        if force or step % self.config.history_every == 0:
            self.history.append({"step": step, "phase": 2 if self.selected else 1,
                                 "theta": self.dist.probs().tolist()})

    # ---------------------------------------------------------------- the theta update
    def _teacher_logits(self, batch: dict, table: dict | None) -> torch.Tensor:
        """[n, B, C] logits of every teacher for ``batch`` (train: the trainer's cache; val: ours)."""
        out = []
        for name, teacher in self.policy.teachers.items():
            if table is None:
                out.append(teacher.features(batch, ["logits"])["logits"])
            else:
                out.append(table[name].index_select(0, batch["idx"].cpu()).to(batch["input_ids"].device))
        return torch.stack(out)

    def xi(self, trainer) -> float:
        """The virtual step's size (see :class:`ThetaConfig`)."""
        if self.config.xi == "theta_lr":
            return self.config.lr
        if self.config.xi == "student_lr":
            return float(trainer.optimizer.param_groups[0]["lr"])
        return float(self.config.xi)

    def loss_closures(self, student, batch: dict, val_batch: dict, i: int):
        """``(train_loss(params, theta), val_loss(params, theta))`` for one θ step with teacher ``i``
        sampled: the closures :func:`~autoskd.search.bilevel.unrolled_theta_grad` differentiates."""
        # read only when train_loss runs, which first order at xi 0 never does
        train_t = functools.cache(lambda: self._teacher_logits(batch, None))
        val_t = self._teacher_logits(val_batch, self.val_tables)
        sswo, active, scaling = self.config.strategy == "sswo", self.dist.active, self.config.scaling

        scales = None
        if self.config.strategy == "expected":  # SSWO's logit scales at the current θ: constants of the θ-gradient
            theta_now = self.dist.theta.detach()
            scales = torch.stack([theta_logit_scale(theta_now, j, scaling) if active[j] else theta_now.new_zeros(())
                                  for j in range(len(theta_now))])

        def student_loss(logits, teacher_logits, theta, labels):
            if scales is not None:
                return expected_distillation_loss(logits, teacher_logits, theta, scales, labels,
                                                  self.alpha, self.temperature)
            target = sswo_teacher_logits(teacher_logits, theta, i, scaling) if sswo else \
                cr_teacher_logits(teacher_logits, theta, active=active)
            return distillation_loss(logits, target, labels, self.alpha, self.temperature)

        def logits_of(params, b):
            return output_logits(functional_call(student, params, args=(), kwargs=model_inputs(b)))

        def train_loss(params, theta):
            return student_loss(logits_of(params, batch), train_t(), theta, batch.get("labels"))

        def val_loss(params, theta):
            if self.config.val_objective == "teacher_mixture":  # the student is not read
                probs = torch.softmax(val_t.float(), -1)
                labels = val_batch["labels"].to(probs.device)
                return mixture_nll(probs.gather(-1, labels[None, :, None].expand(len(probs), -1, 1))[..., 0], theta)
            logits = logits_of(params, val_batch)
            if self.config.val_objective == "task":
                return hard_label_ce(logits, val_batch["labels"])
            return student_loss(logits, val_t, theta, val_batch.get("labels"))

        return train_loss, val_loss

    def direct_grads(self, student, val_batch: dict) -> torch.Tensor:
        """:func:`sswo_direct_grads` on ``val_batch`` at the current weights and θ, from one
        student forward."""
        with torch.no_grad():
            logits = output_logits(student(**model_inputs(val_batch)))
        return sswo_direct_grads(logits, self._teacher_logits(val_batch, self.val_tables), self.dist.theta,
                                 self.dist.active_indices(), self.config.scaling, val_batch.get("labels"),
                                 self.alpha, self.temperature)

    def theta_grad(self, student, batch: dict, val_batch: dict, i: int, xi: float,
                   reduce=None) -> torch.Tensor:
        """The gradient the θ optimiser steps with, teacher ``i`` sampled (``center``: see
        :class:`ThetaConfig`). ``reduce`` averages gradients over data-parallel ranks."""
        sswo, cfg = self.config.strategy == "sswo", self.config
        if sswo and cfg.center:
            direct = self.direct_grads(student, val_batch)
            direct = reduce([direct])[0] if reduce is not None else direct
            baseline = direct[self.dist.active].mean()
            if cfg.order == "first" and xi == 0:  # the sampled entry of `direct` is the whole gradient
                return direct - baseline
        train_loss, val_loss = self.loss_closures(student, batch, val_batch, i)
        order = cfg.order
        if cfg.val_objective == "teacher_mixture":  # θ's own likelihood: its direct gradient is all of it
            order, xi = "first", 0.0
        grad = unrolled_theta_grad(student, self.dist.theta, train_loss, val_loss, xi=xi, order=order,
                                   reduce=reduce)
        if cfg.center:
            if cfg.val_objective == "teacher_mixture":
                return support_centred(grad, self.dist.theta, self.dist.active)
            grad = grad - (baseline if sswo else grad[self.dist.active].mean())
        return grad

    @property
    def nonfinite_steps(self) -> int:
        """θ steps skipped because their gradient was not finite (NaN/inf); past a threshold the
        optimiser stops the search (:class:`~autoskd.search.distribution.ThetaOptimizer`)."""
        return self.optimizer.nonfinite_steps

    @property
    def theta_steps(self) -> int:
        """θ steps attempted (taken or skipped)."""
        return self.optimizer.steps_taken

    def _theta_step(self, trainer, batch) -> None:
        student = trainer.student
        i = None
        if self.config.strategy != "cr":  # CR's student learns from the mixture: nothing to draw
            i = self.policy.draw()
            self.policy.preselected = i
        val_batch = to_device(next(self._val_batches), trainer.device)
        was_training = student.training
        student.eval()  # deterministic closures: the finite differences compare two evaluations
        backend = trainer.backend  # under DeepSpeed: whole weights, gradients averaged over the ranks
        try:
            with backend.functional_forward(student):
                grad = self.theta_grad(student, batch, val_batch, i, self.xi(trainer),
                                       reduce=backend.mean_over_data_ranks)
        finally:
            student.train(was_training)
        self.optimizer.step(grad, sampled=i if self.config.strategy == "sswo" else None)
