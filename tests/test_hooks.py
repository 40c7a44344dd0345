"""Extraction hooks, operation hooks and architecture adapters on tiny random models."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    MPNetConfig,
    MPNetForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from autoskd.engine.hooks import (
    FeatureExtractor,
    OperationHooks,
    identity_forward,
    replace_forward,
    transform_output,
)
from autoskd.errors import AutoSKDError
from autoskd.models.adapters import ArchitectureAdapter, Geometry, module_at

TINY = dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=3, intermediate_size=64,
            vocab_size=100, max_position_embeddings=64)
ATOL = 1e-5


def tiny(family: str = "bert", attn: str = "eager") -> nn.Module:
    torch.manual_seed(0)
    if family == "distilbert":
        config = DistilBertConfig(dim=32, n_heads=4, n_layers=3, hidden_dim=64, vocab_size=100,
                                  max_position_embeddings=64, num_labels=2, attn_implementation=attn)
        return DistilBertForSequenceClassification(config).eval()
    config_cls, model_cls = {
        "bert": (BertConfig, BertForSequenceClassification),
        "roberta": (RobertaConfig, RobertaForSequenceClassification),
        "mpnet": (MPNetConfig, MPNetForSequenceClassification),
    }[family]
    return model_cls(config_cls(**TINY, num_labels=2, attn_implementation=attn)).eval()


def make_batch(family: str = "bert") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 100, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0  # padding
    mask[2, 3:] = 0
    ids[mask == 0] = 1 if family in ("roberta", "mpnet") else 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "labels": torch.tensor([0, 1, 0]), "idx": torch.arange(3)}


def reference(model: nn.Module, batch: dict) -> object:
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return model(**kwargs, output_hidden_states=True, output_attentions=True)


def hooked_modules(model: nn.Module) -> dict[str, int]:
    return {name: len(m._forward_hooks) for name, m in model.named_modules() if m._forward_hooks}


# --------------------------------------------------------------------------- adapters
@pytest.mark.parametrize("family,prefix,query", [
    ("bert", "bert", "bert.encoder.layer.{i}.attention.self.query"),
    ("roberta", "roberta", "roberta.encoder.layer.{i}.attention.self.query"),
    ("mpnet", "mpnet", "mpnet.encoder.layer.{i}.attention.attn.q"),
    ("distilbert", "distilbert", "distilbert.transformer.layer.{i}.attention.q_lin"),
])
def test_adapter_detects_family(family, prefix, query):
    adapter = ArchitectureAdapter.for_model(tiny(family))
    assert adapter.family == family
    assert adapter.layer == query.split(".attention")[0]
    assert adapter.query == query
    assert adapter.word_embeddings == f"{prefix}.embeddings.word_embeddings"
    assert adapter.classifier == "classifier"
    assert adapter.geometry == Geometry(num_layers=3, hidden_size=32, num_heads=4, vocab_size=100, num_labels=2)


def test_adapter_on_a_bare_encoder_and_with_overridden_paths():
    torch.manual_seed(0)
    bare = BertModel(BertConfig(**TINY)).eval()
    adapter = ArchitectureAdapter.for_model(bare)
    assert adapter.layer == "encoder.layer.{i}" and adapter.classifier is None
    assert adapter.geometry.num_layers == 3
    batch = make_batch()
    with torch.no_grad():
        out = FeatureExtractor(bare, ["hidden:-1"])(batch)
    torch.testing.assert_close(out["hidden:-1"], bare(**{k: batch[k] for k in ("input_ids", "attention_mask")})
                               .last_hidden_state)
    custom = ArchitectureAdapter.for_model(tiny(), paths={"value": "bert.encoder.layer.{i}.attention.self.query"})
    assert custom.family == "bert" and custom.value.endswith("self.query")


def test_adapter_counts_layers_of_truncated_model():
    model = tiny()
    model.bert.encoder.layer = model.bert.encoder.layer[:2]  # "keep first k layers"
    assert ArchitectureAdapter.for_model(model).geometry.num_layers == 2


def test_unknown_architecture_without_paths_is_a_one_line_error():
    with pytest.raises(AutoSKDError, match=r"paths=\{") as err:
        ArchitectureAdapter.for_model(nn.Sequential(nn.Linear(4, 4)))
    assert "\n" not in str(err.value)


def test_module_at_names_the_missing_path():
    model = tiny()
    assert module_at(model, "bert.encoder.layer.1") is model.bert.encoder.layer[1]
    with pytest.raises(AutoSKDError, match=r"'bert\.encoder\.layer\.7\.attention'.*'bert\.encoder\.layer' has no submodule '7'"):
        module_at(model, "bert.encoder.layer.7.attention")
    with pytest.raises(AutoSKDError, match="blocks.0.attn.q"):
        ArchitectureAdapter.for_model(model, paths={"layer": "bert.encoder.layer.{i}",
                                                    "query": "blocks.{i}.attn.q"})


# --------------------------------------------------------------------------- extraction
def test_only_requested_modules_get_hooks():
    model = tiny(attn="sdpa")
    assert hooked_modules(model) == {}
    fx = FeatureExtractor(model, ["attention_scores:-1"])
    assert hooked_modules(model) == {"bert.encoder.layer.2.attention.self.query": 1,
                                     "bert.encoder.layer.2.attention.self.key": 1}
    fx.set_features(["hidden:2", "logits"])
    assert hooked_modules(model) == {"bert.encoder.layer.2": 1}
    fx.set_features(["logits"])
    assert hooked_modules(model) == {}
    # shared modules are hooked once; probs+scores+query of a layer need only Q and K
    fx.set_features(["attention_probs:1", "attention_scores:1", "query:1", "hidden:-1", "mlm_logits",
                     "embeddings"])
    assert hooked_modules(model) == {"bert.embeddings": 1,
                                     "bert.encoder.layer.1.attention.self.query": 1,
                                     "bert.encoder.layer.1.attention.self.key": 1,
                                     "bert.encoder.layer.2": 1}
    fx.remove()
    assert hooked_modules(model) == {}


@pytest.mark.parametrize("family", ["bert", "roberta", "mpnet", "distilbert"])
def test_features_match_transformers_outputs(family):
    model = tiny(family)
    batch = make_batch(family)
    names = ["embeddings", "hidden:0", "hidden:1", "hidden:-1", "attention_probs:0", "attention_probs:-1",
             "attention_scores:-1"]
    with FeatureExtractor(model, names) as fx, torch.no_grad():
        out = fx(batch)
        ref = reference(model, batch)
    assert set(out) == set(names) | {"logits"}
    torch.testing.assert_close(out["logits"], ref.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(out["embeddings"], ref.hidden_states[0], atol=ATOL, rtol=0)
    for i in range(3):
        key = f"hidden:{i}" if i < 2 else "hidden:-1"
        torch.testing.assert_close(out[key], ref.hidden_states[i + 1], atol=ATOL, rtol=0)
    torch.testing.assert_close(out["attention_probs:0"], ref.attentions[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(out["attention_probs:-1"], ref.attentions[2], atol=ATOL, rtol=0)
    torch.testing.assert_close(out["attention_scores:-1"].softmax(-1), out["attention_probs:-1"])
    # padded key columns get zero probability, and the scores carry finfo.min there
    masked_keys = batch["attention_mask"][:, None, None, :].expand_as(out["attention_probs:0"]) == 0
    assert out["attention_probs:0"][masked_keys].abs().max() == 0
    assert (out["attention_scores:-1"][masked_keys] == torch.finfo(torch.float32).min).all()


def test_sdpa_model_gives_the_same_attention_as_eager():
    batch = make_batch()
    with torch.no_grad():
        ref = reference(tiny(attn="eager"), batch)
        out = FeatureExtractor(tiny(attn="sdpa"), ["attention_probs:1", "hidden:2"])(batch)
    torch.testing.assert_close(out["attention_probs:1"], ref.attentions[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(out["hidden:2"], ref.hidden_states[3], atol=ATOL, rtol=0)


def test_qkv_shapes_and_values():
    model = tiny()
    batch = make_batch()
    with torch.no_grad():
        out = FeatureExtractor(model, ["query:1", "key:1", "value:-1", "attention_scores:1"])(batch)
        ref = reference(model, batch)
    for name in ("query:1", "key:1", "value:-1"):
        assert out[name].shape == (3, 4, 9, 8)
    # value:-1 is the last layer's value projection of its input, split into heads
    attn = model.bert.encoder.layer[2].attention.self
    expected = attn.value(ref.hidden_states[2]).view(3, 9, 4, 8).transpose(1, 2)
    torch.testing.assert_close(out["value:-1"], expected, atol=ATOL, rtol=0)
    scores = out["query:1"] @ out["key:1"].transpose(-1, -2) / 8 ** 0.5
    keep = batch["attention_mask"][:, None, None, :].expand_as(scores) == 1
    torch.testing.assert_close(out["attention_scores:1"][keep], scores[keep])


def test_negative_and_positive_indices_agree():
    model = tiny()
    batch = make_batch()
    with torch.no_grad():
        out = FeatureExtractor(model, ["hidden:-1", "hidden:2", "value:-3", "value:0"])(batch)
    assert torch.equal(out["hidden:-1"], out["hidden:2"])
    assert torch.equal(out["value:-3"], out["value:0"])


def test_mlm_logits_is_last_hidden_times_word_embeddings():
    model = tiny()
    batch = make_batch()
    with torch.no_grad():
        out = FeatureExtractor(model, ["mlm_logits"])(batch)
        ref = reference(model, batch)
    expected = ref.hidden_states[-1] @ model.bert.embeddings.word_embeddings.weight.T
    assert out["mlm_logits"].shape == (3, 9, 100)
    torch.testing.assert_close(out["mlm_logits"], expected, atol=ATOL, rtol=0)


def test_gradients_flow_through_captured_features():
    model = tiny(attn="sdpa").train()
    fx = FeatureExtractor(model, ["attention_probs:-1", "value:0", "hidden:1", "mlm_logits"])
    out = fx(make_batch())
    loss = sum(v.float().pow(2).mean() for k, v in out.items() if k != "logits")
    loss.backward()
    layer0 = model.bert.encoder.layer[0].attention.self
    assert layer0.value.weight.grad is not None and layer0.value.weight.grad.abs().sum() > 0
    last = model.bert.encoder.layer[2].attention.self
    assert last.query.weight.grad.abs().sum() > 0 and last.key.weight.grad.abs().sum() > 0
    assert model.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert model.classifier.weight.grad is None  # logits were not in the loss


def test_only_model_inputs_reach_the_forward():
    class Strict(nn.Module):  # a custom model whose forward takes no token_type_ids
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(100, 8)
            self.blocks = nn.ModuleList([nn.Linear(8, 8)])
            self.head = nn.Linear(8, 2)

        def forward(self, input_ids, attention_mask=None):
            h = self.blocks[0](self.emb(input_ids))
            return self.head(h[:, 0])

    out = FeatureExtractor(Strict(), ["hidden:0"], ArchitectureAdapter.for_model(
        Strict(), paths={"layer": "blocks.{i}"}))(make_batch())
    assert out["logits"].shape == (3, 2)


def test_error_on_a_layer_the_model_lacks():
    with pytest.raises(AutoSKDError, match="has 3 layers"):
        FeatureExtractor(tiny(), ["hidden:3"])
    with pytest.raises(AutoSKDError, match="has 3 layers"):
        FeatureExtractor(tiny(), ["attention_probs:-4"])
    with pytest.raises(AutoSKDError, match="unknown feature"):
        FeatureExtractor(tiny(), ["attention:1"])


# --------------------------------------------------------------------------- custom module
class TinyBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.last_probs: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5
        scores = scores.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
        self.last_probs = scores.softmax(-1)
        ctx = (self.last_probs @ v).transpose(1, 2).reshape(b, t, d)
        x = self.n1(x + self.o(ctx))
        return self.n2(x + self.ff(x))


class TinyTransformer(nn.Module):
    """Not a transformers model: no config, returns a logits tensor."""

    def __init__(self, vocab: int = 100, dim: int = 16, heads: int = 2, layers: int = 2, labels: int = 3):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([TinyBlock(dim, heads) for _ in range(layers)])
        self.head = nn.Linear(dim, labels)

    def forward(self, input_ids, attention_mask):
        x = self.tok(input_ids)
        for block in self.blocks:
            x = block(x, attention_mask)
        return self.head(x[:, 0])


CUSTOM_PATHS = {"embeddings": "tok", "layer": "blocks.{i}", "query": "blocks.{i}.q", "key": "blocks.{i}.k",
                "value": "blocks.{i}.v", "word_embeddings": "tok", "classifier": "head", "num_heads": 2}


def test_custom_module_with_user_paths():
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    adapter = ArchitectureAdapter.for_model(model, paths=CUSTOM_PATHS)
    assert adapter.family == "custom"
    assert adapter.geometry == Geometry(num_layers=2, hidden_size=16, num_heads=2, vocab_size=100, num_labels=3)
    batch = make_batch()
    with FeatureExtractor(model, ["attention_probs:-1", "hidden:0", "value:1", "mlm_logits", "embeddings"],
                          adapter) as fx, torch.no_grad():
        out = fx(batch)
        logits = model(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(out["logits"], logits)
    torch.testing.assert_close(out["attention_probs:-1"], model.blocks[1].last_probs, atol=ATOL, rtol=0)
    assert out["hidden:0"].shape == (3, 9, 16) and out["value:1"].shape == (3, 2, 9, 8)
    assert out["mlm_logits"].shape == (3, 9, 100)


def test_unknown_architecture_still_gives_logits():
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    fx = FeatureExtractor(model, ["logits"])
    assert hooked_modules(model) == {}
    assert fx(make_batch())["logits"].shape == (3, 3)
    with pytest.raises(AutoSKDError, match=r"paths=\{"):
        fx.set_features(["hidden:0"])


def test_custom_module_needs_num_heads_for_attention_paths():
    with pytest.raises(AutoSKDError, match="num_heads"):
        ArchitectureAdapter.for_model(TinyTransformer(), paths={k: v for k, v in CUSTOM_PATHS.items()
                                                                if k != "num_heads"})


def test_feature_needing_a_missing_path_is_an_error():
    adapter = ArchitectureAdapter.for_model(TinyTransformer(), paths={"layer": "blocks.{i}"})
    with pytest.raises(AutoSKDError, match="'query'"):
        FeatureExtractor(TinyTransformer(), ["query:0"], adapter)
    with pytest.raises(AutoSKDError, match="word_embeddings"):
        FeatureExtractor(TinyTransformer(), ["mlm_logits"], adapter)


# --------------------------------------------------------------------------- operation hooks
def test_replace_forward_changes_output_and_restores():
    model = tiny()
    batch = make_batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    layer = model.bert.encoder.layer[1]
    with torch.no_grad():
        before = model(**inputs).logits
        with replace_forward(layer, identity_forward):
            skipped = model(**inputs).logits
        after = model(**inputs).logits
    assert not torch.allclose(before, skipped)
    assert torch.equal(before, after)
    assert "forward" not in layer.__dict__


def test_replace_forward_by_another_layer_keeps_extraction_hooks():
    """BERT-of-Theseus: teacher layer 1 replaced by another layer; hooks see the replacement."""
    model, other = tiny(), tiny()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = make_batch()
    fx = FeatureExtractor(model, ["hidden:0", "hidden:1"])
    with torch.no_grad():
        ref = fx(batch)
        with replace_forward(model.bert.encoder.layer[1], other.bert.encoder.layer[1].forward):
            swapped = fx(batch)
        additive_mask = (1.0 - batch["attention_mask"][:, None, None, :].float()) * torch.finfo(torch.float32).min
        expected = other.bert.encoder.layer[1](ref["hidden:0"], additive_mask)
    torch.testing.assert_close(swapped["hidden:0"], ref["hidden:0"])
    assert not torch.allclose(ref["hidden:1"], swapped["hidden:1"])
    torch.testing.assert_close(swapped["hidden:1"], expected, atol=ATOL, rtol=0)


def test_replace_forward_restores_on_exception():
    model = tiny()
    layer = model.bert.encoder.layer[0]
    with pytest.raises(RuntimeError, match="boom"):
        with replace_forward(layer, identity_forward):
            assert layer.forward is identity_forward
            raise RuntimeError("boom")
    assert "forward" not in layer.__dict__
    assert layer.forward.__func__ is type(layer).forward


def test_transform_output_changes_output_and_restores():
    model = tiny()
    batch = make_batch()
    fx = FeatureExtractor(model, ["embeddings"])
    with torch.no_grad():
        before = fx(batch)
        with transform_output(model.bert.embeddings, lambda m, i, o: o * 0):
            zeroed = fx(batch)
        after = fx(batch)
    assert zeroed["embeddings"].abs().max() == 0  # extraction sees the transformed output
    assert not torch.allclose(before["logits"], zeroed["logits"])
    assert torch.equal(before["logits"], after["logits"])
    assert torch.equal(before["embeddings"], after["embeddings"])
    assert hooked_modules(model) == {"bert.embeddings": 1}
    with pytest.raises(ValueError):
        with transform_output(model.bert.embeddings, lambda m, i, o: o + 1):
            raise ValueError
    assert hooked_modules(model) == {"bert.embeddings": 1}


def test_operation_hooks_enter_and_exit_together_and_are_reusable():
    model = tiny()
    batch = make_batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    ops = OperationHooks().replace_forward(model.bert.encoder.layer[0], identity_forward)
    ops.transform_output(model.classifier, lambda m, i, o: o + 100.0)
    assert len(ops) == 2
    with torch.no_grad():
        before = model(**inputs).logits
        with ops:
            first = model(**inputs).logits
            assert ops.active
        with ops:  # same set, next step
            second = model(**inputs).logits
        assert torch.equal(first, second)
        assert first.min() > 50
        with pytest.raises(KeyError):
            with ops:
                raise KeyError("x")
        assert not ops.active
        assert torch.equal(model(**inputs).logits, before)
    assert hooked_modules(model) == {}
    assert "forward" not in model.bert.encoder.layer[0].__dict__


def test_operation_hooks_undo_partial_entry():
    model = tiny()

    def failing():
        raise RuntimeError("bad hook")

    ops = OperationHooks().transform_output(model.classifier, lambda m, i, o: o).add(failing)
    with pytest.raises(RuntimeError, match="bad hook"):
        with ops:
            pass
    assert hooked_modules(model) == {}


# --------------------------------------------------------------------------- memory
def test_hooks_hold_no_tensors_after_call_or_remove():
    model = tiny()
    fx = FeatureExtractor(model, ["hidden:1", "attention_probs:2", "mlm_logits"])
    out = fx(make_batch())
    assert fx._captured == {}  # nothing retained between calls
    ref = out["hidden:1"]
    del out
    gc.collect()
    # outside a call the hooks record nothing even when the model runs
    batch = make_batch()
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert fx._captured == {}
    fx.remove()
    assert fx._captured == {} and fx.hooked_paths == []
    assert hooked_modules(model) == {}
    assert ref.shape == (3, 9, 32)


def test_batch_without_attention_mask():
    model = tiny()
    batch = {"input_ids": make_batch()["input_ids"]}
    with torch.no_grad():
        out = FeatureExtractor(model, ["attention_probs:0"])(batch)
        ref = model(**batch, output_attentions=True)
    torch.testing.assert_close(out["attention_probs:0"], ref.attentions[0], atol=ATOL, rtol=0)
