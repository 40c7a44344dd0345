"""Tensor-parallel cases for tests/dist_worker.py (run under torchrun with 2 processes)."""

from __future__ import annotations

import torch

from autoskd.engine.hooks import FeatureExtractor
from autoskd.engine.tensor_parallel import TensorParallel

FEATURES = ["hidden:2", "attention_scores:1", "value:3"]


def teacher_outputs(run_bert, examples) -> dict:
    """The teacher's logits and hooked features, unsharded and then split over 2 ranks."""
    teacher = run_bert(4, 48, seed=1).eval()
    batch = {k: torch.stack([row[k] for row in examples[:8]]) for k in examples[0]}
    with torch.no_grad():
        ref = FeatureExtractor(teacher, FEATURES)(batch)
        TensorParallel(2).shard(teacher)
        local_q = teacher.bert.encoder.layer[0].attention.self.query(torch.zeros(1, 2, 48)).shape[-1]
        tp = FeatureExtractor(teacher, FEATURES)(batch)
    return {"ref": {k: v.clone() for k, v in ref.items()}, "tp": {k: v.clone() for k, v in tp.items()},
            "local_query_width": local_q}


def run_tp_case(case: str, run) -> dict:
    import dist_worker as w

    if case == "tp_teacher":
        return teacher_outputs(w.bert, w.examples())
    if case == "tp_student":  # teacher and student both split over tp=2 (plain torch optimizer on DTensors)
        return run(tensor_parallel=TensorParallel(2, shard_student=True))
    if case == "tp_zero2":  # teacher split over tp=2, student ZeRO-2 data-parallel over both ranks
        return run(deepspeed=w.ZERO["zero2"], tensor_parallel=TensorParallel(2))
    raise SystemExit(f"unknown case {case}")
