"""Reruns into one output folder never mix two experiments (issue 24, "Reruns and resume").

Every finished artifact (``experiment.yaml``, a search's ``config.json``, ``search.json`` and
``search-lr*.json``, every ``trials/<arm>/arm.json``, a tune's study and ``tune.json``, a stage
plan's ``done.json``, a chain hop's ``result.json``, a checkpoint) carries what it was computed
from; a rerun resumes what matches and otherwise stops with one line naming the keys that differ.
Also: θ learning-rate tags are exact, ``restore_best`` keeps a later stage's training, and the
teacher-output cache keys on what determines the outputs and checks a table's shape on load.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import datasets
import pytest
import torch

import autoskd.methods  # noqa: F401  (registers the built-in methods)
from autoskd.data.collate import make_loader, tokenize_split
from autoskd.errors import AutoSKDError
from autoskd.search.arms import Arm
from autoskd.search.trials import TrialSpec, run_arms
from helpers import InterruptAt, OneClassTeacher, tiny_bert

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
import fake_runner  # noqa: E402


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


# ---------------------------------------------------------------------------------------------- arms
def _spec(root: Path, **base) -> TrialSpec:
    return TrialSpec(team_path="teams/x.yaml", task={"name_or_path": "rotten_tomatoes", "seed": 0, "max_train": 50},
                     root=str(root), cache_dir=str(root / "cache"), base_config={"method": "kd", "epochs": 1.0, **base},
                     runner="fake_runner:run")


def test_an_arm_of_another_configuration_is_refused_not_reused(tmp_path):
    arms = [Arm("candidate-00", "candidate", theta=[0.3, 0.7]), Arm("avgkd", "average")]
    first = run_arms(_spec(tmp_path), arms, executor="local", progress=False)
    assert [r["status"] for r in first] == ["finished", "finished"]
    assert all(len(r["fingerprint"]) == 64 for r in first)
    # the identical rerun resumes
    again = run_arms(_spec(tmp_path), arms, executor="local", progress=False)
    assert [r["status"] for r in again] == ["loaded", "loaded"]
    # candidates are named by index: another search's candidate-00 has another theta
    other = [Arm("candidate-00", "candidate", theta=[0.9, 0.1]), Arm("avgkd", "average")]
    with pytest.raises(AutoSKDError) as err:
        run_arms(_spec(tmp_path), other, executor="local", progress=False)
    line = one_line(err)
    assert "candidate-00" in line and "arm.theta" in line and "--out" in line and "delete" in line
    # another base configuration (epochs): every arm differs
    with pytest.raises(AutoSKDError, match=r"base_config\.epochs"):
        run_arms(_spec(tmp_path, epochs=2.0), arms, executor="local", progress=False)
    assert sorted(fake_runner.calls(tmp_path)) == ["avgkd", "candidate-00"]  # nothing ran again


def test_a_setting_added_since_resumes_old_work_only_at_the_value_that_reproduces_it(tmp_path):
    """An arm stamped before ``tensor_parallel``/``deepspeed`` existed resumes when they hold the
    values that do what it did (rerun.ADDED_SETTINGS), and is refused at any other value."""
    from autoskd.rerun import fingerprint

    arms = [Arm("avgkd", "average")]
    run_arms(_spec(tmp_path), arms, executor="local", progress=False)
    # rewrite the record as a build without the settings wrote it (its identity and fingerprint)
    path = tmp_path / "trials" / "avgkd" / "arm.json"
    record = json.loads(path.read_text())
    assert "tensor_parallel" not in json.dumps(record["identity"])
    now = _spec(tmp_path, deepspeed=None, tensor_parallel=1)
    assert [r["status"] for r in run_arms(now, arms, executor="local", progress=False)] == ["loaded"]
    with pytest.raises(AutoSKDError, match=r"base_config\.tensor_parallel: \(absent\) -> 2"):
        run_arms(_spec(tmp_path, deepspeed=None, tensor_parallel=2), arms, executor="local", progress=False)
    with pytest.raises(AutoSKDError, match=r"base_config\.deepspeed"):
        run_arms(_spec(tmp_path, deepspeed={"zero_optimization": {"stage": 3}}), arms, executor="local", progress=False)
    assert record["fingerprint"] == fingerprint(record["identity"])
    assert fake_runner.calls(tmp_path) == ["avgkd"]  # the resumed arm did not run again


# ---------------------------------------------------------------------------------------------- search
def _search_config(**kw):
    from autoskd.search.run import SearchConfig
    from autoskd.search.theta_step import ThetaConfig

    theta = {"num_candidates": 2, "order": "first", **kw.pop("theta", {})}
    settings = {"search_epochs": 1, "eval_epochs": 1, "lr": 3e-3, "batch_size": 16, "m": 0, "executor": "local",
                "n_random": 1, "max_train": 96, "max_eval": 48, **kw}
    return SearchConfig(theta=ThetaConfig(**theta), **settings)


def test_search_rerun_with_another_strategy_stops_and_resource_flags_resume(tiny_team_yaml, sentiment_csv, tmp_path):
    from autoskd.search.run import run_search

    out, cache, task = tmp_path / "run", tmp_path / "cache", {"name_or_path": str(sentiment_csv)}
    run_search(tiny_team_yaml, task, _search_config(theta_only=True), out, cache_dir=cache, progress=False)
    record = json.loads((out / "search.json").read_text())
    assert len(record["fingerprint"]) == 64
    mtime = (out / "search.json").stat().st_mtime_ns
    with pytest.raises(AutoSKDError) as err:
        run_search(tiny_team_yaml, task, _search_config(theta_only=True, theta={"strategy": "cr"}), out,
                   cache_dir=cache, progress=False)
    line = one_line(err)
    assert "theta.strategy" in line and "'sswo' -> 'cr'" in line and "--out" in line, line
    with pytest.raises(AutoSKDError, match=r"search\.m\b"):
        run_search(tiny_team_yaml, task, _search_config(theta_only=True, m=1), out, cache_dir=cache, progress=False)
    with pytest.raises(AutoSKDError, match=r"search\.seed"):
        run_search(tiny_team_yaml, task, _search_config(theta_only=True, seed=1), out, cache_dir=cache, progress=False)
    # where and how far it runs are not what it computes: the identical search resumes
    run_search(tiny_team_yaml, task, _search_config(theta_only=True, max_concurrent=3, baselines="none"), out,
               cache_dir=cache, progress=False)
    assert (out / "search.json").stat().st_mtime_ns == mtime


def test_a_search_record_of_another_configuration_is_refused_from_python(tok, sentiment_csv, tmp_path):
    """``bilevel_search`` called directly (no config.json above it) refuses a mismatching record."""
    from autoskd.data.tasks import load_task
    from autoskd.search.run import SearchConfig, bilevel_search
    from autoskd.search.theta_step import ThetaConfig
    from autoskd.team import TeacherTeam

    task = load_task(str(sentiment_csv), seed=0).subsample(64, 32, seed=0)
    teachers = {"a": OneClassTeacher(0.3), "b": OneClassTeacher(0.6)}
    team = TeacherTeam(student=tiny_bert(tok, 1), teachers=teachers, tokenizer=tok, max_length=16)
    team.build(task, cache_dir=tmp_path / "teachers", progress=False)

    def search(strategy):
        config = SearchConfig(search_epochs=1, lr=3e-3, batch_size=16,
                              theta=ThetaConfig(num_candidates=1, order="first", strategy=strategy))
        return bilevel_search(team, task, config, m=0, out_dir=tmp_path, cache_dir=tmp_path / "cache", progress=False)

    first = search("sswo")
    mtime = (tmp_path / "search.json").stat().st_mtime_ns
    assert search("sswo")["fingerprint"] == first["fingerprint"]  # resumed, not run again
    assert (tmp_path / "search.json").stat().st_mtime_ns == mtime
    with pytest.raises(AutoSKDError, match=r"search\.theta\.strategy"):
        search("cr")


def test_lr_tags_are_exact_and_distinct(tmp_path):
    from autoskd.search.run import _lr_tag, search_record_path

    assert _lr_tag(2.5e-4) != _lr_tag(3e-4) and _lr_tag(1.1e-2) != _lr_tag(1.2e-2)
    for lr in (2.5e-4, 3e-4, 1e-2, 2e-2, 1.0, 12.0, 1 / 3, 1.23456789e-5):
        tag = _lr_tag(lr)
        assert float(tag) == lr and "/" not in tag, (lr, tag)
    assert (_lr_tag(1e-2), _lr_tag(2e-2)) == ("1e-2", "2e-2")  # one-digit rates keep their short names
    config = _search_config(theta_lrs=[2.5e-4, 3e-4])
    paths = {search_record_path(config, tmp_path, lr) for lr in config.grid}
    assert len(paths) == 2


# ---------------------------------------------------------------------------------------------- tune
def test_tune_rerun_with_another_team_task_or_base_stops(tmp_path, monkeypatch):
    import optuna

    from autoskd.fanout import tune as tune_module
    from autoskd.fanout.space import SearchSpace
    from autoskd.fanout.tune import TuneSettings, run_tune

    monkeypatch.setattr(tune_module, "_build_team", lambda spec, progress: None)
    monkeypatch.setattr(tune_module, "_run_trials", lambda *a, **k: None)
    monkeypatch.setattr(tune_module, "write_results", lambda study, out, objectives: {})
    space = SearchSpace.from_dict({"name": "lrs", "fixed": {"method": "kd"}, "params": {"lr": {"grid": [1e-3, 2e-3]}}})
    team_a, team_b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    team_a.write_text("name: a\n")
    team_b.write_text("name: b\n")
    out, task = tmp_path / "out", {"name_or_path": "rotten_tomatoes", "seed": 0}

    def tune(team=team_a, task=task, out=out, **settings):
        settings = {"sampler": "grid", "base": {"batch_size": 16}, **settings}
        return run_tune(space, str(team), task, TuneSettings(**settings), out, cache_dir=tmp_path / "cache",
                        progress=False)

    tune()
    study = optuna.load_study(study_name="lrs", storage=f"sqlite:///{out / 'optuna.db'}")
    assert len(json.loads(study.user_attrs["autoskd_run"])["fingerprint"]) == 64
    assert len(json.loads((out / "tune.json").read_text())["fingerprint"]) == 64
    tune(trials=1, max_concurrent=2)  # more or fewer trials, other resources: the same study resumes
    with pytest.raises(AutoSKDError) as err:
        tune(team=team_b)
    line = one_line(err)
    assert "team" in line and "lrs" in line and "--study" in line, line
    with pytest.raises(AutoSKDError, match=r"task\.seed"):
        tune(task={**task, "seed": 1})
    with pytest.raises(AutoSKDError, match=r"base_config\.batch_size"):
        tune(base={"batch_size": 32})
    # a shared storage: another out folder does not make another configuration's study its own
    db = tmp_path / "shared.db"
    tune(out=tmp_path / "one", storage=str(db))
    with pytest.raises(AutoSKDError, match=r"base_config\.batch_size"):
        tune(out=tmp_path / "two", storage=str(db), base={"batch_size": 8})
    # tune.json: another study into the same folder would overwrite its trials and results
    with pytest.raises(AutoSKDError, match="study"):
        tune(study="other")


# ---------------------------------------------------------------------------------------------- experiment files
def test_experiment_rerun_into_the_same_out_names_the_keys_that_differ(capsys, tmp_path, monkeypatch, tiny_dir):
    import autoskd.search.run
    from test_cli import assert_one_error, run, team_yaml

    team = team_yaml(tmp_path, str(tiny_dir), str(tiny_dir))
    calls = []
    monkeypatch.setattr(autoskd.search.run, "run_search", lambda *a, **kw: calls.append(a))
    argv = ["search", "--team", team, "--task", "x.csv", "--m", "0", "--out", tmp_path / "s"]
    assert run(capsys, *argv)[0] == 0
    # the same experiment (and only resources or how far it goes changed) resumes
    assert run(capsys, *argv, "--max-concurrent", "2", "--theta-only", "--no-progress")[0] == 0
    line = assert_one_error(capsys, argv + ["--strategy", "cr", "--seed", "1"], "search.theta.strategy", "seed",
                            "--out", "delete")
    assert "2 keys differ" in line
    assert len(calls) == 2  # the refused run started nothing


# ---------------------------------------------------------------------------------------------- restore_best
FILLERS = ["movie", "film", "plot", "story", "cast", "show", "script", "scene"]


def _good_bad(tok, n: int, flip: bool = False, shuffle: bool = True, offset: int = 0):
    texts = [f"{'good' if (i + offset) % 2 else 'bad'} {FILLERS[(i + offset) % 8]} {FILLERS[((i + offset) // 8) % 8]}"
             for i in range(n)]
    labels = [((i + offset) % 2) ^ int(flip) for i in range(n)]
    ds = datasets.Dataset.from_dict({"text": texts, "label": labels, "idx": list(range(n))})
    return make_loader(tokenize_split(ds, tok, 16), tok, 16, shuffle=shuffle, seed=0)


def test_restore_best_keeps_the_last_stages_training(tok):
    """Stage 1 learns the task (its epoch scores best on dev); stage 2 trains on flipped labels.
    The student must hold stage 2's best weights, not be rolled back to stage 1's."""
    from autoskd.engine.trainer import Distiller, Stage, evaluate

    model = tiny_bert(tok, 1, seed=0, dropout=0.0)
    dev = _good_bad(tok, 32, shuffle=False, offset=1000)
    stages = [Stage("task", _good_bad(tok, 64), epochs=4, lr=3e-3),
              Stage("task", _good_bad(tok, 64, flip=True), epochs=3, lr=1e-2)]
    result = Distiller(model, "finetune", progress=False, device="cpu").fit(stages, dev=dev)
    accs = [h["dev_acc"] for h in result.history]
    assert max(accs[:4]) > max(accs[4:]), accs  # the setting: the first stage's epoch is the best of all
    assert result.best_epoch >= 4 and result.best_dev_acc == max(accs[4:])
    assert result.student_dev_acc == max(accs[4:])
    assert evaluate(model, dev)["accuracy"] == pytest.approx(max(accs[4:]))


# ---------------------------------------------------------------------------------------------- checkpoints
def test_a_checkpoint_of_another_teacher_policy_is_not_resumed(tok, tmp_path):
    """A killed sampled-teacher run (an arm) rerun with another theta into the same folder must not
    continue the old run (whose policy state would overwrite the new theta)."""
    from autoskd.engine.teachers import SampledTeacher, Teacher
    from autoskd.engine.trainer import Distiller, Stage

    def fit(theta, callbacks=()):
        teachers = {"a": Teacher("a", OneClassTeacher(0.3)), "b": Teacher("b", OneClassTeacher(0.6))}
        policy = SampledTeacher(teachers, torch.tensor(theta, dtype=torch.float64))
        return Distiller(tiny_bert(tok, 1), "kd", policy, out_dir=tmp_path, progress=False, device="cpu",
                         callbacks=callbacks).fit([Stage("task", _good_bad(tok, 32), epochs=3)], resume=True)

    with pytest.raises(KeyboardInterrupt):
        fit([0.5, 0.5], callbacks=[InterruptAt(1)])
    with pytest.raises(AutoSKDError) as err:
        fit([0.9, 0.1])
    line = one_line(err)
    assert "theta" in line and "delete" in line, line
    fit([0.5, 0.5])  # the same run resumes


def test_a_stage_plan_rerun_with_a_changed_finished_stage_stops(tok, tmp_path):
    from autoskd.engine.stages import load_stage_plan, run_stages
    from autoskd.engine.trainer import Stage

    def prepare(spec, method):
        return None, [Stage("task", _good_bad(tok, 32), epochs=spec.epochs, lr=spec.lr)]

    def plan(lr):
        return load_stage_plan([{"method": "finetune", "lr": lr, "name": "one"}, {"method": "finetune", "name": "two"}])

    run_stages(tiny_bert(tok, 1), plan(1e-3), prepare, out_dir=tmp_path, progress=False)
    assert len(json.loads((tmp_path / "stage1-two" / "done.json").read_text())["fingerprint"]) == 64
    again = run_stages(tiny_bert(tok, 1), plan(1e-3), prepare, out_dir=tmp_path, progress=False)
    assert all(o.resumed for o in again)
    with pytest.raises(AutoSKDError, match=r"lr"):
        run_stages(tiny_bert(tok, 1), plan(2e-3), prepare, out_dir=tmp_path, progress=False)


def test_a_chain_hop_of_another_configuration_is_not_reloaded(tok, tiny_dir, sentiment_csv, tmp_path):
    from autoskd.chain import run_chain
    from autoskd.data.tasks import load_task
    from autoskd.pipeline import DistillConfig
    from autoskd.team import ModelSpec, TeacherTeam

    task = load_task(str(sentiment_csv), seed=0).subsample(48, 32, seed=0)
    team = TeacherTeam(student=ModelSpec(source=str(tiny_dir), layers=1, init="random"),
                       teachers={"t": tiny_bert(tok, 2, seed=3)}, tokenizer=tok, max_length=16)
    team.build(task, cache_dir=tmp_path / "teachers", progress=False)

    def chain(lr):
        config = DistillConfig(method="takd", epochs=0.5, lr=lr, batch_size=16)
        return run_chain(team, task, config, [2], out_dir=tmp_path / "chain", cache_dir=tmp_path / "cache",
                         progress=False)

    first = chain(1e-3)
    assert len(json.loads((tmp_path / "chain" / "hop0-assistant-L2" / "result.json").read_text())["fingerprint"]) == 64
    again = chain(1e-3)
    assert all(h.resumed for h in again.hops) and [h.dev_acc for h in again.hops] == [h.dev_acc for h in first.hops]
    with pytest.raises(AutoSKDError) as err:
        chain(2e-3)
    assert "lr" in one_line(err)


# ---------------------------------------------------------------------------------------------- teacher-output cache
def test_teacher_cache_key_follows_a_local_folders_weights(tok, tmp_path, sentiment_csv):
    from autoskd.data.tasks import load_task
    from autoskd.team.cache import teacher_cache_key
    from autoskd.team.spec import ModelSpec

    task = load_task(str(sentiment_csv), seed=0)
    folder = tmp_path / "teacher"
    tiny_bert(tok, 1, seed=0).save_pretrained(folder)
    spec = ModelSpec(source=str(folder))
    key = teacher_cache_key(spec, task, 16, 0, tok)
    assert teacher_cache_key(spec, task, 16, 0, tok) == key  # stable
    tiny_bert(tok, 1, seed=1).save_pretrained(folder)  # the same folder, new weights
    assert teacher_cache_key(spec, task, 16, 0, tok) != key


def test_data_key_includes_the_tokenizer_and_truncation(tok, other_vocab_dir, sentiment_csv):
    import copy

    from autoskd.data.tasks import load_task
    from autoskd.models.loading import load_tokenizer
    from autoskd.pipeline import make_loaders

    task = load_task(str(sentiment_csv), seed=0).subsample(32, 16, seed=0)
    base = make_loaders(task, tok, 16, 16, 0).train_id
    assert make_loaders(task, tok, 16, 16, 0).train_id == base
    assert make_loaders(task, load_tokenizer(str(other_vocab_dir)), 16, 16, 0).train_id != base
    assert make_loaders(task, tok, 8, 16, 0).train_id != base
    left = copy.deepcopy(tok)
    left.truncation_side = "left"
    assert make_loaders(task, left, 16, 16, 0).train_id != base


def test_a_cached_table_of_the_wrong_shape_is_rebuilt(tok, tmp_path):
    from autoskd.engine.teacher_cache import TeacherOutputCache, compute_logits_table
    from autoskd.engine.teachers import Teacher

    loader = _good_bad(tok, 24)
    cache = TeacherOutputCache(tmp_path)
    model = tiny_bert(tok, 1, seed=5)
    expected = compute_logits_table(model, loader, progress=False)
    teacher = Teacher("t", model, fingerprint="fp")
    cache.store("fp", "data", torch.zeros(10, 2))  # too few rows (a stale or foreign table under the key)
    assert torch.allclose(teacher.logits_for(loader, "data", cache, progress=False), expected)
    cache.store("fp", "data", torch.zeros(24, 5))  # another class count
    assert torch.allclose(teacher.logits_for(loader, "data", cache, progress=False), expected)
    assert torch.allclose(cache.load("fp", "data"), expected)  # and stored again
    cache.path("fp", "data").write_bytes(b"not a table")  # a damaged file
    assert torch.allclose(teacher.logits_for(loader, "data", cache, progress=False), expected)
