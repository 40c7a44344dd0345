"""autoskd.team: team files, validation, hashing, and building/caching teachers."""

from __future__ import annotations

import json
import textwrap
from dataclasses import replace
from pathlib import Path

import datasets
import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, BertConfig

from autoskd.data.tasks import TaskData
from autoskd.defaults import DEFAULT_LR
from autoskd.errors import AutoSKDError
from autoskd.models import count_layers
from autoskd.team import FinetuneSettings, ModelSpec, TeacherTeam, TeamSpec, bundled_teams

REPO = Path(__file__).resolve().parent.parent


from helpers import OneClassTeacher, tiny_config  # noqa: E402


def make_task(n_train: int = 24, n_dev: int = 12, name: str = "toy", shift: int = 0) -> TaskData:
    """A learnable two-class toy task (positive and negative words)."""
    pos = ["great", "wonderful", "moving", "brilliant", "superb", "charming"]
    neg = ["awful", "boring", "dull", "terrible", "tedious", "bland"]

    def split(n: int, offset: int) -> datasets.Dataset:
        texts, labels = [], []
        for i in range(n):
            label = (i + offset) % 2
            word = (pos if label else neg)[(i + offset + shift) % 6]
            texts.append(f"the film was {word} and the cast {word}")
            labels.append(label)
        return datasets.Dataset.from_dict({"text": texts, "label": labels, "idx": list(range(n))})

    splits = {"train": split(n_train, 0), "val": split(n_train, 1), "dev": split(n_dev, 2), "test": split(n_dev, 3)}
    return TaskData(name, ["negative", "positive"], "text", None, splits)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "team.yaml"
    path.write_text(textwrap.dedent(text))
    return path


# ---------------------------------------------------------------------------------------------- YAML


def test_bundled_ladder_parses():
    assert "minilm-ladder" in bundled_teams()
    spec = TeamSpec.from_yaml(REPO / "teams" / "minilm-ladder.yaml")
    assert spec.name == "minilm-ladder" and spec.max_length == 64
    assert spec.student == ModelSpec(source="minilm-l6", layers=2, init="pretrained", name=None)
    assert [t.layers for t in spec.teachers] == [1, 2, 3, 4, 6]
    assert [t.name for t in spec.teachers] == ["minilm-L1", "minilm-L2", "minilm-L3", "minilm-L4", "minilm-L6"]
    assert spec.teachers[0].finetune.lr == pytest.approx(5e-4)  # "5.0e-4" in YAML parses as a number
    assert [t.finetune.epochs for t in spec.teachers] == [2] * 5
    # By bare name too.
    assert TeamSpec.from_yaml("minilm-ladder").to_dict() == spec.to_dict()
    tiny = TeamSpec.from_yaml("tiny-test")
    assert all(t.finetune.max_train_examples == 256 and t.finetune.epochs == 1 for t in tiny.teachers)


def test_bundled_mixed_team_shares_the_ladders_full_data_teachers():
    """minilm-mixed reuses three ladder teachers as they are (so their cache entries) and adds
    two fine-tuned on 200 rows only."""
    ladder, mixed = TeamSpec.from_yaml("minilm-ladder"), TeamSpec.from_yaml("minilm-mixed")
    assert mixed.student == ladder.student
    same = {t.name: t for t in ladder.teachers}
    full = [t for t in mixed.teachers if t.finetune.max_train_examples is None]
    assert [t.name for t in full] == ["minilm-L1", "minilm-L4", "minilm-L6"]
    assert all(t == same[t.name] for t in full)
    few = [t for t in mixed.teachers if t.finetune.max_train_examples == 200]
    assert [(t.name, t.layers) for t in few] == [("minilm-L3-200rows", 3), ("minilm-L6-200rows", 6)]


def test_yaml_values_and_defaults(tmp_path):
    spec = TeamSpec.from_yaml(write(tmp_path, """
        name: t
        student: {source: minilm-l6, layers: 1, init: truncated-teacher, teacher: big}
        finetune: {epochs: 2, batch_size: 16}
        teachers:
          - {name: big, source: minilm-l6, finetune: {lr: 3e-4}}
          - {source: minilm-l6, layers: 3}
    """))
    big, second = spec.teachers
    assert big.finetune == FinetuneSettings(epochs=2, lr=3e-4, batch_size=16)  # "3e-4" is a YAML string
    assert second.name == "minilm-l6-L3" and second.finetune.lr == DEFAULT_LR and second.finetune.batch_size == 16
    assert spec.student.teacher == "big" and spec.max_length == 128


