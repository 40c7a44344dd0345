"""``autoskd tune`` end to end on tiny random-init models (one local Ray for the whole file), and
ASHA on AutoSKD's arms."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from transformers import BertConfig, BertForSequenceClassification

from autoskd.cli import main
from autoskd.errors import AutoSKDError
from autoskd.fanout.space import SearchSpace
from autoskd.fanout.tune import TuneSettings, run_tune
from autoskd.search.arms import Arm
from autoskd.ray_runtime import REPO_ROOT, ensure_ray_env
from autoskd.search.trials import TrialSpec, arm_dir, run_arms

TESTS = Path(__file__).resolve().parent
WORDS = "movie plot cast story script scene music actor ending film".split()


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray (2 CPUs, 127.0.0.1) for every tune in this file: run_tune uses it as it is."""
    ensure_ray_env()
    import ray

    env = {"PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(TESTS)]), "TOKENIZERS_PARALLELISM": "false",
           "RAY_CHDIR_TO_TRIAL_DIR": "0", "OMP_NUM_THREADS": "1"}
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", object_store_memory=256 * 1024 ** 2,
             log_to_driver=False, logging_level="warning", runtime_env={"env_vars": env})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, real_tokenizer):
    """A task a tiny model learns in an epoch ('good'/'bad' decides the label) and a team of tiny BERTs."""
    root = tmp_path_factory.mktemp("tune")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i in range(400):
        words = [WORDS[int(j)] for j in torch.randint(len(WORDS), (3,), generator=gen)]
        rows.append({"text": f"{'good' if i % 2 else 'bad'} {' '.join(words)}", "label": i % 2})
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for layers in (1, 2):
        cfg = BertConfig(vocab_size=len(real_tokenizer), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64, num_labels=2)
        torch.manual_seed(layers)
        BertForSequenceClassification(cfg).save_pretrained(root / f"t{layers}")
        real_tokenizer.save_pretrained(root / f"t{layers}")
    team = {"name": "tiny", "student": {"source": str(root / "t2"), "layers": 1, "init": "random"},
            "teachers": [{"name": f"T{k}", "source": str(root / f"t{k}"),
                          "finetune": {"epochs": 2, "lr": 3e-3, "batch_size": 16}} for k in (1, 2)],
            "max_length": 16}
    (root / "team.yaml").write_text(yaml.safe_dump(team))
    return root


def _space(tmp: Path, name: str, data: dict) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **data}))
    return path


@pytest.fixture(scope="module")
def asha_tune(ray_local, tiny):
    """A grid of 3 learning rates under ASHA, one trial at a time; grid seed 1 runs the good lr first,
    so the two that learn nothing are behind it at the first rung and get stopped."""
    space = _space(tiny, "lrs", {"fixed": {"method": "kd", "epochs": 3},
                                 "params": {"lr": {"grid": [3e-3, 1e-6, 2e-6]}}})
    out = tiny / "run-asha"
    code = main([str(a) for a in ["tune", "--space", space, "--team", tiny / "team.yaml", "--task", tiny / "data.jsonl",
                 "--sampler", "grid", "--scheduler", "asha", "--seed", "1", "--max-concurrent", "1",
                 "--batch-size", "16", "--out", out, "--cache-dir", tiny / "cache", "--no-progress"]])
    assert code == 0
    return out


def test_tune_outputs_study_and_asha(asha_tune):
    out = asha_tune
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] == 3 and summary["sampler"] == "grid"
    assert summary["best"]["params"] == {"lr": 3e-3} and summary["best"]["values"]["dev_acc"] > 0.9
    assert summary["stopped_early"] >= 1, summary  # ASHA stopped at least one hopeless lr
    assert summary["student_epochs"] < 3 * 3
    for name in ("results.txt", "results.json", "best_config.json", "history.png", "epochs.png", "importance.png"):
        assert (out / name).stat().st_size > 0, name
    reloaded = BertForSequenceClassification.from_pretrained(out / "best_student")
    assert reloaded.config.num_hidden_layers == 1
    study = optuna.load_study(study_name="lrs", storage=f"sqlite:///{out / 'optuna.db'}")
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    best = max(trials, key=lambda t: t.value)
    assert sorted(best.intermediate_values) == [1, 2]  # epochs 1-2 reported by the engine callback
    stopped = [t for t in trials if t.user_attrs["stopped_early"]]
    assert stopped and all(t.user_attrs["epochs"] < 3 for t in stopped)
    assert study.metric_names == ["dev_acc"]
    record = json.loads((out / "trials" / best.user_attrs["trial"] / "trial.json").read_text())
    assert record["values"] == {"method": "kd", "epochs": 3, "lr": 3e-3} and len(record["history"]) == 3


