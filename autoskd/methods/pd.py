"""PD, Pre-trained Distillation (Turc et al. 2019): pre-train the student with MLM, then
distil the task with the teacher's soft labels only (soft cross-entropy at tau = 1, no gold
labels). The pre-training stage runs on unlabelled text with ``--pretrain-epochs``. Follows
GKD's catalogue."""

from ..engine.methods import METHODS, Method
from ..engine.spec import FeatureLoss, MethodSpec


@METHODS.register("pd")
class PD(Method):
    spec = MethodSpec(
        name="pd",
        description="Pre-trained Distillation: MLM pre-training of the student, then soft cross-entropy "
                    "on the teacher's logits (tau 1), no gold labels.",
        losses=(FeatureLoss("logits", "logits", "soft_ce", temperature=1.0, name="soft"),),
        stages=("pretrain", "task"), mlm_weight=1.0, mlm_stages=("pretrain",),
        reference="Turc et al. 2019, Well-Read Students Learn Better",
    )
