"""The engine's extension points: layer maps, schedules, projections, relation transforms,
several teachers per step, stage options, the MLM path and combination by config. Values
are checked against hand computations on fixed small inputs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from autoskd.engine.auxiliary import AuxiliaryModel
from autoskd.engine.callbacks import Callback
from autoskd.engine.layer_maps import map_layers
from autoskd.engine.losses import DISTANCES
from autoskd.engine.mlm import adapt_teacher_mlm, attach_mlm_head
from autoskd.engine.multi_teacher import AllTeachers, combine
from autoskd.engine.relations import get_transform
from autoskd.engine.schedules import schedule_value
from autoskd.engine.spec import FeatureLoss, MethodSpec
from autoskd.engine.teachers import SingleTeacher, Teacher
from autoskd.engine.trainer import Distiller, Stage
from autoskd.errors import AutoSKDError
from autoskd.methods import get_method
from autoskd.models.adapters import Geometry
from helpers import tiny_bert
from test_methods_all import loader

G = Geometry(num_layers=2, hidden_size=4, num_heads=2, vocab_size=10, num_labels=2)


def approx(x):
    return pytest.approx(x, rel=1e-5, abs=1e-6)


# ------------------------------------------------------------------ layer maps
def test_layer_maps():
    assert map_layers("uniform", 2, 6) == [(0, 2), (1, 5)]
    assert map_layers("skip", 3, 6) == [(0, 1), (1, 3)]          # PKD: every 2nd teacher layer, last excluded
    assert map_layers("one_to_one", 3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert map_layers("list:0-2,1/-1", 2, 6) == [(0, 2), (1, 5)]
    assert len(map_layers("all", 2, 3)) == 6
    assert map_layers("uniform_lower:1", 2, 4) == [(0, 1)] and map_layers("uniform_upper:1", 2, 4) == [(1, 3)]
    with pytest.raises(AutoSKDError, match="unknown layer map 'zigzag'"):
        FeatureLoss("hidden:{s}", "hidden:{t}", "mse", layers="zigzag")
    with pytest.raises(AutoSKDError, match="outside"):
        map_layers("list:0-9", 2, 6)


# ------------------------------------------------------------------ schedules
def test_schedules_by_hand():
    assert schedule_value("annealing", 0.0) == approx(1 / 7)
    assert schedule_value("annealing", 0.5) == approx(1 - (math.ceil(3.5) - 1) / 7)
    assert schedule_value("annealing", 0.99) == approx(1.0)
    assert schedule_value("continuation", 0.333) == approx(0.333 / 1.332)
    assert schedule_value("continuation", 0.7) == 1.0
    assert schedule_value("linear:0.2,1", 0.5) == approx(0.6)
    assert schedule_value("step:0.5,0,3", 0.49) == 0 and schedule_value("step:0.5,0,3", 0.5) == 3
    with pytest.raises(AutoSKDError, match="unknown schedule"):
        FeatureLoss("logits", "logits", "kl", weight_schedule="wobble")


def test_weight_and_teacher_scale_schedules_change_the_loss_at_the_right_step():
    z_s, z_t = torch.tensor([[0.5, -1.0]]), torch.tensor([[2.0, 1.0]])
    spec = MethodSpec(name="m", description="", losses=(
        FeatureLoss("logits", "logits", "mse", teacher_scale="annealing", name="a"),
        FeatureLoss("logits", "logits", "mse", weight_schedule="step:0.5,0,2", name="b")))
    aux = AuxiliaryModel(spec, G, {"t": G})
    for progress in (0.0, 0.5, 0.9):
        out = aux.compute("task", {"logits": z_s}, {"logits": z_t}, {}, "t", progress=progress)
        phi = schedule_value("annealing", progress)
        assert float(out["a_mse"]) == approx(float(((z_s - phi * z_t) ** 2).mean()))
        assert float(out["b_mse"]) == approx((0 if progress < 0.5 else 2) * float(((z_s - z_t) ** 2).mean()))


def test_annealing_kd_in_training_uses_phi_of_the_step(tok):
    """Annealing-KD's term at each step equals MSE(z_s, phi(step/N) z_t) on the batch."""
    teacher, student = tiny_bert(tok, layers=2, seed=1, dropout=0.0), tiny_bert(tok, layers=2, seed=2, dropout=0.0)
    seen = []

    class Check(Callback):
        def on_step_begin(self, trainer, ctx, batch):
            with torch.no_grad():
                z_s, z_t = trainer.student(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits, \
                    teacher(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
            seen.append((ctx.stage, ctx.step, float(((z_s - schedule_value("annealing", ctx.progress) * z_t) ** 2).mean())))

        def on_step_end(self, trainer, ctx, batch, losses):
            if ctx.stage == "annealing":
                assert float(losses["annealed_mse"]) == approx(seen[-1][2])

    d = Distiller(student, "annealing_kd", teacher, progress=False, checkpoint=False, restore_best=False,
                  callbacks=[Check()])
    d.fit([Stage("annealing", loader(tok, False), epochs=1, lr=1e-3), Stage("task", loader(tok, False), epochs=1)])
    assert [s[:2] for s in seen] == [("annealing", 0), ("annealing", 1), ("task", 0), ("task", 1)]


# ------------------------------------------------------------------ projections, transforms, distances
def test_projection_sharing():
    wide = Geometry(num_layers=4, hidden_size=8, num_heads=2, vocab_size=10, num_labels=2)

    def n_proj(kind, teachers):
        spec = MethodSpec(name="m", description="", losses=(
            FeatureLoss("hidden:{s}", "hidden:{t}", "mse", layers="uniform", projection=kind),))
        return len(AuxiliaryModel(spec, G, teachers).projections)

    assert n_proj("linear", {"a": wide, "b": wide}) == 4         # per teacher and layer pair
    assert n_proj("per_teacher", {"a": wide, "b": wide}) == 2
    assert n_proj("shared", {"a": wide, "b": wide}) == 1
    with pytest.raises(AutoSKDError, match="unknown projection"):
        n_proj("magic", {"a": wide})


def test_relation_transforms_by_hand():
    x = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]])  # [1, 3, 4]
    mask = torch.tensor([[1, 1, 0]])
    rel = get_transform("relation_heads:2")(x, mask=mask)                         # [1, 2, 3, 3]
    head0 = x[0, :, :2]
    scores = head0 @ head0.T / math.sqrt(2)
    expected = torch.softmax(scores.masked_fill(torch.tensor([False, False, True]), float("-inf")), -1)
    assert torch.allclose(rel[0, 0], expected, atol=1e-6)
    assert torch.allclose(rel.sum(-1), torch.ones(1, 2, 3))
    cos = get_transform("token_cos")(x, mask=mask)
    assert float(cos[0, 0, 1]) == approx(0.0) and float(cos[0, 0, 2]) == 0.0   # padded pair zeroed
    ang = get_transform("window_angle:3")(x, mask=torch.ones(1, 3))
    e_10, e_12 = F.normalize(x[0, 0] - x[0, 1], dim=0), F.normalize(x[0, 2] - x[0, 1], dim=0)
    assert float(ang[0, 1, 0, 2]) == approx(float(e_10 @ e_12))               # angle at token 1 between 0 and 2
    assert get_transform("cls_l2")(x).norm(dim=-1).tolist() == approx([1.0])
    with pytest.raises(AutoSKDError, match="not divisible"):
        get_transform("relation_heads:3")(x)


