"""DistilBERT (Sanh et al. 2019): pre-training distillation on unlabelled text with
5 x KL at tau 2 on the masked tokens' word-prediction logits, 2 x the student's own MLM
loss and 1 x (1 - cos) between the final hidden states; then fine-tuning on gold labels.
Needs MLM heads (the teacher's is adapted first) and equal hidden widths. Follows GKD's
catalogue."""

from ..engine.methods import METHODS, Method
from ..engine.spec import FeatureLoss, MethodSpec


@METHODS.register("distilbert")
class DistilBERT(Method):
    spec = MethodSpec(
        name="distilbert",
        description="DistilBERT: 5 KL (tau 2) on masked-token MLM logits + 2 MLM + 1 cosine on final hidden "
                    "states in pre-training, then fine-tuning.",
        losses=(FeatureLoss("mlm_logits", "mlm_logits", "kl", weight=5.0, temperature=2.0, stage="pretrain",
                            tokens="masked", name="mlm_soft"),
                FeatureLoss("hidden:-1", "hidden:-1", "cosine", weight=1.0, stage="pretrain", name="hidden")),
        stages=("pretrain", "task"), mlm_weight=2.0, mlm_stages=("pretrain",),
        hard_label_weight=1.0, hard_label_stages=("task",),
        reference="Sanh et al. 2019, DistilBERT, a distilled version of BERT",
    )
