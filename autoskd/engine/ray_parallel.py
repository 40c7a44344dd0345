"""One trial = one parallel job: a trial's distillation as a Ray Train worker group.

``autoskd search --executor ray --processes-per-trial N --deepspeed ds.json`` makes each
candidate/baseline trial start a :class:`ray.train.torch.TorchTrainer` with N workers (gloo on
CPU, nccl on GPUs). Ray Train sets up the process group; every worker runs the same
:func:`autoskd.search.trials.distill_arm`, so the one training loop runs under DeepSpeed across
the group exactly as under ``torchrun``; rank 0 writes the student and reports the record.

Other fan-out code (``autoskd tune``) uses it the same way: put
``"runner": "autoskd.engine.ray_parallel:distill_arm_parallel"`` in the TrialSpec and
``processes`` (plus ``deepspeed``) in its ``base_config``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

CPUS_PER_WORKER_ENV = "AUTOSKD_CPUS_PER_WORKER"
RECORD_FILE = "parallel_record.json"


def distill_arm_parallel(spec, arm, out_dir: Path) -> dict:
    """Trial runner: ``distill_arm`` on ``processes`` Ray Train workers (in-process when 1)."""
    from ..search.trials import distill_arm

    n = int(spec.base_config.get("processes", 1) or 1)
    if n <= 1:
        return distill_arm(spec, arm, out_dir)
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cuda = torch.cuda.is_available()
    cpus = float(os.environ.get(CPUS_PER_WORKER_ENV, "0.5" if not cuda else "1"))
    trainer = TorchTrainer(
        _worker, train_loop_config={"spec": spec.to_dict(), "arm": arm.to_dict(), "out": str(out_dir)},
        scaling_config=ScalingConfig(num_workers=n, use_gpu=cuda, resources_per_worker={"CPU": cpus}),
        torch_config=TorchConfig(backend="nccl" if cuda else "gloo"),
        run_config=RunConfig(storage_path=str(Path(out_dir).absolute() / "ray_train"), name="workers"))
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    record = Path(out_dir) / RECORD_FILE  # written by rank 0: Ray Train versions differ in what
    if not record.exists():               # Result.metrics keeps of reports without checkpoints
        raise RuntimeError(f"the worker group finished without a record in {record}")
    return json.loads(record.read_text())


def _worker(config: dict) -> None:
    """One rank of the group: the ordinary single-trial runner, inside the group's process group."""
    import ray.train

    from ..search.arms import Arm
    from ..search.trials import TrialSpec, distill_arm

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    spec = TrialSpec.from_dict(config["spec"])
    if os.path.isdir(spec.workdir):
        os.chdir(spec.workdir)
    record = distill_arm(spec, Arm.from_dict(config["arm"]), Path(config["out"]))
    import torch.distributed as dist

    record["processes"] = dist.get_world_size() if dist.is_initialized() else 1
    if not dist.is_initialized() or dist.get_rank() == 0:
        (Path(config["out"]) / RECORD_FILE).write_text(json.dumps(record))
    ray.train.report({"dev_acc": record["dev_acc"]})
