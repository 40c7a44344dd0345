"""Each method's recipe on a decoder LM, written out, or the reason it has none.

A method's :class:`~autoskd.engine.spec.MethodSpec` is written for an encoder classifier:
sentence logits ``[B, C]``, BERT's MLM head, gold labels. On a causal LM the same ideas read
other features: the next-token distributions ``lm_logits`` ``[B, T, V]`` compared at the
positions that carry a target, and the corpus's own next token in place of a gold label. Each
recipe below restates one method that way (a method as data, TextBrewer-style), so what runs
on a decoder is explicit and tested, never inferred by renaming features. A method without a
recipe is refused before anything loads, in one line that says why.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from ..methods import GENERIC_OPTIONS, Method, get_method  # the built-in methods, registered
from ..engine.spec import FeatureLoss, MethodSpec
from ..errors import AutoSKDError
from . import cross_tokenizer_loss  # noqa: F401  (registers uld_hybrid)

Recipe = Callable[[MethodSpec, dict], MethodSpec]


def _word(distance: str = "forward_kl", weight: float = 1.0, temperature: float = 1.0, stage: str = "task",
          name: str = "soft", params: tuple = ()) -> FeatureLoss:
    """Next-token distillation: the teacher's distribution over the vocabulary at every target."""
    return FeatureLoss("lm_logits", "lm_logits", distance, weight=weight, temperature=temperature, stage=stage,
                       name=name, params=params)


def _finetune(spec: MethodSpec, options: dict) -> MethodSpec:
    return spec  # the hard-label term is the next-token cross-entropy on the corpus


def _kd(spec: MethodSpec, options: dict) -> MethodSpec:
    # "kl" (the classifier default) means forward KL over the vocabulary; temperature 1, as
    # GKD (Agarwal et al. 2024) and MiniLLM use for LMs, unless the user sets one.
    loss = "forward_kl" if options["loss"] == "kl" else options["loss"]
    params = (("beta", options["beta"]),) if loss == "jsd" else ()
    return dataclasses.replace(spec, losses=(_word(loss, options["alpha"], params=params),))


def _glmd(spec: MethodSpec, options: dict) -> MethodSpec:
    # GLMD's two stages of word-prediction distillation, no labels, no intermediate layers: KL at
    # tau 15 over every target token (the paper's pre-training stage), then KL at tau 1 (its
    # task stage; for a language model the word predictions are also the task's soft targets).
    # vocab_alpha < 1: the pipeline compresses the student's vocabulary first (:mod:`.vocab`).
    return dataclasses.replace(spec, losses=(_word("forward_kl", temperature=15.0, stage="pretrain", name="word"),
                                             _word("forward_kl", temperature=1.0, stage="task", name="soft")),
                               stages=("pretrain", "task"), hard_label_weight=0.0)


def _distilbert(spec: MethodSpec, options: dict) -> MethodSpec:
    # DistilBERT's triple loss as DistilGPT2 was trained: 5 KL_2 on the word predictions (every
    # next token: a causal LM has no masked subset), 2 x the LM loss (next-token CE in place of
    # MLM), 1 x cosine on the final hidden states; then plain LM training in the task stage.
    return dataclasses.replace(
        spec, losses=(_word("forward_kl", 5.0, 2.0, stage="pretrain", name="mlm_soft"),
                      FeatureLoss("hidden:-1", "hidden:-1", "cosine", stage="pretrain", name="hidden")),
        mlm_weight=0.0, stage_hard_label_weights=(("pretrain", 2.0), ("task", 1.0)))


def _tinybert(spec: MethodSpec, options: dict) -> MethodSpec:
    # TinyBERT's hidden, embedding and attention terms read the decoder's features unchanged
    # (causal, rotary and grouped-KV attention handled by the extractor); its prediction stage
    # compares word predictions (soft CE at tau 1 = forward KL at tau 1 up to a constant).
    losses = tuple(_word("forward_kl", stage=l.stage, name="soft") if l.student == "logits" else l
                   for l in spec.losses)
    return dataclasses.replace(spec, losses=losses)


def _minilm(spec: MethodSpec, options: dict) -> MethodSpec:
    return spec  # attention KL + value relation on the last layer, plus the LM's next-token loss


