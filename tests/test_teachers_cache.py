"""autoskd.engine.teacher_cache and autoskd.engine.teachers: the on-disk logits cache, the
engine's use of it (teachers run once, not every step), and the teacher policies
(single, average, sampled from theta with SSWO scaling, ``preselected``)."""

from __future__ import annotations

import datasets
import pytest
import torch
from torch import nn

from autoskd.data.collate import make_loader, tokenize_split
from autoskd.engine.batches import model_inputs
from autoskd.engine.callbacks import Callback
from autoskd.engine.teacher_cache import (
    TeacherOutputCache,
    compute_logits_table,
    model_fingerprint,
    sequential_loader,
)
from autoskd.engine.teachers import AverageTeachers, SampledTeacher, SingleTeacher, Teacher, as_policy
from autoskd.engine.trainer import Distiller, Stage
from autoskd.errors import AutoSKDError
import autoskd.methods  # noqa: F401  (registers the built-in methods these runs name)

MAX_LENGTH = 32


from helpers import tiny_bert  # noqa: E402


WORDS = ["good", "bad", "dull", "great", "film", "plot", "cast", "long", "short", "story", "fun", "slow"]


def dataset(n: int) -> datasets.Dataset:
    # Varying lengths, so batches get different padding.
    texts = [" ".join(WORDS[(i * k) % len(WORDS)] for k in range(1, 2 + i % 7)) for i in range(n)]
    return datasets.Dataset.from_dict({"text": texts, "label": [i % 2 for i in range(n)], "idx": list(range(n))})


def loader(tok, n: int = 40, batch_size: int = 8, shuffle: bool = True, seed: int = 0):
    return make_loader(tokenize_split(dataset(n), tok, MAX_LENGTH), tok, batch_size, shuffle=shuffle, seed=seed)


class ForwardCounter:
    def __init__(self, model: nn.Module):
        self.count = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.count += 1


@torch.no_grad()
def direct_logits(model: nn.Module, loader, i: int) -> torch.Tensor:
    """The model's logits for row ``i`` alone (no padding)."""
    row = loader.dataset[i]
    batch = loader.collate_fn([row])
    was = model.training
    model.eval()
    out = model(**model_inputs(batch)).logits[0]
    model.train(was)
    return out


def one_batch(tok, n: int = 8, seed: int = 0) -> dict:
    return next(iter(loader(tok, 24, n, shuffle=True, seed=seed)))


# ---------------------------------------------------------------------------------------------- the cache
def test_logits_table_matches_direct_forward(tok, tmp_path):
    teacher = tiny_bert(tok).eval()
    train = loader(tok, 40, 8, shuffle=True)
    cache = TeacherOutputCache(tmp_path / "cache")
    table = cache.get_or_compute(model_fingerprint(teacher), "data-A", teacher, train, progress=False)
    assert table.shape == (40, 2) and table.dtype == torch.float32
    for i in range(40):
        assert torch.allclose(table[i], direct_logits(teacher, train, i), atol=1e-5), i
    files = list((tmp_path / "cache").iterdir())
    assert [f.suffix for f in files] == [".safetensors"]  # atomic write left no temp file behind


def test_second_call_is_served_from_disk(tok, tmp_path):
    teacher = tiny_bert(tok).eval()
    fp = model_fingerprint(teacher)
    train = loader(tok, 40, 8)
    counter = ForwardCounter(teacher)
    first = TeacherOutputCache(tmp_path).get_or_compute(fp, "data-A", teacher, train, progress=False)
    assert counter.count == 5  # 40 rows / 8
    counter.count = 0
    again = TeacherOutputCache(tmp_path).get_or_compute(fp, "data-A", teacher, train, progress=False)  # new object
    assert counter.count == 0
    assert torch.equal(first, again)
    assert torch.equal(TeacherOutputCache(tmp_path).load(fp, "data-A"), first)


def test_other_data_or_teacher_recomputes(tok, tmp_path):
    teacher = tiny_bert(tok).eval()
    fp = model_fingerprint(teacher)
    cache = TeacherOutputCache(tmp_path)
    counter = ForwardCounter(teacher)
    cache.get_or_compute(fp, "data-A", teacher, loader(tok, 40, 8), progress=False)
    counter.count = 0
    small = cache.get_or_compute(fp, "data-B", teacher, loader(tok, 16, 8), progress=False)
    assert counter.count == 2 and small.shape == (16, 2)
    counter.count = 0
    other_fp = "f" * 64
    cache.get_or_compute(other_fp, "data-A", teacher, loader(tok, 40, 8), progress=False)
    assert counter.count == 5
    assert cache.load("0" * 64, "data-A") is None
    assert len(list(tmp_path.glob("*.safetensors"))) == 3


