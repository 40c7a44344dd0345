"""TinyBERT (Jiao et al. 2020): transformer-layer distillation, then prediction-layer.

Follows GKD's catalogue (pt -> ft1 same terms -> ft2 CE_1), without data augmentation as GLMD
App. A.1:

``pretrain`` / ``intermediate``
    ``embeddings_mse``  MSE(E_S W, E_T)
    ``hidden_mse``      MSE(H_S^s W, H_T^g(s)) for every student layer s, with the uniform
                        map g(s) = (s+1) * Lt/Ls - 1 (2-layer student / 6-layer teacher:
                        (0, 2), (1, 5)); the last pair is the final hidden state
    ``attention_mse``   MSE(A_S^s, A_T^g(s)) on the attention *scores* (pre-softmax); masked
                        positions (<= -1e2) are set to 0 on both sides, as TinyBERT does
``prediction``
    ``soft_ce``         soft cross-entropy -softmax(z_T/tau) . log softmax(z_S/tau), tau = 1

``W`` is TinyBERT's single ``fit_dense``: one ``nn.Linear(H_s, H_t)`` per teacher in the
auxiliary model, shared by the embeddings, every layer and both stages. Head counts must match.

Deviations: the general-distillation stage (``pretrain``) is not in the default stage list: the
pipeline runs it for any method when ``--pretrain-epochs`` is given (on the task's own texts,
not a general corpus), and listing it would make stage plans, the LM pipeline and the methods
table pre-train TinyBERT on those texts by default. Option ``pretrain=true`` lists it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..engine.methods import METHODS, Method
from ..engine.spec import FeatureLoss, MethodSpec


def _intermediate(stage: str) -> tuple[FeatureLoss, ...]:
    return (
        FeatureLoss("embeddings", "embeddings", "mse", projection="fit_dense", stage=stage, name="embeddings"),
        FeatureLoss("hidden:{s}", "hidden:{t}", "mse", layers="uniform", projection="fit_dense", stage=stage,
                    name="hidden"),
        FeatureLoss("attention_scores:{s}", "attention_scores:{t}", "mse", layers="uniform", stage=stage,
                    name="attention"),
    )


@METHODS.register("tinybert")
class TinyBERT(Method):
    spec = MethodSpec(
        name="tinybert",
        description="TinyBERT: embedding, hidden-state (one shared fit_dense projection) and attention-score "
                    "MSE over uniformly mapped layers, then soft cross-entropy on logits.",
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