def _native(spec: MethodSpec, options: dict) -> MethodSpec:
    return spec  # written for decoders (seqkd, on_policy)


DECODER_RECIPES: dict[str, Recipe] = {
    "finetune": _finetune, "kd": _kd, "glmd": _glmd, "distilbert": _distilbert, "tinybert": _tinybert,
    "minilm": _minilm, "seqkd": _native, "on_policy": _native,
}

_CLS = "distils the [CLS] vector, which a decoder does not have"
_MULTI = "is a multi-teacher method; on LM teams it comes with the LM search issue (use kd per teacher)"
_NOT_YET = "has no decoder recipe yet (not validated on causal LMs)"
REFUSED: dict[str, str] = {
    "pd": "pre-trains the student with BERT's masked-LM objective; use distilbert or kd",
    "pkd": _CLS, "sid": _CLS, "alp_kd": _CLS, "universal_kd": _CLS,
    "rail_kd": "compares mean-pooled sentence vectors of a classifier",
    "lrc_bert": "contrasts sentence vectors of a classifier across the batch",
    "diito": "swaps spans in MLM-masked text; a decoder has no MLM stage",
    "theseus": "replaces teacher blocks by student blocks of an encoder classifier",
    "tmkd": _MULTI, "mt_bert": _MULTI, "rl_kd": _MULTI, "uncertainty": _MULTI,
    "takd": "trains a chain of teacher assistants (run kd link by link)", "dgkd": _MULTI,
    "mobilebert": _NOT_YET, "minilmv2": _NOT_YET, "annealing_kd": _NOT_YET, "ckd": _NOT_YET,
    "continuation_kd": _NOT_YET, "mgskd": _NOT_YET, "mlm": "is BERT's masked-LM objective",
}


def decoder_method(name: str | Method, **options: Any) -> Method:
    """``name`` with ``options``, its spec restated for a causal LM (or one-line refusal)."""
    if isinstance(name, Method):
        method = name
        name = method.spec.name
        if getattr(method, "_decoder", False):
            return method
    else:
        if "+" in str(name) or str(name).endswith((".yaml", ".yml")):
            raise AutoSKDError("method combinations and stage plans are not available for LM teams yet; "
                               "name one method")
        method = get_method(name, **options)
    recipe = DECODER_RECIPES.get(name)
    if recipe is None:
        why = REFUSED.get(name, _NOT_YET)
        raise AutoSKDError(f"method {name!r} cannot distil a decoder LM: it {why}; methods for LMs: "
                           f"{', '.join(sorted(DECODER_RECIPES))}")
    spec = recipe(method.spec, method.options)  # generic options are applied again below: idempotent
    generic = {k: v for k, v in options.items() if k in GENERIC_OPTIONS
               or (k.endswith("_weight") and k not in method.OPTIONS)}
    method.spec = method._apply_generic(spec, generic)
    method._decoder = True
    return method


def cross_tokenizer_method(method: Method, teacher: str) -> Method:
    """The method for a teacher with its own tokenizer: every next-token term becomes
    ``uld_hybrid`` (KL on the tokens both vocabularies share, ULD on the rest; see
    :mod:`.cross_tokenizer_loss`), at aligned positions only. Terms on hidden states or attention
    and text the teacher writes cannot cross tokenizers: refused in one line."""
    name = method.spec.name
    if any(l.teacher != "lm_logits" for l in method.spec.losses) or name == "seqkd" \
            or float(method.options.get("vocab_alpha", 1.0)) < 1.0:
        raise AutoSKDError(f"teacher {teacher!r} has its own tokenizer, so only next-token methods can use it "
                           f"(kd, glmd without vocab_alpha, on_policy, finetune); {name!r} reads more")
    losses = tuple(dataclasses.replace(l, distance="uld_hybrid", params=()) for l in method.spec.losses)
    method.spec = dataclasses.replace(method.spec, losses=losses)
    return method


def lm_temperatures(method: Method) -> list[float]:
    """Temperatures at which the teacher's next-token distribution is read (one cache each)."""
    return sorted({float(l.temperature) for l in method.spec.losses if l.teacher == "lm_logits"})


def is_decoder_only(method: Method) -> bool:
    return bool(method.spec.extra.get("decoder_only"))
