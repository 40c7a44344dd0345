"""A run killed at a stage boundary resumes with the data order of the unbroken run.

Stages usually share one shuffled loader, whose generator advances one draw per epoch; a
relaunch builds the loader afresh. Every stage's loader generator is therefore checkpointed,
so the resumed second stage draws the second stage's order, not the first's (the cause of the
ZeRO-3 resume gap in tests/test_deepspeed.py, which is the same loop on another backend).
"""

from __future__ import annotations

import pytest
import torch

import dist_worker as w


@pytest.mark.parametrize("killed_epoch, epochs", [(0, 1.0), (1, 2.0)])
def test_resume_in_a_later_stage_equals_the_unbroken_run(tmp_path, killed_epoch, epochs):
    """tinybert (2 stages, one loader), killed in the second stage at its start or after its first
    epoch, relaunched with a new loader: same per-step losses and weights as an unbroken run."""
    full = w.run(epochs=epochs)
    with pytest.raises(KeyboardInterrupt):
        w.run(out_dir=tmp_path, callbacks=[w.Interrupt(killed_epoch)], epochs=epochs)
    resumed = w.run(out_dir=tmp_path, resume=True, epochs=epochs)
    remaining = len(full["losses"]) - int(2 * epochs + 2 * killed_epoch)  # 2 batches per epoch
    assert len(resumed["losses"]) == remaining > 0
    assert resumed["losses"] == full["losses"][-len(resumed["losses"]):]
    for k, v in full["weights"].items():
        torch.testing.assert_close(resumed["weights"][k], v, atol=0, rtol=0, msg=k)
