"""The categorical distribution Cat(θ) over a teacher team (AutoSKDBERT, sections 2.1-2.4.2).

θ lives on the probability simplex over ``n`` teachers: the probability of distilling from
teacher ``i`` at a step is ``θ_i``. This module holds

* :class:`TeacherDistribution`: θ as an ``nn.Parameter`` of *probabilities* (not logits), plus an
  ``active`` mask of the teachers still in the team. θ is a valid distribution after construction
  and after every update (:meth:`TeacherDistribution.project_`).
* :func:`select_teachers`: the teacher-selection step between phase 1 and phase 2 (the paper's
  eq. 8): zero the ``m`` smallest weights and renormalise by ``max(‖masked‖_p, eps)``.
* :func:`ineffective_teacher_count`: appendix A.1's rule for choosing ``m`` (teachers smaller
  than the student).
* :class:`ThetaOptimizer`: Adam on θ (paper: weight decay 1e-3, lr 3e-4 ... 1e-3) with the two
  update strategies of section 2.4.1, SSWO (only the sampled weight moves) and CR (all move).

Nothing here knows about the training loop; the gradient fed to :meth:`ThetaOptimizer.step`
comes from :mod:`autoskd.search.bilevel`. Draws use the engine's one Cat(θ) sampler
(:func:`~autoskd.engine.teachers.draw_categorical`), the one the student's teacher policy draws with.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from ..engine.teachers import draw_categorical
from ..errors import AutoSKDError

__all__ = [
    "TeacherDistribution",
    "select_teachers",
    "ineffective_teacher_count",
    "ThetaOptimizer",
    "STRATEGIES",
    "DEFAULT_THETA_LR",
    "DEFAULT_THETA_WEIGHT_DECAY",
    "NONFINITE_FLOOR",
    "NONFINITE_SHARE",
]

#: update strategies understood by :class:`ThetaOptimizer`: SSWO updates only the sampled entry,
#: CR and ``expected`` (SSWO's step in expectation over the draw, see ``ThetaConfig``) every entry
STRATEGIES = ("sswo", "cr", "expected")

#: Adam's learning rate and weight decay on θ: AutoSKDBERT's App. E (its grid spans lr 3e-4 to 1e-3)
DEFAULT_THETA_LR = 5e-4
DEFAULT_THETA_WEIGHT_DECAY = 1e-3

#: a θ step whose gradient is not finite (NaN/inf) is skipped; the search stops once more than
#: ``max(NONFINITE_FLOOR, NONFINITE_SHARE x steps)`` steps were skipped: a diverging θ step, not a
#: stray overflow (a diverged one is non-finite at every step and stops after the floor)
NONFINITE_FLOOR = 10
NONFINITE_SHARE = 0.05


def _as_1d_float(values: Tensor | Sequence[float], what: str, dtype: torch.dtype | None = None) -> Tensor:
    t = torch.as_tensor(values, dtype=dtype) if not isinstance(values, Tensor) else values
    if t.dim() != 1 or t.numel() == 0:
        raise AutoSKDError(f"{what} must be a non-empty 1-D list of weights, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.to(dtype or torch.get_default_dtype())
    elif dtype is not None:
        t = t.to(dtype)
    return t


class TeacherDistribution(nn.Module):
    """Cat(θ) over ``n`` teachers: θ is an ``nn.Parameter`` of probabilities on the simplex.

    ``theta`` (parameter, shape ``[n]``) and ``active`` (bool buffer, shape ``[n]``) are both in the
    ``state_dict``, so a distribution saves/loads like any module. Invariants, restored by
    :meth:`project_` after every update: ``theta >= 0``, ``theta[~active] == 0`` exactly and
    ``theta.sum() == 1`` (up to rounding). ``active`` is all True until :meth:`select_` drops the
    ineffective teachers.

    The initial weights are renormalised to sum to 1 (so ``[1, 2, 1]`` means ``[.25, .5, .25]``);
    negative, non-finite or all-zero (over the active teachers) weights are an :class:`AutoSKDError`.
    θ is kept in float64 by default: it is tiny, and the simplex invariant then holds to ~1e-15.
    """

    def __init__(
        self,
        probs: Tensor | Sequence[float],
        active: Tensor | Sequence[bool] | None = None,
        dtype: torch.dtype = torch.float64,
    ):
        super().__init__()
        t = _as_1d_float(probs, "teacher weights", dtype).detach().clone()
        if not torch.isfinite(t).all():
            raise AutoSKDError(f"teacher weights must be finite numbers, got {t.tolist()}")
        if (t < 0).any():
            raise AutoSKDError(f"teacher weights must be >= 0, got {t.tolist()}")
        n = t.numel()
        if active is None:
            mask = torch.ones(n, dtype=torch.bool, device=t.device)
        else:
            mask = torch.as_tensor(active, dtype=torch.bool).detach().clone().reshape(-1).to(t.device)
            if mask.numel() != n:
                raise AutoSKDError(f"active mask has {mask.numel()} entries but there are {n} teachers")
            if not mask.any():
                raise AutoSKDError("at least one teacher must be active")
        t = torch.where(mask, t, torch.zeros_like(t))
        if float(t.sum()) <= 0:
            raise AutoSKDError(f"teacher weights must not all be zero (over the active teachers), got {t.tolist()}")
        self.theta = nn.Parameter(t / t.sum())
        self.register_buffer("active", mask)

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_list(
        cls,
        values: Sequence[float],
        active: Sequence[bool] | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> "TeacherDistribution":
        """A distribution from a list of nonnegative weights (renormalised to sum to 1)."""
        return cls(list(values), active=active, dtype=dtype)

    @classmethod
    def uniform(cls, n: int, dtype: torch.dtype = torch.float64) -> "TeacherDistribution":
        """The uniform distribution over ``n >= 1`` teachers (the paper's usual initialisation)."""
        if int(n) < 1:
            raise AutoSKDError(f"a teacher team needs at least one teacher, got n={n}")
        return cls(torch.full((int(n),), 1.0 / int(n), dtype=dtype), dtype=dtype)

    # ----------------------------------------------------------------- accessors
    @property
    def n(self) -> int:
        """Number of teachers in the team (active or not)."""
        return self.theta.numel()

    def probs(self) -> Tensor:
        """A detached copy of θ (safe to keep; later updates do not change it)."""
        return self.theta.detach().clone()

    def active_indices(self) -> list[int]:
        return [int(i) for i in torch.nonzero(self.active).flatten().tolist()]

    def inactive_indices(self) -> list[int]:
        return [int(i) for i in torch.nonzero(~self.active).flatten().tolist()]

    def forward(self) -> Tensor:
        """θ itself (with gradient), so the distribution can be called like a module."""
        return self.theta

    def extra_repr(self) -> str:
        vals = ", ".join(f"{v:.4f}" for v in self.theta.detach().tolist())
        return f"n={self.n}, theta=[{vals}], active={self.active.tolist()}"

    # ----------------------------------------------------------------- sampling
    def sample(self, generator: torch.Generator | None = None) -> int:
        """Draw one teacher index ``i ~ Cat(θ)``, only among the active teachers.

        ``generator`` (a ``torch.Generator`` on θ's device) makes the draw reproducible.
        """
        # no positive mass cannot happen after project_(); the draw is then uniform over the active teachers
        return draw_categorical(self.theta, generator, support=self.active)

    # ----------------------------------------------------------------- updates
    @torch.no_grad()
    def project_(self) -> "TeacherDistribution":
        """Put θ back on the simplex in place: clamp to >= 0, zero the inactive teachers exactly,
        renormalise to sum 1. If nothing positive is left (or θ went non-finite), fall back to the
        uniform distribution over the active teachers. Returns ``self``."""
        t = self.theta.data
        t.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).clamp_(min=0.0)
        t.masked_fill_(~self.active, 0.0)
        s = float(t.sum())
        if not math.isfinite(s) or s <= 0.0:
            t.copy_(self.active.to(t.dtype))
            s = float(t.sum())
        t.div_(s)
        return self

    @torch.no_grad()
    def set_probs_(self, probs: Tensor | Sequence[float]) -> "TeacherDistribution":
        """Overwrite θ (then project onto the simplex of the active teachers)."""
        t = _as_1d_float(probs, "teacher weights", self.theta.dtype).to(self.theta.device)
        if t.numel() != self.n:
            raise AutoSKDError(f"expected {self.n} teacher weights, got {t.numel()}")
        self.theta.data.copy_(t)
        return self.project_()

    @torch.no_grad()
    def select_(self, m: int, p: float = 1.0, eps: float = 1e-12) -> list[int]:
        """Teacher selection (eq. 8) in place: drop the ``m`` smallest *active* weights, mark them
        inactive and redistribute their mass. Returns the dropped indices (ascending)."""
        new_theta, dropped = select_teachers(self.theta.detach(), m, p=p, eps=eps, active=self.active)
        self.theta.data.copy_(new_theta)
        if dropped:
            self.active[torch.as_tensor(dropped, dtype=torch.long, device=self.active.device)] = False
        self.project_()  # a no-op for p=1; makes p != 1 a distribution again
        return dropped


