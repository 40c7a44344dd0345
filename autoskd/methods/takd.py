"""TAKD (Mirzadeh et al. 2020): distillation through teacher assistants. One hop is
0.5 x KL at tau 10 + 0.5 x cross-entropy on gold labels; ``autoskd chain`` runs the hops
teacher -> assistant(s) -> student, each hop's student teaching the next hop."""

from ..engine.methods import METHODS, Method
from ..engine.spec import FeatureLoss, MethodSpec


@METHODS.register("takd")
class TAKD(Method):
    spec = MethodSpec(
        name="takd",
        description="Teacher-assistant KD: one hop of 0.5 KL (tau 10) + 0.5 hard labels; chain hops with "
                    "`autoskd chain`.",
        losses=(FeatureLoss("logits", "logits", "kl", weight=0.5, temperature=10.0, name="soft"),),
        hard_label_weight=0.5, extra={"chain": "takd"},
        reference="Mirzadeh et al. 2020, Improved Knowledge Distillation via Teacher Assistant (AAAI)",
    )
