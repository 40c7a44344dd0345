"""Methods: each loss equals a value computed by hand on fixed small inputs; Theseus's
hybrid forward, schedule and gradients; registry and option errors."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from autoskd.engine.spec import map_layers
from autoskd.errors import AutoSKDError
from autoskd.methods import METHODS, Method, describe_methods, get_method
from autoskd.models.adapters import ArchitectureAdapter, Geometry

NEG = torch.finfo(torch.float32).min


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def kl(p_t, p_s):
    return sum(b * math.log(b / a) for a, b in zip(p_s, p_t) if b > 0)


def approx(x):
    return pytest.approx(x, rel=1e-5, abs=1e-6)


def val(x: torch.Tensor) -> float:
    return float(x.detach())


def ctx_for(aux, stage="task", step=0, total_steps=1, student=None, teachers=None):
    return SimpleNamespace(student=student, teachers=teachers or {}, auxiliary=aux, stage=stage, step=step,
                           total_steps=total_steps, device=torch.device("cpu"))


def total(losses):
    return float(sum(v.detach() for v in losses.values()))


# ------------------------------------------------------------------ registry, options
def test_describe_methods_lists_every_method():
    described = describe_methods()
    assert {"finetune", "kd", "minilm", "theseus", "tinybert", "mlm", "glmd"} <= {d["name"] for d in described}
    assert len(described) == 30  # GKD's Table 1 (25) + GLMD + finetune + mlm + seqkd + on_policy (decoder LMs)
    for d in described:
        assert d["description"] and d["stages"] and d["reference"]
        assert set(d) >= {"name", "description", "stages", "features", "reference"}
    tiny = next(d for d in described if d["name"] == "tinybert")
    assert tiny["stages"] == ["intermediate", "prediction"]
    assert tiny["features"] == ["embeddings", "hidden", "attention_scores", "logits"]


def test_every_method_module_says_how_it_follows_gkds_catalogue():
    """Issue 25: each built-in method's module says it follows GKD's catalogue (or is not in it);
    a deviation is stated in a "Deviations:" paragraph of that docstring."""
    import sys

    for name in METHODS.names():
        module = sys.modules[METHODS.get(name).__module__]
        if not module.__name__.startswith("autoskd.methods."):
            continue  # the engine's own ``mlm``
        assert "GKD's" in module.__doc__ and "catalogue" in module.__doc__, name


def test_unknown_method_lists_known_ones():
    with pytest.raises(AutoSKDError, match="unknown method 'bogus'.*alp_kd, annealing_kd, ckd"):
        get_method("bogus")


def test_unknown_option_is_an_error():
    with pytest.raises(AutoSKDError, match="method 'kd' has no option gamma.*alpha"):
        get_method("kd", gamma=0.1)
    with pytest.raises(AutoSKDError, match="alpha must be in"):
        get_method("kd", alpha=1.5)
    with pytest.raises(AutoSKDError, match="not a valid"):
        get_method("kd", alpha="lots")
    with pytest.raises(AutoSKDError, match="no temperature"):
        get_method("finetune", temperature=2)


def test_options_override_spec():
    kd = get_method("kd", alpha="0.25", temperature="4")  # CLI strings are coerced
    (soft,) = kd.spec.losses
    assert (soft.weight, soft.temperature, kd.spec.hard_label_weight) == (0.25, 4.0, 0.75)
    tiny = get_method("tinybert", hidden_weight=2.0, stages="intermediate")
    assert tiny.spec.stages == ("intermediate",)
    assert {l.weight for l in tiny.spec.losses if l.name == "hidden"} == {2.0}
    assert get_method("tinybert", pretrain=True).spec.stages == ("pretrain", "intermediate", "prediction")
    instance = get_method("minilm")
    assert get_method(instance) is instance
    assert isinstance(get_method("theseus"), METHODS.get("theseus"))


def test_tinybert_uniform_layer_map():
    assert map_layers("uniform", 2, 6) == [(0, 2), (1, 5)]


# ------------------------------------------------------------------ finetune and kd
def test_finetune_is_hard_labels_only():
    method = get_method("finetune")
    assert not method.spec.needs_teacher
    aux = method.build_auxiliary(Geometry(2, 4, 1, num_labels=2), {})
    assert aux.feature_requests("task", None) == (["logits"], [])
    logits, labels = t([[2.0, 0.0]]), torch.tensor([1])
    losses = method.losses(ctx_for(aux), {"logits": logits}, {}, None, {"labels": labels})
    assert list(losses) == ["hard_ce"]
    assert total(losses) == approx(-math.log(softmax([2.0, 0.0])[1]))


def test_kd_loss_by_hand():
    method = get_method("kd", alpha=0.5, temperature=2.0)
    geom = Geometry(2, 4, 1, num_labels=2)
    aux = method.build_auxiliary(geom, {"teacher": geom})
    assert aux.feature_requests("task", "teacher") == (["logits"], ["logits"])
    s, tt, labels = [[1.0, 2.0], [0.0, 0.5]], [[2.0, 0.0], [1.0, 1.0]], [1, 0]
    tau = 2.0
    soft = sum(kl(softmax([x / tau for x in b]), softmax([x / tau for x in a])) for a, b in zip(s, tt)) / 2
    hard = -(math.log(softmax(s[0])[1]) + math.log(softmax(s[1])[0])) / 2
    batch = {"labels": torch.tensor(labels), "attention_mask": torch.ones(2, 3, dtype=torch.long)}
    losses = method.losses(ctx_for(aux), {"logits": t(s)}, {"logits": t(tt)}, "teacher", batch)
    assert set(losses) == {"soft_kl", "hard_ce"}
    assert val(losses["soft_kl"]) == approx(0.5 * tau**2 * soft)
    assert total(losses) == approx(0.5 * tau**2 * soft + 0.5 * hard)
    # default: alpha = 1 (pure distillation), tau = 2: no hard-label term
    pure = get_method("kd")
    losses = pure.losses(ctx_for(pure.build_auxiliary(geom, {"teacher": geom})), {"logits": t(s)},
                         {"logits": t(tt)}, "teacher", batch)
    assert list(losses) == ["soft_kl"] and total(losses) == approx(tau**2 * soft)
    assert aux.last_distances["teacher/soft_kl"] == approx(tau**2 * soft)  # raw, unweighted


def test_kd_width_mismatch_asks_for_projection():
    with pytest.raises(AutoSKDError, match="projection='linear'"):
        get_method("kd").build_auxiliary(Geometry(2, 4, 1, num_labels=2), {"t": Geometry(2, 4, 1, num_labels=3)})


# ------------------------------------------------------------------ tinybert
# TinyBERT's single fit_dense: one Linear shared by the embeddings and every hidden layer
W_FIT, B_FIT = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), np.array([0.0, 0.0, 0.5])


def _scores(rows):
    return t([[[[*r, NEG] for r in rows]]])  # [1, 1, 3, 3], key 2 (padding) masked


def tinybert_features():
    student = {
        "embeddings": t([[[1, 2], [0, 1], [9, 9]]]),
        "hidden:0": t([[[1, 0], [2, 1], [7, 7]]]),
        "hidden:1": t([[[0, 1], [1, 1], [5, 5]]]),
        "attention_scores:0": _scores([[0.5, 1.0], [2.0, -1.0], [3.0, 3.0]]),
        "attention_scores:1": _scores([[1.0, 1.0], [0.0, 0.0], [1.0, 2.0]]),
        "logits": t([[0.3, -0.2]]),
    }
    teacher = {
        "embeddings": t([[[1, 2, 3], [0, 0, 0], [1, 1, 1]]]),
        "hidden:2": t([[[2, 0, 1], [4, 1, 0], [0, 0, 0]]]),
        "hidden:5": t([[[0, 1, 1], [2, 1, 2], [0, 0, 0]]]),
        "attention_scores:2": _scores([[1.0, 0.0], [2.0, 2.0], [0.0, 0.0]]),
        "attention_scores:5": _scores([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]),
        "logits": t([[1.0, 0.0]]),
    }
    return student, teacher


def _set_linear(linear: nn.Linear, w, b) -> None:
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(w, dtype=torch.float32))
        linear.bias.copy_(torch.tensor(b, dtype=torch.float32))


def test_tinybert_losses_by_hand():
    method = get_method("tinybert")
    sg, tg = Geometry(2, 2, 1, num_labels=2), Geometry(6, 3, 1, num_labels=2)
    aux = method.build_auxiliary(sg, {"t": tg})
    # GKD's catalogue (issue 25): one shared Linear ds -> dt for H_0 and every mapped layer
    assert sorted(aux.projections) == ["t/fit_dense"]
    assert {l.projection for l in method.spec.losses if l.name in ("embeddings", "hidden")} == {"fit_dense"}
    _set_linear(aux.projections["t/fit_dense"], W_FIT, B_FIT)
    assert aux.feature_requests("intermediate", "t") == (
        ["embeddings", "hidden:0", "hidden:1", "attention_scores:0", "attention_scores:1", "logits"],
        ["embeddings", "hidden:2", "hidden:5", "attention_scores:2", "attention_scores:5"],
    )
    student, teacher = tinybert_features()
    batch = {"attention_mask": torch.tensor([[1, 1, 0]]), "labels": torch.tensor([0])}

    def proj_mse(s, w, b, tt):  # real tokens 0 and 1 only, mean over their 2 x 3 elements
        s, tt = s.numpy()[0, :2], tt.numpy()[0, :2]
        return float(((s @ w.T + b - tt) ** 2).sum() / 6)

    def att_mse(s_rows, t_rows):  # masked scores -> 0; real rows x real keys = 2 x 2 elements
        d = np.array(s_rows)[:2, :2] - np.array(t_rows)[:2, :2]
        return float((d**2).sum() / 4)

    emb = proj_mse(student["embeddings"], W_FIT, B_FIT, teacher["embeddings"])
    assert emb == approx((0.5**2 + 1 + 1.5**2) / 6)  # written out: diffs (0,0,.5), (0,1,1.5)
    h0 = proj_mse(student["hidden:0"], W_FIT, B_FIT, teacher["hidden:2"])
    h1 = proj_mse(student["hidden:1"], W_FIT, B_FIT, teacher["hidden:5"])
    assert h0 == approx((1 + 0 + 0.25 + 4 + 0 + 12.25) / 6)  # written out: diffs (-1,0,.5), (-2,0,3.5)
    a0 = att_mse([[0.5, 1.0], [2.0, -1.0]], [[1.0, 0.0], [2.0, 2.0]])
    a1 = att_mse([[1.0, 1.0], [0.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]])
    assert (a0, a1) == (approx((0.25 + 1 + 0 + 9) / 4), approx(0.5))

    losses = method.losses(ctx_for(aux, "intermediate"), student, teacher, "t", batch)
    assert set(losses) == {"embeddings_mse", "hidden_mse:s0-t2", "hidden_mse:s1-t5",
                           "attention_mse:s0-t2", "attention_mse:s1-t5"}  # no hard CE here
    assert val(losses["hidden_mse:s0-t2"]) == approx(h0)
    assert val(losses["hidden_mse:s1-t5"]) == approx(h1)
    assert val(losses["attention_mse:s0-t2"]) == approx(a0)
    assert total(losses) == approx(emb + h0 + h1 + a0 + a1)

    # prediction stage: soft cross-entropy at tau = 1
    assert aux.feature_requests("prediction", "t") == (["logits"], ["logits"])
    p_t, p_s = softmax([1.0, 0.0]), softmax([0.3, -0.2])
    losses = method.losses(ctx_for(aux, "prediction"), student, teacher, "t", batch)
    assert list(losses) == ["soft_ce"]
    assert total(losses) == approx(-sum(b * math.log(a) for a, b in zip(p_s, p_t)))

    # gradients reach the projections
    for v in student.values():
        v.requires_grad_(True)
    sum(method.losses(ctx_for(aux, "intermediate"), student, teacher, "t", batch).values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in aux.parameters())
    assert torch.isfinite(student["attention_scores:0"].grad).all()


def test_tinybert_pretrain_stage_shares_projections():
    method = get_method("tinybert", pretrain=True)
    aux = method.build_auxiliary(Geometry(2, 2, 1), {"t": Geometry(6, 3, 1)})
    assert list(aux.projections) == ["t/fit_dense"]  # one fit_dense for both stages
    assert aux.feature_requests("pretrain", "t") == aux.feature_requests("intermediate", "t")


def test_tinybert_multi_teacher_projections_per_teacher():
    aux = get_method("tinybert").build_auxiliary(
        Geometry(2, 2, 1), {"big": Geometry(6, 3, 1), "deep.v2": Geometry(4, 5, 1)})
    assert sorted(aux.projections) == ["big/fit_dense", "deep_v2/fit_dense"]  # one fit_dense per teacher
    assert aux.projections["big/fit_dense"].weight.shape == (3, 2)
    assert aux.projections["deep_v2/fit_dense"].weight.shape == (5, 2)
    assert aux.feature_requests("intermediate", "deep.v2")[1][:3] == ["embeddings", "hidden:1", "hidden:3"]


def test_tinybert_needs_equal_heads():
    with pytest.raises(AutoSKDError, match="heads"):
        get_method("tinybert").build_auxiliary(Geometry(2, 4, 1), {"t": Geometry(4, 4, 2)})


# ------------------------------------------------------------------ minilm
def test_minilm_losses_by_hand():
    method = get_method("minilm")
    aux = method.build_auxiliary(Geometry(2, 2, 1, num_labels=2), {"t": Geometry(3, 4, 1, num_labels=2)})
    assert aux.feature_requests("task", "t") == (["attention_probs:1", "value:1", "logits"],
                                                 ["attention_probs:2", "value:2"])
    s_att = [[0.5, 0.5, 0.0], [0.25, 0.75, 0.0], [0.2, 0.3, 0.5]]
    t_att = [[0.8, 0.2, 0.0], [0.5, 0.5, 0.0], [0.1, 0.1, 0.8]]
    student = {"attention_probs:1": t([[s_att]]), "value:1": t([[[[1, 0], [0, 1], [3, 3]]]]),
               "logits": t([[0.2, -0.3]])}
    teacher = {"attention_probs:2": t([[t_att]]), "value:2": t([[[[1, 0, 1, 0], [0, 1, 0, 1], [2, 2, 2, 2]]]])}
    batch = {"attention_mask": torch.tensor([[1, 1, 0]]), "labels": torch.tensor([1])}

    attention = (kl(t_att[0], s_att[0]) + kl(t_att[1], s_att[1])) / 2  # real query rows 0, 1
    # value relation over real keys 0, 1: student v.v/sqrt(2), teacher v.v/sqrt(4)
    r = 1 / math.sqrt(2)
    s_vr = [softmax([1 * r, 0.0]), softmax([0.0, 1 * r])]
    t_vr = [softmax([2 / 2, 0.0]), softmax([0.0, 2 / 2])]
    value = (kl(t_vr[0], s_vr[0]) + kl(t_vr[1], s_vr[1])) / 2
    hard = -math.log(softmax([0.2, -0.3])[1])

    losses = method.losses(ctx_for(aux), student, teacher, "t", batch)
    assert set(losses) == {"attention_kl", "value_relation_kl", "hard_ce"}
    assert val(losses["attention_kl"]) == approx(attention)
    assert val(losses["value_relation_kl"]) == approx(value)
    assert total(losses) == approx(attention + value + hard)


def test_minilm_requires_equal_head_counts():
    with pytest.raises(AutoSKDError, match="student has 2 attention heads and teacher 't' has 4"):
        get_method("minilm").build_auxiliary(Geometry(2, 8, 2), {"t": Geometry(4, 16, 4)})


def test_minilm_stage_option():
    m = get_method("minilm", stage="pretrain")
    assert m.spec.stages == ("pretrain",) and {l.stage for l in m.spec.losses} == {"pretrain"}
    assert not m.spec.uses_hard_labels("pretrain")


# ------------------------------------------------------------------ with real (tiny) models
def tiny_bert(layers: int, hidden: int, heads: int = 2, seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=40, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=2 * hidden, max_position_embeddings=16, num_labels=2,
                        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    return BertForSequenceClassification(config)


def tiny_batch():
    return {"input_ids": torch.tensor([[2, 5, 7, 9, 3], [2, 11, 3, 0, 0]]),
            "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
            "token_type_ids": torch.zeros(2, 5, dtype=torch.long), "labels": torch.tensor([1, 0])}


def _extract(model, aux, stage, teacher_name, which):
    from autoskd.engine.hooks import FeatureExtractor

    names = aux.feature_requests(stage, teacher_name)[0 if which == "student" else 1]
    return FeatureExtractor(model, names)(tiny_batch())


@pytest.mark.parametrize("method_name", ["tinybert", "minilm"])
def test_identical_models_have_zero_feature_losses(method_name):
    """Student == teacher (and identity projections): every feature distance is 0, masked
    positions and padded rows included -- the hooks' feature layouts fit the losses."""
    student = tiny_bert(2, 8).eval()
    teacher = copy.deepcopy(student)
    geom = ArchitectureAdapter.for_model(student).geometry
    method = get_method(method_name)
    aux = method.build_auxiliary(geom, {"t": geom})
    for linear in aux.projections.values():
        _set_linear(linear, np.eye(8), np.zeros(8))
    stage = method.spec.stages[0]
    losses = method.losses(ctx_for(aux, stage), _extract(student, aux, stage, "t", "student"),
                           _extract(teacher, aux, stage, "t", "teacher"), "t", tiny_batch())
    feature_terms = {k: val(v) for k, v in losses.items() if k != "hard_ce"}
    assert feature_terms and all(abs(v) < 1e-5 for v in feature_terms.values()), feature_terms


