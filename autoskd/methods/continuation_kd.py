"""Continuation-KD (Jafari et al. 2022): KD as a continuation from an easy to the real problem.

Loss = psi(t) x hard cross-entropy + (1 - psi(t)) x mean_i [m_i > phi(t)] m_i, where
m_i = MSE(z_s,i, phi(t) z_t,i) is sample i's regression to the annealed teacher logits
(phi as Annealing-KD) and only samples still further away than phi count; psi(t) rises
linearly to 1/2 at 0.666 of the stage (t/(1.333 N)) and is 1 after it, so the stage ends on
gold labels alone. Follows GKD's catalogue: its pt -> ft needs no unlabelled corpus, so pt is
the student's pre-trained start (the team's ``init``), and this is the ft stage.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..engine.methods import METHODS, Method, training_progress
from ..engine.losses import hard_label_ce
from ..engine.schedules import schedule_value
from ..engine.spec import FeatureLoss, MethodSpec


@METHODS.register("continuation_kd")
class ContinuationKD(Method):
    spec = MethodSpec(
        name="continuation_kd",
        description="Continuation-KD: psi x hard + (1 - psi) x MSE to annealed teacher logits where it exceeds "
                    "phi; psi rises to 1 by 2/3 of training.",
        losses=(FeatureLoss("logits", "logits", "mse", teacher_scale="annealing", name="annealed"),),
        reference="Jafari et al. 2022, Continuation KD: Improved Knowledge Distillation through the Lens of "
                  "Continuation Optimization (EMNLP Findings)",
    )

    def losses(self, ctx, student_feats, teacher_feats, teacher_name, batch) -> dict[str, Tensor]:
        progress = training_progress(ctx)
        phi, psi = schedule_value("annealing", progress), schedule_value("continuation", progress)
        z_s, z_t = student_feats["logits"].float(), teacher_feats["logits"].float()
        per_sample = F.mse_loss(z_s, phi * z_t, reduction="none").mean(-1)
        active = (per_sample.detach() > phi).float()
        out = {"annealed_mse": (1 - psi) * (per_sample * active).mean()}
        if "labels" in batch and psi > 0:
            out["hard_ce"] = psi * hard_label_ce(z_s, batch["labels"])
        return out
