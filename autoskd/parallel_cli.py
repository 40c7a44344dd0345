"""Command-line flags for DeepSpeed and tensor parallelism, shared by ``distill`` and ``search``:
they set the experiment's ``scale:`` section (``scale.deepspeed``, ``scale.tensor_parallel``,
``scale.processes_per_trial``; :mod:`autoskd.experiment`), which the run hands to
``DistillConfig``/``SearchConfig``.

A run under N processes is started by a launcher, e.g.
``deepspeed --num_gpus 2 -m autoskd.cli distill --deepspeed ds.json`` or
``torchrun --nproc_per_node 2 -m autoskd.cli distill --deepspeed ds.json``.
"""

from __future__ import annotations

import argparse

from .cli_types import positive_int


def add_parallel_args(p: argparse.ArgumentParser, trials: bool = False) -> None:
    g = p.add_argument_group("scale: DeepSpeed / tensor parallelism (experiment keys scale.*)")
    g.add_argument("--deepspeed", metavar="CONFIG",
                   help="DeepSpeed config (JSON, or YAML with a `deepspeed:` block): ZeRO 0-3, offload, "
                        "gradient accumulation, bf16/fp16; \"auto\" values come from the run")
    g.add_argument("--tensor-parallel", type=positive_int, metavar="N",
                   help="split the teacher's layers over N ranks (needs N processes from a launcher; default: 1)")
    if trials:
        g.add_argument("--processes-per-trial", type=positive_int, metavar="N",
                       help="run each trial (and a search's θ phase) as one N-process job (Ray Train worker group)")
