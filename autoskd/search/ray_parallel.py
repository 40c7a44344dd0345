"""One trial = one parallel job: a trial's distillation as a Ray Train worker group.

``autoskd search --executor ray --processes-per-trial N --deepspeed ds.json`` makes each
candidate/baseline trial start a :class:`ray.train.torch.TorchTrainer` with N workers (gloo on
CPU, nccl on GPUs). Ray Train sets up the process group; every worker runs the same
:func:`autoskd.search.trials.distill_arm`, so the one training loop runs under DeepSpeed across
the group exactly as under ``torchrun``; rank 0 writes the student and reports the record.
It lives in the search layer, beside the runner and the search it spreads over a group: the
engine underneath only sees a process group, whoever started it.

With ``--processes-per-trial N`` the search's own θ phase runs the same way
(:func:`bilevel_search_parallel`): N ranks train the student under DeepSpeed and update Cat(θ)
identically (each θ step averages its unrolled gradient over the ranks).

Other fan-out code (``autoskd tune``) uses it the same way: put
``"runner": "autoskd.search.ray_parallel:distill_arm_parallel"`` in the TrialSpec and
``processes`` (plus ``deepspeed``) in its ``base_config``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..atomic import write_json

CPUS_PER_WORKER_ENV = "AUTOSKD_CPUS_PER_WORKER"
RECORD_FILE = "parallel_record.json"


def run_group(worker, loop_config: dict, n: int, storage: Path, record: Path) -> dict:
    """Run ``worker(loop_config)`` on ``n`` Ray Train workers (one process group) and return the
    JSON record its rank 0 wrote to ``record``: Ray Train versions differ in what
    ``Result.metrics`` keeps of reports without checkpoints, a file does not."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cuda = torch.cuda.is_available()
    cpus = float(os.environ.get(CPUS_PER_WORKER_ENV, "0.5" if not cuda else "1"))
    trainer = TorchTrainer(
        worker, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=n, use_gpu=cuda, resources_per_worker={"CPU": cpus}),
        torch_config=TorchConfig(backend="nccl" if cuda else "gloo"),
        run_config=RunConfig(storage_path=str(Path(storage).absolute()), name="workers"))
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if not record.exists():
        raise RuntimeError(f"the worker group finished without a record in {record}")
    return json.loads(record.read_text())


def distill_arm_parallel(spec, arm, out_dir: Path) -> dict:
    """Trial runner: ``distill_arm`` on ``processes`` Ray Train workers (in-process when 1)."""
    from .trials import distill_arm

    n = int(spec.base_config.get("processes", 1) or 1)
    if n <= 1:
        return distill_arm(spec, arm, out_dir)
    return run_group(_worker, {"spec": spec.to_dict(), "arm": arm.to_dict(), "out": str(out_dir)}, n,
                     Path(out_dir) / "ray_train", Path(out_dir) / RECORD_FILE)


def bilevel_search_parallel(team_path: str, task_args: dict, config, m: int, out_dir: Path, cache_dir: Path,
                            theta_lr: float | None = None, identity: dict | None = None) -> dict:
    """AutoSKD's θ search (phase 1, selection, phase 2) on ``config.processes`` Ray Train workers
    under ``config.deepspeed``: each rank trains on its slice of every batch and θ is updated
    identically on every rank (:mod:`autoskd.engine.functional_forward`); rank 0 writes the record,
    stamped with ``identity`` as :func:`~autoskd.search.run.bilevel_search` stamps it."""
    from ..rerun import check_stamp
    from .run import search_record_path

    lr = theta_lr if theta_lr is not None else config.theta.lr
    record = search_record_path(config, Path(out_dir), lr)
    if record.exists():
        done = json.loads(record.read_text())
        if identity is not None:
            check_stamp(done, {**identity, "m": m, "theta_lr": lr}, f"{record.name} in {out_dir}", out_dir)
        return done
    from ..ray_runtime import ray_session, worker_env

    loop = {"team": str(team_path), "task": task_args, "config": config.to_dict(), "m": m, "out": str(out_dir),
            "cache": str(cache_dir), "theta_lr": theta_lr, "workdir": os.getcwd(), "identity": identity}
    with ray_session(worker_env(), address=config.address):
        return run_group(_search_worker, loop, config.processes, Path(out_dir) / "ray_train" / record.stem, record)


def _rank_setup() -> None:
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)


def _search_worker(loop: dict) -> None:
    """One rank of the θ search's group: rebuild the task and the (cached) team, then search."""
    from .run import SearchConfig, bilevel_search, load_search_task
    from ..team import TeacherTeam

    _rank_setup()
    if os.path.isdir(loop["workdir"]):
        os.chdir(loop["workdir"])
    config = SearchConfig.from_dict(loop["config"])
    task, team_task = load_search_task(loop["task"], config)
    cache = Path(loop["cache"])
    team = TeacherTeam.from_yaml(loop["team"]).build(team_task, cache_dir=cache / "teachers",
                                                      seed=loop["task"]["seed"], progress=False)
    bilevel_search(team, task, config, loop["m"], Path(loop["out"]), cache, False, loop["theta_lr"],
                   loop.get("identity"))


def _worker(config: dict) -> None:
    """One rank of the group: the ordinary single-trial runner, inside the group's process group."""
    import ray.train

    from .arms import Arm
    from .trials import TrialSpec, distill_arm

    _rank_setup()
    spec = TrialSpec.from_dict(config["spec"])
    if os.path.isdir(spec.workdir):
        os.chdir(spec.workdir)
    record = distill_arm(spec, Arm.from_dict(config["arm"]), Path(config["out"]))
    import torch.distributed as dist

    record["processes"] = dist.get_world_size() if dist.is_initialized() else 1
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_json(Path(config["out"]) / RECORD_FILE, record, indent=None)
    ray.train.report({"dev_acc": record["dev_acc"]})