@pytest.mark.parametrize("method_name", ["tinybert", "minilm"])
def test_real_models_train_end_to_end(method_name):
    student, teacher = tiny_bert(2, 8, seed=1).train(), tiny_bert(4, 12, seed=2).eval()
    method = get_method(method_name)
    aux = method.build_auxiliary(ArchitectureAdapter.for_model(student).geometry,
                                 {"t": ArchitectureAdapter.for_model(teacher).geometry})
    stage = method.spec.stages[0]
    with torch.no_grad():
        t_feats = _extract(teacher, aux, stage, "t", "teacher")
    losses = method.losses(ctx_for(aux, stage), _extract(student, aux, stage, "t", "student"), t_feats, "t",
                           tiny_batch())
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in student.bert.encoder.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is not None for p in aux.parameters())
    assert set(aux.last_distances) == {f"t/{k}" for k in losses if k != "hard_ce"}


# ------------------------------------------------------------------ theseus
def theseus_pair(rate=None, **options):
    teacher = tiny_bert(4, 8, seed=3).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = tiny_bert(2, 8, seed=4)
    if rate is not None:
        options["replace_rate"] = rate
    method = get_method("theseus", **options)
    method.setup(student, {"teacher": teacher})
    return method, student, teacher


def test_theseus_schedule_values():
    # default (GKD's catalogue, issue 25): b = 0.3, linear to 1 at 0.66 of the stage, then the
    # successor alone; schedule_end=1 is the old default (1 at the last step)
    m = get_method("theseus")
    assert [m.replace_rate_at(s, 11) for s in (0, 5, 10)] == [approx(0.3), approx(0.3 + 0.7 * 0.5 / 0.66), 1.0]
    assert m.replace_rate_at(7, 11) == 1.0
    last = get_method("theseus", schedule_end=1.0)
    assert [last.replace_rate_at(s, 11) for s in (0, 5, 10)] == [approx(0.3), approx(0.65), approx(1.0)]
    half = get_method("theseus", schedule_end=0.5)
    assert half.replace_rate_at(2, 11) == approx(0.3 + 0.7 * 0.2 / 0.5)
    assert half.replace_rate_at(5, 11) == approx(1.0) and half.replace_rate_at(8, 11) == 1.0
    slope = get_method("theseus", base_rate=0.5, rate_slope=0.1)
    assert slope.replace_rate_at(3, 100) == approx(0.8) and slope.replace_rate_at(50, 100) == 1.0
    assert get_method("theseus", replace_rate=0.4).replace_rate_at(7, 10) == 0.4


