"""Annealing-KD (Jafari et al. 2021): the student first regresses the teacher's logits scaled
by phi(t) = 1 - (ceil(7(1 - t/N)) - 1)/7 -- a gentle 1/7 of them at first, the full logits at
the end (MSE, stage ``annealing``) -- then fine-tunes on gold labels (stage ``task``). Follows
GKD's catalogue."""

from ..engine.methods import METHODS, Method
from ..engine.spec import FeatureLoss, MethodSpec


@METHODS.register("annealing_kd")
class AnnealingKD(Method):
    spec = MethodSpec(
        name="annealing_kd",
        description="Annealing-KD: MSE to teacher logits scaled by an annealing phi(t) rising from 1/7 to 1, "
                    "then hard labels.",
        losses=(FeatureLoss("logits", "logits", "mse", teacher_scale="annealing", stage="annealing",
                            name="annealed"),),
        stages=("annealing", "task"), hard_label_weight=1.0, hard_label_stages=("task",),
        reference="Jafari et al. 2021, Annealing Knowledge Distillation (EACL)",
    )
