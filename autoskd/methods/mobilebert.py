"""MobileBERT (Sun et al. 2020): progressive knowledge transfer in pre-training.

Terms: per-layer attention KL and 0.5 x hidden-state MSE (embeddings H_0 and every layer,
one-to-one when depths are equal, else the uniform map). The pre-training stage is cut into
L + 1 phases: phase 0 trains the embeddings, phase k the layers up to k, with the terms of
layers before k down-weighted x0.1 (the paper freezes them). The task stage fine-tunes on
gold labels. Follows GKD's catalogue.

Deviations: MobileBERT's inverted-bottleneck architecture is not reproduced (GKD pre-trained one
for a week): any student with the teacher's head count works, widths bridged by linear
projections.
"""

from ..engine.methods import METHODS
from ..engine.spec import FeatureLoss, MethodSpec
from ._progressive import Progressive


@METHODS.register("mobilebert")
class MobileBERT(Progressive):
    spec = MethodSpec(
        name="mobilebert",
        description="MobileBERT progressive transfer: attention KL + 0.5 hidden MSE layer by layer over L+1 "
                    "pre-training phases (earlier layers x0.1), then fine-tuning.",
        losses=(FeatureLoss("embeddings", "embeddings", "mse", weight=0.5, projection="linear", stage="pretrain",
                            name="embeddings"),
                FeatureLoss("hidden:{s}", "hidden:{t}", "mse", weight=0.5, layers="one_to_one", projection="linear",
                            stage="pretrain", name="hidden"),
                FeatureLoss("attention_probs:{s}", "attention_probs:{t}", "kl", layers="one_to_one",
                            stage="pretrain", name="attention")),
        stages=("pretrain", "task"), hard_label_weight=1.0, hard_label_stages=("task",),
        reference="Sun et al. 2020, MobileBERT: a Compact Task-Agnostic BERT for Resource-Limited Devices (ACL)",
    )

    def layer_factor(self, phase: int, layer: int) -> float:
        if layer + 1 > phase:
            return 0.0  # not reached yet
        return 1.0 if layer + 1 == phase else 0.1

    def other_factor(self, phase: int, key: str) -> float:
        return 1.0 if phase == 0 else 0.1  # the embeddings: trained in phase 0, kept x0.1 later