@pytest.mark.parametrize("text, message", [
    ("""
        student: {source: minilm-l6}
        teachers: [{name: a, source: minilm-l6}]
        colour: red
     """, "unknown key 'colour' in team.yaml; allowed keys: name, student, teachers, max_length, tokenizer, description"),
    ("""
        student: {source: minilm-l6}
        teachers: [{name: a, source: minilm-l6, lyers: 2}]
     """, r"unknown key 'lyers' in team.yaml.teachers\[0\]; allowed keys: source, layers, init, name, finetune"),
    ("""
        student: {source: minilm-l6}
        teachers: [{name: a, source: minilm-l6, finetune: {epoch: 2}}]
     """, r"unknown key 'epoch' in team.yaml.teachers\[0\].finetune; allowed keys: epochs, lr"),
    ("""
        student: {source: minilm-l6}
        teachers: []
     """, "has no teachers"),
    ("""
        student: {source: minilm-l6}
     """, "has no teachers"),
    ("""
        student: {source: minilm-l6}
        teachers: [{name: a, source: minilm-l6}, {name: a, source: minilm-l6, layers: 2}]
     """, "two teachers named 'a'; give each teacher a unique 'name'"),
    ("""
        student: {source: minilm-l6, init: warm}
        teachers: [{name: a, source: minilm-l6}]
     """, "unknown init 'warm'; use one of: pretrained, random, truncated-teacher"),
    ("""
        student: {source: minilm-l6, init: truncated-teacher, teacher: zz}
        teachers: [{name: a, source: minilm-l6}]
     """, "teacher 'zz' is not in the team"),
    ("""
        student: {source: minilm-l6, layers: two}
        teachers: [{name: a, source: minilm-l6}]
     """, "layers must be a whole number"),
    ("""
        student: {source: minilm-l6}
        teachers: [{name: a, source: minilm-l6, finetune: {lr: fast}}]
     """, "lr must be a number"),
    ("""
        student: {source: minilm-l6}
        teachers: [{name: a}]
     """, "has no 'source'"),
    ("""
        student: {source: minilm-l6
        teachers: [
     """, "is not valid YAML"),
])
def test_yaml_errors(tmp_path, text, message):
    with pytest.raises(AutoSKDError, match=message):
        TeamSpec.from_yaml(write(tmp_path, text))


def test_missing_team_file(tmp_path):
    with pytest.raises(AutoSKDError, match=r"team file '.*nope.yaml' not found; pass a path.*minilm-ladder"):
        TeamSpec.from_yaml(tmp_path / "nope.yaml")


def test_errors_are_one_line(tmp_path):
    with pytest.raises(AutoSKDError) as info:
        TeamSpec.from_yaml(write(tmp_path, "student: {source: x\nteachers: [\n"))
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------- hashing


def test_spec_hash_is_canonical_and_local():
    a = ModelSpec(source="minilm-l6", layers=2, name="a")
    assert a.spec_hash() == ModelSpec(source="minilm-l6", layers=2, name="a").spec_hash()
    assert a.spec_hash() != replace(a, finetune=FinetuneSettings(lr=3e-4)).spec_hash()


def test_cache_key_changes_only_for_the_changed_teacher(tiny_dir):
    task = make_task()
    spec = TeamSpec(name="t", student=ModelSpec(str(tiny_dir), layers=1),
                    teachers=[ModelSpec(str(tiny_dir), layers=1, name="a"), ModelSpec(str(tiny_dir), layers=2, name="b")])
    team = TeacherTeam(spec)
    keys = {n: team.cache_key(n, task) for n in team.names}
    assert keys == {n: team.cache_key(n, task) for n in team.names}  # stable
    changed = replace(spec, teachers=[spec.teachers[0], replace(spec.teachers[1], finetune=FinetuneSettings(epochs=5))])
    keys2 = {n: TeacherTeam(changed).cache_key(n, task) for n in team.names}
    assert keys2["a"] == keys["a"] and keys2["b"] != keys["b"]
    # Data, max_length and seed are in every key.
    assert team.cache_key("a", make_task(shift=1)) != keys["a"]
    assert team.cache_key("a", task, seed=1) != keys["a"]
    assert TeacherTeam(replace(spec, max_length=32)).cache_key("a", task) != keys["a"]


# ---------------------------------------------------------------------------------------------- validation


