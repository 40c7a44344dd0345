"""Stage plans: each stage its own method, teacher, trainable parameters and data, on the one engine.

A 2-stage YAML on tiny random BERTs: stage 1 runs TinyBERT's intermediate-layer terms with only
the encoder layers trainable (everything else must keep its exact values), stage 2 runs ``kd``
with every parameter trainable and only kd's loss terms.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from autoskd.cli import main
from autoskd.engine.callbacks import Callback
from autoskd.errors import AutoSKDError

PLAN = """
stages:
  - name: layers
    method: tinybert
    method_stages: [intermediate]
    trainable: [bert.encoder.layer]
    teacher: t4
    epochs: 1
    lr: 1.0e-2
  - name: logits
    method: kd
    teacher: t2
    epochs: 1
    lr: 1.0e-3
    hard_label_weight: 0.5
"""


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory) -> Path:
    words = ["movie", "plot", "cast", "story", "script", "scene"]
    n = 40
    df = pd.DataFrame({"text": [f"{'good' if i % 2 else 'bad'} {words[i % 6]} and {words[(i // 6) % 6]}"
                                for i in range(n)], "label": ["pos" if i % 2 else "neg" for i in range(n)]})
    path = tmp_path_factory.mktemp("data") / "toy.csv"
    df.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_dir) -> Path:
    folder = tmp_path_factory.mktemp("stages")
    (folder / "team.yaml").write_text(textwrap.dedent(f"""
        name: tiny
        student: {{source: "{tiny_dir}", layers: 2, init: random}}
        finetune: {{epochs: 1, lr: 1.0e-3, batch_size: 16}}
        teachers:
          - {{name: t2, source: "{tiny_dir}", layers: 2}}
          - {{name: t4, source: "{tiny_dir}", layers: 4}}
        max_length: 16
    """))
    (folder / "plan.yaml").write_text(PLAN)
    return folder


class Spy(Callback):
    """Student weights at each stage's start and end, the loss keys and teachers of its steps."""

    def __init__(self):
        self.stages = []

    def on_stage_start(self, trainer, ctx):
        state = {k: v.detach().clone() for k, v in trainer.student.state_dict().items()}
        self.stages.append({"method": trainer.method.spec.name, "stage": ctx.stage, "before": state,
                            "keys": set(), "teachers": set()})

    def on_step_end(self, trainer, ctx, batch, losses):
        self.stages[-1]["keys"] |= set(losses)
        self.stages[-1]["teachers"].add(ctx.teacher_name)

    def on_stage_end(self, trainer, ctx):
        self.stages[-1]["after"] = {k: v.detach().clone() for k, v in trainer.student.state_dict().items()}


@pytest.fixture(scope="module")
def team_and_task(work, data_csv):
    from autoskd.data.tasks import load_task
    from autoskd.team import TeacherTeam

    task = load_task(str(data_csv))
    team = TeacherTeam.from_yaml(work / "team.yaml").build(task, cache_dir=work / "cache" / "teachers",
                                                           progress=False)
    return team, task


def test_two_stage_plan_freezes_what_it_says_and_runs_each_methods_loss(work, team_and_task):
    from autoskd.pipeline import DistillConfig
    from autoskd.stage_plans import distill_stages

    team, task = team_and_task
    spy = Spy()
    outcome, stages = distill_stages(team, task, work / "plan.yaml", DistillConfig(batch_size=16),
                                     out_dir=work / "run", cache_dir=work / "cache", progress=False, callbacks=[spy])
    first, second = spy.stages
    assert (first["method"], first["stage"], second["method"], second["stage"]) == \
        ("tinybert", "intermediate", "kd", "task")
    # stage 1: only the encoder layers move; embeddings, pooler and classifier keep their exact values
    moved = {k for k in first["before"] if not torch.equal(first["before"][k], first["after"][k])}
    assert moved and all(k.startswith("bert.encoder.layer.") for k in moved)
    assert any(k.startswith("bert.encoder.layer.1.") for k in moved)
    assert all(torch.equal(first["before"][k], first["after"][k]) for k in first["before"]
               if not k.startswith("bert.encoder.layer."))
    # its loss: TinyBERT's intermediate terms only, from its own teacher
    assert {"embeddings_mse", "loss"} <= first["keys"]
    assert any(k.startswith("hidden_mse") for k in first["keys"]) and any(k.startswith("attention_mse")
                                                                          for k in first["keys"])
    assert not any("soft" in k or k == "hard_ce" for k in first["keys"]) and first["teachers"] == {"t4"}
    # stage 2: kd's own loss (soft term + the stage's hard-label term), everything trainable, teacher t2
    assert second["keys"] == {"soft_kl", "hard_ce", "loss"} and second["teachers"] == {"t2"}
    assert not torch.equal(second["before"]["bert.embeddings.word_embeddings.weight"],
                           second["after"]["bert.embeddings.word_embeddings.weight"])
    assert [s.trainable_parameters for s in stages][0] < [s.trainable_parameters for s in stages][1]
    summary = json.loads((work / "run" / "stages.json").read_text())
    assert [s["method"] for s in summary] == ["tinybert", "kd"]
    assert (work / "run" / "student" / "config.json").exists() and 0 <= outcome.test_acc <= 1