def test_cos_nce_and_soft_ce_by_hand():
    s, t = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    cos = torch.tensor([[1.0, 1 / math.sqrt(2)], [0.0, 1 / math.sqrt(2)]])
    logits = -(1 - cos)
    expected = -(F.log_softmax(logits, -1).diagonal()).mean()
    assert float(DISTANCES.get("cos_nce")(s, t)) == approx(float(expected))
    z_s, z_t = torch.tensor([[0.2, -0.4]]), torch.tensor([[1.0, 0.0]])
    tau = 3.0
    hand = -(F.softmax(z_t / tau, -1) * F.log_softmax(z_s / tau, -1)).sum()
    assert float(DISTANCES.get("soft_ce")(z_s, z_t, temperature=tau)) == approx(float(hand))


# ------------------------------------------------------------------ several teachers per step
def test_combiners():
    per = {"a": {"x": torch.tensor(1.0)}, "b": {"x": torch.tensor(3.0)}}
    assert float(combine("mean", per)["x"]) == 2.0
    assert float(combine("sum", per)["x"]) == 4.0
    g = torch.Generator().manual_seed(0)
    kept = [set(combine("random_survival:0.5", per, g)) for _ in range(50)]
    assert all(k for k in kept) and {"a/x"} in kept and {"b/x"} in kept and {"a/x", "b/x"} in kept


