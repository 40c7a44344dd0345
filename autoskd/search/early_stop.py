"""Early stopping of trials: per-epoch dev accuracy reported to Ray Tune, and the ASHA scheduler.

The engine evaluates the student on dev after every epoch and hands the epoch record to its
callbacks. :class:`EpochReporter` is such a callback: inside a Ray Tune trial it reports the best
dev accuracy so far, so a scheduler can compare trials epoch by epoch and stop the hopeless
ones. The trial reports its last epoch itself, together with its final record (test accuracy,
student size...), so a trial reports exactly once per evaluated epoch.

The reported ``dev_acc`` is the best so far because the engine restores the best epoch's weights
at the end: the value a trial finishes with is the maximum of what it reported, and a trial that
ASHA stopped can never end above one it promoted at the same rung.

The scheduler ranks by ``dev_score``: that accuracy with ties broken by the same epoch's lower dev
loss (:func:`dev_score`). On a small dev set many trials share one accuracy (all at the majority
class, say), and ASHA stops a trial only when it is *below* a rung's cutoff, so without the
tie-break a crowd of equal scores is promoted whole (as in the ASHA benchmark's first run).

It lives in the search layer because AutoSKD's own arms report and stop this way too;
``autoskd tune`` (:mod:`autoskd.fanout`, the layer above) uses it for its trials.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable

from ..engine.callbacks import Callback
from ..errors import AutoSKDError

__all__ = ["EpochReporter", "evaluated_epochs", "epoch_reporters", "make_scheduler", "SCHEDULERS", "REPORT_ENV",
           "dev_score", "record_score", "SCORE"]

SCHEDULERS = ("none", "asha")
#: set in a trial's environment when its epochs should be reported (a scheduler is on)
REPORT_ENV = "AUTOSKD_TUNE_REPORT_EPOCHS"
#: the metric schedulers rank trials by, and the weight of dev loss in it (a tie-break only: far
#: below one dev row's worth of accuracy for any sane loss)
SCORE = "dev_score"
TIE_BREAK = 1e-6


def dev_score(epochs: Iterable[dict]) -> float | None:
    """Best dev accuracy of the epoch records minus ``TIE_BREAK`` x that epoch's dev loss (the first
    epoch reaching it: the one the engine restores); ``None`` before any evaluated epoch."""
    best = None
    for m in epochs:
        if m.get("dev_acc") is not None and (best is None or m["dev_acc"] > best["dev_acc"]):
            best = m
    if best is None:
        return None
    return float(best["dev_acc"]) - TIE_BREAK * float(best.get("dev_loss") or 0.0)


def record_score(record: dict) -> float:
    """What a finished trial reports to the scheduler: its ``dev_score``, or its dev accuracy
    when it has none (no evaluated epoch history)."""
    score = record.get("dev_score")
    if score is None and "dev_ppl" in record:  # a language model: lower perplexity ranks higher
        return -float(record["dev_ppl"])
    return record["dev_acc"] if score is None else score


def evaluated_epochs(config) -> int:
    """How many dev evaluations a :func:`~autoskd.pipeline.distill` run with ``config`` makes."""
    from ..methods import get_method

    method = get_method(config.method, **dict(config.method_options or {}))
    stages = [s for s in method.spec.stages if s != "pretrain"]
    return max(1, len(stages) * math.ceil(float(config.epochs)))


class EpochReporter(Callback):
    """Reports ``dev_acc`` (best so far), ``epoch_dev_acc`` and ``epochs`` to Ray Tune after each
    evaluated epoch but the last (``expected``), which the trial reports with its final record."""

    def __init__(self, expected: int, report=None):
        self.expected = int(expected)
        self.count = 0
        self.best: float | None = None
        self.epochs: list[dict] = []
        self._report = report

    def on_epoch_end(self, trainer, ctx, metrics: dict) -> None:
        if metrics.get("dev_acc") is None:
            return
        self.count += 1
        acc = float(metrics["dev_acc"])
        self.best = acc if self.best is None else max(self.best, acc)
        self.epochs.append({"dev_acc": acc, "dev_loss": metrics.get("dev_loss")})
        if self.count >= self.expected:
            return
        report = self._report
        if report is None:
            from ray import tune

            report = tune.report
        report({"dev_acc": self.best, SCORE: dev_score(self.epochs), "epoch_dev_acc": acc, "epochs": self.count})


def epoch_reporters(config) -> list[Callback]:
    """``[EpochReporter]`` inside a Ray Tune trial whose environment asks for epoch reports, else ``[]``."""
    if os.environ.get(REPORT_ENV) != "1":
        return []
    return [EpochReporter(evaluated_epochs(config))]


def make_scheduler(name: str | None, max_t: int, grace_period: int = 1, reduction_factor: float = 2,
                   metric: str = SCORE, mode: str = "max"):
    """Ray Tune's scheduler by name: ``none`` (run every trial to the end) or ``asha``."""
    name = (name or "none").lower()
    if name not in SCHEDULERS:
        raise AutoSKDError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    if name == "none":
        return None
    if reduction_factor <= 1:
        raise AutoSKDError(f"ASHA's reduction factor must be > 1 (got {reduction_factor})")
    from ray.tune.schedulers import ASHAScheduler

    max_t = max(1, int(max_t))
    return ASHAScheduler(time_attr="training_iteration", metric=metric, mode=mode, max_t=max_t,
                         grace_period=max(1, min(int(grace_period), max_t)), reduction_factor=reduction_factor)


def stopped_record(base: dict[str, Any], metrics: dict | None, planned: int) -> dict:
    """The record of a trial a scheduler stopped: its last reported scores and the epochs it ran."""
    metrics = metrics or {}
    return {**base, "dev_acc": metrics.get("dev_acc"), "test_acc": None, "stopped_early": True,
            "epochs_run": int(metrics.get("epochs") or metrics.get("training_iteration") or 0),
            "epochs_planned": int(planned)}


def compute_report(records: list[dict], planned_per_record: int) -> dict:
    """Student-epochs the runs took against what running every one to the end would have taken."""
    ran = planned = stopped = 0
    for r in records:
        if r.get("status") == "failed" or r.get("dev_acc") is None:
            continue
        planned += int(r.get("epochs_planned") or planned_per_record)
        if r.get("stopped_early"):
            stopped += 1
            ran += int(r.get("epochs_run") or 0)
        else:
            ran += int(r.get("epochs_planned") or planned_per_record)
    return {"stopped_early": stopped, "student_epochs": ran, "student_epochs_planned": planned,
            "saved_fraction": round(1 - ran / planned, 4) if planned else 0.0}
