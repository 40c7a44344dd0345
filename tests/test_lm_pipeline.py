"""Causal LMs through the one engine: models, recipes, cache, metric, methods, the run and the CLI.

Tiny random Llama/GPT-2 models and a BPE tokenizer trained offline (tests/lm_helpers.py).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from autoskd.engine.trainer import Distiller, Stage
from autoskd.errors import AutoSKDError
from autoskd.lm.data import LMCorpus, make_lm_loader, tokenize_lm_split
from autoskd.lm.evaluate import evaluate_lm, perplexity_metric
from autoskd.lm.generation import continue_prompts
from autoskd.lm.models import load_causal_lm, resolve_lm_source, save_lm, select_layers
from autoskd.lm.pipeline import LMDistillConfig, distill_lm
from autoskd.lm.recipes import REFUSED, decoder_method, lm_temperatures
from autoskd.lm.team import LMMember, LMTeam
from lm_helpers import bpe_tokenizer, documents, tiny_gpt2, tiny_llama


@pytest.fixture(scope="module")
def tok():
    from autoskd.lm.data import ensure_pad_token

    return ensure_pad_token(bpe_tokenizer())


@pytest.fixture(scope="module")
def corpus():
    docs = documents(160)
    return LMCorpus("reviews", {"train": docs[:100], "val": docs[100:120], "dev": docs[120:140],
                                "test": docs[140:160]})


def team_of(tok, student=None, teacher=None, block=16):
    return LMTeam(student=student if student is not None else tiny_llama(len(tok), layers=1, seed=1),
                  teachers={"t": teacher if teacher is not None else tiny_llama(len(tok), layers=3, seed=2)},
                  tokenizer=tok, max_length=block)


@pytest.fixture(scope="module")
def trained_teacher(tok, corpus):
    """A 2-layer Llama fitted to the corpus (so its distribution carries something to distil)."""
    teacher = tiny_llama(len(tok), layers=2, hidden=48, seed=3)
    team = team_of(tok, student=teacher, teacher=tiny_llama(len(tok), layers=1, seed=4))
    distill_lm(team, corpus, LMDistillConfig(method="finetune", epochs=6, lr=3e-3, batch_size=8, samples=0),
               progress=False)
    return teacher.eval()


# ---------------------------------------------------------------------------------------- models
def test_select_layers_keeps_listed_layers_renumbers_and_reloads(tmp_path, tok):
    model = tiny_llama(len(tok), layers=4, seed=5)
    picked = [model.model.layers[i].self_attn.q_proj.weight.clone() for i in (0, 3)]
    select_layers(model, [0, 3])
    assert model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]  # the KV cache's index
    assert all(torch.equal(a, layer.self_attn.q_proj.weight) for a, layer in zip(picked, model.model.layers))
    ids = torch.tensor([[5, 6, 7, 8]])
    save_lm(model, tok, tmp_path / "s")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert torch.allclose(model(input_ids=ids).logits, again(input_ids=ids).logits, atol=1e-5)
    out = again.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)  # the renumbered cache works
    assert out.shape == (1, 7)
    with pytest.raises(AutoSKDError, match="distinct layers"):
        select_layers(model, [0, 0])
    gpt = tiny_gpt2(len(tok), layers=3)
    select_layers(gpt, 2)
    assert gpt.config.n_layer == 2 and len(gpt.transformer.h) == 2


def test_random_init_from_a_folder_resizes_and_sources_fail_in_one_line(tmp_path, tok):
    tiny_llama(len(tok), layers=2).save_pretrained(tmp_path / "m")
    model = load_causal_lm(str(tmp_path / "m"), init="random", config={"num_hidden_layers": 1, "hidden_size": 16,
                                                                         "intermediate_size": 32}, seed=3)
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 16
    same = load_causal_lm(str(tmp_path / "m"), init="random", config={"num_hidden_layers": 1, "hidden_size": 16,
                                                                        "intermediate_size": 32}, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters()))
    for bad, match in [(str(tmp_path / "nope.gguf"), "GGUF file"), ("./missing/folder", "not found"),
                       (str(tmp_path / "m" / "config.json"), "not a .gguf")]:
        with pytest.raises(AutoSKDError, match=match) as err:
            resolve_lm_source(bad)
        assert "\n" not in str(err.value)


def test_gguf_without_the_gguf_package_is_one_line(tmp_path, monkeypatch):
    import importlib.util

    from autoskd.lm import models

    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None if name == "gguf" else real(name))
    with pytest.raises(AutoSKDError, match="pip install gguf"):
        resolve_lm_source(str(tmp_path / "x.gguf"), cache_dir=tmp_path / "cache")


def test_team_yaml_parses_members_and_refuses_bad_keys(tmp_path):
    good = tmp_path / "team.yaml"
    good.write_text("name: t\nkind: lm\nmax_length: 64\nstudent: {source: smollm2-135m, layers: [0, 29]}\n"
                    "teachers:\n  - {name: full, source: smollm2-135m}\n  - {name: cut, source: smollm2-135m, layers: 12}\n")
    team = LMTeam.from_yaml(good)
    assert team.max_length == 64 and list(team.teacher_specs) == ["full", "cut"]
    assert team.student_spec.layers == [0, 29] and team.teacher_specs["cut"].layers == 12
    bad = tmp_path / "bad.yaml"
    bad.write_text("student: {source: a}\nteachers:\n  - {name: x, sorce: b}\n")
    with pytest.raises(AutoSKDError, match="did you mean 'source'"):
        LMTeam.from_yaml(bad)


def test_a_tokenizer_larger_than_the_teachers_vocabulary_is_refused(tok):
    team = LMTeam(student=tiny_llama(len(tok)), teachers={"small": tiny_llama(50)}, tokenizer=tok)
    with pytest.raises(AutoSKDError, match="predicts 50 tokens but the tokenizer has"):
        team.build()


# ---------------------------------------------------------------------------------------- recipes
def test_decoder_recipes_read_next_token_features():
    kd = decoder_method("kd", loss="jsd", beta=0.3)
    (term,) = kd.spec.losses
    assert (term.student, term.teacher, term.distance, term.temperature) == ("lm_logits", "lm_logits", "jsd", 1.0)
    assert dict(term.params) == {"beta": 0.3}
    assert decoder_method("kd", temperature=2).spec.losses[0].temperature == 2.0
    glmd = decoder_method("glmd")
    assert glmd.spec.stages == ("pretrain", "task") and lm_temperatures(glmd) == [1.0, 15.0]
    assert glmd.spec.hard_label_weight == 0.0
    db = decoder_method("distilbert")
    assert {l.student for l in db.spec.losses} == {"lm_logits", "hidden:-1"}
    assert db.spec.hard_weight("pretrain") == 2.0 and db.spec.mlm_weight == 0.0
    tiny = decoder_method("tinybert")
    assert not any(l.student == "logits" for l in tiny.spec.losses)
    assert lm_temperatures(db) == [2.0] and lm_temperatures(tiny) == [1.0]


@pytest.mark.parametrize("name", ["pkd", "pd", "tmkd", "theseus"])
def test_methods_without_a_decoder_recipe_are_refused_in_one_line(name):
    with pytest.raises(AutoSKDError, match=f"method '{name}' cannot distil a decoder LM") as err:
        decoder_method(name)
    assert "\n" not in str(err.value) and REFUSED[name] in str(err.value)


def test_decoder_only_methods_are_refused_on_a_classification_team(tiny_team_yaml, sentiment_csv):
    from autoskd.pipeline import DistillConfig, distill
    from autoskd.team import TeacherTeam

    with pytest.raises(AutoSKDError, match="distils generative LMs"):
        distill(TeacherTeam.from_yaml(tiny_team_yaml), str(sentiment_csv), DistillConfig(method="seqkd"))


# ---------------------------------------------------------------------------------------- metric
def test_perplexity_is_token_weighted_and_lower_is_better(tok, corpus):
    model = tiny_llama(len(tok), seed=6)
    rows = tokenize_lm_split(corpus.split("test"), tok, 16)
    loader = make_lm_loader(rows, 3, shuffle=False)
    total, n = 0.0, 0
    with torch.no_grad():
        for b in loader:
            logits = model(input_ids=b["input_ids"]).logits
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["target_ids"].reshape(-1),
                                                   ignore_index=-100, reduction="sum")
            total, n = total + float(ce), n + int((b["target_ids"] != -100).sum())
    scores = evaluate_lm(model, loader)
    assert scores["tokens"] == n and math.isclose(scores["perplexity"], math.exp(total / n), rel_tol=1e-6)
    metric = perplexity_metric()
    assert metric.key == "dev_ppl" and metric.better(10.0, 12.0) and not metric.better(12.0, 10.0)


def test_restore_best_keeps_the_lowest_dev_perplexity(tok, corpus):
    student = tiny_llama(len(tok), seed=7)
    rows = tokenize_lm_split(corpus.split("train"), tok, 16)
    train = make_lm_loader(rows, 8, shuffle=True)
    dev = make_lm_loader(tokenize_lm_split(corpus.split("dev"), tok, 16), 8, shuffle=False)
    d = Distiller(student, decoder_method("finetune"), None, progress=False, metric=perplexity_metric())
    # a learning rate that diverges after the first epoch: the best epoch is an early one
    result = d.fit([Stage("task", train, epochs=3, lr=0.5, warmup_ratio=0.0)], dev=dev)
    ppls = [h["dev_ppl"] for h in result.history]
    assert result.metric == "perplexity" and result.best_score == min(ppls)
    assert math.isclose(evaluate_lm(student, dev)["perplexity"], min(ppls), rel_tol=1e-5)


# ---------------------------------------------------------------------------------------- runs
@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_kd_with_each_loss_moves_the_student_towards_the_teacher(tok, corpus, trained_teacher, tmp_path, loss):
    team = team_of(tok, teacher=trained_teacher)
    before = evaluate_lm(team.build_student(), make_lm_loader(tokenize_lm_split(corpus.split("test"), tok, 16), 8,
                                                             shuffle=False))["perplexity"]
    out = distill_lm(team, corpus, LMDistillConfig(method="kd", method_options={"loss": loss}, epochs=3, lr=3e-3,
                                                   samples=1), cache_dir=tmp_path, progress=False)
    assert out.scores["test_ppl"] < 0.5 * before
    assert 0.0 <= out.scores["test_top1_agreement"] <= 1.0 and len(out.samples) == 1


def test_the_run_writes_a_plain_transformers_student_and_reuses_the_teacher_cache(tok, corpus, trained_teacher,
                                                                                   tmp_path, monkeypatch):
    team = team_of(tok, teacher=trained_teacher)
    out = distill_lm(team, corpus, LMDistillConfig(method="kd", epochs=1, samples=1), out_dir=tmp_path / "run",
                     cache_dir=tmp_path / "cache", progress=False)
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["test_ppl"] == out.scores["test_ppl"] and result["samples"][0]["continuation"] is not None
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    assert student.config.num_hidden_layers == 1 and (tmp_path / "run" / "student" / "tokenizer.json").exists()
    assert len(list((tmp_path / "cache" / "lm_topk").glob("*.safetensors"))) == 1
    from autoskd.lm import teachers

    def no_teacher_pass(*a, **k):
        raise AssertionError("the cached top-k table should have been reused")

    monkeypatch.setattr(teachers, "compute_topk_table", no_teacher_pass)
    team2 = team_of(tok, teacher=trained_teacher)
    distill_lm(team2, corpus, LMDistillConfig(method="kd", epochs=1, samples=0, agreement=False),
               cache_dir=tmp_path / "cache", progress=False)


@pytest.mark.parametrize("method,options", [("glmd", {}), ("distilbert", {}), ("tinybert", {}), ("minilm", {}),
                                            ("seqkd", {"prompt_tokens": 4, "max_new_tokens": 8}),
                                            ("on_policy", {"lmbda": 0.5, "prompt_tokens": 4, "max_new_tokens": 6})])
def test_every_decoder_method_trains_a_llama_student(tok, corpus, trained_teacher, tmp_path, method, options):
    student = tiny_llama(len(tok), layers=2, hidden=48, seed=8, heads=4, kv_heads=2)  # same heads: per-head terms
    team = team_of(tok, student=student, teacher=trained_teacher)
    out = distill_lm(team, corpus, LMDistillConfig(method=method, method_options=options, epochs=1, lr=3e-3,
                                                   samples=0, agreement=False), cache_dir=tmp_path, progress=False)
    assert math.isfinite(out.scores["test_ppl"]) and out.result.steps > 0
    tables = list((tmp_path / "lm_topk").glob("*.safetensors"))
    assert bool(tables) == (method in ("glmd", "tinybert", "on_policy", "distilbert"))  # a next-token term


def test_hidden_state_terms_read_kept_rows_not_a_teacher_forward_per_step(tok, corpus, trained_teacher, tmp_path):
    """DistilBERT's triple loss on a decoder: the next-token term from the top-k cache, the cosine
    on the last hidden state from the teacher's outputs kept per row after one pass, so the teacher
    runs two passes over the split (table, rows) instead of one forward per step; the loss is the
    live teacher's (to float rounding: a pass batches rows in order) at the same cached logits."""
    from autoskd.engine.trainer import Distiller, Stage
    from autoskd.engine.teachers import SingleTeacher
    from autoskd.lm.data import make_lm_loader, tokenize_lm_split
    from autoskd.lm.teachers import LMTeacher
    from autoskd.lm.topk_cache import TopKCache

    calls = []
    hook = trained_teacher.register_forward_hook(lambda *a: calls.append(1))
    try:
        student = tiny_llama(len(tok), layers=1, hidden=48, seed=21)
        team = team_of(tok, student=student, teacher=trained_teacher)
        out = distill_lm(team, corpus, LMDistillConfig(method="distilbert", epochs=3, lr=3e-3, samples=0,
                                                       agreement=False), cache_dir=tmp_path, progress=False)
    finally:
        hook.remove()
    stages = decoder_method("distilbert").spec.stages  # pre-training (the triple loss), then plain LM training
    batches = out.result.steps // (3 * len(stages))  # the training split's batches: 3 epochs per stage
    assert len(stages) == 2 and len(calls) == 2 * batches  # top-k table + kept rows; live: 1 + 3 passes

    rows = tokenize_lm_split(corpus.split("train"), tok, 16, layout="packed", kind=corpus.kind)
    loader = make_lm_loader(rows, 8, shuffle=False)
    batch = next(iter(loader))
    method = decoder_method("distilbert")
    kept = LMTeacher("t", trained_teacher, "fp", top_k=16, temperatures=[2.0], cache=TopKCache(tmp_path / "t"))
    kept.prepare(loader, "split", device="cpu", progress=False)
    live = LMTeacher("t", trained_teacher, "fp", top_k=16, temperatures=[2.0], cache=TopKCache(tmp_path / "t"))
    live.prepare(loader, "split", device="cpu", progress=False)
    live.rows = None  # as a partitioned teacher: hidden states from a forward
    a, b = kept.features(batch, ["lm_logits", "hidden:-1"]), live.features(batch, ["lm_logits", "hidden:-1"])
    torch.testing.assert_close(a["hidden:-1"], b["hidden:-1"], atol=1e-5, rtol=1e-4)
    assert a["lm_logits"].at(2.0) is not None and kept.rows.filled and len(kept.rows.tokens) == len(rows)


