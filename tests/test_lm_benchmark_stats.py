"""The figures of benchmarks/lm_distill.py: per-arm intervals, the paired difference to CE, and
the target judged only on the KD arms named before the run (``--planned``); the other-tokenizer
arm's team gives Gemma its own tokenizer."""

import pytest

from helpers import load_benchmark


@pytest.fixture(scope="module")
def lmd():
    return load_benchmark("lm_distill")


def _records():
    test = {"ce": [560.0, 600.0, 580.0], "kd_ce": [400.0, 430.0, 410.0], "gemma_uld_ce": [300.0, 650.0, 200.0]}
    return [{"arm": a, "seed": s, "val_ppl": v, "test_ppl": v, "steps": 156, "seconds": 1.0}
            for a, vals in test.items() for s, v in enumerate(vals)]


def test_the_target_is_judged_on_the_planned_arms_only(lmd):
    seeds, arms = [0, 1, 2], ["ce", "kd_ce", "gemma_uld_ce"]
    out = lmd.summarise(_records(), seeds, arms, planned=["kd_ce"])
    assert out["best_kd_arm"] == "kd_ce" and out["target_best_kd_beats_ce"] is True
    assert out["paired_vs_ce"]["kd_ce"]["test_ppl_diff_mean"] == pytest.approx(-500.0 / 3)
    assert out["paired_vs_ce"]["kd_ce"]["verdict"] == "better than ce"
    assert out["paired_vs_ce"]["gemma_uld_ce"]["verdict"] == "tie"  # lower mean, inside the noise
    # by default every main arm is judged (kd_ce among them since the 4-epoch table), post-hoc ones never
    assert lmd.summarise(_records(), seeds, arms)["best_kd_arm"] == "kd_ce"
    assert "best_kd_arm" not in lmd.summarise(_records(), seeds, ["ce", "gemma_uld_ce"])


def test_a_record_made_at_other_settings_is_refused_not_resumed(lmd, tmp_path):
    import argparse
    import json

    args = argparse.Namespace(epochs=4.0, steps=156, block=128, batch_size=8, lr=2e-4, top_k=64,
                              max_train_docs=1500, max_eval_docs=250)
    record = {"arm": "ce", "seed": 0, "test_ppl": 600.0, "settings": lmd.run_settings(args)}
    (tmp_path / "ce-s0.json").write_text(json.dumps(record))
    assert lmd.run_arm("ce", 0, args, tmp_path) == record  # same budget: resumed, nothing trained
    with pytest.raises(SystemExit, match="measured at .*pass another --name"):
        lmd.run_arm("ce", 0, argparse.Namespace(**{**vars(args), "epochs": 1.0, "steps": 44}), tmp_path)


def test_the_other_tokenizer_arm_gets_gemma_with_its_own_tokenizer(lmd):
    team = lmd.make_team(128, "gemma_uld_ce")
    assert list(team.teacher_specs) == ["gemma"] and team.teacher_specs["gemma"].tokenizer == "own"
    assert lmd.make_team(128).teacher_specs["smollm2"].tokenizer is None


def test_the_prepared_gpu_script_runs_end_to_end_on_tiny_models(tmp_path):
    """benchmarks/gpu_lm.py is run where a GPU is lent, once, with no time to debug it there: its
    --smoke mode runs every measurement (matmul rate, teacher forward, KD/CE/ZeRO-3 steps, the θ
    search against sampled KD) on tiny random models on the CPU, in a process of its own (it
    starts DeepSpeed's process group)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu_lm.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_lm.py"), "--smoke", "--quiet", "--json",
                           str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    for key in ("teacher_forward_tokens_per_s", "kd_step_tokens_per_s", "ce_step_tokens_per_s",
                "kd_zero3_step_tokens_per_s", "matmul_tflops", "kd_step_matmul_fraction"):
        assert r[key] > 0, key
    assert r["search"]["theta_steps"] > 0 and r["search"]["search_over_sampled_kd"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
