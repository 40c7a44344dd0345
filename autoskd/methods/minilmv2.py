"""MiniLMv2 (Wang et al. 2021): multi-head self-attention *relation* distillation.

For X in Q, K, V of one teacher layer and the student's last layer, the heads are
concatenated and re-split into R relation heads (R = 48 by default), and
KL(softmax(X_t X_t^T / sqrt(d_r)) || softmax(X_s X_s^T / sqrt(d_r))) is averaged over relation
heads and real query rows. Relations are T x T, so widths and head counts may differ.
Follows GKD's catalogue: teacher layer 12 <-> student last (``teacher_layer`` unset: the
teacher's 12th layer, or its last when it has fewer; an index picks another, e.g. the
paper's upper-middle layer of a large teacher); pt -> ft, the terms run in the ``pretrain``
stage with ``--pretrain-epochs``.

Deviations: as ``minilm``, the task stage keeps the terms beside cross-entropy on the gold
labels (GKD's ft is hard labels alone), so that the method distils without a pre-training
budget; ``hard_label_weight=0`` drops the labels.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..engine.layer_maps import LAYER_MAPS
from ..engine.methods import METHODS, Method
from ..engine.spec import FeatureLoss, MethodSpec
from ..errors import AutoSKDError

if "last_upto" not in LAYER_MAPS:
    @LAYER_MAPS.register("last_upto")
    def last_upto(ls: int, lt: int, arg: str = "") -> list[tuple[int, int]]:
        """The student's last layer with the teacher's k-th (1-based, ``last_upto:12``), or the
        teacher's last when it has fewer than k layers (MiniLMv2 in GKD: L12)."""
        return [(ls - 1, min(int(arg or 12), lt) - 1)]

#: GKD's MiniLMv2 reads the teacher's 12th layer.
TEACHER_LAYER = 12


def _relations(stage: str, teacher_layer: int | None = None, heads: int = 48) -> tuple[FeatureLoss, ...]:
    layers = f"last_upto:{TEACHER_LAYER}" if teacher_layer is None else f"list:-1/{int(teacher_layer)}"
    return tuple(FeatureLoss(f"{x}:{{s}}", f"{x}:{{t}}", "kl", layers=layers, transform=f"relation_heads:{heads}",
                             stage=stage, name=f"{x[0]}{x[0]}_relation") for x in ("query", "key", "value"))


@METHODS.register("minilmv2")
class MiniLMv2(Method):
    spec = MethodSpec(
        name="minilmv2",
        description="MiniLMv2: Q-Q, K-K, V-V self-attention relation KL with 48 relation heads "
                    "(teacher layer 12 or its last, student's last), with cross-entropy on gold labels.",
        losses=(*_relations("task"), *_relations("pretrain")),
        hard_label_weight=1.0,
        reference="Wang et al. 2021, MiniLMv2: Multi-Head Self-Attention Relation Distillation (ACL Findings)",
    )
    OPTIONS = {"relation_heads": 48, "teacher_layer": None}

    def configure(self, spec: MethodSpec, options: dict[str, Any]) -> MethodSpec:
        heads, layer = int(options["relation_heads"]), options["teacher_layer"]
        if layer is not None and layer != int(layer):
            raise AutoSKDError(f"method 'minilmv2': teacher_layer must be a layer index (got {layer})")
        return dataclasses.replace(spec, losses=(*_relations("task", layer, heads), *_relations("pretrain", layer, heads)))