def test_python_api_members(tiny_dir):
    module = AutoModelForSequenceClassification.from_config(tiny_config(layers=1))
    team = TeacherTeam(student=ModelSpec(str(tiny_dir), layers=1), teachers={"mine": module, "cut": str(tiny_dir)})
    assert team.names == ["mine", "cut"]
    assert team.teachers["mine"] is module and not module.training
    assert not any(p.requires_grad for p in module.parameters())
    assert team.status["mine"] == "given"
    assert isinstance(team.teacher_specs["cut"], ModelSpec) and team.teacher_specs["cut"].name == "cut"
    team.validate(make_task())
    with pytest.raises(AutoSKDError, match="at least one teacher"):
        TeacherTeam(student=ModelSpec(str(tiny_dir)), teachers={})
    with pytest.raises(AutoSKDError, match="pass tokenizer="):
        _ = TeacherTeam(teachers={"m": module}).tokenizer


def test_tokenizer_mismatch(tiny_dir, other_vocab_dir):
    team = TeacherTeam(student=ModelSpec(str(tiny_dir), layers=1),
                       teachers={"ok": ModelSpec(str(tiny_dir)), "other": ModelSpec(str(other_vocab_dir))})
    with pytest.raises(AutoSKDError, match=r"teacher 'other' uses a different tokenizer \(vocab 12 vs 30522\) than "
                                           "the student; all team members must share one tokenizer"):
        team.validate(make_task())
    small = AutoModelForSequenceClassification.from_config(tiny_config(layers=1, vocab=12))
    team = TeacherTeam(student=ModelSpec(str(tiny_dir)), teachers={"small": small})
    with pytest.raises(AutoSKDError, match="has 12 token embeddings but the team tokenizer has 30522"):
        team.validate(make_task())


def test_label_count_mismatch_for_module_teacher(tiny_dir):
    three = AutoModelForSequenceClassification.from_config(replace_labels(tiny_config(layers=1), 3))
    team = TeacherTeam(student=ModelSpec(str(tiny_dir)), teachers={"three": three})
    with pytest.raises(AutoSKDError, match="teacher 'three' predicts 3 labels but task 'toy' has 2"):
        team.validate(make_task())

    class Plain(nn.Module):  # no config: the label count comes from a probe forward
        def __init__(self):
            super().__init__()
            self.emb = nn.EmbeddingBag(30522, 8)
            self.head = nn.Linear(8, 5)

        def forward(self, input_ids, attention_mask=None, token_type_ids=None):
            return self.head(self.emb(input_ids))

    team = TeacherTeam(student=ModelSpec(str(tiny_dir)), teachers={"plain": Plain()})
    with pytest.raises(AutoSKDError, match="teacher 'plain' predicts 5 labels but task 'toy' has 2"):
        team.validate(make_task())


def replace_labels(config: BertConfig, n: int) -> BertConfig:
    config.num_labels = n
    return config


def test_layers_out_of_range(tiny_dir):
    team = TeacherTeam(student=ModelSpec(str(tiny_dir), layers=1), teachers={"deep": ModelSpec(str(tiny_dir), layers=9)})
    with pytest.raises(AutoSKDError, match="teacher 'deep': model has 4 layers; 'layers: 9' must be between 1 and 4"):
        team.validate(make_task())
    team = TeacherTeam(student=ModelSpec(str(tiny_dir), layers=3, init="truncated-teacher", teacher="t"),
                       teachers={"t": ModelSpec(str(tiny_dir), layers=2)})
    with pytest.raises(AutoSKDError, match="student has 3 layers but its teacher 't' only 2"):
        team.validate(make_task())


