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
                     base_config=base, runner="autoskd.engine.ray_parallel:distill_arm_parallel")
    spec.build_team(spec.load_task())  # fine-tune the teachers once, here, so both workers read the cache
    [record] = run_arms(spec, [Arm("uniform", "uniform", theta=[0.5, 0.5])], executor="ray", cpus_per_trial=0.5,
                        num_cpus=2, progress=False)
    assert record["status"] == "finished", record
    assert record["processes"] == 2  # the distillation ran as one 2-rank process group
    assert 0.0 <= record["dev_acc"] <= 1.0
    saved = arm_dir(tmp_path, "uniform")
    assert (saved / "student" / "config.json").exists()
    assert json.loads((saved / "arm.json").read_text())["processes"] == 2