def test_data_ids_differing_after_16_chars_do_not_collide(tok, tmp_path):
    from autoskd.data.tasks import TaskData
    from autoskd.pipeline import make_loaders

    task = TaskData("toy", ["0", "1"], "text", None, {r: dataset(24) for r in ("train", "val", "dev", "test")})
    short = make_loaders(task, tok, max_length=4, batch_size=8, seed=0)
    long = make_loaders(task, tok, max_length=32, batch_size=8, seed=0)
    assert short.train_id != long.train_id
    teacher = tiny_bert(tok).eval()
    fp = model_fingerprint(teacher)
    cache = TeacherOutputCache(tmp_path)
    truth4 = compute_logits_table(teacher, short.train, progress=False)
    truth32 = compute_logits_table(teacher, long.train, progress=False)
    assert (truth4 - truth32).abs().max() > 1e-5  # truncation changes the teacher's logits
    cache.get_or_compute(fp, short.train_id, teacher, short.train, progress=False)
    served = cache.get_or_compute(fp, long.train_id, teacher, long.train, progress=False)
    assert torch.allclose(served, truth32, atol=1e-6)  # fails: the max_length=4 table is served


def test_model_fingerprint(tok):
    a = tiny_bert(tok, seed=0)
    fp = model_fingerprint(a)
    assert fp == model_fingerprint(a) == model_fingerprint(tiny_bert(tok, seed=0))
    assert len(fp) == 64
    with torch.no_grad():
        a.classifier.bias[0] += 1e-3
    assert model_fingerprint(a) != fp
    assert model_fingerprint(tiny_bert(tok, seed=1)) != fp


def test_compute_logits_table_orders_by_idx_and_rejects_gaps(tok):
    teacher = tiny_bert(tok).eval()
    shuffled = compute_logits_table(teacher, loader(tok, 24, 8, shuffle=True), progress=False)
    ordered = compute_logits_table(teacher, loader(tok, 24, 5, shuffle=False), progress=False)
    assert torch.allclose(shuffled, ordered, atol=1e-5)
    gappy = tokenize_split(dataset(6).map(lambda r: {"idx": r["idx"] * 2}), tok, MAX_LENGTH)
    with pytest.raises(ValueError, match="without gaps"):
        compute_logits_table(teacher, make_loader(gappy, tok, 4, shuffle=False), progress=False)


def test_sequential_loader_leaves_shuffle_generator_alone(tok):
    a = loader(tok, 40, 8, shuffle=True, seed=3)
    b = loader(tok, 40, 8, shuffle=True, seed=3)
    state = a.generator.get_state()
    seq = [batch["idx"].tolist() for batch in sequential_loader(a)]
    assert sum(seq, []) == list(range(40))  # in order, same batch size
    assert torch.equal(a.generator.get_state(), state)
    for _ in range(2):  # the next epochs' orders are unchanged
        assert [x["idx"].tolist() for x in a] == [x["idx"].tolist() for x in b]


def test_sequential_loader_leaves_global_rng_alone(tok):
    state = torch.get_rng_state()
    list(sequential_loader(loader(tok, 16, 8)))
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------------------------------------- engine + cache
class Batches(Callback):
    def __init__(self, counter: ForwardCounter):
        self.counter = counter
        self.at_stage_start: int | None = None
        self.idx: list[list[int]] = []

    def on_stage_start(self, trainer, ctx):
        self.at_stage_start = self.counter.count  # teacher.prepare has run

    def on_step_begin(self, trainer, ctx, batch):
        self.idx.append(batch["idx"].tolist())


def _kd_run(tok, tmp_path, data_id, cache="cache", teacher_seed=1, dropout=0.1):
    teacher = tiny_bert(tok, layers=2, seed=teacher_seed).eval()
    counter = ForwardCounter(teacher)
    spy = Batches(counter)
    student = tiny_bert(tok, layers=1, seed=2, dropout=dropout)
    train = loader(tok, 40, 8, shuffle=True, seed=5)
    Distiller(student, "kd", teacher, seed=0, progress=False, device="cpu", callbacks=[spy],
              teacher_cache=tmp_path / cache if cache else None).fit(
        [Stage("task", train, epochs=3, lr=1e-3, data_id=data_id)])
    return student, counter, spy


def test_kd_with_cache_runs_teacher_once(tok, tmp_path):
    cached, counter, spy = _kd_run(tok, tmp_path, data_id="toy-40")
    assert spy.at_stage_start == 5  # one pass over 40 rows in batches of 8, to build the table
    assert counter.count == 5  # and none in the 3 x 5 training steps
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1

    _, counter2, spy2 = _kd_run(tok, tmp_path, data_id="toy-40")  # a second run: the table is on disk
    assert counter2.count == 0

    uncached, counter3, spy3 = _kd_run(tok, tmp_path, data_id=None)
    assert spy3.at_stage_start == 0 and counter3.count == 15  # the teacher runs every step

    assert spy.idx == spy3.idx == spy2.idx  # same batches with and without the cache