def test_hidden_state_terms_project_across_widths_on_gpt2(tok, corpus, tmp_path):
    """TinyBERT's hidden and embedding terms on GPT-2 (fused c_attn): a 32-wide student, a 64-wide teacher."""
    team = team_of(tok, student=tiny_gpt2(len(tok), layers=1, hidden=32), teacher=tiny_gpt2(len(tok), layers=2,
                                                                                         hidden=64, seed=2))
    out = distill_lm(team, corpus, LMDistillConfig(method="tinybert", method_options={"attention_weight": 0},
                                                   epochs=1, samples=0, agreement=False),
                     cache_dir=tmp_path, progress=False)
    assert out.result.steps > 0 and math.isfinite(out.scores["test_ppl"])


def test_bf16_autocast_runs_on_cpu_and_fp16_needs_cuda(tok, corpus, trained_teacher, tmp_path):
    team = team_of(tok, teacher=trained_teacher)
    out = distill_lm(team, corpus, LMDistillConfig(method="kd", epochs=1, precision="bf16", samples=0,
                                                   agreement=False), cache_dir=tmp_path, progress=False)
    assert math.isfinite(out.scores["test_ppl"])
    if not torch.cuda.is_available():
        with pytest.raises(AutoSKDError, match="fp16 training needs a CUDA GPU"):
            distill_lm(team_of(tok, teacher=trained_teacher), corpus,
                       LMDistillConfig(method="kd", epochs=1, precision="fp16", samples=0), cache_dir=tmp_path,
                       progress=False)


