"""Command-line options for DeepSpeed and tensor parallelism, shared by ``distill``, ``search``
and (on the fan-out branch) ``tune``: ``add_parallel_args(parser)`` then
``parallel_config(args)`` -> DistillConfig/SearchConfig keywords.

A run under N processes is started by a launcher, e.g.
``deepspeed --num_gpus 2 -m autoskd.cli distill --deepspeed ds.json`` or
``torchrun --nproc_per_node 2 -m autoskd.cli distill --deepspeed ds.json``.
"""

from __future__ import annotations

import argparse

from .errors import AutoSKDError


def add_parallel_args(p: argparse.ArgumentParser, trials: bool = False) -> None:
    g = p.add_argument_group("scale (DeepSpeed / tensor parallelism)")
    g.add_argument("--deepspeed", metavar="CONFIG",
                   help="DeepSpeed config (JSON, or YAML with a `deepspeed:` block): ZeRO 0-3, offload, "
                        "gradient accumulation, bf16/fp16; \"auto\" values come from the run")
    g.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="split the teacher's layers over N ranks (needs N processes from a launcher)")
    if trials:
        g.add_argument("--processes-per-trial", type=int, default=1, metavar="N",
                       help="run each trial (and a search's θ phase) as one N-process job (Ray Train worker group)")


def parallel_config(args) -> dict:
    """``deepspeed`` (the loaded config dict), ``tensor_parallel`` and, for trials, ``processes``."""
    out: dict = {}
    if getattr(args, "deepspeed", None):
        from .engine.deepspeed_backend import load_deepspeed_config

        out["deepspeed"] = load_deepspeed_config(args.deepspeed)
    tp = getattr(args, "tensor_parallel", 1) or 1
    if tp < 1:
        raise AutoSKDError(f"--tensor-parallel must be at least 1 (got {tp})")
    if tp > 1:
        out["tensor_parallel"] = tp
    procs = getattr(args, "processes_per_trial", 1) or 1
    if procs < 1:
        raise AutoSKDError(f"--processes-per-trial must be at least 1 (got {procs})")
    if procs > 1:
        out["processes"] = procs
    return out