def _same_student(a: nn.Module, b: nn.Module) -> None:
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-6), k


def test_cache_gives_the_same_student_without_dropout(tok, tmp_path):
    cached, _, _ = _kd_run(tok, tmp_path, data_id="toy-40", dropout=0.0)
    uncached, _, _ = _kd_run(tok, tmp_path, data_id=None, dropout=0.0)
    _same_student(cached, uncached)


def test_cache_gives_the_same_student(tok, tmp_path):
    cached, _, _ = _kd_run(tok, tmp_path, data_id="toy-40")
    uncached, _, _ = _kd_run(tok, tmp_path, data_id=None)
    _same_student(cached, uncached)


def test_data_id_without_cache_folder_computes_in_memory(tok, tmp_path):
    _, counter, spy = _kd_run(tok, tmp_path, data_id="toy-40", cache=None)
    assert spy.at_stage_start == 5 and counter.count == 5
    assert not any(tmp_path.iterdir())


def test_sampled_teachers_in_the_loop_use_cache(tok, tmp_path):
    ta, tb = tiny_bert(tok, seed=1).eval(), tiny_bert(tok, seed=3).eval()
    ca, cb = ForwardCounter(ta), ForwardCounter(tb)
    policy = SampledTeacher({"a": Teacher("a", ta), "b": Teacher("b", tb)}, torch.tensor([0.3, 0.7]), seed=0)
    chosen = []

    class Who(Callback):
        def on_step_end(self, trainer, ctx, batch, losses):
            chosen.append(ctx.teacher_name)

    Distiller(tiny_bert(tok, layers=1), "kd", policy, progress=False, device="cpu", callbacks=[Who()],
              teacher_cache=tmp_path).fit([Stage("task", loader(tok, 40, 8), epochs=2, data_id="toy")])
    assert (ca.count, cb.count) == (5, 5)
    assert len(chosen) == 10 and set(chosen) <= {"a", "b"}
    assert policy.counts == {"a": chosen.count("a"), "b": chosen.count("b")}


# ---------------------------------------------------------------------------------------------- policies
@pytest.fixture(scope="module")
def three(tok):
    return {n: tiny_bert(tok, seed=s).eval() for n, s in (("a", 1), ("b", 2), ("c", 3))}


def test_teacher_is_frozen_and_serves_table_rows(tok, three):
    model = three["a"]
    t = Teacher("a", model)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert t.fingerprint == model_fingerprint(model)
    assert Teacher("a", model, fingerprint="given").fingerprint == "given"
    batch = one_batch(tok)
    live = t.features(batch, ["logits"])["logits"]
    t.prepare(loader(tok, 24, 8), "d", None, progress=False)
    assert t.logits_table.shape == (24, 2)
    served = t.features(batch, ["logits"])["logits"]
    assert torch.allclose(live, served, atol=1e-5)
    # Non-logit features always come from a forward, table or not.
    feats = t.features(batch, ["hidden:0", "logits"])
    assert feats["hidden:0"].shape[:2] == batch["input_ids"].shape and not feats["logits"].requires_grad
    t.prepare(loader(tok, 24, 8), None, None)
    assert t.logits_table is None


def test_single_teacher(tok, three):
    policy = SingleTeacher(Teacher("a", three["a"]))
    assert {policy.choose(s) for s in range(5)} == {"a"}
    batch = one_batch(tok)
    expected = three["a"](**model_inputs(batch)).logits
    assert torch.allclose(policy.features("a", batch, ["logits"])["logits"], expected, atol=1e-6)
    assert policy.geometry_source("a") is three["a"]


def test_average_teachers(tok, three):
    policy = AverageTeachers({n: Teacher(n, m) for n, m in three.items()})
    assert policy.choose(0) == "average"
    batch = one_batch(tok)
    with torch.no_grad():
        logits = [m(**model_inputs(batch)).logits for m in three.values()]
    got = policy.features("average", batch, ["logits"])["logits"]
    assert torch.allclose(got, (logits[0] + logits[1] + logits[2]) / 3, atol=1e-6)
    with pytest.raises(AutoSKDError, match="AvgKD averages teacher logits only"):
        policy.features("average", batch, ["hidden:0", "logits"])
    # With tables too (the engine's usual path).
    policy.prepare(loader(tok, 24, 8), "d", None, progress=False)
    assert torch.allclose(policy.features("average", batch, ["logits"])["logits"], got, atol=1e-5)


def test_average_teachers_with_intermediate_method_is_an_error(tok, three):
    policy = AverageTeachers({n: Teacher(n, m) for n, m in three.items()})
    with pytest.raises(AutoSKDError, match="AvgKD averages teacher logits only"):
        Distiller(tiny_bert(tok, layers=1), "tinybert", policy, progress=False, device="cpu").fit(
            [Stage("intermediate", loader(tok, 16, 8), epochs=1)])


