"""Llama-family decoder shapes for the planner: named published configs, explicit specs and
the decoder details of a Hugging Face config.

What a decoder changes for memory, compared with GLM/BERT: grouped key/value heads (Llama-3
70B reads 8 KV heads for 64 query heads, so K and V are 1/8 of Q), a gated MLP of three
hidden x ffn matrices (gate, up, down), RMSNorm (a weight, no bias), rotary positions (no
position table) and an output layer that is tied to the word embeddings (Llama-3.2 1B/3B) or
not (Llama-3 8B/70B, Llama-2: V x h more parameters). Parameter counts come from
``LlamaForCausalLM`` built on the ``meta`` device from the published numbers, so they equal
the model cards' exact counts (checked in tests/test_lm_planner.py).
"""

from __future__ import annotations

import functools

from ..errors import AutoSKDError

#: name -> (layers, hidden, heads, kv_heads, intermediate, vocab, max positions, tied, head_dim)
#: from each model's published config.json (meta-llama/...).
LLAMA: dict[str, tuple[int, int, int, int, int, int, int, bool, int]] = {
    "llama3-70b": (80, 8192, 64, 8, 28672, 128256, 8192, False, 128),      # Meta-Llama-3-70B
    "llama3-8b": (32, 4096, 32, 8, 14336, 128256, 8192, False, 128),        # Meta-Llama-3-8B
    "llama3.2-3b": (28, 3072, 24, 8, 8192, 128256, 131072, True, 128),      # Llama-3.2-3B
    "llama3.2-1b": (16, 2048, 32, 8, 8192, 128256, 131072, True, 64),       # Llama-3.2-1B
    "llama2-70b": (80, 8192, 64, 8, 28672, 32000, 4096, False, 128),        # Llama-2-70b-hf
    "llama2-13b": (40, 5120, 40, 40, 13824, 32000, 4096, False, 128),       # Llama-2-13b-hf
    "llama2-7b": (32, 4096, 32, 32, 11008, 32000, 4096, False, 128),        # Llama-2-7b-hf
}
#: Other spellings of the same models (Llama 3.1 has Llama 3's shapes with longer context).
ALIASES = {"llama3.1-70b": "llama3-70b", "llama3.1-8b": "llama3-8b", "llama-3-70b": "llama3-70b",
           "llama-3-8b": "llama3-8b", "llama-3.2-1b": "llama3.2-1b", "llama-3.2-3b": "llama3.2-3b",
           "llama-2-7b": "llama2-7b", "llama-2-13b": "llama2-13b", "llama-2-70b": "llama2-70b"}


def _canonical(text: str) -> str | None:
    key = text.strip().lower().removeprefix("meta-llama/").removeprefix("meta-").removesuffix("-hf")
    return key if key in LLAMA else ALIASES.get(key)


@functools.lru_cache(maxsize=64)
def llama_shape(name: str, *, layers: int, hidden: int, heads: int, kv_heads: int, ffn: int, vocab: int,
                positions: int = 4096, tied: bool = False, gated: bool = True, head_dim: int = 0):
    """A Llama-shaped decoder (``LlamaForCausalLM``: RMSNorm, rotary, SwiGLU when ``gated``),
    its parameters counted on the meta device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from .shapes import ModelShape, meta_module

    if heads % kv_heads:
        raise AutoSKDError(f"model '{name}': {heads} query heads cannot share {kv_heads} key/value heads; "
                           "kv_heads must divide heads")
    head_dim = head_dim or hidden // heads
    config = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, intermediate_size=ffn, vocab_size=vocab,
                         max_position_embeddings=positions, tie_word_embeddings=tied, head_dim=head_dim)
    module = meta_module(lambda: LlamaForCausalLM(config))
    params = sum(p.numel() for p in module.parameters())
    if not gated:  # a plain 2-matrix MLP: one hidden x ffn matrix per layer fewer
        params -= layers * hidden * ffn
    return ModelShape(name, layers, hidden, heads, ffn, vocab, positions, params, kv_heads=kv_heads,
                      head_dim=head_dim, gated=gated, tied=tied, norm="rmsnorm", family="decoder")


def named_decoder(text: str, layers: int | None = None):
    """The shape of a named Llama model (``"llama3-70b"``; ``layers`` keeps the first k), or
    ``None`` when ``text`` names none."""
    key = _canonical(text)
    if key is None:
        return None
    n, hidden, heads, kv, ffn, vocab, positions, tied, head_dim = LLAMA[key]
    if layers is not None and not 1 <= layers <= n:
        raise AutoSKDError(f"cannot keep {layers} layers of '{key}' (it has {n}); pick 1..{n}")
    label = key if layers is None else f"{key}[:{layers} layers]"
    return llama_shape(label, layers=layers or n, hidden=hidden, heads=heads, kv_heads=kv, ffn=ffn, vocab=vocab,
                       positions=positions, tied=tied, head_dim=head_dim)


def is_causal_lm(config) -> bool:
    """Whether a HF config describes a decoder-only causal LM (Llama, Qwen, Gemma, GPT-2, ...).
    BERT-like encoders also have a causal-LM class in transformers, so a model type with a
    masked-LM head counts as an encoder."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    model_type = getattr(config, "model_type", None)
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def decoder_details(config, module) -> dict:
    """The :class:`~autoskd.planner.shapes.ModelShape` decoder fields of a meta-built causal LM."""
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 1
    kv = getattr(config, "num_key_value_heads", None) or heads
    names = {n.rsplit(".", 1)[-1] for n, _ in module.named_modules()}
    out = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    inp = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    tied = out is not None and inp is not None and out.weight is inp.weight
    rms = any("rmsnorm" in type(m).__name__.lower() for m in module.modules())
    head_dim = getattr(config, "head_dim", None)
    return {"kv_heads": int(kv), "head_dim": int(head_dim) if isinstance(head_dim, int) else 0,
            "gated": bool(names & {"gate_proj", "gate_up_proj", "w1"}), "tied": bool(tied),
            "norm": "rmsnorm" if rms else "layernorm", "family": "decoder"}
