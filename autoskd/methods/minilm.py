"""MiniLM (Wang et al. 2020): deep self-attention distillation of the last layer.

Two KL terms on the last encoder layer of each model (GKD's catalogue: last <-> last):

* ``attention_kl``: KL(A_T || A_S) between the self-attention distributions
  (``attention_probs:-1``), per head and query row, averaged over heads and real rows;
* ``value_relation_kl``: KL(VR_T || VR_S) with ``VR = softmax(V V^T / sqrt(d))`` computed
  from ``value:-1`` by the ``pairwise_sdp`` transform (padded keys masked).

Both are T x T per head, so the hidden widths may differ but the head counts must match
(the auxiliary model says so clearly otherwise). Follows GKD's catalogue (pt -> ft): the terms
run in the ``pretrain`` stage, on unlabelled text with ``--pretrain-epochs``.

Deviations: the task stage keeps the two terms beside cross-entropy on the gold labels
(GKD's ft is hard labels alone), so that the method distils without a pre-training budget
(the pipeline pre-trains only when asked, and on the task's own texts). ``hard_label_weight=0``
gives pure MiniLM distillation; option ``stage=NAME`` makes the terms one stage of that name
(e.g. a stage plan's ``pretrain`` entry).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..engine.methods import METHODS, Method
from ..engine.spec import FeatureLoss, MethodSpec


def _terms(stage: str) -> tuple[FeatureLoss, ...]:
    return (FeatureLoss("attention_probs:-1", "attention_probs:-1", "kl", stage=stage, name="attention"),
            FeatureLoss("value:-1", "value:-1", "kl", transform="pairwise_sdp", stage=stage, name="value_relation"))


@METHODS.register("minilm")
class MiniLM(Method):
    spec = MethodSpec(
        name="minilm",
        description="MiniLM: last-layer self-attention distribution KL + value-relation KL "
                    "(equal head counts), with cross-entropy on gold labels.",
        losses=(*_terms("task"), *_terms("pretrain")),
        hard_label_weight=1.0,
        stages=("task",),
        reference="Wang et al. 2020, MiniLM: Deep Self-Attention Distillation for Task-Agnostic "
                  "Compression of Pre-Trained Transformers (NeurIPS)",
    )
    OPTIONS = {"stage": "task"}

    def configure(self, spec: MethodSpec, options: dict[str, Any]) -> MethodSpec:
        stage = str(options["stage"]).strip() or "task"
        if stage == "task":
            return spec
        return dataclasses.replace(spec, losses=_terms(stage), stages=(stage,))