def test_theseus_on_step_samples_groups():
    method, student, teacher = theseus_pair()
    ctx = ctx_for(None, step=0, total_steps=11, student=student, teachers={"teacher": teacher})
    draws = []
    for step in range(11):
        ctx.step = step
        method.on_step(ctx)
        draws.append(list(method.replaced))
    assert method.rate == 1.0 and draws[-1] == [True, True]
    assert len(draws[0]) == 2
    again, _, _ = theseus_pair()  # same seed, same draws
    seq = []
    for step in range(11):
        ctx.step = step
        again.on_step(ctx)
        seq.append(list(again.replaced))
    assert seq == draws


def test_theseus_setup_copies_embeddings_and_classifier():
    method, student, teacher = theseus_pair()
    for name, tensor in teacher.state_dict().items():
        if not name.startswith("bert.encoder.layer."):
            assert torch.equal(student.state_dict()[name], tensor), name
    assert not torch.equal(student.bert.encoder.layer[0].output.dense.weight,
                           teacher.bert.encoder.layer[0].output.dense.weight)
    assert method.group_size == 2


def test_theseus_rate_one_is_the_student_and_zero_the_teacher():
    batch = tiny_batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    method, student, teacher = theseus_pair(rate=1.0)
    student.eval()
    ctx = ctx_for(None, student=student, teachers={"teacher": teacher})
    method.on_step(ctx)
    assert method.replaced == [True, True]
    hybrid = method.student_forward(ctx, None, batch)["logits"]
    torch.testing.assert_close(hybrid, student(**inputs).logits)

    method0, student0, teacher0 = theseus_pair(rate=0.0)
    method0.on_step(ctx)
    assert method0.replaced == [False, False]
    torch.testing.assert_close(method0.student_forward(ctx, None, batch)["logits"], teacher0(**inputs).logits)
    # no group replaced: nothing to learn (the trainer skips such a step)
    out = method0.student_forward(ctx, None, batch)["logits"]
    assert not out.requires_grad
    assert all(p.grad is None for p in student0.parameters())
    # hooks are gone after the step: the teacher is itself again
    torch.testing.assert_close(teacher(**inputs).logits, teacher(**inputs).logits)
    assert "forward" not in teacher.bert.encoder.layer[0].__dict__


