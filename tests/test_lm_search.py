"""The AutoSKD search on teams of language models: the θ step's token losses and gradients, the
sampled LM policy (SSWO tempering, CR mixtures), and the whole search on a tiny team.

Tiny random Llama models and a BPE tokenizer trained offline (tests/lm_helpers.py).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from autoskd.engine.token_losses import TopK, forward_kl, soft_cross_entropy, temper_topk
from autoskd.errors import AutoSKDError
from autoskd.lm.data import LMCorpus, make_lm_loader, tokenize_lm_split
from autoskd.lm.teachers import LMTeacher, SampledLMTeachers, TopKSet, average_topk
from autoskd.search.bilevel import exact_unrolled_theta_grad, unrolled_theta_grad
from autoskd.search.distribution import TeacherDistribution
from autoskd.search.lm_search import LMSearchConfig, run_lm_search
from autoskd.search.lm_theta import LMThetaStep, next_token_ce
from autoskd.search.theta_step import ThetaConfig
from lm_helpers import bpe_tokenizer, documents, tiny_llama


@pytest.fixture(scope="module")
def tok():
    from autoskd.lm.data import ensure_pad_token

    return ensure_pad_token(bpe_tokenizer())


def _topk(n=6, v=40, k=5, seed=0, temperature=1.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, v, generator=g) * 2
    lp, ids = torch.log_softmax(logits / temperature, -1).topk(k, -1)
    return logits, TopK(ids, lp, temperature)


# ---------------------------------------------------------------------------------------- losses
def test_soft_cross_entropy_is_forward_kl_plus_the_teachers_entropy():
    student = torch.randn(6, 40)
    logits, top = _topk()
    for teacher in (logits, top):  # dense and top-k (k + 1 buckets)
        if isinstance(teacher, TopK):
            lp = torch.cat([top.logprobs, top.tail.clamp_min(1e-38).log()[:, None]], -1)
        else:
            lp = torch.log_softmax(teacher, -1)
        entropy = -(lp.exp() * lp).sum(-1).mean()
        ce = soft_cross_entropy(student, teacher)
        assert torch.allclose(ce, forward_kl(student, teacher) + entropy, atol=1e-5)


def test_temper_topk_is_the_identity_at_one_and_sharpens_like_scaled_logits():
    logits, top = _topk(v=40, k=40)  # k = V: the tempered cache equals softmax(c * z) exactly
    same = temper_topk(top, 1.0, 40)
    assert torch.allclose(same.logprobs, top.logprobs, atol=1e-5)
    for c in (0.25, 3.0):
        tempered = temper_topk(top, c, 40)
        exact = torch.log_softmax(c * logits, -1).gather(-1, top.ids)
        assert torch.allclose(tempered.logprobs, exact, atol=1e-4)
    _, sparse = _topk(v=40, k=5)
    scale = torch.tensor(0.5, requires_grad=True)
    flat = temper_topk(sparse, scale, 40)
    assert float(flat.tail.mean().detach()) > float(sparse.tail.mean())  # flatter: more mass in the tail
    flat.logprobs.sum().backward()
    assert scale.grad is not None and torch.isfinite(scale.grad)


def test_weighted_topk_mixture_is_the_mixture_of_distributions():
    la, a = _topk(seed=1, k=40)
    lb, b = _topk(seed=2, k=40)
    mixed = average_topk([a, b], 40, weights=[0.25, 0.75])
    dense = torch.zeros(6, 40).scatter(1, mixed.ids, mixed.logprobs.exp())
    assert torch.allclose(dense, 0.25 * la.softmax(-1) + 0.75 * lb.softmax(-1), atol=1e-5)


# ---------------------------------------------------------------------------------------- θ step
@pytest.fixture(scope="module")
def lm_setup(tok):
    docs = documents(60)
    rows = tokenize_lm_split(docs[:40], tok, 16)
    val_rows = tokenize_lm_split(docs[40:], tok, 16)
    train, val = make_lm_loader(rows, 4, shuffle=False), make_lm_loader(val_rows, 4, shuffle=False)
    teachers = {f"t{i}": LMTeacher(f"t{i}", tiny_llama(len(tok), layers=2, seed=20 + i).eval(), f"fp{i}", top_k=8,
                                   temperatures=[1.0]) for i in range(3)}
    for t in teachers.values():
        t.prepare(train, "train-rows", progress=False)
    return tok, train, val, teachers


def _theta_step(lm_setup, config: ThetaConfig):
    tok, train, val, teachers = lm_setup
    dist = TeacherDistribution([0.2, 0.3, 0.5])
    policy = SampledLMTeachers(teachers, dist.theta, scaling=config.scaling)
    step = LMThetaStep(dist, policy, val, config, m=0, val_id="val-rows")
    return step, dist, next(iter(train)), next(iter(val))


@pytest.mark.parametrize("strategy,scaling,objective", [("sswo", "theta", "distill"), ("expected", "none", "task"),
                                                        ("cr", "none", "distill"), ("expected", "n", "distill")])
def test_lm_theta_gradient_matches_autograd_through_the_virtual_step(lm_setup, strategy, scaling, objective):
    """The finite-difference second-order θ-gradient equals the exact one (autograd through
    w' = w - xi grad_w L_train) on token-level losses over cached top-k teachers."""
    config = ThetaConfig(strategy=strategy, scaling=scaling, val_objective=objective, order="second", xi=0.05)
    step, dist, batch, val_batch = _theta_step(lm_setup, config)
    student = tiny_llama(len(lm_setup[0]), layers=1, seed=7).eval()
    student.config._attn_implementation = "eager"  # SDPA on CPU has no double backward (the exact oracle)
    train_loss, val_loss = step.loss_closures(student, batch, val_batch, 1)
    approx = unrolled_theta_grad(student, dist.theta, train_loss, val_loss, xi=0.05, order="second", fd_eps=1e-3)
    exact = exact_unrolled_theta_grad(student, dist.theta, train_loss, val_loss, xi=0.05)
    assert exact.abs().max() > 0
    assert torch.allclose(approx, exact, rtol=2e-2, atol=1e-6), (approx, exact)
    if strategy == "sswo":  # only the sampled teacher's entry moves
        assert exact[0] == 0 and exact[2] == 0


def test_val_targets_are_the_val_split_and_the_teacher_keeps_serving_train(lm_setup):
    step, _, batch, val_batch = _theta_step(lm_setup, ThetaConfig(strategy="expected", scaling="none",
                                                                  val_objective="task"))
    teacher = step.policy.teachers["t0"]
    live = torch.log_softmax(teacher.model(input_ids=val_batch["input_ids"]).logits, -1)
    got = step._teacher_logits(val_batch, step.val_tables)[0]
    assert torch.allclose(got.logprobs.float(), live.topk(8, -1).values, atol=2e-3)  # fp16 cache
    train_rows = step._teacher_logits(batch, None)[0]
    live_train = torch.log_softmax(teacher.model(input_ids=batch["input_ids"]).logits, -1)
    assert torch.allclose(train_rows.logprobs.float(), live_train.topk(8, -1).values, atol=2e-3)


def test_task_objective_is_the_students_next_token_loss(lm_setup, tok):
    _, _, _, val_batch = _theta_step(lm_setup, ThetaConfig(strategy="expected", scaling="none", val_objective="task"))
    student = tiny_llama(len(tok), layers=1, seed=8)
    logits = student(input_ids=val_batch["input_ids"]).logits
    ppl_loss = next_token_ce(logits, val_batch)
    targets = val_batch["target_ids"]
    manual = -torch.log_softmax(logits, -1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    counted = targets != -100
    assert torch.allclose(ppl_loss, manual[counted].mean(), atol=1e-5)


def test_sampled_lm_policy_tempers_the_drawn_teacher_and_mixes_distributions(lm_setup):
    tok, train, _, teachers = lm_setup
    batch = next(iter(train))
    theta = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    sswo = SampledLMTeachers(teachers, theta, scaling="n")
    got = sswo.features("t2", batch, ["lm_logits"])["lm_logits"].at(1.0)
    raw = teachers["t2"].features(batch, ["lm_logits"])["lm_logits"].at(1.0)
    want = temper_topk(raw, 3 * 0.5, len(tok))  # n * theta_i
    assert torch.allclose(got.logprobs, want.logprobs)
    plain = SampledLMTeachers(teachers, theta, scaling="none")
    assert torch.equal(plain.features("t2", batch, ["lm_logits"])["lm_logits"].at(1.0).logprobs, raw.logprobs)
    plain.mixture = True
    assert plain.choose(0) == plain.MIXTURE
    mixed = plain.features(plain.MIXTURE, batch, ["lm_logits"])["lm_logits"]
    assert isinstance(mixed, TopKSet) and mixed.at(1.0).k == 24  # the union of three top-8 sets


def test_a_mixture_arm_trains_every_step_on_the_theta_mixture_and_a_sampled_one_draws(lm_setup, tmp_path):
    """``candidate_policy: mixture``: the arm's policy is the θ-mixture at every step (no draw),
    weighted by the arm's θ; a ``candidate`` arm with the same θ draws one teacher per step. A
    team with an own-tokenizer teacher cannot be mixed; a classifier arm refuses the kind."""
    from types import SimpleNamespace

    from autoskd.lm.pipeline import LMDistillConfig, lm_policy
    from autoskd.lm.recipes import decoder_method
    from autoskd.pipeline import DistillConfig
    from autoskd.search.arms import Arm, candidate_arms
    from autoskd.search.lm_search import lm_arm_config

    tok, _, _, teachers = lm_setup
    team = SimpleNamespace(teachers={n: t.model for n, t in teachers.items()}, own_tokenizers={},
                           fingerprints={n: f"fp-{n}" for n in teachers}, tokenizer=tok)
    base = LMDistillConfig(top_k=8)
    mixed, drawn = candidate_arms([[1, 1, 2]], kind="mixture")[0], candidate_arms([[1, 1, 2]])[0]
    assert (mixed.kind, mixed.group, drawn.kind, drawn.group) == ("mixture", "autoskd", "candidate", "autoskd")
    policy = lm_policy(team, lm_arm_config(mixed, base), decoder_method("kd"), tmp_path)
    assert policy.mixture and policy.choose(0) == policy.MIXTURE and policy.step_names() == [policy.MIXTURE]
    assert torch.allclose(policy.theta, torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64))
    sampled = lm_policy(team, lm_arm_config(drawn, base), decoder_method("kd"), tmp_path)
    assert not sampled.mixture and sampled.choose(0) in teachers
    with pytest.raises(AutoSKDError, match="cannot be mixed"):
        lm_policy(SimpleNamespace(**{**vars(team), "own_tokenizers": {"t2": tok}}), lm_arm_config(mixed, base),
                  decoder_method("kd"), tmp_path)
    with pytest.raises(AutoSKDError, match="classifier search samples"):
        Arm("candidate-00", "mixture", theta=[0.5, 0.5]).distill_config(DistillConfig())
    with pytest.raises(AutoSKDError, match="candidate_policy"):
        LMSearchConfig(candidate_policy="dirichlet")
    # sampled (the only policy before the setting existed) leaves earlier searches' stamps as they were
    assert "candidate_policy" not in LMSearchConfig(candidate_policy="sampled").computed()
    assert LMSearchConfig().candidate_policy == "mixture" and LMSearchConfig().computed()["candidate_policy"] == "mixture"


def test_teacher_mixture_objective_reads_each_teachers_probability_of_the_next_token(lm_setup):
    """The LM ``teacher_mixture`` objective: each teacher's probability of the actual next token
    from its cached val rows (the cached probability in the top k, else the tail's even share),
    mixed by θ; its θ-gradient is that likelihood's, and θ steps on it reach the mixture weights
    EM finds (the likelihood is concave in θ)."""
    tok, _, val, teachers = lm_setup
    config = ThetaConfig(strategy="expected", scaling="none", val_objective="teacher_mixture", lr=0.05, center=True)
    step, dist, batch, val_batch = _theta_step(lm_setup, config)
    targets = val_batch["target_ids"]
    counted = targets != -100
    rows = []
    for t in teachers.values():
        probs = torch.softmax(t.model(input_ids=val_batch["input_ids"]).logits.float(), -1)
        top = probs.topk(8, -1)
        p_true = probs.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
        inside = (top.indices == targets.clamp_min(0)[..., None]).any(-1)
        rows.append(torch.where(inside, p_true, (1 - top.values.sum(-1)) / (len(tok) - 8))[counted])
    live = torch.stack(rows).double()
    got = step._token_likelihoods(step._teacher_logits(val_batch, step.val_tables), val_batch)
    assert got.shape == live.shape and torch.allclose(got, live, rtol=2e-2, atol=1e-6)  # fp16 cache
    student = tiny_llama(len(tok), layers=1, seed=7).eval()
    theta = dist.theta.detach().clone().requires_grad_(True)
    want = torch.autograd.grad(-(theta[:, None] * got).sum(0).log().mean(), theta)[0]
    grad = step.theta_grad(student, batch, val_batch, None, xi=0.1)
    assert torch.allclose(grad, want - want.mean(), atol=1e-6)  # centred
    with pytest.raises(AutoSKDError, match="theta.center"):
        ThetaConfig(strategy="expected", scaling="none", val_objective="teacher_mixture")


def test_theta_steps_on_the_mixture_likelihood_reach_ems_weights_inside_the_simplex():
    """Complementary teachers (each right on its own share of the tokens, one useless): Adam on θ
    with the centred ``teacher_mixture`` gradient ends where EM does, an interior point, the useless
    teacher at 0 and the two specialists in proportion to their shares."""
    from autoskd.search.distribution import ThetaOptimizer
    from autoskd.search.theta_step import mixture_nll, support_centred

    likelihoods = torch.tensor([[0.6] * 70 + [0.05] * 30, [0.05] * 70 + [0.6] * 30, [0.02] * 100],
                               dtype=torch.float64)
    em = torch.full((3,), 1 / 3, dtype=torch.float64)
    for _ in range(500):
        em = torch.softmax(likelihoods.log() + em.log()[:, None], 0).mean(1)
    dist = TeacherDistribution([1 / 3] * 3)
    opt = ThetaOptimizer(dist, strategy="expected", lr=0.02, weight_decay=0.0)
    for _ in range(400):
        theta = dist.theta.detach().clone().requires_grad_(True)
        grad = torch.autograd.grad(mixture_nll(likelihoods, theta), theta)[0]
        opt.step(support_centred(grad, dist.theta, dist.active))  # as the θ step centres it
    assert em[2] < 1e-3 and 0.6 < float(em[0]) < 0.8  # EM: interior on the specialists' edge
    assert torch.allclose(dist.probs().double(), em, atol=0.03), (dist.probs(), em)


def test_sswo_needs_a_scaling_and_cross_tokenizer_teachers_refuse_tempering():
    with pytest.raises(AutoSKDError, match="none: expected or cr only"):
        ThetaConfig(strategy="sswo", scaling="none")
    ThetaConfig(strategy="expected", scaling="none")  # allowed: θ enters as the draw's weights


# ---------------------------------------------------------------------------------------- the whole search
@pytest.fixture(scope="module")
def lm_team_files(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("lmsearch")
    sources = {}
    for name, layers, seed in (("big", 3, 30), ("small", 1, 31)):
        model = tiny_llama(len(tok), layers=layers, hidden=32, seed=seed)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        sources[name] = str(root / name)
    team = root / "team.yaml"
    team.write_text(f"kind: lm\nmax_length: 16\nstudent: {{source: {sources['big']}, layers: 1}}\nteachers:\n"
                    f"  - {{name: big, source: {sources['big']}}}\n"
                    f"  - {{name: adapted, source: {sources['big']}, train: {{method: finetune, steps: 6, lr: 0.005}}}}\n"
                    f"  - {{name: small, source: {sources['small']}}}\n")
    corpus = root / "docs.txt"
    corpus.write_text("\n".join(documents(200, seed=3)))
    return team, corpus


def test_lm_search_runs_end_to_end_keeps_the_best_student_and_resumes(lm_team_files, tmp_path, monkeypatch):
    team, corpus = lm_team_files
    config = LMSearchConfig(search_epochs=2, eval_epochs=1, lr=3e-3, batch_size=8, n_random=1, top_k=8,
                            theta=ThetaConfig(strategy="expected", scaling="none", val_objective="task",
                                              order="second", xi="student_lr", lr=0.05, num_candidates=2))
    out = tmp_path / "search"
    summary = run_lm_search(team, {"name_or_path": f"lm:{corpus}"}, config, out, cache_dir=tmp_path / "cache",
                            progress=False)
    names = {a["name"] for a in summary["arms"]}
    assert names == {"candidate-00", "candidate-01", "single-big", "single-adapted", "single-small", "avgkd",
                     "uniform", "random-000"}
    assert not summary["failed"]
    assert summary["best"]["dev_ppl"] == min(a["dev_ppl"] for a in summary["arms"])
    search = json.loads((out / "search.json").read_text())
    assert search["theta_steps"] > 0 and len(search["candidates"]) == 2
    assert abs(sum(search["theta"]) - 1) < 1e-6 and search["theta"] != [1 / 3] * 3  # θ moved
    assert (out / "student" / "config.json").exists() and (out / "search.png").exists()
    kept = [p.parent.name for p in (out / "trials").glob("*/student")]
    assert kept == [summary["best"]["name"]]  # the other arms' students are not kept
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "student")
    # a rerun resumes: nothing trains again
    monkeypatch.setattr("autoskd.lm.pipeline.distill_lm", lambda *a, **k: pytest.fail("retrained"))
    again = run_lm_search(team, {"name_or_path": f"lm:{corpus}"}, config, out, cache_dir=tmp_path / "cache",
                          progress=False)
    assert again["best"] == summary["best"]
    from autoskd.rerun import RerunMismatch

    with pytest.raises(RerunMismatch, match="loss"):
        run_lm_search(team, {"name_or_path": f"lm:{corpus}"}, LMSearchConfig(**{**config.to_dict(), "loss": "tvd"}),
                      out, cache_dir=tmp_path / "cache", progress=False)


def test_autoskd_search_on_an_lm_task_runs_from_the_cli_and_says_what_it_kept(lm_team_files, tmp_path, capsys):
    """``autoskd search --task lm:<corpus>`` routes to the LM search with the ``lm-quick`` preset;
    every setting a user can pass lands in the resolved experiment file."""
    import yaml

    from autoskd.cli import main

    team, corpus = lm_team_files
    out = tmp_path / "run"
    code = main(["search", "--team", str(team), "--task", f"lm:{corpus}", "--out", str(out), "--candidates", "1",
                 "--random", "0", "--baselines", "single,avgkd", "--cache-dir", str(tmp_path / "cache"),
                 "--candidate-policy", "mixture", "--strategy", "cr", "--val-objective", "teacher_mixture",
                 "--set", "search.max_steps=6", "--set", "search.lr=0.003", "--set", "search.top_k=8",
                 "--set", "search.method_options.loss=reverse_kl", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "best:" in printed and "AutoModelForCausalLM" in printed
    resolved = yaml.safe_load((out / "experiment.yaml").read_text())
    assert resolved["search"]["preset"] == "lm-quick" and resolved["search"]["theta"]["strategy"] == "cr"
    assert resolved["search"]["theta"]["val_objective"] == "teacher_mixture"
    assert resolved["search"]["theta"]["center"] is True  # the centred θ-gradient (lm_theta_defaults says why)
    config = json.loads((out / "config.json").read_text())
    assert config["loss"] == "reverse_kl" and config["max_steps"] == 6 and config["top_k"] == 8
    result = json.loads((out / "result.json").read_text())
    assert {a["name"] for a in result["arms"]} == {"candidate-00", "single-big", "single-adapted", "single-small",
                                                  "avgkd"}
    assert resolved["search"]["candidate_policy"] == "mixture"
    assert {a["kind"] for a in result["arms"] if a["group"] == "autoskd"} == {"mixture"}  # trained on the θ-mixture
    search = json.loads((out / "search.json").read_text())
    assert search["theta_steps"] > 0 and search["theta"] != [1 / 3] * 3  # θ moved on the mixture's likelihood
    assert all(a["steps"] == 6 for a in result["arms"])
    # bad input: one line, exit 2, nothing trained
    assert main(["search", "--team", str(team), "--task", f"lm:{corpus}", "--out", str(tmp_path / "bad"),
                 "--set", "search.method_options.gamma=0.5", "--cache-dir", str(tmp_path / "cache"),
                 "--no-progress"]) == 2
    assert "gamma" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["smollm2", "smollm2-ladder", "smollm2-gemma", "smollm2-genres", "smollm2-specialists"])
def test_bundled_lm_teams_parse_and_the_ladder_and_mixed_team_are_what_the_issue_asks(name):
    from autoskd.lm.team import LMTeam

    team = LMTeam.from_yaml(name)
    if name == "smollm2-ladder":  # four teachers of different size and quality from one checkpoint
        specs = team.teacher_specs
        assert len(specs) == 4 and {specs["half"].layers, len(specs["quarter"].layers)} == {15, 8}
        assert specs["domain"].train.method == "finetune" and specs["half"].train.teacher == "full"
    if name == "smollm2-genres":  # two specialists, each trained on one genre of the two-genre corpus
        specs = team.teacher_specs
        assert list(specs) == ["full", "reviews", "plots"] and specs["full"].train is None
        assert (specs["reviews"].train.corpus, specs["plots"].train.corpus) == ("rotten_tomatoes", "rotten_tomatoes_plots")
    if name == "smollm2-specialists":  # the genre specialists plus a smaller healed cut: four teachers
        specs = team.teacher_specs
        assert list(specs) == ["full", "reviews", "plots", "quarter"] and len(specs["quarter"].layers) == 8
        assert specs["quarter"].train.method == "kd" and specs["quarter"].train.teacher == "full"
        genres = LMTeam.from_yaml("smollm2-genres").teacher_specs  # the same specialists, so their cache is shared
        assert all(specs[n] == genres[n] for n in ("full", "reviews", "plots"))
    if name == "smollm2-gemma":  # one teacher reads the text with its own tokenizer
        assert team.teacher_specs["gemma"].tokenizer == "own" and team.teacher_specs["smollm2"].tokenizer is None


# ---------------------------------------------------------------------------------------- a team that mixes tokenizers
@pytest.fixture(scope="module")
def mixed_team_files(tmp_path_factory, tok):
    """A team whose teacher ``same`` shares the student's tokenizer and whose teacher ``other``
    reads the text with its own (another byte-level BPE, another vocabulary, a BOS at every
    document start: tests/test_cross_tokenizer.py's tokenizer B)."""
    from test_cross_tokenizer import byte_bpe_b

    root = tmp_path_factory.mktemp("lmsearch-mixed")
    other = byte_bpe_b()
    tiny_llama(len(tok), layers=2, hidden=32, seed=40).save_pretrained(root / "same")
    tok.save_pretrained(root / "same")
    tiny_llama(len(other), layers=2, hidden=32, seed=41).save_pretrained(root / "other")
    other.save_pretrained(root / "other")
    team = root / "team.yaml"
    team.write_text(f"kind: lm\nmax_length: 16\nstudent: {{source: {root / 'same'}, layers: 1, init: random}}\n"
                    f"teachers:\n  - {{name: same, source: {root / 'same'}}}\n"
                    f"  - {{name: other, source: {root / 'other'}, tokenizer: own}}\n")
    corpus = root / "docs.txt"
    corpus.write_text("\n".join(documents(120, seed=3)))
    return team, corpus, other


def _cache_keys(folder) -> list[dict]:
    from safetensors import safe_open

    keys = []
    for path in sorted(folder.glob("topk-*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            keys.append(json.loads(f.metadata()["key"]))
    return keys


def test_lm_search_on_a_team_that_mixes_tokenizers(mixed_team_files, tmp_path, monkeypatch):
    """The θ search, its candidates and every baseline run on a team with one teacher of the
    student's tokenizer and one with its own: θ spans both, the own-tokenizer teacher moves θ
    (a non-zero θ-gradient through its uld_hybrid loss), its top-k cache is keyed on its own
    tokenisation, and AvgKD (one vocabulary only) is left out of ``all`` rather than failing."""
    from autoskd.lm.data import lm_data_id, tokenizer_fingerprint
    from autoskd.lm.team import LMTeam
    from autoskd.search import theta_step
    from autoskd.search.lm_search import corpus_of

    team_path, corpus_path, other_tok = mixed_team_files
    grads = []
    real = theta_step.unrolled_theta_grad

    def recording(*args, **kwargs):
        grad = real(*args, **kwargs)
        grads.append(grad.detach().clone())
        return grad

    monkeypatch.setattr(theta_step, "unrolled_theta_grad", recording)
    config = LMSearchConfig(search_epochs=1, eval_epochs=1, max_steps=6, lr=3e-3, batch_size=8, n_random=1, top_k=8,
                            theta=ThetaConfig(strategy="expected", scaling="none", val_objective="task",
                                              order="second", xi="student_lr", lr=0.05, num_candidates=2))
    out, cache = tmp_path / "search", tmp_path / "cache"
    summary = run_lm_search(team_path, {"name_or_path": f"lm:{corpus_path}"}, config, out, cache_dir=cache,
                            progress=False)
    # θ over both teachers, moved by both: the own-tokenizer teacher's gradient entry is non-zero
    search = json.loads((out / "search.json").read_text())
    assert search["teachers"] == ["same", "other"] and len(search["theta"]) == 2
    assert abs(sum(search["theta"]) - 1) < 1e-6 and search["theta"] != [0.5, 0.5]
    assert search["theta_steps"] > 0 and search["nonfinite_theta_steps"] == 0 and len(search["candidates"]) == 2
    assert search["counts"].get("same", 0) > 0 and search["counts"].get("other", 0) > 0  # both taught the student
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    assert any(abs(float(g[1])) > 0 for g in grads) and any(abs(float(g[0])) > 0 for g in grads)
    assert all(math.isfinite(search[k]) for k in ("val_ppl", "test_ppl"))
    # every arm finished with a finite dev perplexity; AvgKD cannot average two vocabularies
    assert not summary["failed"], summary["failed"]
    assert {a["name"] for a in summary["arms"]} == {"candidate-00", "candidate-01", "single-same", "single-other",
                                                   "uniform", "random-000"}
    assert all(math.isfinite(a["dev_ppl"]) and a["dev_ppl"] > 1 and a["steps"] == 6 for a in summary["arms"])
    assert summary["best"]["dev_ppl"] == min(a["dev_ppl"] for a in summary["arms"])
    assert (out / "student" / "config.json").exists()
    # mixtures need one vocabulary: the default mixture candidates fell back to sampled ones, and
    # the lm-quick θ settings (CR, teacher_mixture) fall back to the task objective the same way
    assert {a["kind"] for a in summary["arms"] if a["group"] == "autoskd"} == {"candidate"}
    assert json.loads((out / "config.json").read_text())["candidate_policy"] == "sampled"
    from autoskd.search.lm_search import one_vocabulary_settings

    fitted = one_vocabulary_settings(team_path, LMSearchConfig())
    assert (fitted.candidate_policy, fitted.theta.strategy, fitted.theta.val_objective) == ("sampled", "expected", "task")
    # the own-tokenizer teacher's tables are keyed on its own tokenisation of each split
    team = LMTeam.from_yaml(team_path).build(seed=0, cache_dir=cache, progress=False)
    corpus = corpus_of({"name_or_path": f"lm:{corpus_path}"}, 0)
    keys = _cache_keys(cache / "lm_topk")
    own = [k["data"] for k in keys if k["teacher"] == team.fingerprints["other"]]
    shared = [k["data"] for k in keys if k["teacher"] == team.fingerprints["same"]]
    student_ids = {s: lm_data_id(corpus, s, team.tokenizer, 16, "packed") for s in ("train", "val")}
    assert set(shared) == set(student_ids.values())  # the student's token rows of train and val
    own_tok = team.own_tokenizers["other"]
    assert own_tok.get_vocab() == other_tok.get_vocab()
    mark = f"|xtok-v1|teacher-tok-{tokenizer_fingerprint(own_tok)}|align-token|"
    assert {d.split("|xtok-v1|")[0] for d in own} == set(student_ids.values())
    assert all(mark in d for d in own) and not any("xtok" in d for d in shared)
    assert tokenizer_fingerprint(own_tok) != tokenizer_fingerprint(team.tokenizer)
    # AvgKD named on such a team: one line, before the θ search trains anything
    with pytest.raises(AutoSKDError, match="teacher 'other' has its own tokenizer; leave avgkd out"):
        run_lm_search(team_path, {"name_or_path": f"lm:{corpus_path}"},
                      LMSearchConfig(**{**config.to_dict(), "baselines": "single,avgkd"}), tmp_path / "named",
                      cache_dir=cache, progress=False)
    assert not (tmp_path / "named" / "search.json").exists()
