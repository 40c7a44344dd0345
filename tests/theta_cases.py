"""AutoSKD's bilevel search under DeepSpeed, for tests/dist_worker.py and tests/test_deepspeed.py.

Phase 1 -> selection -> phase 2 on tiny random BERTs: three teachers, Cat(θ) updated by the
second-order unrolled gradient before every student step (SSWO), one teacher dropped halfway.
The same function runs in one process on the plain torch backend (the reference) and on 2
ranks under ZeRO; θ's trajectory, the student's losses and its weights must agree.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

import dist_worker as w
from autoskd.engine.teachers import SampledTeacher, Teacher
from autoskd.engine.trainer import Distiller, Stage
from autoskd.search.distribution import TeacherDistribution
from autoskd.search.theta_step import ThetaConfig, ThetaStep


def run_search(deepspeed=None, epochs: float = 2.0, center: bool = False) -> dict:
    teachers = {}
    for k in (4, 3, 1):
        model = w.bert(k, 48, seed=k)
        with torch.no_grad():  # confident teachers: sharp targets, so each rank's slice pulls θ its own way
            model.classifier.weight.mul_(50.0)
        teachers[f"t{k}"] = Teacher(f"t{k}", model)
    student = w.bert(2, 32, seed=2)
    dist = TeacherDistribution.uniform(len(teachers))
    config = ThetaConfig(strategy="sswo", order="second", lr=0.05, num_candidates=2, center=center)
    policy = SampledTeacher(teachers, dist.theta, seed=0, scaling=config.scaling)
    val = DataLoader(w.examples(n=16, seed=1), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1))
    step = ThetaStep(dist, policy, val, config, m=1)
    record = w.RecordLosses()
    distiller = Distiller(student, "kd", policy, seed=0, progress=False, deepspeed=deepspeed, callbacks=[step, record],
                          restore_best=False, checkpoint=False, device="cpu")
    distiller.fit([Stage("task", w.loader(8), epochs=epochs, lr=1e-3, warmup_ratio=0.0)])
    theta = [h["theta"] for h in step.history]
    per_rank = [theta]
    if torch.distributed.is_initialized():  # every rank's own trajectory: they must not drift apart
        per_rank = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(per_rank, theta)
    return {"theta": theta, "theta_per_rank": per_rank, "dropped": step.dropped, "counts": dict(policy.counts),
            "candidates": [c["theta"] for c in step.candidates], "losses": record.losses,
            "weights": {k: v.detach().clone() for k, v in student.state_dict().items()}}
