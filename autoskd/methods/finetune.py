"""Fine-tuning: cross-entropy on the gold labels, no teacher.

The engine has one training loop; teachers are fine-tuned by running it with this method.
Not a distillation method, so not in GKD's catalogue.
"""

from __future__ import annotations

from ..engine.methods import METHODS, Method
from ..engine.spec import MethodSpec


@METHODS.register("finetune")
class Finetune(Method):
    spec = MethodSpec(
        name="finetune",
        description="Fine-tuning on the gold labels only (no teacher); used to fine-tune teachers.",
        losses=(),
        hard_label_weight=1.0,
        stages=("task",),
        needs_teacher=False,
        reference="Devlin et al. 2019, BERT (fine-tuning)",
    )
