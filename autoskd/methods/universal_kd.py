"""Universal-KD (Wu et al. 2021): attention over teacher layers with learned projections.

For each intermediate student layer i (H_1..H_{L-1}), its [CLS] vector queries the teacher's
intermediate layers' [CLS] vectors (H_1..H_{L-1}, the last excluded), each mapped to the
student width by its own Linear; the student's vector matches the attention-weighted teacher
vector by KL between their softmaxes over the hidden dimension (x0.5), beside 0.5 x KL (tau 1)
on logits (stage ``intermediate``); stage ``task`` then fine-tunes on gold labels. Follows
GKD's catalogue (Universal-KD(IL), GLMD App. A.1; student from the truncated teacher: the
team's ``init``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.methods import METHODS
from ..engine.spec import FeatureLoss, MethodSpec
from .alp_kd import LayerAttention, attended_layers


@METHODS.register("universal_kd")
class UniversalKD(LayerAttention):
    spec = MethodSpec(
        name="universal_kd",
        description="Universal-KD: student [CLS] attends over linearly projected teacher layers, KL over the "
                    "hidden-dim softmax x0.5 + 0.5 KL (tau 1), then hard labels.",
        losses=(FeatureLoss("logits", "logits", "kl", weight=0.5, temperature=1.0, stage="intermediate",
                            name="soft"),),
        stages=("intermediate", "task"), hard_label_weight=1.0, hard_label_stages=("task",),
        reference="Wu et al. 2021, Universal-KD: Attention-based Output-Grounded Intermediate Layer "
                  "Knowledge Distillation (EMNLP)",
    )
    OPTIONS = {"universal_weight": 0.5}
    attention_stages = ("intermediate",)

    def student_layers(self, num_layers: int) -> range:
        return range(max(1, num_layers - 1))  # intermediate layers (layer 0 for a 2-layer student)

    def teacher_layers(self, num_layers: int) -> range:
        return range(max(1, num_layers - 1))  # H_1..H_{L-1}: the last layer speaks through the logits

    def build_auxiliary(self, student_geom, teacher_geoms):
        aux = super().build_auxiliary(student_geom, teacher_geoms)
        for name, geom in teacher_geoms.items():
            aux.extra[f"proj_{name}".replace(".", "_")] = nn.ModuleList(
                nn.Linear(geom.hidden_size, student_geom.hidden_size) for _ in self.teacher_layers(geom.num_layers))
        return aux

    def losses(self, ctx, student_feats, teacher_feats, teacher_name, batch) -> dict[str, Tensor]:
        out = super().losses(ctx, student_feats, teacher_feats, teacher_name, batch)
        if ctx.stage not in self.attention_stages:
            return out
        name = teacher_name or next(iter(ctx.auxiliary.teacher_geoms))
        projections = ctx.auxiliary.extra[f"proj_{name}".replace(".", "_")]
        layers = self.teacher_layers(ctx.auxiliary.teacher_geoms[name].num_layers)
        teachers = torch.stack([proj(teacher_feats[f"hidden:{j}"][:, 0].float())
                                for j, proj in zip(layers, projections)], dim=1)
        terms = []
        for i in self.student_layers(ctx.auxiliary.student_geom.num_layers):
            s = student_feats[f"hidden:{i}"][:, 0].float()
            target = attended_layers(s, teachers)
            terms.append(F.kl_div(F.log_softmax(s, -1), F.log_softmax(target, -1), log_target=True,
                                  reduction="batchmean"))
        out["universal_kl"] = torch.stack(terms).mean() * self.options["universal_weight"]
        return out
