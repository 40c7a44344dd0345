"""MiniLM (Wang et al. 2020): deep self-attention distillation of the last layer.

Two KL terms on the last encoder layer of each model:

* ``attention_kl``: KL(A_T || A_S) between the self-attention distributions
  (``attention_probs:-1``), per head and query row, averaged over heads and real rows;
* ``value_relation_kl``: KL(VR_T || VR_S) with ``VR = softmax(V V^T / sqrt(d))`` computed
  from ``value:-1`` by the ``pairwise_sdp`` transform (padded keys masked).

Both are T x T per head, so the hidden widths may differ but the head counts must match
(the auxiliary model says so clearly otherwise). The paper distils in pre-training; GLMD
(App. A.1, Table 6) then fine-tunes on hard labels. Here the terms are usable in any stage:
by default they run in the ``task`` stage together with cross-entropy on the gold labels
(``hard_label_weight=1``); option ``stage=pretrain`` moves them to a pre-training stage on
unlabelled text (no labels there, so no cross-entropy), and ``hard_label_weight=0`` gives
pure MiniLM distillation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..engine.methods import METHODS, Method
from ..engine.spec import FeatureLoss, MethodSpec


@METHODS.register("minilm")
class MiniLM(Method):
    spec = MethodSpec(
        name="minilm",
        description="MiniLM: last-layer self-attention distribution KL + value-relation KL "
                    "(equal head counts), with cross-entropy on gold labels.",
        losses=(
            FeatureLoss("attention_probs:-1", "attention_probs:-1", "kl", name="attention"),
            FeatureLoss("value:-1", "value:-1", "kl", transform="pairwise_sdp", name="value_relation"),
        ),
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
        losses = tuple(dataclasses.replace(l, stage=stage) for l in spec.losses)
        return dataclasses.replace(spec, losses=losses, stages=(stage,))