@pytest.mark.parametrize("config, words", [
    (dict(method="on_policy", deepspeed={"zero_optimization": {"stage": 3}}), "every rank must stop together"),
    (dict(method="on_policy", tensor_parallel=2), "every rank must stop together"),
    (dict(method="kd", precision="bf16", deepspeed={"zero_optimization": {"stage": 2}}), "set bf16 or fp16 in the"),
])
def test_scale_settings_that_cannot_work_are_refused_before_any_work(config, words):
    """(The working ones, ZeRO-3 and a tensor-parallel teacher under ``autoskd distill``, are
    checked against one process in tests/test_lm_scale.py.)"""
    with pytest.raises(AutoSKDError, match=words):
        LMDistillConfig(**config).check()
    LMDistillConfig(method="on_policy", deepspeed={"zero_optimization": {"stage": 2}}).check()  # ZeRO-1/2: fine


# ---------------------------------------------------------------------------------------- generation
def test_written_rows_carry_targets_only_on_written_tokens(tok):
    model = tiny_llama(len(tok), seed=9)
    prompts = torch.tensor([[5, 6, 7], [8, 9, 10]])
    ids, mask, targets = continue_prompts(model, prompts, 4, eos_id=None, pad_id=0)
    assert ids.shape == (2, 7) and torch.equal(ids[:, :3], prompts) and bool(mask.all())
    assert (targets[:, :2] == -100).all() and torch.equal(targets[:, 2:6], ids[:, 3:7]) and (targets[:, 6] == -100).all()
    greedy = model.generate(prompts, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(greedy, ids)  # the KV-cache loop is the model's own greedy decoding


def test_on_policy_batches_are_written_by_the_student(tok):
    method = decoder_method("on_policy", lmbda=1.0, prompt_tokens=3, max_new_tokens=4)
    student = tiny_llama(len(tok), seed=10)

    class Ctx:
        pass

    ctx = Ctx()
    ctx.student = student
    batch = {"input_ids": torch.randint(1, len(tok), (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long),
             "target_ids": torch.zeros(2, 8, dtype=torch.long), "idx": torch.tensor([0, 1])}
    new = method.prepare_batch(ctx, batch)
    assert new["on_policy"] and "idx" not in new and new["input_ids"].shape[1] <= 3 + 4
    assert torch.equal(new["input_ids"][:, :3], batch["input_ids"][:, :3])
    assert (new["target_ids"][:, :2] == -100).all()
    assert decoder_method("on_policy", lmbda=0.0).prepare_batch(ctx, batch) is batch


# ---------------------------------------------------------------------------------------- GLMD vocabulary
def test_glmd_vocabulary_compression_shrinks_both_ends_and_saves_the_map(tok, corpus, trained_teacher, tmp_path):
    from autoskd.lm.vocab import load_vocab_map

    student = tiny_llama(len(tok), layers=1, hidden=48, seed=11)
    team = team_of(tok, student=student, teacher=trained_teacher)
    out = distill_lm(team, corpus, LMDistillConfig(method="glmd", method_options={"vocab_alpha": 0.4}, epochs=1,
                                                   lr=3e-3, samples=1), out_dir=tmp_path / "run",
                     cache_dir=tmp_path / "cache", progress=False)
    k = out.scores["compressed_vocab_size"]
    assert k == 128 and student.get_input_embeddings().weight.shape[0] == k
    assert student.get_output_embeddings().weight.shape[0] == k
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight  # still tied
    assert math.isfinite(out.scores["test_ppl"]) and "test_top1_agreement" not in out.scores
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    vocab = load_vocab_map(tmp_path / "run" / "student", len(tok), trained_teacher.get_input_embeddings().weight)
    assert saved.config.vocab_size == k and vocab.size == k
    ids = tok("the film was good", return_tensors="pt")["input_ids"]
    assert saved(input_ids=vocab.remap(ids)).logits.shape[-1] == k
    specials = set(tok.all_special_ids)
    assert specials <= set(vocab.kept.tolist())  # special tokens are always kept
    tables = list((tmp_path / "cache" / "lm_topk").glob("*.safetensors"))
    assert len(tables) == 2  # tau 15 and tau 1, both over the kept tokens (new ids)
    from safetensors.torch import load_file

    assert all(int(load_file(t)["ids"].max()) < k for t in tables)


def test_a_dense_teacher_table_past_the_size_limit_is_refused_in_one_line(tok, corpus, trained_teacher, tmp_path):
    from autoskd.lm.teachers import LMTeacher

    rows = tokenize_lm_split(corpus.split("train"), tok, 16)
    teacher = LMTeacher("t", trained_teacher, "fp", top_k=10**9, temperatures=[1.0], dense_limit_bytes=1000)
    with pytest.raises(AutoSKDError, match="top_k") as err:
        teacher.prepare(make_lm_loader(rows, 8, shuffle=False), "data", device="cpu", progress=False)
    assert "GB" in str(err.value) and "\n" not in str(err.value)
    teacher.dense_limit_bytes = 10**9  # k = the whole vocabulary: the exact dense distribution
    teacher.prepare(make_lm_loader(rows, 8, shuffle=False), "data", device="cpu", progress=False)
    assert teacher.tables[1.0].k == len(tok) and teacher.tables[1.0].retained_mass > 0.999


# ---------------------------------------------------------------------------------------- trained teachers
def test_team_members_are_healed_or_adapted_once_and_cached(tok, corpus, tmp_path, monkeypatch):
    full = tiny_llama(len(tok), layers=3, hidden=48, seed=12)
    full.save_pretrained(tmp_path / "full")
    tok.save_pretrained(tmp_path / "full")
    src = str(tmp_path / "full")
    team_yaml = tmp_path / "team.yaml"
    team_yaml.write_text(
        f"kind: lm\nmax_length: 16\nstudent: {{source: {src}, layers: 1}}\nteachers:\n"
        f"  - {{name: full, source: {src}}}\n"
        f"  - {{name: cut, source: {src}, layers: [0, 2], train: {{method: kd, teacher: full, steps: 4, lr: 0.003}}}}\n"
        f"  - {{name: domain, source: {src}, train: {{method: finetune, steps: 3, lr: 0.003}}}}\n")
    team = LMTeam.from_yaml(team_yaml).build(seed=0, corpus=corpus, cache_dir=tmp_path / "cache", progress=False)
    built = sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "lm_teachers").iterdir())
    assert built == ["cut", "domain"] and team.teachers["cut"].config.num_hidden_layers == 2
    assert not torch.equal(team.teachers["domain"].model.embed_tokens.weight, full.model.embed_tokens.weight)
    assert len(set(team.fingerprints.values())) == 3
    from autoskd.lm import teacher_prep

    monkeypatch.setattr("autoskd.lm.pipeline.distill_lm", lambda *a, **k: pytest.fail("rebuilt a cached member"))
    again = LMTeam.from_yaml(team_yaml).build(seed=0, corpus=corpus, cache_dir=tmp_path / "cache", progress=False)
    assert again.fingerprints == team.fingerprints
    with pytest.raises(AutoSKDError, match="list 'later' before it"):
        bad = tmp_path / "bad.yaml"
        bad.write_text(f"kind: lm\nstudent: {{source: {src}}}\nteachers:\n"
                       f"  - {{name: early, source: {src}, train: {{method: kd, teacher: later}}}}\n"
                       f"  - {{name: later, source: {src}}}\n")
        LMTeam.from_yaml(bad).build(corpus=corpus, cache_dir=tmp_path / "cache2", progress=False)
    assert teacher_prep.TrainSettings.from_value({"steps": 2}, "t").method == "finetune"


