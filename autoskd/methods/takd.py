"""TAKD (Mirzadeh et al. 2020): distillation through teacher assistants. One hop is
KL at tau 10 + cross-entropy on gold labels (weights 1 and 1); ``autoskd chain`` runs the hops
teacher -> assistant(s) -> student, each hop's student teaching the next hop. Follows GKD's
catalogue ("KL_10 + hard")."""

from ..engine.methods import METHODS, Method
from ..engine.spec import FeatureLoss, MethodSpec


@METHODS.register("takd")
class TAKD(Method):
    spec = MethodSpec(
        name="takd",
        description="Teacher-assistant KD: one hop of KL (tau 10) + hard labels; chain hops with "
                    "`autoskd chain`.",
        losses=(FeatureLoss("logits", "logits", "kl", weight=1.0, temperature=10.0, name="soft"),),
        hard_label_weight=1.0, extra={"chain": "takd"},
        reference="Mirzadeh et al. 2020, Improved Knowledge Distillation via Teacher Assistant (AAAI)",
    )
