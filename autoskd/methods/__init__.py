"""Built-in distillation methods, and the one place that loads them.

One module per method: a declarative :class:`~autoskd.engine.spec.MethodSpec` plus, only
where behaviour changes over training, a small class. ``autoskd methods`` lists them with
their stages and terms; ``docs/methods.md`` has the table (GKD's Table 1 + GLMD).

The engine defines what a method is (:class:`~autoskd.engine.methods.Method`, the ``METHODS``
registry) and never imports this package. Importing it (or any module in it) registers every
built-in method, the engine's own ``mlm`` included, so the layers above the engine look methods
up by name through it::

    from autoskd.methods import get_method

    method = get_method("kd", alpha=0.5)
"""

from ..engine import mlm as _mlm  # noqa: F401  (registers the engine's own ``mlm`` method)
from ..engine.methods import GENERIC_OPTIONS, METHODS, Method, describe_methods, get_method
from . import (  # noqa: F401  (registration)
    finetune,
    kd,
    pd,
    pkd,
    distilbert,
    theseus,
    tinybert,
    mobilebert,
    sid,
    minilm,
    minilmv2,
    alp_kd,
    lrc_bert,
    annealing_kd,
    ckd,
    universal_kd,
    diito,
    continuation_kd,
    rail_kd,
    mgskd,
    tmkd,
    mt_bert,
    rl_kd,
    uncertainty,
    takd,
    dgkd,
    glmd,
    seqkd,
    on_policy,
)

__all__ = ["METHODS", "GENERIC_OPTIONS", "Method", "get_method", "describe_methods"]