def test_stage_plan_from_the_cli_resumes_after_finished_stages(capsys, work, data_csv):
    args = ["distill", "--team", work / "team.yaml", "--task", data_csv, "--method", work / "plan.yaml",
            "--batch-size", "16", "--cache-dir", work / "cache", "--out", work / "cli", "--no-progress"]
    assert main([str(a) for a in args]) == 0
    assert "student (tinybert -> kd)" in capsys.readouterr().out
    (work / "cli" / "result.json").unlink()  # as if killed after stage 2 finished, before saving
    assert main([str(a) for a in args]) == 0
    assert all(s["resumed"] for s in json.loads((work / "cli" / "stages.json").read_text()))


@pytest.mark.parametrize("plan, message", [
    ("stages: []", "needs a non-empty 'stages:' list"),
    ("stages:\n  - {epochs: 1}", r"stages\[0\] has no 'method'"),
    ("stages:\n  - {method: kd, epoch: 1}", "unknown key 'epoch' in plan.yaml: stages\\[0\\]; allowed keys"),
    ("stages:\n  - {method: tinybert, method_stages: [task]}", "method 'tinybert' has no stage 'task'"),
    ("stages:\n  - {method: kd, options: {temprature: 2}}", "has no option temprature"),
    ("stages:\n  - {method: kd, trainable: ['*.no_such.*']}", "trainable pattern '\\*.no_such.\\*' matches no"),
    ("stages:\n  - {method: kd, lr: fast}", r"stages\[0\].lr must be a number"),
    ("stages:\n  - {method: kd}\n  - {method: kd, teacher: t9}", "stage 'stage1-kd': teacher 't9' is not in the team"),
    ("stages:\n  - {method: kd}\n  - {method: kd, trainable: [bert.nope]}", "prefix 'bert.nope' matches no"),
])
def test_bad_plans_fail_in_one_line(capsys, work, data_csv, tmp_path, plan, message):
    import re

    (tmp_path / "plan.yaml").write_text(plan)
    code = main([str(a) for a in ["distill", "--team", work / "team.yaml", "--task", data_csv, "--method",
                                  tmp_path / "plan.yaml", "--cache-dir", work / "cache", "--out", tmp_path / "o",
                                  "--no-progress"]])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("autoskd: error: ") and re.search(message, err), err
    assert not (tmp_path / "o").exists()  # refused before the first stage trained


def test_glob_patterns_select_exact_parameters(team_and_task):
    from autoskd.engine.stages import resolve_trainable

    team, task = team_and_task
    student = team.build_student(task)
    names = resolve_trainable(student, ["*.attention.self.query.*", "classifier"], "s")
    assert names[-1] == "classifier" and all(".attention.self.query." in n for n in names[:-1]) and len(names) == 5
    with pytest.raises(AutoSKDError, match="matches no student parameter"):
        resolve_trainable(student, ["*nothing*"], "s")


def test_unlabelled_stage_on_another_data_file(work, team_and_task, data_csv, tmp_path):
    """TinyBERT's general distillation as a stage: its pretrain terms on another file's text
    without labels (no hard-label term, no dev evaluation), then its task stages."""
    from autoskd.pipeline import DistillConfig
    from autoskd.stage_plans import distill_stages

    team, task = team_and_task
    plan = [{"method": "tinybert", "method_stages": ["pretrain"], "data": str(data_csv), "labels": False,
             "name": "general"},
            {"method": "tinybert", "method_stages": ["intermediate", "prediction"], "name": "task"}]
    seen = []

    class Batches(Callback):
        def on_step_end(self, trainer, ctx, batch, losses):
            seen.append((ctx.stage, "labels" in batch, set(losses)))

    _, stages = distill_stages(team, task, plan, DistillConfig(batch_size=16), progress=False, callbacks=[Batches()])
    general = [s for s in seen if s[0] == "pretrain"]
    assert general and not any(has for _, has, _ in general)
    assert all("hard_ce" not in keys and "embeddings_mse" in keys for *_, keys in general)
    assert [s[0] for s in seen if s[0] != "pretrain"][:1] == ["intermediate"] and seen[-1][0] == "prediction"
    assert stages[0].result.best_dev_acc is None and stages[1].result.best_dev_acc is not None
