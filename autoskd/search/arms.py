"""What a search evaluates: *arms*, each one student trained from scratch with one teacher policy.

An :class:`Arm` is plain data (it crosses process boundaries as a dict): a name (also its folder
under ``<root>/trials/``), a ``kind`` saying which teacher policy it trains with, and the policy's
parameter (``theta`` or ``teacher``). ``group`` is the arm's family in tables and plots.

==========  =====================================================  ===========
kind        teacher policy (``DistillConfig``)                     group
==========  =====================================================  ===========
candidate   ``sampled`` with a theta delivered by the search       ``autoskd``
mixture     ``mixture`` (every step the θ-mixture; LM searches)    ``autoskd``
single      ``single`` with one team member (single-teacher KD)    ``single``
average     ``average`` (AvgKD)                                    ``average``
uniform     ``sampled`` with theta = 1/n for every teacher         ``uniform``
random      ``sampled`` with theta ~ Dirichlet(1) (paper, fig. 3)  ``random``
==========  =====================================================  ===========

A ``mixture`` candidate trains on the θ-weighted mixture of the teachers' next-token
distributions instead of one drawn teacher per step: the same expected target without the draw's
variance (what AvgKD has over uniform sampling), and the target a CR search's own student learns
from. The LM search trains its candidates so with ``candidate_policy: mixture``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import numpy as np

from ..errors import AutoSKDError

if TYPE_CHECKING:  # pipeline imports torch; arms stay light so workers and tests import them fast
    from ..pipeline import DistillConfig

__all__ = ["Arm", "KINDS", "GROUPS", "BASELINES", "candidate_arms", "baseline_arms", "parse_baselines"]

#: kind -> group
KINDS = {"candidate": "autoskd", "mixture": "autoskd", "single": "single", "average": "average", "uniform": "uniform", "random": "random"}
GROUPS = ("autoskd", "single", "average", "uniform", "random")
#: baseline names accepted by :func:`parse_baselines` / :func:`baseline_arms`, in build order
BASELINES = ("single", "avgkd", "uniform", "random")
_ALIASES = {"average": "avgkd", "avg": "avgkd", "single-teacher": "single", "dirichlet": "random"}


@dataclass
class Arm:
    """One student training to run: a teacher policy plus a name (its output folder)."""

    name: str
    kind: str
    theta: list[float] | None = None
    teacher: str | None = None
    group: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise AutoSKDError(f"unknown arm kind {self.kind!r}; choose one of: {', '.join(KINDS)}")
        self.group = self.group or KINDS[self.kind]
        if self.group not in GROUPS:
            raise AutoSKDError(f"unknown arm group {self.group!r}; choose one of: {', '.join(GROUPS)}")
        if not self.name or not re.fullmatch(r"[A-Za-z0-9._-]+", self.name) or self.name in (".", ".."):
            raise AutoSKDError(f"arm name {self.name!r} must be a non-empty folder name of letters, digits, '.', '_', '-'")
        if self.kind in ("candidate", "mixture", "uniform", "random"):
            if not self.theta:
                raise AutoSKDError(f"arm {self.name!r} ({self.kind}) needs theta, one weight per teacher")
            self.theta = [float(t) for t in self.theta]
        if self.kind == "single" and not self.teacher:
            raise AutoSKDError(f"arm {self.name!r} (single) needs the teacher's name")

    def distill_config(self, base: "DistillConfig") -> "DistillConfig":
        """``base`` with this arm's teacher policy (everything else, e.g. epochs and seed, kept)."""
        if self.kind == "single":
            return dataclasses.replace(base, policy="single", teacher=self.teacher, theta=None)
        if self.kind == "average":
            return dataclasses.replace(base, policy="average", teacher=None, theta=None)
        if self.kind == "mixture":
            raise AutoSKDError(f"arm {self.name!r}: mixture candidates train language models (next-token "
                               "distributions); a classifier search samples its candidates")
        return dataclasses.replace(base, policy="sampled", teacher=None, theta=list(self.theta))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Arm":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def _width(n: int, minimum: int) -> int:
    return max(minimum, len(str(max(n - 1, 0))))


