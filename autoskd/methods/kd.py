"""Vanilla knowledge distillation (Hinton et al. 2015) on the classifier's logits.

Loss: ``alpha * tau^2 * KL(softmax(z_T/tau) || softmax(z_S/tau)) + (1 - alpha) * CE(z_S, y)``.
The default ``alpha=1`` is pure prediction-layer distillation (no gold labels), as the
teacher -> student distillation step of AutoSKDBERT; ``tau`` defaults to 2.

Deviations: GKD's catalogue has KD as soft CE at tau 10 (no tau^2) plus gold labels. ``kd`` is
kept as AutoSKDBERT's distillation step, the method this project implements: the search, its
baselines and the decoder-LM recipes run ``kd`` and read its ``alpha``/``temperature``, so its
defaults are that step's; ``alpha`` and ``temperature`` set other mixes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import AutoSKDError
from ..engine.methods import METHODS, Method
from ..engine.spec import FeatureLoss, MethodSpec


@METHODS.register("kd")
class KD(Method):
    spec = MethodSpec(
        name="kd",
        description="Hinton KD: KL divergence between teacher and student logits at temperature tau "
                    "(weight alpha), plus (1 - alpha) x cross-entropy on gold labels.",
        losses=(FeatureLoss("logits", "logits", "kl", weight=1.0, temperature=2.0, name="soft"),),
        hard_label_weight=0.0,
        stages=("task",),
        reference="Hinton, Vinyals, Dean 2015, Distilling the Knowledge in a Neural Network",
    )
    #: ``loss``: ``kl`` (Hinton), or a token-level divergence -- ``forward_kl``, ``reverse_kl``,
    #: ``jsd`` (generalised JSD with ``beta``, GKD) or ``tvd`` -- the choices for language models.
    OPTIONS = {"alpha": 1.0, "loss": "kl", "beta": 0.5}
    LOSSES = ("kl", "forward_kl", "reverse_kl", "jsd", "tvd", "uld_hybrid")

    def configure(self, spec: MethodSpec, options: dict[str, Any]) -> MethodSpec:
        alpha = options["alpha"]
        if not 0.0 <= alpha <= 1.0:
            raise AutoSKDError(f"method 'kd': alpha must be in [0, 1] (got {alpha})")
        loss = str(options["loss"])
        if loss not in self.LOSSES:
            raise AutoSKDError(f"method 'kd': loss {loss!r} unknown; choose one of: {', '.join(self.LOSSES)}")
        beta = options["beta"]
        if not 0.0 <= beta <= 1.0:
            raise AutoSKDError(f"method 'kd': beta must be in [0, 1] (got {beta})")
        params = (("beta", beta),) if loss == "jsd" else ()
        losses = tuple(dataclasses.replace(l, weight=alpha, distance=loss, params=params) for l in spec.losses)
        return dataclasses.replace(spec, losses=losses, hard_label_weight=1.0 - alpha)
