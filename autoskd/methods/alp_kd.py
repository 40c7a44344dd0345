"""ALP-KD (Passban et al. 2021): attention-based layer projection.

Every student layer's [CLS] vector s attends over *all* teacher layers' [CLS] vectors t_j
(alpha_j = softmax_j(s . t_j)) and matches their weighted sum by MSE (weight 0.2), beside
0.7 x soft cross-entropy at tau 20 on logits and 0.1 x gold-label cross-entropy. Needs equal
hidden widths (the attention is a dot product between the two models' vectors). Follows GKD's
catalogue (ft, student from the truncated teacher: the team's ``init``). It gives no weight for
the MSE: 0.2 (``alp_weight``) is ours, the 0.7 + 0.1 + 0.2 = 1 split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..engine.methods import METHODS, Method
from ..engine.spec import FeatureLoss, MethodSpec
from ..errors import AutoSKDError


def attended_layers(s: Tensor, teacher_layers: Tensor) -> Tensor:
    """ALP: ``sum_j softmax_j(s . t_j) t_j`` for s [B, H] and teacher_layers [B, L, H]."""
    alpha = torch.softmax(torch.einsum("bh,blh->bl", s, teacher_layers), dim=-1)
    return torch.einsum("bl,blh->bh", alpha, teacher_layers)


class LayerAttention(Method):
    """Shared plumbing: every student layer and every teacher layer's hidden state."""

    def feature_requests(self, ctx, teacher_name):
        student, teacher = super().feature_requests(ctx, teacher_name)
        if ctx.stage not in self.attention_stages:
            return student, teacher
        ls = ctx.auxiliary.student_geom.num_layers
        lt = ctx.auxiliary.teacher_geoms[teacher_name or next(iter(ctx.auxiliary.teacher_geoms))].num_layers
        student = list(dict.fromkeys([*(f"hidden:{i}" for i in self.student_layers(ls)), *student]))
        return student, list(dict.fromkeys([*teacher, *(f"hidden:{j}" for j in self.teacher_layers(lt))]))

    def student_layers(self, num_layers: int) -> range:
        return range(num_layers)

    def teacher_layers(self, num_layers: int) -> range:
        return range(num_layers)

    @staticmethod
    def cls_stack(feats, layers) -> Tensor:
        return torch.stack([feats[f"hidden:{j}"][:, 0].float() for j in layers], dim=1)


@METHODS.register("alp_kd")
class ALPKD(LayerAttention):
    spec = MethodSpec(
        name="alp_kd",
        description="ALP-KD: each student layer's [CLS] matches an attention-weighted sum over all teacher "
                    "layers (MSE x0.2), 0.7 soft CE (tau 20), 0.1 hard labels.",
        losses=(FeatureLoss("logits", "logits", "soft_ce", weight=0.7, temperature=20.0, name="soft"),),
        hard_label_weight=0.1,
        reference="Passban et al. 2021, ALP-KD: Attention-Based Layer Projection for Knowledge Distillation (AAAI)",
    )
    OPTIONS = {"alp_weight": 0.2}
    attention_stages = ("task",)

    def losses(self, ctx, student_feats, teacher_feats, teacher_name, batch) -> dict[str, Tensor]:
        out = super().losses(ctx, student_feats, teacher_feats, teacher_name, batch)
        name = teacher_name or next(iter(ctx.auxiliary.teacher_geoms))
        teachers = self.cls_stack(teacher_feats, self.teacher_layers(ctx.auxiliary.teacher_geoms[name].num_layers))
        terms = []
        for i in self.student_layers(ctx.auxiliary.student_geom.num_layers):
            s = student_feats[f"hidden:{i}"][:, 0].float()
            if s.shape[-1] != teachers.shape[-1]:
                raise AutoSKDError(f"alp_kd attends with dot products, so widths must match (student "
                                   f"{s.shape[-1]}, teacher {teachers.shape[-1]})")
            terms.append(F.mse_loss(s, attended_layers(s, teachers)))
        out["alp_mse"] = torch.stack(terms).mean() * self.options["alp_weight"]
        return out
