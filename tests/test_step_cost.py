"""What a trial step costs: fused AdamW, lazily loaded teachers (issue 6, part 3)."""

from __future__ import annotations

import torch

from autoskd.data.tasks import load_task
from autoskd.engine.teachers import Teacher
from autoskd.engine.backends import adamw as _optimizer
from autoskd.models.lazy import LazyModel, LazyModels
from autoskd.pipeline import DistillConfig, distill
from autoskd.team import FinetuneSettings, ModelSpec, TeacherTeam, TeamSpec
from helpers import tiny_bert


def test_fused_adamw_gives_the_default_loops_numbers(tok):
    """The engine's AdamW is fused on CPU and, step for step, matches torch's per-tensor loop."""
    fused_model, loop_model = tiny_bert(tok, seed=3), tiny_bert(tok, seed=3)
    fused = _optimizer(list(fused_model.named_parameters()), lr=1e-3, weight_decay=0.01)
    assert all(g["fused"] for g in fused.param_groups)
    loop = _optimizer(list(loop_model.named_parameters()), lr=1e-3, weight_decay=0.01)
    for g in loop.param_groups:  # what the engine did before: torch's CPU default
        g["fused"], g["foreach"] = None, False
    batch = tok(["a great film", "a dull film"], return_tensors="pt")
    for step in range(5):
        for model, opt in ((fused_model, fused), (loop_model, loop)):
            torch.manual_seed(step)
            loss = model(**batch, labels=torch.tensor([1, 0])).logits.square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    for (name, a), b in zip(fused_model.named_parameters(), loop_model.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), name
    assert not torch.equal(fused_model.classifier.weight, tiny_bert(tok, seed=3).classifier.weight)


def _task(tmp_path):
    path = tmp_path / "reviews.csv"
    rows = ["text,label"] + [f"{'great' if i % 2 else 'awful'} film number {i},{i % 2}" for i in range(60)]
    path.write_text("\n".join(rows))
    return load_task(str(path))


def test_cached_teachers_are_loaded_only_when_needed(tiny_dir, tmp_path):
    """A rebuilt team holds its cached teachers unloaded; a KD run that reads every logit from
    the cache never loads them and trains the same student as with loaded teachers."""
    task = _task(tmp_path)
    fast = FinetuneSettings(epochs=1, lr=1e-3, batch_size=16)
    spec = TeamSpec(name="lazy", max_length=16, student=ModelSpec(str(tiny_dir), layers=1),
                    teachers=[ModelSpec(str(tiny_dir), layers=1, name="a", finetune=fast),
                              ModelSpec(str(tiny_dir), layers=2, name="b", finetune=fast)])
    teachers_dir, cache = tmp_path / "teachers", tmp_path / "cache"
    built = TeacherTeam(spec).build(task, cache_dir=teachers_dir, progress=False)
    assert all(built.teachers.loaded(n) for n in ("a", "b"))
    config = DistillConfig(method="kd", policy="average", epochs=1, batch_size=16, lr=1e-3)
    eager = distill(built, task, config, cache_dir=cache, progress=False)  # fills the logits cache

    cached = TeacherTeam(spec).build(task, cache_dir=teachers_dir, progress=False)
    assert cached.status == {"a": "cached", "b": "cached"}
    assert not any(cached.teachers.loaded(n) for n in ("a", "b"))
    assert "2" in cached.summary().splitlines()[-1]  # layer count read from the cache's meta.json
    lazy = distill(cached, task, config, cache_dir=cache, progress=False)
    assert not any(cached.teachers.loaded(n) for n in ("a", "b"))
    assert lazy.dev_acc == eager.dev_acc
    for x, y in zip(lazy.student.parameters(), eager.student.parameters()):
        assert torch.equal(x, y)

    # a cold logits cache needs the weights: the teacher loads, frozen, and gives the same logits
    single = DistillConfig(method="kd", teacher="b", epochs=1, batch_size=16, lr=1e-3)
    distill(cached, task, single, cache_dir=tmp_path / "cold", progress=False)
    assert cached.teachers.loaded("b") and not cached.teachers.loaded("a")
    b = cached.teachers["b"]
    assert not b.training and not any(p.requires_grad for p in b.parameters())
    assert all(torch.equal(x, y) for x, y in zip(b.state_dict().values(), built.teachers["b"].state_dict().values()))


def test_teacher_features_beyond_logits_load_the_model(tok):
    """Hidden states cannot come from the cache: asking for them loads the lazy teacher once."""
    loads = []

    def load():
        loads.append(1)
        return tiny_bert(tok, layers=2, seed=5)

    teacher = Teacher("t", LazyModel(load, lambda: tiny_bert(tok, layers=2, seed=9)))
    assert teacher.shape_model is not None and loads == []  # shape only: no load
    models = LazyModels({"t": LazyModel(lambda: teacher.model)})
    assert not models.loaded("t") and list(models) == ["t"] and loads == []
    batch = dict(tok(["a great film"], return_tensors="pt"))
    feats = teacher.features(batch, ["hidden:1"])
    assert feats["hidden:1"].shape[-1] == 32 and loads == [1]
    teacher.features(batch, ["hidden:1"])
    assert loads == [1] and models["t"] is teacher.model


def test_length_grouped_loader_pads_less_and_covers_every_row(tok):
    from autoskd.data.collate import TokenizedSplit, make_loader

    lengths = [3 + (7 * i) % 40 for i in range(200)]
    split = TokenizedSplit({"input_ids": [[101] + [1000] * (n - 2) + [102] for n in lengths],
                            "attention_mask": [[1] * n for n in lengths], "label": [i % 2 for i in range(200)],
                            "idx": list(range(200))})

    def epoch(loader):
        batches = list(loader)
        real = sum(int(b["attention_mask"].sum()) for b in batches)
        return [b["idx"].tolist() for b in batches], real / sum(b["input_ids"].numel() for b in batches)

    plain, plain_fill = epoch(make_loader(split, tok, 16, shuffle=True, seed=1))
    grouped = make_loader(split, tok, 16, shuffle=True, seed=1, group_by_length=True)
    first, fill = epoch(grouped)
    assert sorted(i for b in first for i in b) == list(range(200))  # every row once per epoch
    assert len(first) == len(grouped) == 13
    assert fill > 0.8 and plain_fill < 0.65, (fill, plain_fill)
    state = grouped.sampler.generator.get_state()  # what the engine checkpoints
    second, _ = epoch(grouped)
    assert second != first  # a new order each epoch
    grouped.sampler.generator.set_state(state)
    assert epoch(grouped)[0] == second  # resumable from the generator state
    again = make_loader(split, tok, 16, shuffle=True, seed=1, group_by_length=True)
    assert epoch(again)[0] == first  # seeded