def test_build_student_variants(tiny_dir):
    task = make_task()
    team = TeacherTeam(student=ModelSpec(str(tiny_dir), layers=2), teachers={"t": str(tiny_dir)})
    student = team.build_student(task, seed=0)
    assert count_layers(student) == 2 and student.training
    assert student.config.id2label == {0: "negative", 1: "positive"}
    assert all(p.requires_grad for p in student.parameters())
    rand = TeacherTeam(student=ModelSpec(str(tiny_dir), layers=2, init="random"), teachers={"t": str(tiny_dir)})
    a, b = rand.build_student(task, seed=5), rand.build_student(task, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    trunc = TeacherTeam(student=ModelSpec(str(tiny_dir), layers=1, init="truncated-teacher", teacher="t"),
                        teachers={"t": str(tiny_dir)})
    with pytest.raises(AutoSKDError, match="not built yet; call team.build"):
        trunc.build_student(task)
    module = AutoModelForSequenceClassification.from_config(tiny_config(layers=1))
    given = TeacherTeam(student=module, teachers={"t": str(tiny_dir)})
    copy1 = given.build_student(task)
    assert copy1 is not module and torch.equal(copy1.classifier.weight, module.classifier.weight)


# ---------------------------------------------------------------------------------------------- build + cache


def test_build_caches_and_rebuilds_only_changed(tiny_dir, tmp_path, capsys):
    task = make_task(n_train=8, n_dev=8)  # train_full: 16 rows = 2 steps per teacher
    fast = FinetuneSettings(epochs=1, lr=1e-3, batch_size=8)
    spec = TeamSpec(name="toy-team", max_length=16,
                    student=ModelSpec(str(tiny_dir), layers=1, init="truncated-teacher", teacher="b"),
                    teachers=[ModelSpec(str(tiny_dir), layers=1, name="a", finetune=fast),
                              ModelSpec(str(tiny_dir), layers=2, name="b", finetune=fast)])
    cache = tmp_path / "cache"
    team = TeacherTeam(spec).build(task, cache_dir=cache, progress=False)
    assert team.status == {"a": "built", "b": "built"}
    assert capsys.readouterr().out == ""  # progress=False is quiet
    table = team.summary()
    assert "dev acc" in table and "built" in table and "toy-team" in table
    assert set(team.dev_accuracy) == {"a", "b"} and all(0 <= v <= 1 for v in team.dev_accuracy.values())
    for name, model in team.teachers.items():
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        entry = team.cache_dirs[name]
        assert entry.name == f"{name}-{team.cache_key(name, task)[:12]}"
        meta = json.loads((entry / "meta.json").read_text())
        assert meta["hash"] == team.cache_key(name, task) and meta["dev_accuracy"] == team.dev_accuracy[name]
        reloaded = AutoModelForSequenceClassification.from_pretrained(entry)
        assert all(torch.equal(x, y) for x, y in zip(reloaded.state_dict().values(), model.state_dict().values()))
    assert count_layers(team.teachers["b"]) == 2

    student = team.build_student(task)
    assert torch.equal(student.classifier.weight, team.teachers["b"].classifier.weight)

    again = TeacherTeam(spec).build(task, cache_dir=cache, progress=False)
    assert again.status == {"a": "cached", "b": "cached"}
    assert again.dev_accuracy == team.dev_accuracy and again.fingerprints == team.fingerprints

    slower = replace(fast, lr=5e-4)
    changed = replace(spec, teachers=[spec.teachers[0], replace(spec.teachers[1], finetune=slower)])
    third = TeacherTeam(changed).build(task, cache_dir=cache, progress=False)
    assert third.status == {"a": "cached", "b": "built"}
    assert third.fingerprints["a"] == team.fingerprints["a"] and third.fingerprints["b"] != team.fingerprints["b"]

    forced = TeacherTeam(spec).build(task, cache_dir=cache, progress=False, force=True)
    assert forced.status == {"a": "built", "b": "built"}


def test_build_evaluates_given_module(tiny_dir, tmp_path):
    module = AutoModelForSequenceClassification.from_config(tiny_config(layers=1))
    team = TeacherTeam(student=ModelSpec(str(tiny_dir), layers=1), teachers={"mine": module},
                       tokenizer=str(tiny_dir), max_length=16).build(make_task(), cache_dir=tmp_path, progress=False)
    assert team.status == {"mine": "given"} and 0 <= team.dev_accuracy["mine"] <= 1
    assert team.teachers["mine"] is module and "mine" not in team.fingerprints
    assert not any(tmp_path.iterdir())  # nothing cached for a given module


def test_build_warns_about_a_teacher_no_better_than_the_majority_class(tiny_dir, tmp_path, capsys):
    team = TeacherTeam(student=ModelSpec(str(tiny_dir), layers=1), teachers={"lazy": OneClassTeacher(margin=2.0)},
                       tokenizer=str(tiny_dir), max_length=16).build(make_task(), cache_dir=tmp_path)
    assert team.dev_accuracy["lazy"] == 0.5 and team.uninformative == ["lazy"]
    warning = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warning) == 1 and "teacher lazy scores 0.5000" in warning[0] and "majority class (0.5000)" in warning[0]
    assert "drop it from the team" in warning[0]


def test_uninformative_teachers_keep_the_informative_ones():
    from autoskd.team.report import majority_rate, uninformative_teachers

    assert majority_rate([0, 1, 1, 1]) == 0.75 and majority_rate([]) == 0.0
    accs = {"good": 0.83, "weak": 0.70, "majority": 0.5909, "barely": 0.599}
    assert uninformative_teachers(accs, 0.5909) == ["majority", "barely"]
