"""Uncertainty-driven teacher assignment (Li et al. 2021, "dynamic KD"): the batch is sorted
by the student's prediction entropy and cut into n groups (n teachers ordered by size); the
most uncertain group learns from the smallest teacher and the most confident from the largest
(as methods.md states GKD's setting), each group by KL (tau 1); plus hard labels. Follows GKD's
catalogue (the paper's hard selection)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..engine.losses import kl
from ..engine.methods import METHODS
from ..engine.multi_teacher import MultiTeacherMethod
from ..engine.spec import FeatureLoss, MethodSpec


def entropy_groups(logits: Tensor, n: int) -> list[Tensor]:
    """Sample indices sorted by descending entropy, cut into ``n`` near-equal groups."""
    p = F.softmax(logits.detach().float(), -1)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)
    return list(torch.argsort(entropy, descending=True).tensor_split(n))


@METHODS.register("uncertainty")
class Uncertainty(MultiTeacherMethod):
    spec = MethodSpec(
        name="uncertainty",
        description="Uncertainty: batch sorted by student entropy into n groups; high-entropy samples learn from "
                    "the smallest teacher (KL tau 1), plus hard labels.",
        losses=(FeatureLoss("logits", "logits", "kl", temperature=1.0, name="soft"),),
        hard_label_weight=1.0, extra={"teachers": "all"},
        reference="Li et al. 2021, Dynamic Knowledge Distillation for Pre-trained Language Models (EMNLP)",
    )

    def setup(self, student, teachers) -> None:
        super().setup(student, teachers)
        self.by_size = sorted(teachers, key=lambda n: sum(p.numel() for p in teachers[n].parameters()))

    def losses(self, ctx, student_feats, teacher_feats, teacher_name, batch) -> dict[str, Tensor]:
        z_s = student_feats["logits"]
        order = [n for n in self.by_size if n in teacher_feats]
        terms = []
        for name, idx in zip(order, entropy_groups(z_s, len(order))):
            if idx.numel():
                terms.append(kl(z_s[idx], teacher_feats[name]["logits"][idx], temperature=1.0) * idx.numel())
        out = {"soft_kl": torch.stack(terms).sum() / z_s.shape[0]}
        out.update(ctx.auxiliary.label_losses(ctx.stage, student_feats, batch, getattr(ctx, "hard_label_weight", None)))
        return out
