"""Each method's loss equals a value computed by hand (plain torch, written out here) on fixed
small features -- no models, so these run in milliseconds."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from autoskd.engine.schedules import schedule_value
from autoskd.methods import get_method
from autoskd.models.adapters import Geometry

B, T, H, HEADS, C, V = 3, 4, 8, 2, 2, 12
GS = Geometry(num_layers=2, hidden_size=H, num_heads=HEADS, vocab_size=V, num_labels=C)
GT = Geometry(num_layers=4, hidden_size=H, num_heads=HEADS, vocab_size=V, num_labels=C)
MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]])
LABELS = torch.tensor([0, 1, 1])
MLM = torch.tensor([[-100, 5, -100, 7], [3, -100, -100, -100], [-100, 2, -100, -100]])


def approx(x):
    return pytest.approx(float(x), rel=1e-4, abs=1e-5)


def feats(seed: int, layers: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    out = {"logits": r(B, C), "embeddings": r(B, T, H), "mlm_logits": r(B, T, V)}
    for i in range(layers):
        out[f"hidden:{i}"] = r(B, T, H)
        for k in ("query", "key", "value"):
            out[f"{k}:{i}"] = r(B, HEADS, T, H // HEADS)
        scores = out[f"query:{i}"] @ out[f"key:{i}"].transpose(-1, -2) / math.sqrt(H // HEADS)
        out[f"attention_scores:{i}"] = scores.masked_fill(MASK[:, None, None, :] == 0, torch.finfo(torch.float32).min)
        out[f"attention_probs:{i}"] = torch.softmax(out[f"attention_scores:{i}"], -1)
    return out


S, TF = feats(1, 2), feats(2, 4)


def run(name, stage="task", step=0, total=1, teachers=None, batch=None, **options):
    method = get_method(name, **options)
    teachers = teachers or {"t": GT}
    aux = method.build_auxiliary(GS, teachers)
    ctx = SimpleNamespace(stage=stage, step=step, total_steps=total, auxiliary=aux, teachers=dict.fromkeys(teachers),
                          teacher_name="t", epoch=0, hard_label_weight=None, policy=None)
    batch = batch or {"attention_mask": MASK, "labels": LABELS, "mlm_labels": MLM}
    method.on_step(ctx)
    tf = {n: TF for n in teachers} if len(teachers) > 1 or getattr(method, "combiner", None) else TF
    if isinstance(tf, dict) and "logits" not in tf:
        out = method.losses(ctx, S, tf, None, batch)
    else:
        out = method.losses(ctx, S, TF, "t", batch)
    return method, {k: float(v) for k, v in out.items()}


def kl_t(s, t, tau):  # tau^2 KL(softmax(t/tau) || softmax(s/tau)), rows averaged
    p = F.softmax(t / tau, -1)
    return float((p * (F.log_softmax(t / tau, -1) - F.log_softmax(s / tau, -1))).sum(-1).mean() * tau**2)


def soft_ce(s, t, tau):
    return float(-(F.softmax(t / tau, -1) * F.log_softmax(s / tau, -1)).sum(-1).mean())


def ce(logits=None):
    return float(F.cross_entropy(S["logits"] if logits is None else logits, LABELS))


def test_pkd():
    _, out = run("pkd")
    # skip map for 2 student / 4 teacher layers: (0, 1); normalised [CLS]
    s, t = F.normalize(S["hidden:0"][:, 0], dim=-1), F.normalize(TF["hidden:1"][:, 0], dim=-1)
    assert out["patient_mse:s0-t1"] == approx(100 * ((s - t) ** 2).mean())
    assert out["soft_kl"] == approx(0.5 * kl_t(S["logits"], TF["logits"], 10))
    assert out["hard_ce"] == approx(0.5 * ce())


def test_takd_and_kd_family():
    _, out = run("takd")  # GKD's catalogue (issue 25): KL_10 + hard, weights 1 and 1
    assert out == {"soft_kl": approx(kl_t(S["logits"], TF["logits"], 10)), "hard_ce": approx(ce())}
    _, out = run("pd")
    assert out == {"soft_soft_ce": approx(soft_ce(S["logits"], TF["logits"], 1))}


def test_distilbert_pretrain_terms():
    _, out = run("distilbert", stage="pretrain")
    m = (MLM != -100)
    p_t, lp_s = F.softmax(TF["mlm_logits"] / 2, -1), F.log_softmax(S["mlm_logits"] / 2, -1)
    kl_rows = (p_t * (F.log_softmax(TF["mlm_logits"] / 2, -1) - lp_s)).sum(-1)
    assert out["mlm_soft_kl"] == approx(5 * 4 * kl_rows[m].mean())               # masked tokens only
    cos = 1 - F.cosine_similarity(S["hidden:1"], TF["hidden:3"], dim=-1)
    assert out["hidden_cosine"] == approx(cos[MASK == 1].mean())
    assert out["mlm_ce"] == approx(2 * F.cross_entropy(S["mlm_logits"].reshape(-1, V), MLM.reshape(-1)))


def test_glmd_word_kl_over_every_real_token():
    _, out = run("glmd", stage="task_mlm")
    tau = 15
    rows = (F.softmax(TF["mlm_logits"] / tau, -1) * (F.log_softmax(TF["mlm_logits"] / tau, -1)
                                                      - F.log_softmax(S["mlm_logits"] / tau, -1))).sum(-1)
    assert out == {"word_kl": approx(tau**2 * rows[MASK == 1].mean())}
    _, out = run("glmd", stage="task")
    assert out == {"soft_soft_ce": approx(soft_ce(S["logits"], TF["logits"], 1))}


def test_minilmv2_relations():
    _, out = run("minilmv2", relation_heads=4)  # a 4-layer teacher: its last layer stands in for L12

    def rel(x):  # [B, heads, T, d] -> concat heads -> 4 relation heads -> softmax(XX^T/sqrt(dr)), masked keys
        x = x.transpose(1, 2).reshape(B, T, H).view(B, T, 4, H // 4).transpose(1, 2)
        scores = x @ x.transpose(-1, -2) / math.sqrt(H // 4)
        return torch.softmax(scores.masked_fill(MASK[:, None, None, :] == 0, float("-inf")), -1)

    for k in ("query", "key", "value"):
        a_s, a_t = rel(S[f"{k}:1"]), rel(TF[f"{k}:3"])
        rows = (a_t * (a_t.clamp_min(1e-38).log() - a_s.clamp_min(1e-38).log())).sum(-1)   # [B, R, T]
        w = MASK[:, None, :].expand_as(rows).float()
        assert out[f"{k[0]}{k[0]}_relation_kl:s1-t3"] == approx((rows * w).sum() / w.sum())
    assert out["hard_ce"] == approx(ce())


def test_minilmv2_reads_the_teachers_twelfth_layer():
    """GKD's catalogue (issue 25): teacher L12 <-> student last; a shallower teacher gives its last,
    ``teacher_layer`` any other (0-based, negative from the end)."""
    def teacher_layers(layers, **options):
        geom = Geometry(num_layers=layers, hidden_size=H, num_heads=HEADS, vocab_size=V, num_labels=C)
        aux = get_method("minilmv2", relation_heads=4, **options).build_auxiliary(GS, {"t": geom})
        return {stage: aux.feature_requests(stage, "t") for stage in ("task", "pretrain")}

    for stage, (student, teacher) in teacher_layers(24).items():
        assert student[:3] == ["query:1", "key:1", "value:1"] and teacher == ["query:11", "key:11", "value:11"]
    assert teacher_layers(12)["task"][1] == ["query:11", "key:11", "value:11"]
    assert teacher_layers(6)["task"][1] == ["query:5", "key:5", "value:5"]
    assert teacher_layers(24, teacher_layer=-1)["task"][1] == ["query:23", "key:23", "value:23"]
    assert teacher_layers(24, teacher_layer=20)["pretrain"][1] == ["query:20", "key:20", "value:20"]


def test_alp_kd():
    _, out = run("alp_kd")
    t = torch.stack([TF[f"hidden:{j}"][:, 0] for j in range(4)], 1)
    terms = []
    for i in range(2):
        s = S[f"hidden:{i}"][:, 0]
        a = torch.softmax(torch.einsum("bh,blh->bl", s, t), -1)
        terms.append(((s - (a[..., None] * t).sum(1)) ** 2).mean())
    assert out["alp_mse"] == approx(0.2 * sum(terms) / 2)
    assert out["soft_soft_ce"] == approx(0.7 * soft_ce(S["logits"], TF["logits"], 20))
    assert out["hard_ce"] == approx(0.1 * ce())


def test_minilm_terms_also_in_pretraining():
    """GKD's catalogue (issue 25): MiniLM distils in pre-training (pt -> ft); the task stage keeps
    the terms with gold labels (our deviation), and the pre-training stage has no labels."""
    method, task = run("minilm")
    _, pre = run("minilm", stage="pretrain")
    assert method.spec.stages == ("task",)
    assert set(pre) == {"attention_kl", "value_relation_kl"} and set(task) == set(pre) | {"hard_ce"}
    assert pre["attention_kl"] == approx(task["attention_kl"])
    a_s, a_t = S["attention_probs:1"], TF["attention_probs:3"]
    rows = (a_t * (a_t.clamp_min(1e-38).log() - a_s.clamp_min(1e-38).log())).sum(-1)   # [B, heads, T]
    w = MASK[:, None, :].expand_as(rows).float()
    assert pre["attention_kl"] == approx((rows * w).sum() / w.sum())


def test_universal_kd_attends_over_the_teachers_intermediate_layers():
    """GKD's catalogue (issue 25): [CLS] of H_1..H_{L-1} on both sides, one Linear per teacher layer."""
    method = get_method("universal_kd")
    aux = method.build_auxiliary(GS, {"t": GT})
    projections = aux.extra["proj_t"]
    assert len(projections) == 3                                   # teacher H_1..H_3 of 4 layers
    ctx = SimpleNamespace(stage="intermediate", auxiliary=aux, teacher_name="t", step=0, total_steps=1, epoch=0,
                          hard_label_weight=None)
    student, teacher = method.feature_requests(ctx, "t")
    assert [f for f in teacher if f.startswith("hidden:")] == ["hidden:0", "hidden:1", "hidden:2"]
    assert "hidden:0" in student and "hidden:1" not in student   # student H_1 of 2 layers
    out = method.losses(ctx, S, TF, "t", {"attention_mask": MASK, "labels": LABELS})
    with torch.no_grad():
        t = torch.stack([projections[j](TF[f"hidden:{j}"][:, 0]) for j in range(3)], 1)
        s = S["hidden:0"][:, 0]
        a = torch.softmax(torch.einsum("bh,blh->bl", s, t), -1)
        target = (a[..., None] * t).sum(1)
        expected = (F.softmax(target, -1) * (F.log_softmax(target, -1) - F.log_softmax(s, -1))).sum(-1).mean()
    assert float(out["universal_kl"].detach()) == approx(0.5 * expected)
    assert float(out["soft_kl"].detach()) == approx(0.5 * kl_t(S["logits"], TF["logits"], 1))


