"""Feature names: what a method may ask a model for.

A method never touches model code; it names the features it needs (``"hidden:3"``,
``"attention_scores:-1"``, ``"logits"``) and the extraction hooks capture exactly those.

On a decoder-only causal LM the same names mean: ``embeddings`` what decoder layer 0 receives,
``hidden:i`` the output of decoder layer i (``hidden:-1`` is before the model's final norm),
``query/key/value/attention_*:i`` the post-RoPE attention of layer i with kv heads repeated to
the query heads and causal + padding masking, and ``lm_logits`` the [B, T, vocab] logits.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import AutoSKDError

#: Feature kinds and whether they are per-layer.
FEATURE_KINDS: dict[str, bool] = {
    "embeddings": False,
    "hidden": True,
    "query": True,
    "key": True,
    "value": True,
    "attention_scores": True,
    "attention_probs": True,
    "logits": False,
    "mlm_logits": False,
    # A causal LM's next-token logits [B, T, vocab] (output.logits); no hook, no layer.
    "lm_logits": False,
}

#: Per-layer kinds that come from the self-attention projections (Q, K, V).
ATTENTION_KINDS = ("query", "key", "value", "attention_scores", "attention_probs")


@dataclass(frozen=True)
class FeatureRef:
    """A parsed feature name: ``kind`` plus a layer index for per-layer kinds."""

    kind: str
    layer: int | None = None

    @property
    def name(self) -> str:
        return self.kind if self.layer is None else f"{self.kind}:{self.layer}"

    def resolve(self, num_layers: int) -> "FeatureRef":
        """Turn a negative layer into its positive index, checking it exists."""
        if self.layer is None:
            return self
        layer = self.layer + num_layers if self.layer < 0 else self.layer
        if not 0 <= layer < num_layers:
            raise AutoSKDError(
                f"feature {self.name!r} asks for layer {self.layer} but the model has "
                f"{num_layers} layers (valid: 0..{num_layers - 1} or -1..-{num_layers})"
            )
        return FeatureRef(self.kind, layer)

    def __str__(self) -> str:
        return self.name


def parse_feature(name: str) -> FeatureRef:
    """Parse ``"kind"`` or ``"kind:layer"`` into a :class:`FeatureRef`."""
    kind, _, layer_text = str(name).partition(":")
    kind = kind.strip()
    if kind not in FEATURE_KINDS:
        raise AutoSKDError(f"unknown feature {name!r}; known kinds: {', '.join(FEATURE_KINDS)}")
    per_layer = FEATURE_KINDS[kind]
    if per_layer and not layer_text:
        raise AutoSKDError(f"feature {name!r} needs a layer index, e.g. '{kind}:0' or '{kind}:-1'")
    if not per_layer and layer_text:
        raise AutoSKDError(f"feature {kind!r} takes no layer index; use {kind!r}")
    if not per_layer:
        return FeatureRef(kind)
    try:
        return FeatureRef(kind, int(layer_text))
    except ValueError:
        raise AutoSKDError(f"feature {name!r}: layer must be an integer") from None