def test_tmkd_loss_is_the_mean_over_teachers_by_hand():
    method = get_method("tmkd")
    aux = method.build_auxiliary(G, {"a": G, "b": G})
    ctx = type("Ctx", (), dict(stage="task", step=0, total_steps=1, auxiliary=aux, teachers={"a": 0, "b": 0},
                               hard_label_weight=None))()
    z_s = torch.tensor([[0.0, 1.0]])
    feats = {"a": {"logits": torch.tensor([[1.0, 1.0]])}, "b": {"logits": torch.tensor([[3.0, -1.0]])}}
    labels = torch.tensor([1])
    out = method.losses(ctx, {"logits": z_s}, feats, None, {"labels": labels})
    mse_a, mse_b = ((z_s - feats["a"]["logits"]) ** 2).mean(), ((z_s - feats["b"]["logits"]) ** 2).mean()
    assert float(out["teachers_mse"]) == approx(float((mse_a + mse_b) / 2))
    assert float(out["hard_ce"]) == approx(float(F.cross_entropy(z_s, labels)) / 2)


def test_mt_bert_weights_samples_by_teacher_correctness():
    from autoskd.methods.mt_bert import weighted_soft_ce

    z_s = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    z_t = torch.tensor([[4.0, 0.0], [4.0, 0.0]])
    labels = torch.tensor([0, 1])  # the teacher is right on sample 0, wrong on sample 1
    w = 1 / (1 + F.cross_entropy(z_t, labels, reduction="none"))
    soft = -(F.softmax(z_t, -1) * F.log_softmax(z_s, -1)).sum(-1)
    assert float(weighted_soft_ce(z_s, z_t, labels)) == approx(float((w * soft).mean()))
    assert w[0] > 3 * w[1]


def test_uncertainty_sends_uncertain_samples_to_the_small_teacher():
    from autoskd.methods.uncertainty import entropy_groups

    logits = torch.tensor([[5.0, -5.0], [0.0, 0.0], [2.0, 0.0], [0.1, 0.0]])
    groups = entropy_groups(logits, 2)
    assert sorted(groups[0].tolist()) == [1, 3] and sorted(groups[1].tolist()) == [0, 2]