# --------------------------------------------------------------------------- eq. 8
def select_teachers(
    theta: Tensor,
    m: int,
    p: float = 1.0,
    eps: float = 1e-12,
    *,
    active: Tensor | None = None,
) -> tuple[Tensor, list[int]]:
    """Teacher selection, the paper's eq. 8.

    ``θ⁽²⁾ = θ⁽¹⁾ ⊙ mask / max(‖θ⁽¹⁾ ⊙ mask‖_p, eps)`` where ``mask`` is 0 at the ``m`` smallest
    weights (the ineffective teachers) and 1 elsewhere. The paper uses ``p = 1`` (so θ⁽²⁾ sums to 1)
    and ``eps = 1e-12``; with ``p != 1`` the result is a rescaling, not a distribution.

    Ties are broken by **lower index first**: among equal weights the teacher with the smaller
    index counts as smaller and is dropped first (a stable ascending sort).

    ``active`` (optional bool mask): teachers already out of the team are not candidates; they
    stay 0, are not reported in ``dropped`` and do not count towards ``m``.

    Returns ``(new_theta, dropped)``: a new tensor (θ is not modified, no gradient) and the dropped
    indices in ascending order. Requires ``0 <= m < n`` (``n`` = number of candidates), else
    :class:`AutoSKDError`.
    """
    theta = _as_1d_float(theta, "theta").detach()
    n_all = theta.numel()
    if active is None:
        cand = torch.ones(n_all, dtype=torch.bool, device=theta.device)
    else:
        cand = torch.as_tensor(active, dtype=torch.bool, device=theta.device).reshape(-1)
        if cand.numel() != n_all:
            raise AutoSKDError(f"active mask has {cand.numel()} entries but theta has {n_all}")
    n = int(cand.sum())
    if isinstance(m, bool) or int(m) != m:
        raise AutoSKDError(f"the ineffective teacher number m must be an integer, got {m!r}")
    m = int(m)
    if not 0 <= m < n:
        raise AutoSKDError(
            f"the ineffective teacher number m must satisfy 0 <= m < {n} (the number of teachers), got m={m}"
        )
    if not (p > 0):
        raise AutoSKDError(f"the norm exponent p must be > 0, got {p}")
    cand_idx = torch.nonzero(cand).flatten()
    order = torch.sort(theta[cand_idx], stable=True).indices  # ascending, ties -> lower index first
    dropped = sorted(int(i) for i in cand_idx[order[:m]].tolist())
    mask = cand.clone()
    if dropped:
        mask[torch.as_tensor(dropped, dtype=torch.long, device=theta.device)] = False
    masked = theta * mask.to(theta.dtype)
    denom = torch.linalg.vector_norm(masked, ord=p).clamp(min=eps)
    return masked / denom, dropped


