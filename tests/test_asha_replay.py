"""The offline ASHA replay (benchmarks/asha_replay.py) drives Ray's real ASHA scheduler: a late
bloomer is stopped at the first rung, a steady leader is kept, and compute is counted per epoch."""

import json
from pathlib import Path

import pytest

from helpers import load_benchmark


@pytest.fixture(scope="module")
def replay_mod():
    return load_benchmark("asha_replay")


def _full_run(root: Path, histories: list[list[float]]) -> Path:
    for i, accs in enumerate(histories):
        d = root / "trials" / f"trial-{i:04d}"
        d.mkdir(parents=True)
        epochs = [{"kind": "epoch", "epoch": e, "dev_acc": a, "dev_loss": 0.5} for e, a in enumerate(accs)]
        (d / "result.json").write_text(json.dumps({"history": epochs}))
        (d / "trial.json").write_text(json.dumps({"trial": d.name, "values": {"i": i}, "train_seconds": len(accs)}))
    return root


def test_late_bloomer_is_stopped_and_compute_counted(tmp_path, replay_mod):
    # trial 0 leads from the start; trial 3 sits at the majority class at epoch 1 but ends best
    histories = [[0.70, 0.72, 0.73, 0.74], [0.65, 0.66, 0.66, 0.67], [0.62, 0.63, 0.63, 0.64],
                 [0.50, 0.60, 0.70, 0.80]]
    trials = replay_mod.load_histories(_full_run(tmp_path, histories))
    assert [len(t["scores"]) for t in trials] == [4, 4, 4, 4]
    out = replay_mod.replay(trials, grace=1, factor=2.0, workers=1)
    assert out["full_best"] == {"i": 3} and out["full_best_stopped_at_epoch"] == 1
    assert out["asha_best"] == {"i": 0}
    assert out["best_ratio"] == pytest.approx(0.74 / 0.80, abs=1e-4)
    assert out["student_epochs"]["full"] == 16
    assert out["student_epochs"]["asha"] < 16
    # with no early rung (grace = all epochs) nothing is stopped and the ratios are 1
    none = replay_mod.replay(trials, grace=4, factor=2.0, workers=1)
    assert none["best_ratio"] == 1.0 and none["compute_ratio"] == 1.0


def test_folder_without_histories_is_refused(tmp_path, replay_mod):
    with pytest.raises(SystemExit, match="--scheduler none"):
        replay_mod.load_histories(tmp_path)