# ------------------------------------------------------------------ stages
def test_stage_trainable_teacher_and_hard_label_weight(tok):
    teachers = {"deep": Teacher("deep", tiny_bert(tok, layers=4, seed=1)),
                "flat": Teacher("flat", tiny_bert(tok, layers=2, seed=2))}
    student = tiny_bert(tok, layers=2, seed=3)
    before = copy.deepcopy(student.state_dict())
    used = []

    class Spy(Callback):
        def on_step_end(self, trainer, ctx, batch, losses):
            used.append((ctx.stage, ctx.teacher_name, "hard_ce" in losses))

    d = Distiller(student, "kd", AllTeachers(teachers), progress=False, checkpoint=False, restore_best=False,
                  callbacks=[Spy()], method_options={"alpha": 0.5})
    d.fit([Stage("task", loader(tok, False), epochs=1, lr=1e-2, teacher="flat", trainable=("bert.encoder.layer.1",),
                 hard_label_weight=0.0)])
    after = student.state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("bert.encoder.layer.1") for k in changed)
    assert used == [("task", "flat", False)] * 2
    with pytest.raises(AutoSKDError, match="names teacher 'nobody'"):
        d.fit([Stage("task", loader(tok, False), epochs=1, teacher="nobody")])
    with pytest.raises(AutoSKDError, match="matches no student parameter"):
        d.fit([Stage("task", loader(tok, False), epochs=1, trainable=("decoder.",))])


def test_progressive_phases_of_mobilebert_and_sid():
    mb, sid = get_method("mobilebert"), get_method("sid")
    mb.num_layers = sid.num_layers = 2
    ctx = type("Ctx", (), {})()
    ctx.total_steps = 9
    phases = []
    for step in range(9):
        ctx.step = step
        phases.append(mb.phase(ctx))
    assert phases == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [mb.layer_factor(p, 0) for p in (0, 1, 2)] == [0.0, 1.0, 0.1]
    assert [mb.layer_factor(p, 1) for p in (0, 1, 2)] == [0.0, 0.0, 1.0]
    # SID: its last phase (soft labels) is a stage of its own (issue 25: it is the only phase that
    # trains the classifier), so the intermediate stage is cut into L phases, one more layer each
    assert [sid.phase(type("C", (), {"step": s, "total_steps": 8})()) for s in range(8)] == [0] * 4 + [1] * 4
    assert [sid.layer_factor(p, 0) for p in (0, 1)] == [1.0, 1.0]
    assert [sid.layer_factor(p, 1) for p in (0, 1)] == [0.0, 1.0]
    assert sid.spec.stages == ("intermediate", "prediction")


# ------------------------------------------------------------------ MLM path
def test_masking_collator_and_tied_mlm_head(tok):
    batch = next(iter(loader(tok, True)))
    labels = batch["mlm_labels"]
    assert labels.shape == batch["input_ids"].shape
    specials = torch.isin(labels, torch.tensor(tok.all_special_ids))
    assert not specials.any() and (labels != -100).any()
    model = tiny_bert(tok, layers=2)
    head = attach_mlm_head(model)
    assert head.decoder_weight.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()
    assert head.transform.dense.in_features == 32 and head.bias.shape == (len(tok),)


def test_mlm_adaptation_trains_the_head_only_and_lowers_the_loss(tok):
    model = Teacher("t", tiny_bert(tok, layers=2, dropout=0.0)).model   # frozen, as a team teacher
    encoder = copy.deepcopy(model.bert.state_dict())
    result = adapt_teacher_mlm(model, loader(tok, True), steps=12, lr=5e-3)
    assert result["steps"] == 12 and result["last_mlm_ce"] < result["first_mlm_ce"]
    assert all(torch.equal(v, model.bert.state_dict()[k]) for k, v in encoder.items())
    assert not any(p.requires_grad for p in model.parameters())  # frozen again, head included


def test_word_prediction_method_refuses_a_teacher_without_mlm_head(tok):
    with pytest.raises(AutoSKDError, match="has no MLM head; run its MLM adaptation stage"):
        Distiller(tiny_bert(tok, 2), "distilbert", tiny_bert(tok, 2, seed=4), progress=False)


