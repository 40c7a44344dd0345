"""Several teachers in one step: the ``AllTeachers`` policy, combiners, ``MultiTeacherMethod``.

A multi-teacher method sees the teacher side as ``{teacher: features}``: the auxiliary model
resolves its terms per teacher (each teacher its own depth, width and projections), the
method computes each teacher's terms and a *combiner* (registered by name) merges them:

``mean``               the average of each term over the teachers (TMKD)
``sum``                their sum
``random_survival:p``  each teacher's terms kept with probability p this step, then summed
                       (DGKD's teacher dropout; at least one teacher always survives)

Combinations that need per-sample losses (MT-BERT's per-sample weights, Uncertainty's
grouping of a batch, RL-KD's per-sample teacher choice) override :meth:`MultiTeacherMethod.losses`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from ..errors import AutoSKDError
from ..registry import Registry
from .methods import Method, training_progress
from .teachers import AverageTeachers, TeacherPolicy

Combiner = Callable[..., dict[str, Tensor]]
COMBINERS: Registry[Combiner] = Registry("combiner")


class AllTeachers(TeacherPolicy):
    """Every teacher speaks in every step (what multi-teacher methods need)."""

    def choose(self, step: int) -> str:
        return next(iter(self.teachers))  # nominal: a multi-teacher method asks each teacher


def _stack_mean(per: Mapping[str, Mapping[str, Tensor]], names: list[str]) -> dict[str, Tensor]:
    keys = list(dict.fromkeys(k for n in names for k in per[n]))
    return {k: torch.stack([per[n][k] for n in names if k in per[n]]).sum() / len(names) for k in keys}


@COMBINERS.register("mean")
def mean(per: Mapping[str, Mapping[str, Tensor]], generator: torch.Generator | None = None, arg: str = "") -> dict:
    return _stack_mean(per, list(per))


@COMBINERS.register("sum")
def total(per: Mapping[str, Mapping[str, Tensor]], generator: torch.Generator | None = None, arg: str = "") -> dict:
    return {k: v * len(per) for k, v in _stack_mean(per, list(per)).items()}


@COMBINERS.register("random_survival")
def random_survival(per: Mapping[str, Mapping[str, Tensor]], generator: torch.Generator | None = None,
                    arg: str = "") -> dict:
    p = float(arg or 0.75)
    names = list(per)
    keep = (torch.rand(len(names), generator=generator) < p).tolist()
    if not any(keep):
        keep[int(torch.randint(len(names), (1,), generator=generator))] = True
    alive = [n for n, k in zip(names, keep) if k]
    out: dict[str, Tensor] = {}
    for n in alive:
        for k, v in per[n].items():
            out[f"{n}/{k}"] = v
    return out


def combine(name: str, per: Mapping[str, Mapping[str, Tensor]], generator: torch.Generator | None = None) -> dict:
    kind, _, arg = str(name).partition(":")
    return COMBINERS.get(kind)(per, generator, arg)


class MultiTeacherMethod(Method):
    """A method whose every step reads all the run's teachers (``AllTeachers`` policy)."""

    combiner: str = "mean"

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.generator = torch.Generator().manual_seed(int(self.options.get("seed", 0) or 0))

    def teacher_names(self, ctx) -> list[str]:
        names = list(ctx.teachers)
        if not names:
            raise AutoSKDError(f"method {self.spec.name!r} needs teachers")
        return names

    def feature_requests(self, ctx, teacher_name: str | None):
        if isinstance(getattr(ctx, "policy", None), AverageTeachers):
            raise AutoSKDError(f"{self.spec.name!r} uses every teacher itself; pass the teachers with AllTeachers")
        student: list[str] = []
        teachers: dict[str, list[str]] = {}
        for name in self.teacher_names(ctx):
            s, t = ctx.auxiliary.feature_requests(ctx.stage, name)
            student += s
            teachers[name] = t
        return list(dict.fromkeys(student)), teachers

    def teacher_features(self, ctx, policy, teacher_name, batch: dict, requests: Mapping[str, list[str]]):
        return {name: (policy.features(name, batch, req) if req else {}) for name, req in requests.items()}

    def losses(self, ctx, student_feats, teacher_feats, teacher_name, batch) -> dict[str, Tensor]:
        progress = training_progress(ctx)
        per = {name: ctx.auxiliary.compute(ctx.stage, student_feats, feats, batch, name, include_hard=False,
                                           progress=progress)
               for name, feats in teacher_feats.items()}
        out = combine(self.combiner, {n: v for n, v in per.items() if v}, self.generator) if any(per.values()) else {}
        out.update(ctx.auxiliary.label_losses(ctx.stage, student_feats, batch,
                                              getattr(ctx, "hard_label_weight", None)))
        return out
