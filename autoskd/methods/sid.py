"""SID (Aguilar et al. 2020, knowledge distillation from internal representations; GLMD uses
its Exp3.4 strategy): progressive internal distillation in L + 1 phases (L = student layers).
Phase k < L matches student layers 0..k to their uniformly mapped teacher layers by attention
KL and [CLS] cosine distance (one more layer per phase, stage ``intermediate``, cut into L
phases); the last phase learns the teacher's soft labels (soft CE, tau 1) and is its own stage,
``prediction``.

Deviations: the last phase is a stage of its own (GKD's catalogue: "adds one layer per phase
over L+1 phases; last CE_1"), because it is the only phase that trains the classifier. As one
stage cut into L + 1 phases, the classifier trained in the last 1/(L+1) of the budget only, and
the best dev epoch restored at the end could come from a phase in which the classifier had
never trained (the methods table's SID ended below chance, dev 0.409, every row the minority
class). As two stages, the prediction phase gets the run's epochs like ``kd`` and
``restore_best`` restores that stage's best epoch only. The intermediate stage runs the run's
epochs too, split evenly over its L phases.
"""

from ..engine.methods import METHODS
from ..engine.spec import FeatureLoss, MethodSpec
from ._progressive import Progressive


@METHODS.register("sid")
class SID(Progressive):
    spec = MethodSpec(
        name="sid",
        description="SID: layers added one per phase (attention KL + [CLS] cosine on uniformly mapped layers), "
                    "then soft cross-entropy (tau 1) in the last phase, a stage of its own.",
        losses=(FeatureLoss("attention_probs:{s}", "attention_probs:{t}", "kl", layers="uniform",
                            stage="intermediate", name="attention"),
                FeatureLoss("hidden:{s}", "hidden:{t}", "cosine", layers="uniform", transform="cls",
                            projection="linear", stage="intermediate", name="cls"),
                FeatureLoss("logits", "logits", "soft_ce", temperature=1.0, stage="prediction", name="soft")),
        stages=("intermediate", "prediction"),
        reference="Aguilar et al. 2020, Knowledge Distillation from Internal Representations (AAAI)",
    )
    progressive_stages = ("intermediate",)

    def num_phases(self) -> int:
        return max(1, int(self.num_layers))  # the (L+1)-th phase is the prediction stage

    def layer_factor(self, phase: int, layer: int) -> float:
        return 1.0 if layer <= phase else 0.0

    def other_factor(self, phase: int, key: str) -> float:
        return 1.0