def test_a_specialist_trains_on_its_own_corpus_minus_the_tasks_held_out_text(tok, corpus, tmp_path):
    """``train.corpus``: a member adapted to another corpus. Documents the task holds out (here
    all of val/dev/test, planted in the member's file) never reach its training split, and its
    cache key differs from the same member trained on the task."""
    from autoskd.lm.teacher_prep import TrainSettings, member_corpus

    full = tiny_llama(len(tok), layers=2, hidden=48, seed=21)
    full.save_pretrained(tmp_path / "full")
    tok.save_pretrained(tmp_path / "full")
    held_out = corpus.split("val") + corpus.split("dev") + corpus.split("test")
    genre = [f"the plot follows agent {i} across the city at night" for i in range(60)]
    (tmp_path / "genre.txt").write_text("\n".join(genre + held_out), encoding="utf-8")
    settings = TrainSettings.from_value({"corpus": str(tmp_path / "genre.txt"), "steps": 2}, "t")
    own = member_corpus(settings, corpus)
    assert own.split("train") and not set(own.split("train")) & set(held_out)
    assert set(own.split("train")) < set(genre)
    assert member_corpus(TrainSettings(), corpus) is corpus
    assert "corpus" not in TrainSettings().to_dict()  # members without one keep their cache keys
    src = str(tmp_path / "full")
    team_yaml = tmp_path / "team.yaml"
    team_yaml.write_text(
        f"kind: lm\nmax_length: 16\nstudent: {{source: {src}, layers: 1}}\nteachers:\n"
        f"  - {{name: task, source: {src}, train: {{method: finetune, steps: 2, lr: 0.003}}}}\n"
        f"  - {{name: genre, source: {src}, train: {{method: finetune, steps: 2, lr: 0.003, "
        f"corpus: {tmp_path / 'genre.txt'}}}}}\n")
    team = LMTeam.from_yaml(team_yaml).build(seed=0, corpus=corpus, cache_dir=tmp_path / "cache", progress=False)
    assert team.fingerprints["task"] != team.fingerprints["genre"]
    a, b = (team.teachers[n].model.embed_tokens.weight for n in ("task", "genre"))
    assert not torch.equal(a, b)  # trained on different text
    with pytest.raises(AutoSKDError, match="train.corpus must be a corpus name"):
        TrainSettings.from_value({"corpus": 3}, "t")


