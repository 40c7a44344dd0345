"""RAIL-KD (Haidar et al. 2022): random intermediate layer mapping.

At the start of every epoch, L_s - 1 teacher layers are drawn at random (sorted, last layer
excluded); the mean-pooled hidden states of the student's first L_s - 1 layers and of the
drawn teacher layers are each concatenated, mapped by a Linear to 128 dims, L2-normalised
and matched by MSE (x1/3), beside 1/3 x soft CE at tau 10 on the logits and 1/3 x hard labels.
Follows GKD's catalogue (the student starts from a DistilBERT-style model: the team's ``init``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.methods import METHODS, Method
from ..engine.relations import masked_mean_pool
from ..engine.spec import FeatureLoss, MethodSpec


@METHODS.register("rail_kd")
class RAILKD(Method):
    spec = MethodSpec(
        name="rail_kd",
        description="RAIL-KD: random teacher layers drawn per epoch, concatenated mean-pooled states -> Linear "
                    "128 -> L2 -> MSE x1/3, 1/3 soft CE (tau 10), 1/3 hard labels.",
        losses=(FeatureLoss("logits", "logits", "soft_ce", weight=1 / 3, temperature=10.0, name="soft"),),
        hard_label_weight=1 / 3,
        reference="Haidar et al. 2022, RAIL-KD: RAndom Intermediate Layer Mapping for Knowledge Distillation "
                  "(NAACL Findings)",
    )
    OPTIONS = {"rail_weight": 1 / 3, "dim": 128, "seed": 0}

    def __init__(self, **options):
        super().__init__(**options)
        self.generator = torch.Generator().manual_seed(int(self.options["seed"]))
        self.drawn: dict[str, list[int]] = {}
        self._epoch = None

    def build_auxiliary(self, student_geom, teacher_geoms):
        aux = super().build_auxiliary(student_geom, teacher_geoms)
        k, dim = max(1, student_geom.num_layers - 1), int(self.options["dim"])
        aux.extra["student"] = nn.Linear(k * student_geom.hidden_size, dim)
        for name, geom in teacher_geoms.items():
            aux.extra[f"teacher_{name}".replace(".", "_")] = nn.Linear(k * geom.hidden_size, dim)
        return aux

    def draw(self, ls: int, lt: int) -> list[int]:
        k = max(1, ls - 1)
        return sorted(torch.randperm(max(k, lt - 1), generator=self.generator)[:k].tolist())

    def on_step(self, ctx) -> None:
        if ctx.epoch != self._epoch or not self.drawn:  # a new draw per epoch
            self._epoch = ctx.epoch
            ls = ctx.auxiliary.student_geom.num_layers
            self.drawn = {n: self.draw(ls, g.num_layers) for n, g in ctx.auxiliary.teacher_geoms.items()}

    def feature_requests(self, ctx, teacher_name):
        student, teacher = super().feature_requests(ctx, teacher_name)
        k = max(1, ctx.auxiliary.student_geom.num_layers - 1)
        name = teacher_name or next(iter(ctx.auxiliary.teacher_geoms))
        return ([*(f"hidden:{i}" for i in range(k)), *student],
                list(dict.fromkeys([*teacher, *(f"hidden:{j}" for j in self.drawn[name])])))

    def losses(self, ctx, student_feats, teacher_feats, teacher_name, batch) -> dict[str, Tensor]:
        out = super().losses(ctx, student_feats, teacher_feats, teacher_name, batch)
        mask = batch.get("attention_mask")
        name = teacher_name or next(iter(ctx.auxiliary.teacher_geoms))
        k = max(1, ctx.auxiliary.student_geom.num_layers - 1)
        s = torch.cat([masked_mean_pool(student_feats[f"hidden:{i}"], mask) for i in range(k)], -1)
        t = torch.cat([masked_mean_pool(teacher_feats[f"hidden:{j}"], mask) for j in self.drawn[name]], -1)
        s = F.normalize(ctx.auxiliary.extra["student"](s), dim=-1)
        t = F.normalize(ctx.auxiliary.extra[f"teacher_{name}".replace(".", "_")](t), dim=-1)
        out["rail_mse"] = F.mse_loss(s, t) * self.options["rail_weight"]
        return out
