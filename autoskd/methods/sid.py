"""SID (Aguilar et al. 2020, knowledge distillation from internal representations): the
task stage runs in L + 1 phases; phase k (0-based, k < L) matches student layers 0..k to
their uniformly mapped teacher layers by attention KL and [CLS] cosine distance (one more
layer per phase), and the last phase learns the teacher's soft labels (soft CE, tau 1)."""

from ..engine.methods import METHODS
from ..engine.spec import FeatureLoss, MethodSpec
from ._progressive import Progressive


@METHODS.register("sid")
class SID(Progressive):
    spec = MethodSpec(
        name="sid",
        description="SID: layers added one per phase (attention KL + [CLS] cosine on uniformly mapped layers), "
                    "soft cross-entropy in the last phase.",
        losses=(FeatureLoss("attention_probs:{s}", "attention_probs:{t}", "kl", layers="uniform", name="attention"),
                FeatureLoss("hidden:{s}", "hidden:{t}", "cosine", layers="uniform", transform="cls",
                            projection="linear", name="cls"),
                FeatureLoss("logits", "logits", "soft_ce", temperature=1.0, name="soft")),
        reference="Aguilar et al. 2020, Knowledge Distillation from Internal Representations (AAAI)",
    )
    progressive_stages = ("task",)

    def layer_factor(self, phase: int, layer: int) -> float:
        return 1.0 if layer <= phase < self.num_layers else 0.0

    def other_factor(self, phase: int, key: str) -> float:
        return 1.0 if phase >= self.num_layers else 0.0