# ---------------------------------------------------------------------------------------- another tokenizer
def test_a_teacher_with_its_own_tokenizer_teaches_through_uld_hybrid(tok, corpus, tmp_path):
    """A team file whose teacher reads the text with another tokenizer: kd becomes uld_hybrid at
    aligned positions; methods on hidden states are refused in one line."""
    other = bpe_tokenizer(vocab_size=290)
    teacher = tiny_llama(len(other), layers=2, seed=13)
    teacher.save_pretrained(tmp_path / "teacher")
    other.save_pretrained(tmp_path / "teacher")
    student = tiny_llama(len(tok), layers=1, seed=14)
    student.save_pretrained(tmp_path / "student")
    tok.save_pretrained(tmp_path / "student")
    team_yaml = tmp_path / "team.yaml"
    team_yaml.write_text(f"kind: lm\nmax_length: 16\nstudent: {{source: {tmp_path / 'student'}}}\nteachers:\n"
                         f"  - {{name: other, source: {tmp_path / 'teacher'}, tokenizer: own}}\n")
    out = distill_lm(LMTeam.from_yaml(team_yaml), corpus, LMDistillConfig(method="kd", epochs=1, samples=0),
                     cache_dir=tmp_path / "cache", progress=False)
    assert math.isfinite(out.scores["test_ppl"]) and "test_top1_agreement" not in out.scores
    assert list((tmp_path / "cache" / "lm_topk").glob("*.safetensors"))  # cached on the teacher's own tokenisation
    with pytest.raises(AutoSKDError, match="has its own tokenizer, so only next-token methods"):
        distill_lm(LMTeam.from_yaml(team_yaml), corpus, LMDistillConfig(method="distilbert"), progress=False)


