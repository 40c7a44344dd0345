"""Every registered method runs each of its stages end to end on tiny random models: the
loss is finite, the student changes, and the stage's terms are the ones its spec names."""

from __future__ import annotations

import copy

import pytest
import torch

from autoskd.data.collate import DynamicPaddingCollator
from autoskd.engine.mlm import MaskingCollator, adapt_teacher_mlm
from autoskd.engine.multi_teacher import AllTeachers, MultiTeacherMethod
from autoskd.engine.teachers import SingleTeacher, Teacher
from autoskd.engine.trainer import Distiller, Stage
from autoskd.methods import METHODS, get_method
from helpers import tiny_bert

GKD_TABLE_1 = ["kd", "pd", "pkd", "distilbert", "theseus", "tinybert", "mobilebert", "sid", "minilm", "minilmv2",
               "alp_kd", "lrc_bert", "annealing_kd", "ckd", "universal_kd", "diito", "continuation_kd", "rail_kd",
               "mgskd", "tmkd", "mt_bert", "rl_kd", "uncertainty", "takd", "dgkd"]
TINY_OPTIONS = {"minilmv2": {"relation_heads": 4}}
TEXTS = ["a good film", "the film is bad", "good good film !", "a bad , bad film", "the best film of the year",
         "not a good one", "films are fun", "a dull and long film"]


def rows(tok):
    enc = tok(TEXTS, truncation=True, max_length=16)
    return [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i],
             "token_type_ids": enc["token_type_ids"][i], "label": i % 2, "idx": i} for i in range(len(TEXTS))]


def loader(tok, masked: bool, seed: int = 0):
    collate = MaskingCollator(tok, mlm_probability=0.3, seed=seed) if masked else DynamicPaddingCollator(tok)
    return torch.utils.data.DataLoader(rows(tok), batch_size=4, shuffle=False, collate_fn=collate)


@pytest.fixture(scope="module")
def team(tok):
    """Two tiny teachers (4 and 2 layers... 4 and 4 wide-equal) with adapted MLM heads, and a 2-layer student."""
    teachers = {"t4": tiny_bert(tok, layers=4, seed=1, dropout=0.0), "t2": tiny_bert(tok, layers=2, seed=2, dropout=0.0)}
    for model in teachers.values():
        adapt_teacher_mlm(model, loader(tok, masked=True), steps=2, lr=1e-2)
    return teachers


def run_method(name, tok, team, **options):
    method = get_method(name, **{**TINY_OPTIONS.get(name, {}), **options})
    student = tiny_bert(tok, layers=2, seed=3)
    multi = isinstance(method, MultiTeacherMethod)
    teachers = {n: Teacher(n, copy.deepcopy(m)) for n, m in team.items()}
    policy = AllTeachers(teachers) if multi else SingleTeacher(teachers["t4"])
    before = {k: v.clone() for k, v in student.state_dict().items()}
    seen: dict[str, set] = {}

    from autoskd.engine.callbacks import Callback

    class Record(Callback):
        def on_step_end(self, trainer, ctx, batch, losses):
            assert all(torch.isfinite(v) for v in losses.values()), losses
            seen.setdefault(ctx.stage, set()).update(losses)

    trainer = Distiller(student, method, policy, progress=False, checkpoint=False, restore_best=False,
                        callbacks=[Record()])
    stages = [Stage(s, loader(tok, method.masked_stage(s)), epochs=1, lr=1e-3, evaluate=False)
              for s in method.spec.stages]
    trainer.fit(stages)
    changed = any(not torch.equal(before[k], v) for k, v in student.state_dict().items() if k in before)
    return method, seen, changed


@pytest.mark.parametrize("name", GKD_TABLE_1 + ["glmd"])
def test_every_method_runs_its_stages(name, tok, team):
    method, seen, changed = run_method(name, tok, team)
    assert set(seen) == set(method.spec.stages)
    assert changed, "the student did not change"
    for stage in method.spec.stages:
        terms = {k.split("/")[-1].split(":")[0] for k in seen[stage]}
        assert "loss" in terms and len(terms) > 1, (stage, terms)


def test_all_of_table_1_and_glmd_are_registered():
    assert set(GKD_TABLE_1 + ["glmd"]) <= set(METHODS.names())
