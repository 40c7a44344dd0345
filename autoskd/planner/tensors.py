"""The parameter tensors of a model shape, by size: what ZeRO-3 keeps whole and what it gathers.

ZeRO-3 partitions every parameter over the data-parallel ranks except the small ones: a
tensor of at most ``stage3_param_persistence_threshold`` elements (1e5 by default, and in the
configs the planner writes) stays whole on every rank, because gathering it would cost more
than it saves. On a decoder that is every norm weight and, at small widths, the grouped K/V
projections; so the planner needs the tensor sizes, not only the parameter count. It also
needs the largest tensor: ZeRO-3 gathers one module at a time, and a decoder's largest module
is the vocabulary matrix (the embedding or an untied output layer), not a transformer layer.
"""

from __future__ import annotations

from .shapes import ModelShape

#: DeepSpeed's default ``stage3_param_persistence_threshold`` (elements).
PERSISTENCE_THRESHOLD = 100_000


def _layer_sizes(shape: ModelShape) -> list[int]:
    """One transformer layer's parameter tensors."""
    h, f = shape.hidden, shape.ffn
    if shape.decoder:
        layer = [h * shape.q_dim, h * shape.kv_dim, h * shape.kv_dim, shape.q_dim * h, h * f, f * h]
        layer += [h * f] if shape.gated else []
        return layer + ([h, h] if shape.norm == "rmsnorm" else [h, h, h, h])
    # GLM-shaped (GKD table 8): fused QKV, biases, LayerNorms
    return [3 * h * h, 3 * h, h * h, h, h, h, f * h, f, h * f, h, h, h]


def _outer_sizes(shape: ModelShape) -> list[int]:
    """The tensors outside the layers: embeddings, output layer, final norms."""
    h, v = shape.hidden, shape.vocab
    if shape.decoder:
        sizes = [v * h] + ([] if shape.tied else [v * h])
        if shape.norm == "rmsnorm":
            return sizes + [h]
        return sizes + [h, h, shape.max_positions * h]  # GPT-2-style: LayerNorm, learned positions
    return [v * h, shape.max_positions * h, shape.max_positions * h, h, h, h, h]  # GLM: 2-D positions


def tensor_sizes(shape: ModelShape) -> list[int]:
    """Element counts of every parameter tensor of ``shape`` (a tied matrix counted once)."""
    return _layer_sizes(shape) * shape.layers + _outer_sizes(shape)


def persistent_params(shape: ModelShape, threshold: int = PERSISTENCE_THRESHOLD) -> int:
    """Parameters ZeRO-3 keeps whole on every rank (tensors of at most ``threshold`` elements)."""
    return sum(n for n in tensor_sizes(shape) if n <= threshold)


def largest_tensor(shape: ModelShape) -> int:
    """Elements of the largest parameter tensor (the vocabulary matrix of an LM)."""
    return max(tensor_sizes(shape))


def layer_params(shape: ModelShape) -> int:
    """Parameters of one transformer layer."""
    return sum(_layer_sizes(shape))