def test_killed_nsga2_tune_resumes_without_redoing_finished_trials(ray_local, tiny, monkeypatch):
    """Two objectives (dev accuracy, student size) with NSGA-II; the study in a shared SQLite file;
    a driver killed with a trial running resumes, keeping its finished trials; the killed trial
    (no heartbeat for longer than the grace period) is failed and run again."""
    from autoskd.fanout import study as study_module

    monkeypatch.setattr(study_module, "HEARTBEAT_INTERVAL", 1)
    monkeypatch.setattr(study_module, "GRACE_PERIOD", 2)
    space = SearchSpace.from_dict({"name": "pareto", "fixed": {"method": "kd", "epochs": 1},
                                   "params": {"student.layers": {"int": [1, 2]}, "lr": {"loguniform": [1e-3, 5e-3]}}})
    out, db = tiny / "run-pareto", tiny / "shared.db"
    task = {"name_or_path": str(tiny / "data.jsonl")}

    def tune(trials):
        return run_tune(space, str(tiny / "team.yaml"), task,
                        TuneSettings(sampler="nsga2", trials=trials, storage=str(db), base={"batch_size": 16}),
                        out, cache_dir=tiny / "cache", progress=False)

    first = tune(2)
    assert first["finished"] == 2 and first["objectives"] == ["dev_acc", "student_params_m"]
    stamps = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("trials/*/trial.json")}
    assert len(stamps) == 2
    storage = study_module.open_storage(f"sqlite:///{db}")
    study = optuna.load_study(study_name="pareto", storage=storage)
    killed = study.ask(space.to_optuna())  # what a killed driver leaves: a trial RUNNING in the storage
    storage.record_heartbeat(killed._trial_id)  # ... with its last heartbeat
    time.sleep(3)  # longer than the grace period: its driver is dead
    second = tune(3)
    assert second["finished"] == 3 and second["pareto_front"]
    assert (out / "pareto.png").stat().st_size > 0 and (out / "history.png").stat().st_size > 0
    trials = optuna.load_study(study_name="pareto", storage=f"sqlite:///{db}").get_trials()
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == 3 and states.count("FAIL") == 1
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retried) == 1 and retried[0].state.name == "COMPLETE" and retried[0].params == killed.params
    after = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("trials/*/trial.json")}
    assert len(after) == 3 and all(after[k] == v for k, v in stamps.items())  # finished trials not redone
    sizes = {t.params["student.layers"]: t.values[1] for t in trials if t.values}
    if len(sizes) == 2:
        assert sizes[2] > sizes[1]  # a deeper student is bigger
    # the same study name with another space is refused in one line
    other = SearchSpace.from_dict({"name": "pareto", "params": {"lr": {"uniform": [0.1, 0.2]}}})
    with pytest.raises(AutoSKDError, match="another search space"):
        run_tune(other, str(tiny / "team.yaml"), task, TuneSettings(sampler="nsga2", trials=4, storage=str(db)), out,
                 cache_dir=tiny / "cache", progress=False)


def test_asha_stops_losing_arms_and_resume_keeps_them(ray_local, tmp_path):
    spec = TrialSpec(team_path="teams/x.yaml", task={"name_or_path": "rotten_tomatoes", "seed": 0},
                     root=str(tmp_path), cache_dir=str(tmp_path / "cache"),
                     base_config={"method": "kd", "epochs": 4.0}, runner="fake_epochs_runner:run")
    arms = [Arm("uniform", "uniform", theta=[0.5, 0.5]), Arm("random-000", "random", theta=[0.9, 0.1]),
            Arm("random-001", "random", theta=[0.1, 0.9])]
    records = run_arms(spec, arms, executor="ray", max_concurrent=1, progress=False, scheduler="asha")
    assert [r["status"] for r in records] == ["finished", "stopped", "stopped"], records
    assert records[0]["dev_acc"] == pytest.approx(0.9) and records[0]["test_acc"] is not None
    for r in records[1:]:
        assert r["stopped_early"] and r["epochs_run"] < 4 and r["epochs_planned"] == 4 and r["test_acc"] is None
        assert json.loads((arm_dir(tmp_path, r["name"]) / "arm.json").read_text())["stopped_early"]
    again = run_arms(spec, arms, executor="ray", max_concurrent=1, progress=False, scheduler="asha")
    assert [r["status"] for r in again] == ["loaded"] * 3  # stopped arms are finished work too
    with pytest.raises(Exception, match="executor 'ray'"):
        run_arms(spec, arms, executor="local", scheduler="asha")


def test_tune_prebuilds_the_team_the_trials_use(monkeypatch, tmp_path):
    """With ``teachers_full_data`` the driver's one-off team build must be the trials' own team
    (whole training split); it used to fine-tune a second team on the students' rows."""
    from autoskd.fanout import tune as tune_module

    seen = []

    def fake_build(self, task, progress=False):
        seen.append(self.task.get("teachers_full_data"))

    monkeypatch.setattr(TrialSpec, "build_team", fake_build)
    monkeypatch.setattr(TrialSpec, "load_task", lambda self: None)
    spec = TrialSpec(team_path="teams/tiny-test.yaml", task={"name_or_path": "rotten_tomatoes", "max_train": 50,
                                                            "teachers_full_data": True},
                     root=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    tune_module._build_team(spec, progress=False)
    assert seen == [True]


def test_every_sampler_pickles_as_ray_tune_pickles_its_searcher():
    """Ray Tune pickles the searcher with its sampler when a tune starts; Optuna 5's GA samplers
    hold a thread lock that does not pickle, so NSGA-II is wrapped (a copy gets a fresh lock)."""
    import pickle

    from autoskd.fanout.study import SAMPLERS, make_sampler

    space = SearchSpace.from_dict({"name": "p", "fixed": {"method": "kd", "epochs": 1},
                                   "params": {"lr": {"loguniform": [1e-3, 5e-3]}}})
    for name in SAMPLERS:
        if name == "grid":
            continue
        sampler = make_sampler(name, space, seed=3, multi_objective=name == "nsga2")
        copy = pickle.loads(pickle.dumps(sampler))
        assert type(copy) is type(sampler)
    nsga2 = pickle.loads(pickle.dumps(make_sampler("nsga2", space, multi_objective=True)))
    with nsga2._thread_lock:  # a working lock of its own
        pass
