"""MiniLMv2 (Wang et al. 2021): multi-head self-attention *relation* distillation.

For X in Q, K, V of one teacher layer and the student's last layer, the heads are
concatenated and re-split into R relation heads (R = 48 by default), and
KL(softmax(X_t X_t^T / sqrt(d_r)) || softmax(X_s X_s^T / sqrt(d_r))) is averaged over relation
heads and real query rows. Relations are T x T, so widths and head counts may differ. The
paper uses an upper-middle teacher layer for large teachers; ``teacher_layer`` picks it
(default: the last). As ``minilm``, the terms run in the task stage with gold labels by default
and, with ``--pretrain-epochs``, also in pre-training on unlabelled text.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..engine.methods import METHODS, Method
from ..engine.spec import FeatureLoss, MethodSpec


def _relations(stage: str, teacher_layer: int = -1, heads: int = 48) -> tuple[FeatureLoss, ...]:
    return tuple(FeatureLoss(f"{x}:-1", f"{x}:{teacher_layer}", "kl", transform=f"relation_heads:{heads}",
                             stage=stage, name=f"{x[0]}{x[0]}_relation") for x in ("query", "key", "value"))


@METHODS.register("minilmv2")
class MiniLMv2(Method):
    spec = MethodSpec(
        name="minilmv2",
        description="MiniLMv2: Q-Q, K-K, V-V self-attention relation KL with 48 relation heads "
                    "(last student layer), with cross-entropy on gold labels.",
        losses=(*_relations("task"), *_relations("pretrain")),
        hard_label_weight=1.0,
        reference="Wang et al. 2021, MiniLMv2: Multi-Head Self-Attention Relation Distillation (ACL Findings)",
    )
    OPTIONS = {"relation_heads": 48, "teacher_layer": -1}

    def configure(self, spec: MethodSpec, options: dict[str, Any]) -> MethodSpec:
        heads, layer = options["relation_heads"], options["teacher_layer"]
        return dataclasses.replace(spec, losses=(*_relations("task", layer, heads), *_relations("pretrain", layer, heads)))