def _chi2(counts: list[int], probs: list[float]) -> float:
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs) if p > 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampling_follows_theta(three, seed):
    theta = [0.2, 0.5, 0.3]
    policy = SampledTeacher({n: Teacher(n, m) for n, m in three.items()}, torch.tensor(theta), seed=seed)
    names = [policy.choose(step) for step in range(2000)]
    counts = [names.count(n) for n in "abc"]
    assert policy.counts == dict(zip("abc", counts))
    assert _chi2(counts, theta) < 13.82  # chi-square, 2 dof, p = 0.001


def test_sampling_is_seeded(three):
    teachers = {n: Teacher(n, m) for n, m in three.items()}

    def draws(seed):
        policy = SampledTeacher(teachers, torch.tensor([0.2, 0.5, 0.3]), seed=seed)
        return [policy.draw() for _ in range(50)]

    assert draws(4) == draws(4)
    assert draws(4) != draws(5)
    torch.manual_seed(0)  # the global RNG plays no part
    first = draws(6)
    torch.manual_seed(1)
    assert draws(6) == first


def test_zero_weight_teacher_is_never_sampled(three):
    policy = SampledTeacher({n: Teacher(n, m) for n, m in three.items()}, torch.tensor([0.5, 0.0, 0.5]))
    names = {policy.choose(s) for s in range(1000)}
    assert names == {"a", "c"} and policy.counts["b"] == 0


def test_theta_is_read_every_step(three):
    theta = torch.tensor([1.0, 0.0, 0.0])
    policy = SampledTeacher({n: Teacher(n, m) for n, m in three.items()}, theta)
    assert {policy.choose(s) for s in range(20)} == {"a"}
    theta.copy_(torch.tensor([0.0, 0.0, 1.0]))  # the search updates theta in place
    assert {policy.choose(s) for s in range(20)} == {"c"}


def test_preselected_is_honoured_once(three):
    policy = SampledTeacher({n: Teacher(n, m) for n, m in three.items()}, torch.tensor([1.0, 0.0, 0.0]))
    policy.preselected = 2
    assert policy.choose(0) == "c"
    assert policy.preselected is None
    assert policy.counts == {"a": 0, "b": 0, "c": 0}  # choose() did not draw (the caller's draw counts)
    assert policy.choose(1) == "a" and policy.counts["a"] == 1
    # The search's pattern: draw() in a callback, then the step uses that draw.
    policy.theta.copy_(torch.tensor([0.0, 1.0, 0.0]))
    i = policy.draw()
    policy.preselected = i
    policy.theta.copy_(torch.tensor([1.0, 0.0, 0.0]))
    assert policy.choose(2) == "b" and policy.last_index == 1 and policy.counts["b"] == 1


def test_sswo_scales_logits_by_theta(tok, three):
    theta = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    teachers = {n: Teacher(n, m) for n, m in three.items()}
    batch = one_batch(tok)
    scaled = SampledTeacher(teachers, theta)
    plain = SampledTeacher(teachers, theta, scale_logits=False)
    for i, name in enumerate("abc"):
        raw = three[name](**model_inputs(batch)).logits.detach()
        got = scaled.features(name, batch, ["logits"])["logits"]
        assert got.dtype == raw.dtype
        assert torch.allclose(got, raw * float(theta[i]), atol=1e-6)
        assert torch.allclose(plain.features(name, batch, ["logits"])["logits"], raw, atol=1e-6)
    # Other features are not scaled.
    h = three["b"](**model_inputs(batch), output_hidden_states=True).hidden_states[1]
    assert torch.allclose(scaled.features("b", batch, ["hidden:0"])["hidden:0"], h, atol=1e-6)


def test_sampled_teacher_validates_theta_length(three):
    with pytest.raises(AutoSKDError, match="distribution has 2 weights but the team has 3 teachers"):
        SampledTeacher({n: Teacher(n, m) for n, m in three.items()}, torch.tensor([0.5, 0.5]))


def test_as_policy(three):
    single = as_policy(three["a"])
    assert isinstance(single, SingleTeacher) and single.choose(0) == "teacher"
    named = as_policy({"x": three["a"]}, {"x": "fp-x"})
    assert isinstance(named, SingleTeacher) and named.name == "x" and named.teachers["x"].fingerprint == "fp-x"
    assert as_policy(None) is None
    assert as_policy(named) is named
    with pytest.raises(AutoSKDError, match="several teachers given without a policy"):
        as_policy(dict(three))
    with pytest.raises(AutoSKDError, match="cannot use int as teachers"):
        as_policy(3)
    with pytest.raises(AutoSKDError, match="no teachers given"):
        AverageTeachers({})
