"""MGSKD (Liu et al. 2022): multi-granularity structural knowledge distillation.

On uniformly mapped layers, lower student layers (below 3) match token-level and span-level
relations -- pair-wise cosine matrices by MSE and the span triplet angles by smooth L1 --
and higher layers the sample-level angles among the batch's sentences (smooth L1, x4)
(stage ``intermediate``); stage ``prediction`` then learns soft labels (KL, tau 1). Spans
are consecutive 4-token windows (the paper's phrase spans come from a parser; this keeps
the granularity without one).
"""

from ..engine.methods import METHODS, Method
from ..engine.spec import FeatureLoss, MethodSpec

_LOW, _HIGH = "uniform_lower:3", "uniform_upper:3"


@METHODS.register("mgskd")
class MGSKD(Method):
    spec = MethodSpec(
        name="mgskd",
        description="MGSKD: token/span pair relations (MSE) and span angles (smooth L1) in lower layers, "
                    "sample-level angles x4 in higher layers, then soft labels (KL tau 1).",
        losses=(FeatureLoss("hidden:{s}", "hidden:{t}", "mse", layers=_LOW, transform="token_cos",
                            stage="intermediate", name="token_pair"),
                FeatureLoss("hidden:{s}", "hidden:{t}", "mse", layers=_LOW, transform="span_relation:4",
                            stage="intermediate", name="span_pair"),
                FeatureLoss("hidden:{s}", "hidden:{t}", "huber", layers=_LOW, transform="span_angle:4",
                            stage="intermediate", name="span_angle"),
                FeatureLoss("hidden:{s}", "hidden:{t}", "huber", weight=4.0, layers=_HIGH,
                            transform="sample_angle", stage="intermediate", name="sample_angle"),
                FeatureLoss("logits", "logits", "kl", temperature=1.0, stage="prediction", name="soft")),
        stages=("intermediate", "prediction"),
        reference="Liu et al. 2022, Multi-Granularity Structural Knowledge Distillation for Language Model "
                  "Compression (ACL)",
    )