# ------------------------------------------------------------------ combination by config
def test_combination_runs_one_forward_per_model_and_sums_the_methods(tok, tmp_path):
    teacher, student = tiny_bert(tok, layers=4, seed=1, dropout=0.0), tiny_bert(tok, layers=2, seed=2, dropout=0.0)
    calls = {"teacher": 0, "student": 0}
    teacher.register_forward_hook(lambda *a: calls.__setitem__("teacher", calls["teacher"] + 1))
    student.register_forward_hook(lambda *a: calls.__setitem__("student", calls["student"] + 1))
    terms = []

    class Spy(Callback):
        def on_step_end(self, trainer, ctx, batch, losses):
            terms.append(losses)

    d = Distiller(student, "minilm+minilmv2+kd", teacher, progress=False, checkpoint=False, restore_best=False,
                  callbacks=[Spy()], method_options={})
    d.method.methods["minilmv2"] = get_method("minilmv2", relation_heads=4)
    d.auxiliary = d.method.build_auxiliary(d.auxiliary.parts["kd"].student_geom, d.auxiliary.parts["kd"].teacher_geoms)
    d.ctx.auxiliary = d.auxiliary
    d.fit([Stage("task", loader(tok, False), epochs=1, lr=1e-3, evaluate=False)])
    assert calls == {"teacher": 2, "student": 2}  # 2 steps: one forward per model per step
    keys = set(terms[0])
    # minilmv2's terms carry their layer pair (teacher L12, or its last: issue 25)
    assert {"minilm/attention_kl", "minilmv2/qq_relation_kl:s1-t3", "kd/soft_kl", "hard_ce", "loss"} <= keys
    assert float(terms[0]["loss"]) == approx(sum(float(v) for k, v in terms[0].items() if k != "loss"))
    # YAML form with weights and per-method options
    (tmp_path / "mix.yaml").write_text("methods:\n  - {name: kd, weight: 2.0, options: {temperature: 1}}\n"
                                       "  - {name: pkd, weight: 0.5}\n")
    mix = get_method(str(tmp_path / "mix.yaml"))
    assert mix.weights == {"kd": 2.0, "pkd": 0.5} and mix.methods["kd"].spec.losses[0].temperature == 1.0
    with pytest.raises(AutoSKDError, match="cannot be combined"):
        get_method("kd+tmkd")
    with pytest.raises(AutoSKDError, match="both replace the student's forward"):
        get_method("theseus+glmd")


# ------------------------------------------------------------------ a teacher with its own tokenizer
def test_own_tokenizer_teacher_serves_logit_methods_and_refuses_feature_methods(tok, other_vocab_dir, tmp_path):
    from transformers import AutoTokenizer, BertForSequenceClassification

    from autoskd.engine.own_tokenizer import OwnTokenizerTeacher
    from autoskd.engine.teacher_cache import TeacherOutputCache
    from test_methods_all import TEXTS

    other_tok = AutoTokenizer.from_pretrained(other_vocab_dir)
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(other_vocab_dir, num_labels=2)
    teacher = OwnTokenizerTeacher("roberta-like", model, other_tok, TEXTS, max_length=16)
    batch = next(iter(loader(tok, False)))
    expected = model(**other_tok(TEXTS[:4], padding=True, return_tensors="pt")).logits
    assert torch.allclose(teacher.features(batch, ["logits"])["logits"], expected, atol=1e-5)
    cache = TeacherOutputCache(tmp_path)
    teacher.prepare(loader(tok, False), "toy", cache)
    assert torch.allclose(teacher.logits_table[:4], expected, atol=1e-5) and len(list(tmp_path.iterdir())) == 1
    student = tiny_bert(tok, layers=2)
    Distiller(student, "kd", SingleTeacher(teacher), progress=False, checkpoint=False).fit(
        [Stage("task", loader(tok, False), epochs=1, data_id="toy")])
    with pytest.raises(AutoSKDError, match="uses its own tokenizer.*hidden.*logit-level method"):
        Distiller(tiny_bert(tok, layers=2), "pkd", SingleTeacher(teacher), progress=False, checkpoint=False).fit(
            [Stage("task", loader(tok, False), epochs=1)])
