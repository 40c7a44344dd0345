"""Schedules: a loss weight, temperature or teacher scale as a function of training progress.

A schedule is ``fn(progress, **args) -> float`` with ``progress = step / total_steps`` in
[0, 1) of the current stage. A :class:`~autoskd.engine.spec.FeatureLoss` names one in
``weight_schedule`` (multiplies the term's weight), ``temperature_schedule`` (multiplies its
temperature) or ``teacher_scale`` (multiplies the teacher feature: Annealing-KD's phi).
Arguments follow a colon: ``"linear:0.1,1.0"``, ``"step:0.5"``.
"""

from __future__ import annotations

import math
from typing import Callable

from ..errors import AutoSKDError
from ..registry import Registry

Schedule = Callable[..., float]
SCHEDULES: Registry[Schedule] = Registry("schedule")


def _args(name: str, arg: str) -> list[float]:
    try:
        return [float(a) for a in arg.split(",") if a.strip()]
    except ValueError:
        raise AutoSKDError(f"schedule {name}:{arg}: arguments must be numbers, e.g. linear:0.1,1") from None


def schedule_value(spec: str | None, progress: float) -> float:
    """The value of the named schedule (``None`` -> 1.0) at ``progress`` in [0, 1]."""
    if not spec:
        return 1.0
    name, _, arg = str(spec).partition(":")
    return float(SCHEDULES.get(name.strip())(min(max(progress, 0.0), 1.0), *_args(name, arg)))


def check_schedule(spec: str | None) -> None:
    """Fail now (one line) for an unknown schedule name or bad arguments."""
    schedule_value(spec, 0.0)


@SCHEDULES.register("constant")
def constant(p: float, value: float = 1.0) -> float:
    return value


@SCHEDULES.register("linear")
def linear(p: float, start: float = 0.0, end: float = 1.0) -> float:
    """From ``start`` at progress 0 to ``end`` at progress 1."""
    return start + (end - start) * p


@SCHEDULES.register("cosine")
def cosine(p: float, start: float = 1.0, end: float = 0.0) -> float:
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * p))


@SCHEDULES.register("step")
def step(p: float, at: float = 0.5, before: float = 0.0, after: float = 1.0) -> float:
    """``before`` until progress ``at``, then ``after``."""
    return before if p < at else after


@SCHEDULES.register("annealing")
def annealing(p: float, steps: float = 7.0) -> float:
    """Annealing-KD's teacher scale phi = 1 - (ceil(n(1 - p)) - 1) / n, n = 7 (Jafari et al.
    2021): 1/n at the start, rising in n steps to 1 (phi clipped to (0, 1])."""
    n = steps
    return max(1.0 / n, 1.0 - (math.ceil(n * (1.0 - p)) - 1) / n)


@SCHEDULES.register("continuation")
def continuation(p: float, end: float = 0.666) -> float:
    """Continuation-KD's psi = t / (2N * end) ... reaching 1 at ``end`` of the stage:
    psi = min(1, p / (2 * end)) below ``end``, 1 after it (methods.md: t/(1.333N), 1 after .666N)."""
    return 1.0 if p >= end else min(1.0, p / (2 * end))