# --------------------------------------------------------------------------- appendix A.1
def ineffective_teacher_count(
    teacher_capacities: Iterable[float],
    student_capacity: float,
    count_student_as_weak: bool = False,
) -> int:
    """Appendix A.1: ``m`` = the number of teachers *weaker than the student by capacity*.

    A capacity is a model-size measure (the parameter count, or the depth): a teacher counts
    as weak when its capacity is strictly below the student's, so a teacher of the student's
    own size is not dropped. With ``count_student_as_weak`` the student itself counts as one
    more weak teacher (``+1``; the paper's CIFAR setting, where the student architecture is in
    its own team). The result is capped at ``n - 1`` so that at least one teacher survives
    selection (``0 <= m < n``).
    """
    caps = [float(s) for s in teacher_capacities]
    if not caps:
        raise AutoSKDError("ineffective_teacher_count needs at least one teacher capacity")
    student = float(student_capacity)
    if any(math.isnan(s) for s in caps) or math.isnan(student):
        raise AutoSKDError(f"capacities must be numbers, got teachers={caps}, student={student_capacity}")
    m = sum(1 for s in caps if s < student) + (1 if count_student_as_weak else 0)
    return min(m, len(caps) - 1)


# --------------------------------------------------------------------------- optimiser
class ThetaOptimizer:
    """Adam on θ with the two update strategies of section 2.4.1, keeping θ on the simplex.

    The paper optimises Cat(θ) with Adam, weight decay 1e-3 and lr in 3e-4 ... 1e-3 (table 9 /
    appendix E), hence the defaults. The Adam here keeps its state *per entry* of θ (first and
    second moment and its own step count for bias correction), because the two strategies
    update different entries:

    * ``"sswo"`` (stochastic single-weight optimisation): only the sampled teacher's weight
      moves, and only *its* Adam state advances. The other entries' moments, step counts and
      values are untouched (``torch.optim.Adam`` would decay every entry's moments and apply
      weight decay to all of them at each step). The projection back to the simplex then
      rescales all entries by one common factor, leaving the others' ratios unchanged.
    * ``"cr"`` (continuous relaxation, DARTS): every active entry moves with its gradient.
    * ``"expected"`` (SSWO's step in expectation over the draw; not in the paper): every active
      entry moves, as in CR.

    Weight decay is Adam's L2 form (``g + wd·θ``), as ``torch.optim.Adam(weight_decay=...)``.
    Call :meth:`step` once per search step with the θ-gradient (e.g. from
    :func:`autoskd.search.bilevel.unrolled_theta_grad`) and, for SSWO, the sampled teacher.

    A gradient with a non-finite entry among those it would move skips the step (θ and Adam's
    state unchanged) and is counted: :attr:`steps_taken` counts every call, :attr:`nonfinite_steps`
    the skipped ones. More than ``max(nonfinite_floor, nonfinite_share × steps_taken)`` skipped
    steps stop the search with one line (:class:`AutoSKDError`): θ's step diverged.
    """

    def __init__(
        self,
        dist: TeacherDistribution,
        strategy: str = "sswo",
        lr: float = DEFAULT_THETA_LR,
        weight_decay: float = DEFAULT_THETA_WEIGHT_DECAY,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        nonfinite_floor: int = NONFINITE_FLOOR,
        nonfinite_share: float = NONFINITE_SHARE,
    ):
        key = str(strategy).lower()
        if key not in STRATEGIES:
            raise AutoSKDError(f"unknown theta update strategy {strategy!r}; choose one of: {', '.join(STRATEGIES)}")
        if not lr > 0:
            raise AutoSKDError(f"the categorical-distribution learning rate must be > 0, got {lr}")
        if weight_decay < 0:
            raise AutoSKDError(f"the categorical-distribution weight decay must be >= 0, got {weight_decay}")
        self.dist = dist
        self.strategy = key
        self.lr, self.weight_decay, self.betas, self.eps = float(lr), float(weight_decay), betas, float(eps)
        self.nonfinite_floor, self.nonfinite_share = int(nonfinite_floor), float(nonfinite_share)
        self.steps_taken = 0
        self.nonfinite_steps = 0
        self.reset()

    def reset(self) -> None:
        """Forget Adam's moments and step counts (e.g. between phase 1 and phase 2)."""
        theta = self.dist.theta
        self.exp_avg = torch.zeros_like(theta.detach())
        self.exp_avg_sq = torch.zeros_like(theta.detach())
        self.steps = torch.zeros(theta.numel(), dtype=torch.long, device=theta.device)

    def step(self, grad: Tensor, sampled: int | None = None) -> None:
        """One update of θ with gradient ``grad`` (shape ``[n]``), then projection to the simplex.

        ``sampled`` is the teacher drawn this step; required for SSWO (and must be active),
        ignored by CR and ``expected``. Gradients of inactive teachers are ignored.
        """
        theta = self.dist.theta
        g = torch.as_tensor(grad).detach().to(dtype=theta.dtype, device=theta.device).reshape(-1)
        if g.numel() != theta.numel():
            raise ValueError(f"theta gradient has {g.numel()} entries, expected {theta.numel()}")
        update = self.dist.active.clone()
        if self.strategy == "sswo":
            if sampled is None:
                raise ValueError("SSWO needs the index of the sampled teacher")
            i = int(sampled)
            if not (0 <= i < theta.numel()) or not bool(self.dist.active[i]):
                raise ValueError(f"sampled teacher {sampled} is not an active teacher")
            update = torch.zeros_like(update)
            update[i] = True
        self.steps_taken += 1
        if not bool(torch.isfinite(g[update]).all()):
            self.nonfinite_steps += 1
            self._check_nonfinite()
            return
        g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)  # entries that do not move
        with torch.no_grad():
            t = theta.data
            beta1, beta2 = self.betas
            g = g + self.weight_decay * t
            self.steps[update] += 1
            self.exp_avg[update] = beta1 * self.exp_avg[update] + (1 - beta1) * g[update]
            self.exp_avg_sq[update] = beta2 * self.exp_avg_sq[update] + (1 - beta2) * g[update] ** 2
            k = self.steps[update].to(t.dtype)
            m_hat = self.exp_avg[update] / (1 - beta1 ** k)
            v_hat = self.exp_avg_sq[update] / (1 - beta2 ** k)
            t[update] -= self.lr * m_hat / (v_hat.sqrt() + self.eps)
        self.dist.project_()

    def _check_nonfinite(self) -> None:
        limit = max(self.nonfinite_floor, self.nonfinite_share * self.steps_taken)
        if self.nonfinite_steps > limit:
            raise AutoSKDError(
                f"the theta search diverged: {self.nonfinite_steps} of {self.steps_taken} theta steps had a non-finite "
                "(NaN/inf) gradient and were skipped; lower --theta-lr or --xi, or try --order first")

    def state_dict(self) -> dict:
        return {"strategy": self.strategy, "exp_avg": self.exp_avg.clone(), "exp_avg_sq": self.exp_avg_sq.clone(),
                "steps": self.steps.clone(), "steps_taken": self.steps_taken, "nonfinite_steps": self.nonfinite_steps}

    def load_state_dict(self, state: dict) -> None:
        if state.get("strategy", self.strategy) != self.strategy:
            raise AutoSKDError(
                f"checkpoint was made with theta strategy {state['strategy']!r}, not {self.strategy!r}"
            )
        self.exp_avg, self.exp_avg_sq = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
        self.steps = state["steps"].clone()
        self.steps_taken = int(state.get("steps_taken", 0))
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
