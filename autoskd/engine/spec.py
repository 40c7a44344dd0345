"""A distillation method described as data (TextBrewer-style).

A :class:`MethodSpec` says which features to match, by which distance, with which weight,
through which projection, in which training stage. The auxiliary model turns it into losses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import AutoSKDError

LAYER_MAPS = ("none", "uniform", "last")


@dataclass(frozen=True)
class FeatureLoss:
    """One term of a method's loss: distance(student feature, teacher feature) * weight.

    ``student``/``teacher`` are feature names (see :mod:`autoskd.engine.features`); with a
    layer map they may contain ``{s}`` and ``{t}`` placeholders for the student and teacher
    layer indices. ``projection="linear"`` maps the student feature to the teacher's width
    with a trainable ``nn.Linear`` owned by the auxiliary model. ``transform`` names a
    registered feature transform applied to both sides first (e.g. a relation matrix).
    ``stage`` is the training stage in which the term is active (``"task"`` by default,
    ``"pretrain"`` for terms used on unlabelled text, or any stage name a method defines).
    ``name`` is a short handle for the term: its loss key is ``f"{name}_{distance}"`` (plus
    ``:s{s}-t{t}`` for mapped layers) and the method option ``f"{name}_weight"`` sets its
    weight; without it the student feature kind stands in (``hidden`` -> ``hidden_mse``).
    """

    student: str
    teacher: str
    distance: str
    weight: float = 1.0
    layers: str = "none"
    projection: str | None = None
    transform: str | None = None
    temperature: float = 1.0
    stage: str = "task"
    name: str | None = None

    def __post_init__(self) -> None:
        if self.layers not in LAYER_MAPS:
            raise AutoSKDError(f"layer map {self.layers!r} unknown; choose one of {', '.join(LAYER_MAPS)}")


def map_layers(layers: str, student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs for a layer map.

    ``uniform`` is TinyBERT's g(m) = m * N/M: student layer s (0-based) learns from teacher
    layer (s + 1) * N // M - 1, so the last student layer always meets the last teacher layer.
    ``last`` pairs the last layers only.
    """
    if layers == "none":
        return []
    if layers == "last":
        return [(student_layers - 1, teacher_layers - 1)]
    if layers == "uniform":
        if teacher_layers < student_layers:
            raise AutoSKDError(
                f"uniform layer mapping needs a teacher at least as deep as the student "
                f"(teacher {teacher_layers} < student {student_layers} layers); use a deeper teacher"
            )
        return [(s, (s + 1) * teacher_layers // student_layers - 1) for s in range(student_layers)]
    raise AutoSKDError(f"layer map {layers!r} unknown; choose one of {', '.join(LAYER_MAPS)}")


@dataclass(frozen=True)
class MethodSpec:
    """A whole method: its loss terms, the hard-label weight, and the stages it trains in.

    ``hard_label_weight`` adds cross-entropy on the gold labels (task stages only:
    ``hard_label_stages`` names them; ``None`` means every stage except ``"pretrain"``).
    ``stages`` lists the stage names the method expects, in order; ``distill`` runs them
    in that order unless the user overrides the stage list.
    """

    name: str
    description: str
    losses: tuple[FeatureLoss, ...] = ()
    hard_label_weight: float = 0.0
    stages: tuple[str, ...] = ("task",)
    needs_teacher: bool = True
    reference: str = ""
    extra: dict = field(default_factory=dict)
    hard_label_stages: tuple[str, ...] | None = None

    def uses_hard_labels(self, stage: str) -> bool:
        """Whether the hard-label cross-entropy is part of ``stage``'s loss."""
        if self.hard_label_weight <= 0:
            return False
        if self.hard_label_stages is None:
            return stage != "pretrain"
        return stage in self.hard_label_stages

    def losses_for(self, stage: str) -> tuple[FeatureLoss, ...]:
        return tuple(loss for loss in self.losses if loss.stage == stage)
