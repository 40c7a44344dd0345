"""DIITO (Wu et al. 2022): distillation with interchange intervention training objectives.

Pre-training stage, two passes per step:

1. the plain pass: 0.25 x KL at tau 2 on the masked tokens' word-prediction logits,
   0.25 x the student's own MLM loss, 0.25 x (1 - cos) between the final hidden states;
2. the interchange pass: one uniformly aligned layer pair (s, g(s)) is drawn; in *both*
   models a random 30% token span of that layer's output is overwritten with the same span
   of the next example in the batch (operation hooks, no model code touched), and the
   student matches the intervened teacher's word predictions (0.25 x KL at tau 2).

The task stage fine-tunes on gold labels. Needs MLM heads and one width/tokenizer. Follows GKD's
catalogue.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..engine.hooks import transform_output
from ..engine.layer_maps import map_layers
from ..engine.methods import METHODS, Method
from ..engine.spec import FeatureLoss, MethodSpec
from ..models.adapters import ArchitectureAdapter


def swap_span(hidden: Tensor, start: int, length: int) -> Tensor:
    """``hidden`` [B, T, H] with positions start..start+length taken from the next example."""
    out = hidden.clone()
    out[:, start:start + length] = hidden.roll(-1, dims=0)[:, start:start + length]
    return out


def _swap_hook(start: int, length: int):
    def hook(module, inputs, output: Any):
        if isinstance(output, tuple):
            return (swap_span(output[0], start, length), *output[1:])
        return swap_span(output, start, length)
    return hook


@METHODS.register("diito")
class DIITO(Method):
    spec = MethodSpec(
        name="diito",
        description="DIITO: 0.25 KL (tau 2) + 0.25 MLM + 0.25 cosine, plus 0.25 KL after swapping a 30% token "
                    "span of an aligned layer with the next example in both models; then fine-tuning.",
        losses=(FeatureLoss("mlm_logits", "mlm_logits", "kl", weight=0.25, temperature=2.0, stage="pretrain",
                            tokens="masked", name="mlm_soft"),
                FeatureLoss("hidden:-1", "hidden:-1", "cosine", weight=0.25, stage="pretrain", name="hidden")),
        stages=("pretrain", "task"), mlm_weight=0.25, mlm_stages=("pretrain",),
        hard_label_weight=1.0, hard_label_stages=("task",),
        reference="Wu et al. 2022, Causal Distillation for Language Models (NAACL)",
    )
    OPTIONS = {"span": 0.3, "interchange_weight": 0.25, "temperature_ii": 2.0, "seed": 0}

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.generator = torch.Generator().manual_seed(int(self.options["seed"]))
        self.student_model = None
        self.intervention: tuple[int, int, int, int] | None = None  # s, t, start, length

    def setup(self, student, teachers) -> None:
        super().setup(student, teachers)
        self.student_model = student

    def _draw(self, ctx, batch) -> tuple[int, int, int, int]:
        ls = ctx.auxiliary.student_geom.num_layers
        name = ctx.teacher_name or next(iter(ctx.auxiliary.teacher_geoms))
        pairs = map_layers("uniform", ls, ctx.auxiliary.teacher_geoms[name].num_layers)
        s, t = pairs[int(torch.randint(len(pairs), (1,), generator=self.generator))]
        length_all = int(batch["input_ids"].shape[1])
        length = max(1, int(round(self.options["span"] * length_all)))
        start = int(torch.randint(max(1, length_all - length + 1), (1,), generator=self.generator))
        return s, t, start, length

    def teacher_features(self, ctx, policy, teacher_name, batch, requests):
        feats = super().teacher_features(ctx, policy, teacher_name, batch, requests)
        if ctx.stage != "pretrain" or policy is None or batch["input_ids"].shape[0] < 2:
            self.intervention = None
            return feats
        self.intervention = s, t, start, length = self._draw(ctx, batch)
        teacher = policy.teachers[teacher_name].model
        layer = ArchitectureAdapter.for_model(teacher).module(teacher, "layer", t)
        with transform_output(layer, _swap_hook(start, length)):
            feats["ii:mlm_logits"] = policy.features(teacher_name, batch, ["mlm_logits"])["mlm_logits"]
        return feats

    def losses(self, ctx, student_feats, teacher_feats, teacher_name, batch) -> dict[str, Tensor]:
        plain = {k: v for k, v in teacher_feats.items() if not k.startswith("ii:")}
        out = super().losses(ctx, student_feats, plain, teacher_name, batch)
        if self.intervention is None:
            return out
        s, _, start, length = self.intervention
        layer = ArchitectureAdapter.for_model(self.student_model).module(self.student_model, "layer", s)
        from ..engine.hooks import FeatureExtractor

        with FeatureExtractor(self.student_model, ["mlm_logits"]) as fx, transform_output(layer, _swap_hook(start, length)):
            s_logits = fx(batch)["mlm_logits"]
        from ..engine.losses import kl

        masked, t_logits = batch["mlm_labels"] != -100, teacher_feats["ii:mlm_logits"]
        rows = batch.get("mlm_rows")
        if rows is not None and s_logits.dim() == 2:  # [N, V] at the selected positions (Method.mlm_rows)
            keep = masked[rows]
            if not bool(keep.all()):
                s_logits, t_logits = s_logits[keep], t_logits[keep]
            loss = kl(s_logits, t_logits, temperature=self.options["temperature_ii"]) if len(s_logits) else \
                s_logits.sum() * 0.0
        else:
            loss = kl(s_logits, t_logits, temperature=self.options["temperature_ii"], mask=masked.float()[:, :, None])
        out["interchange_kl"] = self.options["interchange_weight"] * loss
        return out