def test_theseus_gradients_reach_only_student_layers():
    method, student, teacher = theseus_pair(rate=1.0)
    student.train()
    ctx = ctx_for(None, student=student, teachers={"teacher": teacher})
    method.on_step(ctx)
    method.replaced = [True, False]  # only group 0 replaced: student layer 1 is not in the hybrid
    geom = ArchitectureAdapter.for_model(student).geometry
    aux = method.build_auxiliary(geom, {"teacher": ArchitectureAdapter.for_model(teacher).geometry})
    assert aux.feature_requests("task", "teacher") == (["logits"], [])
    batch = tiny_batch()
    feats = method.student_forward(ctx, None, batch)
    losses = method.losses(ctx_for(aux, student=student), feats, {}, "teacher", batch)
    assert list(losses) == ["hard_ce"]
    losses["hard_ce"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    for name, p in student.named_parameters():
        if name.startswith("bert.encoder.layer.0."):
            assert p.grad is not None, name
        else:
            assert p.grad is None, name


def test_theseus_shape_errors():
    teacher = tiny_bert(4, 8).eval()
    with pytest.raises(AutoSKDError, match="multiple"):
        get_method("theseus").setup(tiny_bert(3, 8), {"t": teacher})
    with pytest.raises(AutoSKDError, match="hidden sizes must match"):
        get_method("theseus").setup(tiny_bert(2, 12), {"t": teacher})
    with pytest.raises(AutoSKDError, match="exactly one teacher"):
        get_method("theseus").setup(tiny_bert(2, 8), {"a": teacher, "b": teacher})


def test_custom_method_subclass():
    from autoskd.engine.spec import FeatureLoss, MethodSpec

    class Cosine(Method):
        spec = MethodSpec(name="cos-last", description="cosine on the last hidden state",
                          losses=(FeatureLoss("hidden:-1", "hidden:-1", "cosine"),))

    aux = get_method(Cosine).build_auxiliary(Geometry(2, 2, 1), {"t": Geometry(3, 2, 1)})
    assert aux.feature_requests("task", "t") == (["hidden:1", "logits"], ["hidden:2"])
    s, tt = t([[[1, 0], [1, 1]]]), t([[[1, 1], [2, 2]]])
    losses = aux.compute("task", {"hidden:1": s, "logits": t([[0, 0]])}, {"hidden:2": tt}, {}, "t")
    assert list(losses) == ["hidden_cosine"]
    assert val(losses["hidden_cosine"]) == approx((1 - 1 / math.sqrt(2) + 0) / 2)
