"""Patient KD, PKD-skip (Sun et al. 2019): the student's intermediate [CLS] vectors,
L2-normalised, match every k-th teacher layer's (k = Lt/Ls, last layer excluded) by MSE x100,
plus 0.5 x KL at tau 10 on the logits and 0.5 x cross-entropy on gold labels. The paper
initialises the student from the teacher's first layers (team ``init: truncated-teacher``).
Follows GKD's catalogue (half-depth student: teacher layers 2, 4, .., Lt-2)."""

from ..engine.methods import METHODS, Method
from ..engine.spec import FeatureLoss, MethodSpec


@METHODS.register("pkd")
class PKD(Method):
    spec = MethodSpec(
        name="pkd",
        description="Patient KD (skip): normalised [CLS] MSE x100 on every k-th teacher layer, 0.5 KL (tau 10) "
                    "on logits, 0.5 hard labels.",
        losses=(FeatureLoss("hidden:{s}", "hidden:{t}", "mse", weight=100.0, layers="skip", transform="cls_l2",
                            name="patient"),
                FeatureLoss("logits", "logits", "kl", weight=0.5, temperature=10.0, name="soft")),
        hard_label_weight=0.5,
        reference="Sun et al. 2019, Patient Knowledge Distillation for BERT Model Compression (EMNLP)",
    )
