"""RL-KD (Yuan et al. 2021, reinforced multi-teacher selection).

Stage ``warmup``: 0.5 x the mean over teachers of soft CE at tau 10 + 0.5 x hard labels.
Stage ``task``: an agent -- one Linear per teacher over that teacher's [CLS] state, its
cross-entropy on the gold label and its logits, then a sigmoid -- samples a Bernoulli mask
per (sample, teacher); the student learns from the selected teachers only (soft CE at tau
10, averaged over the selected ones; a sample with none selected learns from gold labels
alone) and the agent is trained by REINFORCE with reward -CE(student, gold) per sample
(mean reward as the baseline). The agent's parameters live in the auxiliary model. Follows
GKD's catalogue; the agent starts by selecting every teacher (bias 2, ours: the catalogue is silent).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.losses import hard_label_ce
from ..engine.methods import METHODS
from ..engine.multi_teacher import MultiTeacherMethod
from ..engine.spec import FeatureLoss, MethodSpec


def per_sample_soft_ce(z_s: Tensor, z_t: Tensor, tau: float) -> Tensor:
    return -(F.softmax(z_t.float() / tau, -1) * F.log_softmax(z_s.float() / tau, -1)).sum(-1)


@METHODS.register("rl_kd")
class RLKD(MultiTeacherMethod):
    spec = MethodSpec(
        name="rl_kd",
        description="RL-KD: warm-up on the mean of teachers' soft CE (tau 10); then an agent samples which teachers "
                    "teach each sample, trained by REINFORCE on the student's loss.",
        losses=(FeatureLoss("logits", "logits", "soft_ce", weight=0.5, temperature=10.0, stage="warmup",
                            name="soft"),),
        stages=("warmup", "task"), hard_label_weight=0.5, extra={"teachers": "all"},
        reference="Yuan et al. 2021, Reinforced Multi-Teacher Selection for Knowledge Distillation (AAAI)",
    )
    OPTIONS = {"temperature_rl": 10.0, "seed": 0}

    def build_auxiliary(self, student_geom, teacher_geoms):
        aux = super().build_auxiliary(student_geom, teacher_geoms)
        for name, g in teacher_geoms.items():
            agent = nn.Linear(g.hidden_size + 1 + student_geom.num_labels, 1)
            nn.init.zeros_(agent.weight)
            nn.init.constant_(agent.bias, 2.0)  # start by selecting every teacher (p = 0.88)
            aux.extra[f"agent_{name}".replace(".", "_")] = agent
        return aux

    def feature_requests(self, ctx, teacher_name):
        student, teachers = super().feature_requests(ctx, teacher_name)
        if ctx.stage == "warmup":
            return student, teachers
        return student, {n: ["hidden:-1", "logits"] for n in teachers}

    def losses(self, ctx, student_feats, teacher_feats, teacher_name, batch) -> dict[str, Tensor]:
        if ctx.stage == "warmup" or "labels" not in batch:
            return super().losses(ctx, student_feats, teacher_feats, teacher_name, batch)
        labels, z_s, tau = batch["labels"], student_feats["logits"], self.options["temperature_rl"]
        soft, masks, log_probs = [], [], []
        for name, feats in teacher_feats.items():
            z_t = feats["logits"].float()
            state = torch.cat([feats["hidden:-1"][:, 0].float(),
                               F.cross_entropy(z_t, labels, reduction="none")[:, None], z_t], -1)
            prob = torch.sigmoid(ctx.auxiliary.extra[f"agent_{name}".replace(".", "_")](state).squeeze(-1))
            action = torch.bernoulli(prob.detach(), generator=self.generator)
            log_probs.append(action * prob.clamp_min(1e-6).log() + (1 - action) * (1 - prob).clamp_min(1e-6).log())
            soft.append(per_sample_soft_ce(z_s, z_t, tau))
            masks.append(action)
        mask, soft = torch.stack(masks, 1), torch.stack(soft, 1)                     # [B, n]
        chosen = (soft * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        reward = -F.cross_entropy(z_s.detach().float(), labels, reduction="none")
        advantage = reward - reward.mean()
        self.last_selection = mask.mean(0).tolist()
        return {"soft_ce": 0.5 * chosen.mean(),
                "hard_ce": hard_label_ce(z_s, labels) * ctx.auxiliary.spec.hard_weight(ctx.stage),
                "agent_reinforce": -(advantage * torch.stack(log_probs, 1).sum(1)).mean()}
