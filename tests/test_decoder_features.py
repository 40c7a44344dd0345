"""Decoder-only causal LMs: detection and every feature checked against the model's own eager
outputs, on tiny seeded random models (Llama with GQA, Mistral, Qwen2, Qwen3, Gemma, Gemma2,
Gemma3 text, GPT-2) and a batch with a left-padded and a right-padded row."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from autoskd.engine.hooks import FeatureExtractor
from autoskd.errors import AutoSKDError
from autoskd.models.adapters import ArchitectureAdapter, module_at

VOCAB, T, ATOL = 128, 10, 1e-5
# Larger than the default 0.02 so attention is peaked and a wrong scale or mask shows.
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
              num_attention_heads=4, max_position_embeddings=64, initializer_range=0.3)

# family -> (config class, model class, config kwargs, expected (kv_heads, head_dim), prefix)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=2), (2, 8), "model"),
    "mistral": (MistralConfig, MistralForCausalLM, dict(num_key_value_heads=2, sliding_window=4), (2, 8), "model"),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(num_key_value_heads=2), (2, 8), "model"),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(num_key_value_heads=2, head_dim=16), (2, 16), "model"),
    "gemma": (GemmaConfig, GemmaForCausalLM, dict(num_key_value_heads=1, head_dim=16), (1, 16), "model"),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM,
               dict(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
                    attn_logit_softcapping=2.0, final_logit_softcapping=None), (2, 16), "model"),
    "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM,
                    dict(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
                         layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
                    (2, 16), "model"),
    "gpt2": (GPT2Config, GPT2LMHeadModel, dict(n_embd=32, n_layer=3, n_head=4, n_positions=64, n_inner=64,
                                               bos_token_id=1, eos_token_id=2), (4, 8), "transformer"),
}
_MODELS: dict[tuple[str, str], nn.Module] = {}


def tiny(family: str, attn: str = "eager") -> nn.Module:
    """A seeded tiny causal LM; the sdpa twin gets the eager model's weights."""
    if (family, attn) not in _MODELS:
        config_cls, model_cls, extra, _, _ = FAMILIES[family]
        kwargs = dict(extra) if family == "gpt2" else {**COMMON, **extra}
        if family == "gpt2":
            kwargs.update(vocab_size=VOCAB, initializer_range=0.3)
        torch.manual_seed(0)
        model = model_cls(config_cls(**kwargs, attn_implementation=attn)).eval()
        if attn != "eager":
            model.load_state_dict(tiny(family).state_dict())
        _MODELS[family, attn] = model
    return _MODELS[family, attn]


def make_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, T), generator=g)
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    mask[2, 6:] = 0  # right padding
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "labels": ids.clone(), "idx": torch.arange(3)}


def reference(model: nn.Module, batch: dict) -> object:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     output_hidden_states=True, output_attentions=True)


def interface_state() -> dict:
    return dict(ALL_ATTENTION_FUNCTIONS._local_mapping)


@pytest.mark.parametrize("family", FAMILIES)
def test_detects_decoder_geometry(family):
    model = tiny(family)
    adapter = ArchitectureAdapter.for_model(model)
    kv_heads, head_dim = FAMILIES[family][3]
    prefix = FAMILIES[family][4]
    g = adapter.geometry
    assert adapter.causal and adapter.family == model.config.model_type
    assert (g.num_layers, g.hidden_size, g.num_heads, g.vocab_size) == (3, 32, 4, VOCAB)
    assert (g.num_kv_heads, g.head_dim, g.head_size, g.num_labels) == (kv_heads, head_dim, head_dim, None)
    assert adapter.input_keys == ("input_ids", "attention_mask")
    layer = "h.{i}" if family == "gpt2" else "layers.{i}"
    assert adapter.layer == f"{prefix}.{layer}"
    assert adapter.word_embeddings == f"{prefix}.{'wte' if family == 'gpt2' else 'embed_tokens'}"
    assert isinstance(adapter.module(model, "attention", 2), nn.Module)
    assert isinstance(module_at(model, adapter.final_norm), nn.Module)