def _safe(name: str) -> str:
    """A teacher name as a folder-name fragment."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "teacher"


def candidate_arms(thetas: Iterable[Iterable[float]], names: Iterable[str] | None = None,
                   kind: str = "candidate") -> list[Arm]:
    """One arm per distribution delivered by the search (in the given order), named
    ``candidate-NN`` unless ``names`` are given."""
    thetas = [list(t) for t in thetas]
    w = _width(len(thetas), 2)
    names = list(names) if names is not None else [f"candidate-{i:0{w}d}" for i in range(len(thetas))]
    if len(names) != len(thetas):
        raise AutoSKDError(f"{len(names)} candidate names for {len(thetas)} distributions")
    if KINDS.get(kind) != "autoskd":
        raise AutoSKDError(f"candidate kind {kind!r} unknown; use candidate (sampled) or mixture")
    return [Arm(n, kind, theta=t) for n, t in zip(names, thetas)]


def parse_baselines(text: str | Iterable[str] | None) -> set[str]:
    """``"all"``, ``"none"`` or a comma list of ``single,avgkd,uniform,random`` -> set of names."""
    if text is None:
        return set()
    items = [s.strip().lower() for s in (text.split(",") if isinstance(text, str) else text)]
    items = [s for s in items if s]
    if not items or items == ["none"]:
        return set()
    if "all" in items:
        if len(items) > 1:
            raise AutoSKDError(f"baselines 'all' cannot be combined with other names (got {','.join(items)})")
        return set(BASELINES)
    out = set()
    for s in items:
        s = _ALIASES.get(s, s)
        if s not in BASELINES:
            raise AutoSKDError(f"unknown baseline {s!r}; use all, none, or a comma list of: {', '.join(BASELINES)}")
        out.add(s)
    return out


def random_thetas(n_teachers: int, n: int, seed: int = 0) -> list[list[float]]:
    """``n`` distributions drawn from Dirichlet(1, ..., 1) (uniform on the simplex).

    Deterministic in ``seed``; drawn one at a time so a larger ``n`` extends a smaller one (a run
    asked for more random arms reuses the finished ones)."""
    rng = np.random.default_rng(seed)
    return [rng.dirichlet(np.ones(n_teachers)).tolist() for _ in range(n)]


def baseline_arms(teacher_names: list[str], which: set[str] | str = "all", n_random: int = 0,
                  seed: int = 0) -> list[Arm]:
    """The comparison arms: ``single-<teacher>`` per teacher, ``avgkd``, ``uniform``, ``random-NNN``."""
    which = parse_baselines(which) if isinstance(which, str) else {_ALIASES.get(w, w) for w in which}
    unknown = which - set(BASELINES)
    if unknown:
        raise AutoSKDError(f"unknown baseline(s) {', '.join(sorted(unknown))}; choose from: {', '.join(BASELINES)}")
    teacher_names = list(teacher_names)
    if not teacher_names:
        raise AutoSKDError("baselines need a team with at least one teacher")
    if n_random < 0:
        raise AutoSKDError(f"the number of random distributions must be >= 0 (got {n_random})")
    n = len(teacher_names)
    arms: list[Arm] = []
    if "single" in which:
        names = [f"single-{_safe(t)}" for t in teacher_names]
        if len(set(names)) != len(names):  # two teachers whose names sanitise alike
            names = [f"single-{i:02d}-{_safe(t)}" for i, t in enumerate(teacher_names)]
        arms += [Arm(a, "single", teacher=t) for a, t in zip(names, teacher_names)]
    if "avgkd" in which:
        arms.append(Arm("avgkd", "average"))
    if "uniform" in which:
        arms.append(Arm("uniform", "uniform", theta=[1.0 / n] * n))
    if "random" in which and n_random > 0:
        w = _width(n_random, 3)
        arms += [Arm(f"random-{i:0{w}d}", "random", theta=t) for i, t in enumerate(random_thetas(n, n_random, seed))]
    return arms
