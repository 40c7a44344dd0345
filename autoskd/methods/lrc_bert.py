"""LRC-BERT (Fu et al. 2021): contrastive intermediate-layer distillation.

Each uniformly mapped student layer, projected to the teacher's width by a Linear, is pulled
towards its own sample's teacher representation and away from the other samples' in the
batch (COS-NCE on mean-pooled hidden states). Stages: MLM pre-training of the student
(``pretrain``, with ``--pretrain-epochs``), then COS-NCE alone (``intermediate``), then
COS-NCE + KL at tau 1.1 on logits + 3 x hard labels (``prediction``). Batches need >= 2 rows.
Follows GKD's catalogue; as GLMD App. A.1, without the paper's gradient perturbation.
"""

from ..engine.methods import METHODS, Method
from ..engine.spec import FeatureLoss, MethodSpec


def _nce(stage: str) -> FeatureLoss:
    return FeatureLoss("hidden:{s}", "hidden:{t}", "cos_nce", layers="uniform", projection="linear", stage=stage,
                       name="contrastive")


@METHODS.register("lrc_bert")
class LRCBERT(Method):
    spec = MethodSpec(
        name="lrc_bert",
        description="LRC-BERT: COS-NCE contrastive loss on projected, uniformly mapped hidden states; then "
                    "COS-NCE + KL (tau 1.1) + 3 hard labels.",
        losses=(_nce("intermediate"), _nce("prediction"),
                FeatureLoss("logits", "logits", "kl", temperature=1.1, stage="prediction", name="soft")),
        stages=("pretrain", "intermediate", "prediction"), mlm_weight=1.0, mlm_stages=("pretrain",),
        stage_hard_label_weights=(("prediction", 3.0),),
        reference="Fu et al. 2021, LRC-BERT: Latent-representation Contrastive Knowledge Distillation (AAAI)",
    )
