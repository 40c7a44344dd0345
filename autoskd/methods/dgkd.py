"""DGKD (Son et al. 2021): densely guided KD. Every earlier model of a teacher-assistant
chain (the teacher and each assistant) teaches the student at once: 0.5 x soft CE at tau 10
per teacher, each teacher kept with probability 0.75 per step (stochastic teacher dropout,
at least one kept), summed, plus 0.5 x hard labels. ``autoskd chain --method dgkd`` runs it.
Follows GKD's catalogue."""

from ..engine.multi_teacher import MultiTeacherMethod
from ..engine.methods import METHODS
from ..engine.spec import FeatureLoss, MethodSpec


@METHODS.register("dgkd")
class DGKD(MultiTeacherMethod):
    spec = MethodSpec(
        name="dgkd",
        description="DGKD: all earlier models of a chain teach; 0.5 soft CE (tau 10) per teacher, each kept "
                    "w.p. 0.75 per step, plus 0.5 hard labels.",
        losses=(FeatureLoss("logits", "logits", "soft_ce", weight=0.5, temperature=10.0, name="soft"),),
        hard_label_weight=0.5, extra={"teachers": "all", "chain": "dgkd"},
        reference="Son et al. 2021, Densely Guided Knowledge Distillation using Multiple Teacher Assistants (ICCV)",
    )
    OPTIONS = {"survival": 0.75, "seed": 0}

    @property
    def combiner(self) -> str:
        return f"random_survival:{self.options['survival']}"
