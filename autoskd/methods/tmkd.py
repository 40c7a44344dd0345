"""TMKD (Yang et al. 2020): multi-teacher KD. The student regresses every teacher's logits
(MSE), averaged over the teachers, in a pre-training stage on unlabelled text and in the task
stage, where gold labels add a cross-entropy weighted 1/n (n teachers). Follows GKD's
catalogue; as GLMD App. A.1, without the paper's multi-header output layer."""

from ..engine.multi_teacher import MultiTeacherMethod
from ..engine.methods import METHODS
from ..engine.spec import FeatureLoss, MethodSpec


@METHODS.register("tmkd")
class TMKD(MultiTeacherMethod):
    spec = MethodSpec(
        name="tmkd",
        description="TMKD: MSE to each teacher's logits averaged over the teachers (pre-training and task), plus "
                    "hard labels x 1/n.",
        losses=(FeatureLoss("logits", "logits", "mse", stage="pretrain", name="teachers"),
                FeatureLoss("logits", "logits", "mse", stage="task", name="teachers")),
        stages=("pretrain", "task"), hard_label_weight=1.0, extra={"teachers": "all"},
        reference="Yang et al. 2020, Model Compression with Two-stage Multi-teacher Knowledge Distillation "
                  "for Web Question Answering System (WSDM)",
    )
    combiner = "mean"

    def losses(self, ctx, student_feats, teacher_feats, teacher_name, batch):
        out = super().losses(ctx, student_feats, teacher_feats, teacher_name, batch)
        if "hard_ce" in out:
            out["hard_ce"] = out["hard_ce"] / len(teacher_feats)
        return out
