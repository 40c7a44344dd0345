"""CKD (Park et al. 2021): contextual knowledge distillation of word and layer relations.

On uniformly mapped layers: word relation -- KL between softmaxed token-token cosine
matrices (x1) -- and the local word angle within a 21-token window (smooth L1, x10); across
the mapped layers: the layer relation of each token's representations (cosine matrix over
layers, MSE x1) and their angle (smooth L1, x10); plus 0.9 x soft CE at tau 3 on the logits
and 0.1 x hard labels. Relations are T x T / L x L, so widths may differ. Follows GKD's
catalogue: its pt -> ft needs no unlabelled corpus (GLMD App. A.1 ran CKD's task-specific
loss only), so pt is the student's pre-trained start, the team's ``init``; the same terms also
run in a pre-training stage when ``--pretrain-epochs`` asks for one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..engine.methods import METHODS, Method
from ..engine.relations import angle_tensor, cos_matrix
from ..engine.spec import FeatureLoss, MethodSpec


def _terms(stage: str) -> tuple[FeatureLoss, ...]:
    return (FeatureLoss("hidden:{s}", "hidden:{t}", "kl", layers="uniform", transform="token_relation",
                        stage=stage, name="word_relation"),
            FeatureLoss("hidden:{s}", "hidden:{t}", "huber", weight=10.0, layers="uniform",
                        transform="window_angle:21", stage=stage, name="word_angle"))


def layer_relations(feats, layers: list[int], mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per token, the cosine matrix [B, T, L, L] and angles [B, T, L, L, L] across ``layers``."""
    x = torch.stack([feats[f"hidden:{j}"].float() for j in layers], dim=2)     # [B, T, L, H]
    if mask is not None:
        x = x * mask[:, :, None, None].to(x.dtype)
    return cos_matrix(x), angle_tensor(x)


@METHODS.register("ckd")
class CKD(Method):
    spec = MethodSpec(
        name="ckd",
        description="CKD: word relation (x1) and 21-token-window angle (x10), layer relation (x1) and layer "
                    "angle (x10) on mapped layers, 0.9 soft CE (tau 3), 0.1 hard labels.",
        losses=(*_terms("task"), FeatureLoss("logits", "logits", "soft_ce", weight=0.9, temperature=3.0,
                                             name="soft"), *_terms("pretrain")),
        hard_label_weight=0.1,
        reference="Park et al. 2021, Distilling Linguistic Context for Language Model Compression (EMNLP)",
    )
    OPTIONS = {"layer_relation_weight": 1.0, "layer_angle_weight": 10.0}

    def losses(self, ctx, student_feats, teacher_feats, teacher_name, batch) -> dict[str, Tensor]:
        out = super().losses(ctx, student_feats, teacher_feats, teacher_name, batch)
        pairs = [(t.student_layer, t.teacher_layer) for t in ctx.auxiliary.terms(ctx.stage, teacher_name)
                 if t.loss.name == "word_relation"]
        if len(pairs) < 2:
            return out  # one mapped layer has no layer relation
        mask = batch.get("attention_mask")
        s_rel, s_ang = layer_relations(student_feats, [s for s, _ in pairs], mask)
        t_rel, t_ang = layer_relations(teacher_feats, [t for _, t in pairs], mask)
        out["layer_relation_mse"] = F.mse_loss(s_rel, t_rel) * self.options["layer_relation_weight"]
        out["layer_angle_huber"] = F.smooth_l1_loss(s_ang, t_ang) * self.options["layer_angle_weight"]
        return out