def test_avgkd_averages_next_token_distributions_not_logits(tok, corpus, trained_teacher, tmp_path):
    from autoskd.engine.token_losses import TopK
    from autoskd.lm.teachers import average_topk

    torch.manual_seed(0)
    a, b = torch.randn(2, 3, len(tok)), 3 * torch.randn(2, 3, len(tok))
    pa, pb = a.softmax(-1), b.softmax(-1)
    exact = (pa + pb) / 2

    def topk(p, k):
        values, ids = p.topk(k, -1)
        return TopK(ids, values.log())

    mean = average_topk([topk(pa, len(tok)), topk(pb, len(tok))], len(tok))  # k = V: exact
    dense = torch.zeros_like(exact).scatter_(-1, mean.ids, mean.logprobs.exp())
    assert torch.allclose(dense, exact, atol=1e-6)
    small = average_topk([topk(pa, 5), topk(pb, 5)], len(tok))
    mass = small.logprobs.exp().sum(-1)
    assert torch.allclose(mass, (pa.topk(5, -1).values.sum(-1) + pb.topk(5, -1).values.sum(-1)) / 2, atol=1e-5)
    team = LMTeam(student=tiny_llama(len(tok), layers=1, seed=15),
                  teachers={"a": trained_teacher, "b": tiny_llama(len(tok), layers=2, hidden=48, seed=16)},
                  tokenizer=tok, max_length=16)
    out = distill_lm(team, corpus, LMDistillConfig(method="kd", policy="average", epochs=1, samples=0,
                                                   agreement=False), cache_dir=tmp_path, progress=False)
    assert math.isfinite(out.scores["test_ppl"])


def test_padded_rows_are_served_from_the_cache_at_their_batch_length(tok, corpus, trained_teacher, tmp_path):
    out = distill_lm(team_of(tok, teacher=trained_teacher), corpus,
                     LMDistillConfig(method="kd", layout="padded", epochs=1, samples=0, agreement=False),
                     cache_dir=tmp_path, progress=False)
    assert math.isfinite(out.scores["test_ppl"]) and out.result.steps > 0
