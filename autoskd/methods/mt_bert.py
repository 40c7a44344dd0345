"""MT-BERT (Wu et al. 2021): multi-teacher distillation with per-sample teacher weights.

Per teacher k and sample i: soft cross-entropy (tau 1) between teacher and student logits,
weighted by w_ik = 1 / (1 + CE(teacher k's logits, gold label)) -- a teacher that is wrong on
a sample speaks less for it; plus PKD-style MSE (x100) of the L2-normalised [CLS] states of
uniformly mapped layers (GKD's catalogue: map ``u``) through one Linear per teacher; terms
averaged over teachers; plus hard labels. As GLMD's runs, no co-finetuning of the teachers (the
team's teachers are fine-tuned apart).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..engine.methods import METHODS
from ..engine.multi_teacher import MultiTeacherMethod
from ..engine.spec import FeatureLoss, MethodSpec


def weighted_soft_ce(z_s: Tensor, z_t: Tensor, labels: Tensor) -> Tensor:
    """mean_i w_i * -sum p_t log p_s with w_i = 1 / (1 + CE(z_t,i, y_i))."""
    z_s, z_t = z_s.float(), z_t.float()
    weight = 1.0 / (1.0 + F.cross_entropy(z_t, labels, reduction="none"))
    soft = -(F.softmax(z_t, -1) * F.log_softmax(z_s, -1)).sum(-1)
    return (weight * soft).mean()


@METHODS.register("mt_bert")
class MTBERT(MultiTeacherMethod):
    spec = MethodSpec(
        name="mt_bert",
        description="MT-BERT: per-teacher soft CE weighted per sample by 1/(1 + teacher CE), PKD-style hidden "
                    "MSE through a Linear per teacher, plus hard labels.",
        losses=(FeatureLoss("hidden:{s}", "hidden:{t}", "mse", weight=100.0, layers="uniform", projection="per_teacher",
                            transform="cls_l2", name="patient"),),
        hard_label_weight=1.0, extra={"teachers": "all"},
        reference="Wu et al. 2021, One Teacher is Enough? Pre-trained Language Model Distillation from Multiple "
                  "Teachers (ACL Findings)",
    )

    def feature_requests(self, ctx, teacher_name):
        student, teachers = super().feature_requests(ctx, teacher_name)
        return student, {n: list(dict.fromkeys([*req, "logits"])) for n, req in teachers.items()}

    def losses(self, ctx, student_feats, teacher_feats, teacher_name, batch) -> dict[str, Tensor]:
        out = super().losses(ctx, student_feats, teacher_feats, teacher_name, batch)
        if "labels" in batch:
            out["weighted_soft_ce"] = torch.stack([weighted_soft_ce(student_feats["logits"], f["logits"],
                                                                    batch["labels"])
                                                   for f in teacher_feats.values()]).mean()
        return out