def _angles_by_hand(xs, xt, real, k):
    """MGSKD's top-k triplet angles, written out: per anchor a, its k nearest others by the
    teacher's cosine (real ones first), the angles at a among pairs of real neighbours."""
    diffs = []
    for b in range(xs.shape[0]):
        for a in range(xs.shape[1]):
            if not real[b, a]:
                continue
            others = [j for j in range(xs.shape[1]) if j != a]
            sim = {j: float(F.cosine_similarity(xt[b, a], xt[b, j], dim=0)) if real[b, j] else -3.0 for j in others}
            nb = sorted(others, key=lambda j: -sim[j])[:k]
            for j in nb:
                for l in nb:
                    if j == l or not (real[b, j] and real[b, l]):
                        continue
                    cs = float(F.cosine_similarity(xs[b, j] - xs[b, a], xs[b, l] - xs[b, a], dim=0))
                    ct = float(F.cosine_similarity(xt[b, j] - xt[b, a], xt[b, l] - xt[b, a], dim=0))
                    diffs.append(float(F.smooth_l1_loss(torch.tensor(cs), torch.tensor(ct))))
    return sum(diffs) / len(diffs)


def test_mgskd_token_and_span_triplet_angles():
    """GKD's catalogue (issue 25): lower layers match token and span pair relations *and* their
    top-20 triplet angles (smooth L1), neighbours by the teacher's cosine similarity."""
    _, out = run("mgskd", stage="intermediate", top_k=2)
    assert {k.split(":")[0] for k in out} == {"token_pair_mse", "span_pair_mse", "token_angle_huber"}
    for s, t in ((0, 1), (1, 3)):
        assert out[f"token_angle_huber:s{s}-t{t}"] == approx(
            _angles_by_hand(S[f"hidden:{s}"], TF[f"hidden:{t}"], MASK.bool(), 2))
    # spans: 4-token windows of 12 tokens (3 spans; the second row's last span is padding)
    g = torch.Generator().manual_seed(5)
    student = {f"hidden:{i}": torch.randn(2, 12, H, generator=g) for i in range(2)}
    teacher = {f"hidden:{j}": torch.randn(2, 12, H, generator=g) for j in range(4)}
    student["logits"], teacher["logits"] = torch.randn(2, C, generator=g), torch.randn(2, C, generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    method = get_method("mgskd")
    aux = method.build_auxiliary(GS, {"t": GT})
    ctx = SimpleNamespace(stage="intermediate", auxiliary=aux, teacher_name="t", step=0, total_steps=1, epoch=0,
                          hard_label_weight=None)
    out = method.losses(ctx, student, teacher, "t", {"attention_mask": mask})

    def spans(x):  # mean of the real tokens of each 4-token window
        m = mask[:, :, None].float()
        return (x * m).view(2, 3, 4, -1).sum(2) / m.view(2, 3, 4, 1).sum(2).clamp_min(1)

    real = mask.view(2, 3, 4).sum(-1) > 0
    assert real.tolist() == [[True, True, True], [True, True, False]]
    for s, t in ((0, 1), (1, 3)):
        xs, xt = spans(student[f"hidden:{s}"]), spans(teacher[f"hidden:{t}"])
        assert float(out[f"span_angle_huber:s{s}-t{t}"]) == approx(_angles_by_hand(xs, xt, real, 20))
        assert float(out[f"token_angle_huber:s{s}-t{t}"]) == approx(
            _angles_by_hand(student[f"hidden:{s}"], teacher[f"hidden:{t}"], mask.bool(), 20))


def test_continuation_kd_at_three_steps():
    for step in (0, 5, 9):
        _, out = run("continuation_kd", step=step, total=10)
        p = step / 10
        phi, psi = schedule_value("annealing", p), min(1.0, p / 1.332) if p < 0.666 else 1.0
        m = ((S["logits"] - phi * TF["logits"]) ** 2).mean(-1)
        assert out["annealed_mse"] == approx((1 - psi) * (m * (m > phi)).mean())
        assert out.get("hard_ce", 0.0) == approx(psi * ce())


def test_lrc_bert_prediction_stage():
    _, out = run("lrc_bert", stage="prediction")
    assert out["hard_ce"] == approx(3 * ce())
    assert out["soft_kl"] == approx(kl_t(S["logits"], TF["logits"], 1.1))
    assert {k for k in out if k.startswith("contrastive")} == {"contrastive_cos_nce:s0-t1", "contrastive_cos_nce:s1-t3"}


def test_dgkd_random_survival_and_tmkd_mean():
    teachers = {"a": GT, "b": GT}
    method, out = run("dgkd", teachers=teachers, seed=0)
    g = torch.Generator().manual_seed(0)
    keep = (torch.rand(2, generator=g) < 0.75).tolist()
    if not any(keep):
        keep[int(torch.randint(2, (1,), generator=g))] = True
    expected = {f"{n}/soft_soft_ce" for n, k in zip("ab", keep) if k}
    assert {k for k in out if k != "hard_ce"} == expected
    for k in expected:
        assert out[k] == approx(0.5 * soft_ce(S["logits"], TF["logits"], 10))
    assert out["hard_ce"] == approx(0.5 * ce())


def test_rail_kd_uses_the_epoch_draw():
    method, out = run("rail_kd")
    drawn = method.drawn["t"]
    assert len(drawn) == 1 and 0 <= drawn[0] < 3
    assert out["soft_soft_ce"] == approx(soft_ce(S["logits"], TF["logits"], 10) / 3)
    assert out["hard_ce"] == approx(ce() / 3)
    assert 0 < out["rail_mse"] <= 4 / 128 / 3  # MSE of unit vectors in 128 dims (<= 4/128), x 1/3
