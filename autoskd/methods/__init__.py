"""Built-in distillation methods; importing this package registers them in ``METHODS``.

One module per method: a declarative :class:`~autoskd.engine.spec.MethodSpec` plus, only
where behaviour changes over training, a small class. ``autoskd methods`` lists them with
their stages and terms; the README's Methods section has the table (GKD's Table 1 + GLMD).
"""

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

__all__ = ["finetune", "kd", "pd", "pkd", "distilbert", "theseus", "tinybert", "mobilebert", "sid", "minilm", "minilmv2", "alp_kd", "lrc_bert", "annealing_kd", "ckd", "universal_kd", "diito", "continuation_kd", "rail_kd", "mgskd", "tmkd", "mt_bert", "rl_kd", "uncertainty", "takd", "dgkd", "glmd", "seqkd", "on_policy"]
