"""A stand-in trial runner that "trains" epoch by epoch: it hands made-up dev accuracies to the
engine callbacks a real arm gets (:func:`autoskd.search.early_stop.epoch_reporters`), so the
scheduler sees the same reports as from :func:`autoskd.search.trials.distill_arm`. The arm named
``uniform`` improves every epoch; every other arm stays at 0.5."""

from __future__ import annotations

from pathlib import Path


def run(spec, arm, out_dir: Path) -> dict:
    from autoskd.search.early_stop import epoch_reporters

    config = arm.distill_config(spec.distill_config())
    callbacks = epoch_reporters(config)
    epochs = int(config.epochs)
    scores = [0.6 + 0.1 * e for e in range(epochs)] if arm.name == "uniform" else [0.5] * epochs
    for score in scores:
        for cb in callbacks:
            cb.on_epoch_end(None, None, {"kind": "epoch", "dev_acc": score})
    (Path(out_dir) / "student").mkdir(parents=True, exist_ok=True)
    return {"dev_acc": max(scores), "test_acc": max(scores) - 0.05, "steps": epochs}
