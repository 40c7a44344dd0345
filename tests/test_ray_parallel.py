"""One trial = one parallel job: a search arm trained by a 2-worker Ray Train group under ZeRO-2."""

from __future__ import annotations

import json

import pytest

from autoskd.search.arms import Arm
from autoskd.search.trials import TrialSpec, arm_dir, run_arms

pytestmark = pytest.mark.integration


def test_trial_runs_as_a_two_process_deepspeed_job(tmp_path):
    pytest.importorskip("ray")
    from autoskd.pipeline import DistillConfig

    task = {"name_or_path": "rotten_tomatoes", "seed": 0, "max_train": 64, "max_eval": 32}
    base = DistillConfig(method="kd", epochs=1, batch_size=16, deepspeed={"zero_optimization": {"stage": 2}},
                         processes=2)
    spec = TrialSpec(team_path="teams/tiny-test.yaml", task=task, root=str(tmp_path), cache_dir=str(tmp_path / "cache"),
                     base_config=base, runner="autoskd.search.ray_parallel:distill_arm_parallel")
    spec.build_team(spec.load_task())  # fine-tune the teachers once, here, so both workers read the cache
    [record] = run_arms(spec, [Arm("uniform", "uniform", theta=[0.5, 0.5])], executor="ray", cpus_per_trial=0.5,
                        num_cpus=2, progress=False)
    assert record["status"] == "finished", record
    assert record["processes"] == 2  # the distillation ran as one 2-rank process group
    assert 0.0 <= record["dev_acc"] <= 1.0
    saved = arm_dir(tmp_path, "uniform")
    assert (saved / "student" / "config.json").exists()
    assert json.loads((saved / "arm.json").read_text())["processes"] == 2


def test_search_theta_phase_runs_as_a_two_process_deepspeed_job(tmp_path):
    """``autoskd search --processes-per-trial 2 --deepspeed``: the θ search itself (phase 1,
    selection, phase 2) trains as one 2-rank ZeRO-2 group, and so does its candidate."""
    pytest.importorskip("ray")
    from autoskd.search.run import SearchConfig, run_search

    config = SearchConfig.from_preset("quick", theta={"num_candidates": 1, "warmup": 0.0}, baselines="none",
                                      n_random=0, search_epochs=2.0, eval_epochs=1.0, batch_size=16,
                                      max_train=64, max_eval=32, processes=2, cpus_per_trial=1.0,
                                      deepspeed={"zero_optimization": {"stage": 2}})
    summary = run_search("teams/tiny-test.yaml", {"name_or_path": "rotten_tomatoes", "seed": 0}, config, tmp_path,
                         cache_dir=tmp_path / "cache", progress=False)
    search = json.loads((tmp_path / "search.json").read_text())
    assert search["processes"] == 2  # the θ search ran as a 2-rank process group
    assert len(search["candidates"]) == 1 and len(search["history"]) > 2
    assert search["history"][-1]["theta"] != search["history"][0]["theta"]  # θ was updated
    assert summary["best_candidate"]["name"] == "candidate-00"
    record = json.loads((arm_dir(tmp_path, "candidate-00") / "arm.json").read_text())
    assert record["processes"] == 2
