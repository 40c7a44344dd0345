"""DeepSpeed ZeRO and teacher-student tensor parallelism, on CPU with 2 processes over gloo.

One ``torchrun --nproc_per_node 2`` launch runs every distributed case of tests/dist_worker.py
(tiny random BERTs, TinyBERT's two stages: hidden/attention/embedding features through the
extraction hooks and the auxiliary model's projections, then logits). Each is compared with the
same run in this one process on the plain torch backend: per-step losses and trained weights.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dist_worker as w
from autoskd.engine.deepspeed_backend import load_deepspeed_config, resolve_config
from autoskd.errors import AutoSKDError

ROOT = Path(__file__).resolve().parents[1]
CASES = ["zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload", "zero2_ds_adam", "zero1_accum",
         "zero3_resume", "zero3_glmd", "tp_teacher", "tp_student", "tp_zero2", "search_zero2", "search_zero3_all",
         "search_zero3_all_center"]
LOSS_TOL, WEIGHT_TOL = 1e-5, 5e-5


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    from autoskd.engine.deepspeed_backend import _free_port

    cmd = [sys.executable, "-W", "ignore", "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), str(ROOT / "tests" / "dist_worker.py"), str(out), *CASES]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=1800)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
        raise
    assert proc.returncode == 0, stdout[-3000:] + stderr[-5000:]
    return {case: torch.load(out / f"{case}.pt", weights_only=False) for case in CASES}


@pytest.fixture(scope="module")
def reference():
    return w.run()


def assert_same_weights(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert not hasattr(got[k], "ds_id") and got[k].shape == want[k].shape, k
        torch.testing.assert_close(got[k], want[k], atol=WEIGHT_TOL, rtol=0, msg=k)


@pytest.mark.parametrize("case", ["zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload",
                                  "zero2_ds_adam", "tp_student", "tp_zero2"])
def test_two_processes_equal_one(distributed, reference, case):
    got = distributed[case]
    assert len(got["losses"]) == len(reference["losses"]) == 4  # 2 stages x 1 epoch x 2 batches
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(reference["losses"]), atol=LOSS_TOL, rtol=0)
    assert_same_weights(got["weights"], reference["weights"])
    # training moved the weights: the comparison is not between two untouched inits
    assert float((reference["weights"]["classifier.weight"] - w.bert(2, 32, seed=2).state_dict()["classifier.weight"])
                 .abs().max()) > 1e-3


def test_gradient_accumulation_equals_the_larger_batch(distributed):
    """2 ranks x micro-batch 4 x 2 accumulation steps == one process with batch 16."""
    ref = w.run(batch_size=16)
    got = distributed["zero1_accum"]
    pairs = torch.tensor(got["losses"]).view(-1, 2).mean(1)  # micro-batch losses -> optimizer-step losses
    torch.testing.assert_close(pairs, torch.tensor(ref["losses"]), atol=LOSS_TOL, rtol=0)
    assert_same_weights(got["weights"], ref["weights"])


def test_killed_zero3_run_resumes(distributed, reference):
    """Killed in the second stage (after the first stage's checkpoint), relaunched: same losses and
    weights as an unbroken run (the relaunch's fresh loader must draw the second stage's order)."""
    got = distributed["zero3_resume"]
    assert len(got["losses"]) == 2  # only the unfinished stage ran again
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(reference["losses"][-2:]), atol=LOSS_TOL, rtol=0)
    assert_same_weights(got["weights"], reference["weights"])


def test_word_predictions_under_zero3(distributed):
    """GLMD's word-prediction KL (student and teacher ``mlm_logits``, each MLM head tied to its
    model's word embeddings) over 3 stages, every parameter partitioned: equals one process."""
    ref = w.run(method="glmd")
    got = distributed["zero3_glmd"]
    assert len(got["losses"]) == len(ref["losses"]) == 6  # pretrain, task_mlm, task x 2 batches
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), atol=LOSS_TOL, rtol=0)
    assert_same_weights(got["weights"], ref["weights"])


@pytest.mark.parametrize("case", ["search_zero2", "search_zero3_all"])
def test_search_theta_steps_under_zero_equal_one_process(distributed, case):
    """AutoSKD's bilevel search on 2 ranks, each holding half of every train batch (and under
    ZeRO-3 a partition of every weight): θ's trajectory through phase 1, the drop and phase 2 is
    the one-process trajectory on whole batches, on *both* ranks, and so are the student's losses
    and weights (without averaging the virtual step over the ranks, θ drifts by ~1e-3)."""
    from theta_cases import run_search

    ref = run_search()
    got = distributed[case]
    assert len(ref["theta"]) == 6 and ref["dropped"] == [2]  # 3 teachers, 4 steps, the weakest dropped
    assert max(abs(a - b) for a, b in zip(ref["theta"][-1], ref["theta"][-2])) > 1e-3  # phase 2 moves θ
    assert got["dropped"] == ref["dropped"] and got["counts"] == ref["counts"]
    assert len(got["theta_per_rank"]) == 2
    for theta in got["theta_per_rank"]:
        torch.testing.assert_close(torch.tensor(theta), torch.tensor(ref["theta"]), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), atol=LOSS_TOL, rtol=0)
    assert_same_weights(got["weights"], ref["weights"])


def test_centred_search_under_zero3_equals_one_process(distributed):
    """``theta.center``'s extra val forward (every teacher's direct θ-gradient) runs inside the
    ZeRO-3 gather and is averaged over the ranks like the unrolled gradient: same trajectory."""
    from theta_cases import run_search

    ref = run_search(center=True)
    got = distributed["search_zero3_all_center"]
    plain = run_search()["theta"][-1]
    assert max(abs(a - b) for a, b in zip(ref["theta"][-1], plain)) > 1e-5  # centring changes the trajectory
    assert got["dropped"] == ref["dropped"] and got["counts"] == ref["counts"]
    for theta in got["theta_per_rank"]:
        torch.testing.assert_close(torch.tensor(theta), torch.tensor(ref["theta"]), atol=1e-6, rtol=0)
    assert_same_weights(got["weights"], ref["weights"])


def test_tensor_parallel_teacher_matches_unsharded(distributed):
    got = distributed["tp_teacher"]
    assert got["local_query_width"] == 24  # each rank holds half of the 48 query units
    assert set(got["tp"]) == set(got["ref"]) == {"hidden:2", "attention_scores:1", "value:3", "logits"}
    for name, value in got["ref"].items():
        assert got["tp"][name].shape == value.shape
        torch.testing.assert_close(got["tp"][name], value, atol=1e-5, rtol=1e-5, msg=name)


def test_config_auto_values_and_errors(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 4,'
                    ' "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}')
    cfg = resolve_config(load_deepspeed_config(path), micro_batch=8, world=2, lr=1e-4, weight_decay=0.01,
                         max_grad_norm=1.0, device=torch.device("cpu"))
    assert cfg["train_batch_size"] == 64 and cfg["gradient_clipping"] == 1.0
    assert cfg["zero_force_ds_cpu_optimizer"] is False  # our torch AdamW drives the CPU copy
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text("deepspeed:\n  zero_optimization: {stage: 3}\n")
    assert load_deepspeed_config(yaml_path)["zero_optimization"]["stage"] == 3
    with pytest.raises(AutoSKDError, match="does not exist"):
        load_deepspeed_config(tmp_path / "missing.json")
    with pytest.raises(AutoSKDError, match="fp16 needs a CUDA"):
        resolve_config({"fp16": {"enabled": True}}, micro_batch=1, world=1, lr=1e-4, weight_decay=0.0,
                       max_grad_norm=1.0, device=torch.device("cpu"))
