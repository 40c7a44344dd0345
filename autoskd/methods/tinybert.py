"""TinyBERT (Jiao et al. 2020): transformer-layer distillation, then prediction-layer.

Task-specific distillation runs two stages, as in the paper (without data augmentation,
as GLMD App. A.1 does):

``intermediate``
    ``embeddings_mse``  MSE(E_S W_e, E_T)
    ``hidden_mse``      MSE(H_S^s W_h, H_T^g(s)) for every student layer s, with the uniform
                        map g(s) = (s+1) * Lt/Ls - 1 (2-layer student / 6-layer teacher:
                        (0, 2), (1, 5))
    ``attention_mse``   MSE(A_S^s, A_T^g(s)) on the attention *scores* (pre-softmax); masked
                        positions (<= -1e2) are set to 0 on both sides, as TinyBERT does
``prediction``
    ``soft_ce``         soft cross-entropy -softmax(z_T/tau) . log softmax(z_S/tau), tau = 1

Each ``W`` is an ``nn.Linear(H_s, H_t)`` in the auxiliary model, one per (teacher, term,
layer pair) -- TinyBERT itself shares a single ``fit_dense``. Head counts must match.

General distillation (on unlabelled text) uses the same intermediate terms; they are also
defined for a ``pretrain`` stage (sharing the projections), which runs when the user asks:
option ``pretrain=true`` (stages pretrain, intermediate, prediction) or ``stages=...``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..engine.methods import METHODS, Method
from ..engine.spec import FeatureLoss, MethodSpec


def _intermediate(stage: str) -> tuple[FeatureLoss, ...]:
    return (
        FeatureLoss("embeddings", "embeddings", "mse", projection="linear", stage=stage, name="embeddings"),
        FeatureLoss("hidden:{s}", "hidden:{t}", "mse", layers="uniform", projection="linear", stage=stage,
                    name="hidden"),
        FeatureLoss("attention_scores:{s}", "attention_scores:{t}", "mse", layers="uniform", stage=stage,
                    name="attention"),
    )


@METHODS.register("tinybert")
class TinyBERT(Method):
    spec = MethodSpec(
        name="tinybert",
        description="TinyBERT: embedding, hidden-state (linear projections) and attention-score MSE over "
                    "uniformly mapped layers, then soft cross-entropy on logits.",
        losses=(*_intermediate("intermediate"),
                FeatureLoss("logits", "logits", "ce", temperature=1.0, stage="prediction", name="soft"),
                *_intermediate("pretrain")),
        hard_label_weight=0.0,
        stages=("intermediate", "prediction"),
        reference="Jiao et al. 2020, TinyBERT: Distilling BERT for Natural Language Understanding (EMNLP)",
        hard_label_stages=("prediction",),
    )
    OPTIONS = {"pretrain": False}

    def configure(self, spec: MethodSpec, options: dict[str, Any]) -> MethodSpec:
        if options["pretrain"]:
            return dataclasses.replace(spec, stages=("pretrain", "intermediate", "prediction"))
        return spec
