"""Callbacks: how other parts of autoskd take part in the one training loop without
owning one. The AutoSKD search's theta update is a callback on this loop."""

from __future__ import annotations


class Callback:
    """Base class; override only the events you need. Each receives the Distiller and its
    StepContext (stage, step, epoch, current teacher name...)."""

    def on_stage_start(self, trainer, ctx) -> None:
        """Before the first step of a stage (optimizer and teacher cache are ready)."""

    def on_step_begin(self, trainer, ctx, batch: dict) -> None:
        """Before the student's step on ``batch`` (the teacher is not chosen yet)."""

    def on_step_end(self, trainer, ctx, batch: dict, losses: dict) -> None:
        """After the student's update; ``losses`` holds detached loss terms."""

    def on_epoch_end(self, trainer, ctx, metrics: dict) -> None:
        """After an epoch's dev evaluation; ``metrics`` is the epoch record."""

    def on_stage_end(self, trainer, ctx) -> None:
        """After the last step of a stage."""
