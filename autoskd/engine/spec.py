"""A distillation method described as data (TextBrewer-style).

A :class:`MethodSpec` says which features to match, by which distance, with which weight,
through which projection, in which training stage. The auxiliary model turns it into losses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import AutoSKDError
from .layer_maps import map_layers  # noqa: F401  (re-exported: spec.map_layers)



@dataclass(frozen=True)
class FeatureLoss:
    """One term of a method's loss: distance(student feature, teacher feature) * weight.

    ``student``/``teacher`` are feature names (see :mod:`autoskd.engine.features`); with a
    layer map they may contain ``{s}`` and ``{t}`` placeholders for the student and teacher
    layer indices. ``layers`` names a registered layer map (:mod:`.layer_maps`: ``uniform``,
    ``last``, ``skip``, ``one_to_one``, ``all``, ``list:0-2,1-5``). ``projection`` names a
    registered projection (:mod:`.projections`: ``linear`` = one per layer pair and teacher,
    ``per_teacher``, ``shared``) mapping the student feature to the teacher's width with a
    trainable ``nn.Linear`` owned by the auxiliary model. ``transform`` names a registered
    feature transform applied to both sides first (a relation matrix; arguments after a
    colon, e.g. ``relation_heads:48``). ``stage`` is the training stage in which the term is
    active. ``name`` is a short handle: its loss key is ``f"{name}_{distance}"`` (plus
    ``:s{s}-t{t}`` for mapped layers) and the method option ``f"{name}_weight"`` sets its
    weight; without it the student feature kind stands in (``hidden`` -> ``hidden_mse``).

    Schedules (:mod:`.schedules`, functions of the stage's progress): ``weight_schedule``
    multiplies the weight, ``temperature_schedule`` the temperature, ``teacher_scale`` the
    teacher feature (Annealing-KD). ``tokens`` picks the positions a token-level distance
    averages over: ``"attention"`` (real tokens) or ``"masked"`` (MLM-masked tokens only).
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
    weight_schedule: str | None = None
    temperature_schedule: str | None = None
    teacher_scale: str | None = None
    tokens: str = "attention"
    #: Extra keywords of the distance, e.g. ``(("beta", 0.5),)`` for ``jsd``.
    params: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        from .layer_maps import LAYER_MAPS, parse_map
        from .schedules import check_schedule

        LAYER_MAPS.get(parse_map(self.layers)[0])  # unknown names fail here, listing the known ones
        for sched in (self.weight_schedule, self.temperature_schedule, self.teacher_scale):
            check_schedule(sched)
        if self.tokens not in ("attention", "masked"):
            raise AutoSKDError(f"tokens={self.tokens!r} unknown; choose 'attention' or 'masked'")


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
    #: ``((stage, weight), ...)``: a hard-label weight for one stage (LRC-BERT's ft2 x3).
    stage_hard_label_weights: tuple[tuple[str, float], ...] = ()
    #: Weight of the student's own masked-language-model loss on ``mlm_labels`` (PD,
    #: DistilBERT, DIITO) in ``mlm_stages``; needs an MLM head (:mod:`.mlm`).
    mlm_weight: float = 0.0
    mlm_stages: tuple[str, ...] = ("pretrain",)

    def hard_weight(self, stage: str) -> float:
        """The hard-label weight in ``stage`` (0 when the term is off there)."""
        per_stage = dict(self.stage_hard_label_weights)
        if stage in per_stage:
            return float(per_stage[stage])
        return self.hard_label_weight if self.uses_hard_labels(stage) else 0.0

    def uses_hard_labels(self, stage: str) -> bool:
        """Whether the hard-label cross-entropy is part of ``stage``'s loss."""
        per_stage = dict(self.stage_hard_label_weights)
        if stage in per_stage:
            return per_stage[stage] > 0
        if self.hard_label_weight <= 0:
            return False
        if self.hard_label_stages is None:
            return stage != "pretrain"
        return stage in self.hard_label_stages

    def uses_mlm(self, stage: str) -> bool:
        return self.mlm_weight > 0 and stage in self.mlm_stages

    def losses_for(self, stage: str) -> tuple[FeatureLoss, ...]:
        return tuple(loss for loss in self.losses if loss.stage == stage)