@pytest.mark.parametrize("family", FAMILIES)
def test_features_match_eager_outputs(family):
    model, batch = tiny(family), make_batch()
    ref = reference(model, batch)
    names = ["embeddings", "hidden:0", "hidden:1", "hidden:-1", "lm_logits",
             *[f"attention_probs:{i}" for i in range(3)], "value:-1", "attention_scores:1"]
    with torch.no_grad():
        out = FeatureExtractor(model, names)(batch)
    torch.testing.assert_close(out["embeddings"], ref.hidden_states[0], atol=ATOL, rtol=0)
    for i in range(2):
        torch.testing.assert_close(out[f"hidden:{i}"], ref.hidden_states[i + 1], atol=ATOL, rtol=0)
    # hidden:-1 is the last layer's output before the final norm; transformers' last entry is after it.
    norm = module_at(model, ArchitectureAdapter.for_model(model).final_norm)
    torch.testing.assert_close(norm(out["hidden:-1"]), ref.hidden_states[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(out["lm_logits"], ref.logits, atol=0, rtol=0)
    assert out["lm_logits"].shape == (3, T, VOCAB)
    for i in range(3):
        probs = out[f"attention_probs:{i}"]
        assert probs.shape == (3, 4, T, T)
        torch.testing.assert_close(probs, ref.attentions[i], atol=ATOL, rtol=0)
    scores = out["attention_scores:1"]
    assert (scores[2, :, :, 6:] == torch.finfo(scores.dtype).min).all()  # right padding
    later = torch.ones(T, T, dtype=torch.bool).triu(1)
    assert (scores[0][:, later] == torch.finfo(scores.dtype).min).all()  # causal


@pytest.mark.parametrize("family", ["llama", "gemma", "gpt2"])
def test_value_and_probs_rebuild_the_attention_output(family):
    """probs @ value (kv heads repeated) is what the output projection receives."""
    model, batch = tiny(family), make_batch()
    proj = module_at(model, "transformer.h.1.attn.c_proj" if family == "gpt2" else "model.layers.1.self_attn.o_proj")
    seen = {}
    handle = proj.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    try:
        with torch.no_grad():
            out = FeatureExtractor(model, ["attention_probs:1", "value:1", "query:1", "key:1"])(batch)
    finally:
        handle.remove()
    assert out["value:1"].shape == out["key:1"].shape == out["query:1"].shape == (3, 4, T, FAMILIES[family][3][1])
    rebuilt = torch.matmul(out["attention_probs:1"], out["value:1"]).transpose(1, 2).reshape(3, T, -1)
    torch.testing.assert_close(rebuilt, seen["x"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["gemma3_text", "mistral", "gemma2"])
def test_sliding_window_masks_far_keys(family):
    model, batch = tiny(family), make_batch()
    with torch.no_grad():
        probs = FeatureExtractor(model, ["attention_probs:0"])(batch)["attention_probs:0"]
    window = model.config.sliding_window
    far = torch.ones(T, T, dtype=torch.bool).tril(-window)  # kv <= q - window
    assert (probs[0][:, far] == 0).all() and (probs[0][:, ~far].tril() > 0).any()


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "gpt2"])
def test_sdpa_model_gives_the_eager_features(family):
    """Same probs everywhere. Per-token features (key, hidden) are compared at real tokens only:
    a left-pad query sees no key, and sdpa and eager give such rows different outputs, which
    reach later layers' pad positions (the loss code masks pad tokens)."""
    batch = make_batch()
    names = ["attention_probs:0", "attention_probs:-1", "key:-1", "hidden:1"]
    with torch.no_grad():
        eager = FeatureExtractor(tiny(family), names)(batch)
        sdpa = FeatureExtractor(tiny(family, "sdpa"), names)(batch)
    real = batch["attention_mask"].bool()
    for name in names[:2]:
        torch.testing.assert_close(sdpa[name], eager[name], atol=ATOL, rtol=0)
    torch.testing.assert_close(sdpa["key:-1"].transpose(1, 2)[real], eager["key:-1"].transpose(1, 2)[real],
                               atol=ATOL, rtol=1e-5)  # sdpa sums in another order
    torch.testing.assert_close(sdpa["hidden:1"][real], eager["hidden:1"][real], atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("family,attn", [("llama", "eager"), ("llama", "sdpa"), ("gemma2", "eager"),
                                         ("gemma", "sdpa"), ("gpt2", "eager"), ("gpt2", "sdpa")])
def test_extraction_leaves_logits_and_interface_unchanged(family, attn):
    model, batch = tiny(family, attn), make_batch()
    before = interface_state()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        plain = model(**inputs).logits
        fx = FeatureExtractor(model, ["attention_probs:0", "attention_scores:-1", "query:1", "hidden:1"])
        out = fx(batch)
    assert torch.equal(out["logits"], plain)
    assert interface_state() == before  # the capture wrapper is gone after the call
    fx.remove()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, plain)


def test_only_needed_modules_are_hooked():
    model = tiny("llama")

    def added_hooks() -> set[str]:  # transformers' own output-capturing hooks are not ours
        return {name for name, m in model.named_modules() if len(m._forward_hooks) > base.get(name, 0)}

    base = {name: len(m._forward_hooks) for name, m in model.named_modules()}
    fx = FeatureExtractor(model, ["attention_probs:-1", "lm_logits"])
    assert fx.hooked_paths == ["model.layers.2.self_attn"]
    assert added_hooks() == set()  # watched at its attention-function call, not hooked
    fx.set_features(["hidden:1", "attention_probs:1"])
    assert added_hooks() == {"model.layers.1"}
    assert fx.hooked_paths == ["model.layers.1", "model.layers.1.self_attn"]
    fx.set_features(["lm_logits"])
    assert fx.hooked_paths == [] and added_hooks() == set()
    fx.remove()


def test_student_features_carry_gradients_and_nothing_is_retained():
    model = tiny("qwen3")
    fx = FeatureExtractor(model, ["attention_probs:1", "query:0", "lm_logits"])
    out = fx(make_batch())
    assert out["attention_probs:1"].requires_grad and out["query:0"].requires_grad
    out["attention_probs:1"].sum().backward()
    assert model.model.layers[1].self_attn.q_norm.weight.grad is not None
    assert fx._attention.records == {} and fx._captured == {}
    model.zero_grad(set_to_none=True)
    fx.remove()


def test_lm_logits_needs_a_causal_lm():
    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64))
    assert not ArchitectureAdapter.for_model(bert).causal
    with pytest.raises(AutoSKDError, match="lm_logits needs a causal LM"):
        FeatureExtractor(bert, ["lm_logits"])


def test_gpt2_without_the_attention_interface_is_a_clear_error():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                       bos_token_id=1, eos_token_id=2, reorder_and_upcast_attn=True,
                                       attn_implementation="eager")).eval()
    before = interface_state()
    with torch.no_grad(), pytest.raises(RuntimeError, match="did not call"):
        FeatureExtractor(model, ["attention_probs:0"])(make_batch())
    assert interface_state() == before
