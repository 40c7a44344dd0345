"""The AutoSKD search as a callback on the one training loop (Algorithm 1 of the paper).

Before each student step on a ``train`` batch, :class:`ThetaStep` updates Cat(theta) on a
``val`` batch with the student frozen, by the one-step unrolled gradient
``grad_theta L_val(w - xi grad_w L_train(w, theta), theta)``; the student then learns from the
teacher the theta step drew (SSWO) with its logits scaled by theta_i. Halfway through, eq. 8
drops the m weakest teachers (phase 1 -> phase 2), and K candidate distributions are
snapshotted over the later part of phase 2.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from itertools import cycle
from typing import Iterator

import torch
from torch.func import functional_call
from torch.nn import functional as F

from ..engine.batches import model_inputs, to_device
from ..engine.callbacks import Callback
from ..engine.teacher_cache import TeacherOutputCache
from ..engine.teachers import SampledTeacher
from ..errors import AutoSKDError
from .bilevel import cr_teacher_logits, sswo_teacher_logits, unrolled_theta_grad
from .distribution import TeacherDistribution, ThetaOptimizer


@dataclass
class ThetaConfig:
    """Hyperparameters of the categorical-distribution optimisation (paper section 3.2.1, App. E).

    ``xi`` is the virtual step size; None uses the student's current learning rate (DARTS).
    ``val_objective``: ``distill`` (the paper's: the same distillation loss on val data) or
    ``task`` (the student's cross-entropy on labelled val data). ``warmup`` is the fraction of
    phase 1 during which theta stays fixed while the student learns from the (uniform) team:
    the theta-gradient rewards teachers the student agrees with, which only means something
    once the student has learned anything (0 = the paper's Algorithm 1).
    """

    strategy: str = "sswo"
    order: str = "second"
    lr: float = 5e-4
    weight_decay: float = 1e-3
    xi: float | None = None
    val_objective: str = "distill"
    temperature: float = 1.0
    num_candidates: int = 25
    candidate_span: float = 0.5
    every: int = 1
    history_every: int = 1
    warmup: float = 0.0

    def __post_init__(self) -> None:
        if self.val_objective not in ("distill", "task"):
            raise AutoSKDError(f"val objective {self.val_objective!r} unknown; choose distill or task")
        if self.num_candidates < 1:
            raise AutoSKDError("num_candidates must be at least 1")
        if not 0 <= self.warmup < 1:
            raise AutoSKDError("theta warmup must be a fraction of phase 1 in [0, 1)")
        if not 0 < self.candidate_span <= 1:
            raise AutoSKDError("candidate_span must be in (0, 1]: the later fraction of phase 2 candidates come from")

    def to_dict(self) -> dict:
        return asdict(self)


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """-sum softmax(z_T/T) log softmax(z_S/T) * T^2: TinyBERT's prediction-layer loss, the L_d
    AutoSKDBERT distils with.

    For the student it has the same gradient as KL; for theta it does not, and the difference
    matters: KL = CE - H(p_T) adds an entropy term that penalises sharpening *every* teacher,
    while CE's theta-gradient rewards exactly the teachers whose predictions the student,
    after the virtual step, agrees with on held-out data.
    """
    t = temperature
    return -(F.softmax(teacher_logits / t, -1) * F.log_softmax(student_logits / t, -1)).sum(-1).mean() * t * t


class ThetaStep(Callback):
    """Alternates theta steps (val half) with the trainer's student steps (train half)."""

    def __init__(self, distribution: TeacherDistribution, policy: SampledTeacher, val_loader,
                 config: ThetaConfig, m: int, cache: TeacherOutputCache | None = None, val_id: str | None = None):
        if policy.theta is not distribution.theta:
            raise ValueError("the policy must sample from the distribution's own theta tensor")
        if not 0 <= m < distribution.n:
            raise AutoSKDError(f"m (teachers dropped at selection) must be between 0 and {distribution.n - 1}; got {m}")
        self.dist, self.policy, self.config, self.m = distribution, policy, config, m
        self.optimizer = ThetaOptimizer(distribution, strategy=config.strategy, lr=config.lr,
                                        weight_decay=config.weight_decay)
        self.val_loader = val_loader
        self.val_tables = {name: teacher.logits_for(val_loader, val_id, cache, progress=False)
                           for name, teacher in policy.teachers.items()}
        self._val_batches: Iterator[dict] | None = None
        self.history: list[dict] = []
        self.candidates: list[dict] = []
        self.dropped: list[int] = []
        self.selected = False
        self.selection_step = 0
        self.warmup_steps = 0
        self.candidate_steps: set[int] = set()

        self.val_tables = {name: teacher.logits_for(val_loader, val_id, cache, progress=False)
                           for name, teacher in policy.teachers.items()}
    # ---------------------------------------------------------------- schedule
    def on_stage_start(self, trainer, ctx) -> None:
        total = ctx.total_steps
        self.selection_step = total // 2
        self.warmup_steps = int(self.selection_step * self.config.warmup)
        phase2 = total - self.selection_step
        first = self.selection_step + int(round(phase2 * (1 - self.config.candidate_span)))
        span = total - first
        k = self.config.num_candidates
        # K evenly spaced snapshot points over the later part of phase 2, the last at the end.
        self.candidate_steps = {first + int(round(span * (j + 1) / k)) - 1 for j in range(k)}
        self.candidate_steps = {min(max(s, self.selection_step), total - 1) for s in self.candidate_steps}
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
            self._theta_step(trainer, ctx, batch)
        self._record(step + 1)

    def on_step_end(self, trainer, ctx, batch, losses) -> None:
        if ctx.step in self.candidate_steps and len(self.candidates) < self.config.num_candidates:
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

    def _theta_step(self, trainer, ctx, batch) -> None:
        student = trainer.student
        i = self.policy.draw()
        self.policy.preselected = i
        val_batch = to_device(next(self._val_batches), trainer.device)
        train_t = self._teacher_logits(batch, None)
        val_t = self._teacher_logits(val_batch, self.val_tables)
        temperature, sswo = self.config.temperature, self.config.strategy == "sswo"
        active = self.dist.active

        def target(teacher_logits, theta):
            if sswo:
                return sswo_teacher_logits(teacher_logits, theta, i)
            return cr_teacher_logits(teacher_logits, theta, active=active)

        def logits_of(params, b):
            out = functional_call(student, params, args=(), kwargs=model_inputs(b))
            return out.logits if hasattr(out, "logits") else out

        def train_loss(params, theta):
            return soft_cross_entropy(logits_of(params, batch), target(train_t, theta), temperature)

        def val_loss(params, theta):
            logits = logits_of(params, val_batch)
            if self.config.val_objective == "task":
                return F.cross_entropy(logits, val_batch["labels"])
            return soft_cross_entropy(logits, target(val_t, theta), temperature)

        xi = self.config.xi if self.config.xi is not None else trainer.optimizer.param_groups[0]["lr"]
        was_training = student.training
        student.eval()  # deterministic closures: the finite differences compare two evaluations
        try:
            grad = unrolled_theta_grad(student, self.dist.theta, train_loss, val_loss, xi=xi, order=self.config.order)
        finally:
            student.train(was_training)
        self.optimizer.step(grad, sampled=i if sswo else None)
