"""Arms and the trial executors, with a fake runner (no model is trained here)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from autoskd.errors import AutoSKDError
from autoskd.search.arms import Arm, baseline_arms, candidate_arms, parse_baselines, random_thetas
from autoskd.search.trials import TrialSpec, arm_dir, run_arm, run_arms

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
import fake_runner  # noqa: E402

TEACHERS = ["t-small", "t-big"]


def spec_for(root: Path, **kw) -> TrialSpec:
    return TrialSpec(team_path="teams/x.yaml", task={"name_or_path": "rotten_tomatoes", "seed": 0, "max_train": 50},
                     root=str(root), cache_dir=str(root / "cache"), base_config={"method": "kd", "epochs": 1.0},
                     runner="fake_runner:run", **kw)


# ------------------------------------------------------------------------------------------ arms
def test_arm_distill_config_per_kind():
    from autoskd.pipeline import DistillConfig

    base = DistillConfig(epochs=2.0, seed=3, teacher="t-big")
    cand = Arm("candidate-00", "candidate", theta=[0.25, 0.75]).distill_config(base)
    assert (cand.policy, cand.theta, cand.teacher, cand.epochs, cand.seed) == ("sampled", [0.25, 0.75], None, 2.0, 3)
    single = Arm("single-t-small", "single", teacher="t-small").distill_config(base)
    assert (single.policy, single.teacher, single.theta) == ("single", "t-small", None)
    avg = Arm("avgkd", "average").distill_config(base)
    assert (avg.policy, avg.theta) == ("average", None)
    assert base.policy == "single" and base.theta is None  # replace(), not mutation


def test_arm_groups_and_validation():
    assert Arm("candidate-00", "candidate", theta=[1, 0]).group == "autoskd"
    assert Arm("random-000", "random", theta=[0.5, 0.5]).group == "random"
    assert Arm.from_dict(Arm("avgkd", "average").to_dict()) == Arm("avgkd", "average")
    with pytest.raises(AutoSKDError, match="kind"):
        Arm("x", "nope")
    with pytest.raises(AutoSKDError, match="theta"):
        Arm("x", "candidate")
    with pytest.raises(AutoSKDError, match="teacher"):
        Arm("x", "single")
    with pytest.raises(AutoSKDError, match="folder name"):
        Arm("a/b", "average")


def test_candidate_and_baseline_arms():
    cands = candidate_arms([[0.5, 0.5], [1.0, 0.0]])
    assert [a.name for a in cands] == ["candidate-00", "candidate-01"]
    assert all(a.kind == "candidate" and a.group == "autoskd" for a in cands)
    arms = baseline_arms(TEACHERS, "all", n_random=3, seed=7)
    assert [a.name for a in arms] == ["single-t-small", "single-t-big", "avgkd", "uniform",
                                      "random-000", "random-001", "random-002"]
    assert arms[0].teacher == "t-small" and arms[3].theta == [0.5, 0.5]
    assert [a.name for a in baseline_arms(TEACHERS, {"uniform"}, n_random=5)] == ["uniform"]
    assert baseline_arms(TEACHERS, "none", n_random=5) == []


def test_random_arms_deterministic_dirichlet():
    a = baseline_arms(TEACHERS + ["t3"], {"random"}, n_random=4, seed=11)
    b = baseline_arms(TEACHERS + ["t3"], {"random"}, n_random=4, seed=11)
    c = baseline_arms(TEACHERS + ["t3"], {"random"}, n_random=4, seed=12)
    assert [x.theta for x in a] == [x.theta for x in b]
    assert [x.theta for x in a] != [x.theta for x in c]
    for arm in a:
        assert len(arm.theta) == 3 and min(arm.theta) > 0 and np.isclose(sum(arm.theta), 1.0)
    assert random_thetas(3, 2, seed=11) == [x.theta for x in a[:2]]  # more arms extend fewer


def test_parse_baselines():
    assert parse_baselines("all") == {"single", "avgkd", "uniform", "random"}
    assert parse_baselines("none") == set() and parse_baselines("") == set()
    assert parse_baselines("single, avgkd,random") == {"single", "avgkd", "random"}
    assert parse_baselines("average") == {"avgkd"}
    with pytest.raises(AutoSKDError, match="unknown baseline 'bogus'"):
        parse_baselines("single,bogus")
    with pytest.raises(AutoSKDError):
        parse_baselines("all,single")


# ---------------------------------------------------------------------------------------- trials
def test_trial_spec_absolute_and_roundtrip(tmp_path, monkeypatch):
    from autoskd.pipeline import DistillConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.csv").write_text("text,label\na,0\n")
    (tmp_path / "team.yaml").write_text("teachers: []\n")
    spec = TrialSpec(team_path="team.yaml", task={"name_or_path": "data.csv", "seed": 3, "max_train": 10},
                     root="runs/s", cache_dir=".cache/autoskd", base_config=DistillConfig(epochs=2.0))
    assert spec.team_path == str(tmp_path / "team.yaml") and spec.root == str(tmp_path / "runs/s")
    assert spec.cache_dir == str(tmp_path / ".cache/autoskd")
    assert spec.task == {"name_or_path": str(tmp_path / "data.csv"), "seed": 3, "max_train": 10}
    assert spec.seed == 3 and spec.distill_config() == DistillConfig(epochs=2.0)
    assert spec.workdir == str(tmp_path)
    # names (a built-in task, a bundled team) stay names
    named = TrialSpec(team_path="minilm-ladder", task="rotten_tomatoes", root="r")
    assert named.team_path == "minilm-ladder" and named.task == {"name_or_path": "rotten_tomatoes"}
    assert TrialSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(AutoSKDError, match="name_or_path"):
        TrialSpec(team_path="t", task={"seed": 1}, root="r")


def test_run_arm_writes_record(tmp_path):
    spec = spec_for(tmp_path)
    record = run_arm(spec, Arm("candidate-00", "candidate", theta=[0.3, 0.7]))
    on_disk = json.loads((arm_dir(tmp_path, "candidate-00") / "arm.json").read_text())
    assert on_disk == record
    assert record["name"] == "candidate-00" and record["group"] == "autoskd" and record["student_trainings"] == 1
    assert {"dev_acc", "test_acc", "seconds", "steps", "teacher_counts", "theta"} <= set(record)


def test_local_executor_failure_and_resume(tmp_path):
    spec = spec_for(tmp_path)
    arms = [Arm("candidate-00", "candidate", theta=[0.3, 0.7]), Arm("boom", "average"), Arm("avgkd", "average")]
    first = run_arms(spec, arms, executor="local", progress=False)
    assert [r["name"] for r in first] == ["candidate-00", "boom", "avgkd"]
    assert [r["status"] for r in first] == ["finished", "failed", "finished"]
    assert first[1]["error"] == "RuntimeError: fake failure in boom"
    assert "second line" in (arm_dir(tmp_path, "boom") / "error.txt").read_text()
    assert sorted(fake_runner.calls(tmp_path)) == ["avgkd", "boom", "candidate-00"]

    more = arms + [Arm("uniform", "uniform", theta=[0.5, 0.5])]
    second = run_arms(spec, more, executor="local", progress=False)
    assert [r["status"] for r in second] == ["loaded", "failed", "loaded", "finished"]
    assert second[0]["dev_acc"] == first[0]["dev_acc"]
    # finished arms are not re-run; the failed one is retried
    assert sorted(fake_runner.calls(tmp_path)) == ["avgkd", "boom", "boom", "candidate-00", "uniform"]


def test_run_arms_rejects_bad_input(tmp_path):
    spec = spec_for(tmp_path)
    with pytest.raises(AutoSKDError, match="unique"):
        run_arms(spec, [Arm("avgkd", "average"), Arm("avgkd", "average")], executor="local")
    with pytest.raises(AutoSKDError, match="executor"):
        run_arms(spec, [Arm("avgkd", "average")], executor="dask")
    bad = spec_for(tmp_path, )
    bad.runner = "no_such_module_xyz:run"
    records = run_arms(bad, [Arm("avgkd", "average")], executor="local", progress=False)
    assert records[0]["status"] == "failed" and "cannot import trial runner" in records[0]["error"]


def test_ray_executor_runs_trials_and_reports_failure(tmp_path):
    ray = pytest.importorskip("ray")
    spec = spec_for(tmp_path)
    done = run_arm(spec, Arm("uniform", "uniform", theta=[0.5, 0.5]))  # finished before: loaded, not re-run
    arms = [Arm("candidate-00", "candidate", theta=[0.2, 0.8]), Arm("random-boom", "random", theta=[0.6, 0.4]),
            Arm("uniform", "uniform", theta=[0.5, 0.5]), Arm("avgkd", "average")]
    start = time.perf_counter()
    records = run_arms(spec, arms, executor="ray", cpus_per_trial=0.5, num_cpus=2, progress=False)
    elapsed = time.perf_counter() - start
    print(f"ray executor: {len(arms) - 1} trials in {elapsed:.1f} s")
    assert not ray.is_initialized()  # we started it, so we shut it down
    assert [r["name"] for r in records] == [a.name for a in arms]
    assert [r["status"] for r in records] == ["finished", "failed", "loaded", "finished"]
    assert records[1]["error"] == "RuntimeError: fake failure in random-boom"
    assert records[2]["dev_acc"] == done["dev_acc"]
    assert sorted(fake_runner.calls(tmp_path)) == ["avgkd", "candidate-00", "random-boom", "uniform"]
    for r in (records[0], records[3]):
        assert r["omp"] == "1"  # worker environment
        assert json.loads((arm_dir(tmp_path, r["name"]) / "arm.json").read_text())["dev_acc"] == r["dev_acc"]
    assert (tmp_path / "ray" / "trials").is_dir()


def test_a_killed_ray_worker_is_retried_and_the_arm_finishes_with_the_same_result(tmp_path):
    """kill -9 of the worker running an arm: Ray retries it once and the record is what an
    unbroken run gives; an arm that raises is not retried (its error is final)."""
    ray = pytest.importorskip("ray")
    spec = spec_for(tmp_path)
    arms = [Arm("candidate-kill-once", "candidate", theta=[0.3, 0.7]), Arm("random-boom", "random", theta=[0.6, 0.4])]
    records = run_arms(spec, arms, executor="ray", cpus_per_trial=0.5, num_cpus=2, progress=False)
    assert not ray.is_initialized()
    assert [r["status"] for r in records] == ["finished", "failed"]
    assert (tmp_path / "candidate-kill-once.killed").exists()  # the first worker was killed
    assert sorted(fake_runner.calls(tmp_path)) == ["candidate-kill-once", "candidate-kill-once", "random-boom"]
    clean = spec_for(tmp_path / "clean")
    (tmp_path / "clean" / "candidate-kill-once.killed").parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "clean" / "candidate-kill-once.killed").write_text("no kill")
    unbroken = run_arm(clean, arms[0])
    assert records[0]["dev_acc"] == unbroken["dev_acc"] and records[0]["test_acc"] == unbroken["test_acc"]
