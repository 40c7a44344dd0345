"""A command's parsed flags as an experiment: each flag overrides one key, then the experiment
runs (or, with ``--dry-run``, is only shown).

``autoskd distill --lr 1e-3 --epochs 2`` is the experiment ``{kind: distill, distill: {lr: 1e-3,
epochs: 2}}`` and runs through the same resolver and runner as ``autoskd run``; a flag that was
not given (``None``) leaves the key to the file or its default.
"""

from __future__ import annotations

import argparse
from typing import Mapping

from .overrides import apply_overrides, apply_sets

#: flags every experiment command shares (dest -> experiment key)
COMMON_FLAGS = {"team": "team", "cache_dir": "cache_dir", "progress": "progress", "out": "out", "seed": "seed",
                "task": "task.name", "text_column": "task.text_column", "text_pair_column": "task.text_pair_column",
                "label_column": "task.label_column", "encoding": "task.encoding", "max_train": "task.max_train",
                "max_eval": "task.max_eval"}
#: ``--deepspeed``, ``--tensor-parallel``, ``--processes-per-trial``
SCALE_FLAGS = {"deepspeed": "scale.deepspeed", "tensor_parallel": "scale.tensor_parallel",
               "processes_per_trial": "scale.processes_per_trial"}


def experiment_from_flags(args: argparse.Namespace, kind: str, flags: Mapping[str, str],
                          base: Mapping | None = None) -> dict:
    """``{kind, **base}`` with every given flag of ``COMMON_FLAGS`` and ``flags`` (dest -> key) applied."""
    values = {key: getattr(args, dest, None) for dest, key in {**COMMON_FLAGS, **flags}.items()}
    return apply_overrides({"kind": kind, **(base or {})}, values)


def run_tree(tree: Mapping, args: argparse.Namespace, source: str | None = None) -> int:
    """Apply ``--set``, resolve, then run the experiment or (``--dry-run``) print it."""
    from .preview import preview
    from .resolve import resolve_experiment
    from .runner import run_experiment

    resolved = resolve_experiment(apply_sets(tree, getattr(args, "set", None)), source=source)
    if getattr(args, "dry_run", False):
        print(preview(resolved), end="")
        return 0
    return run_experiment(resolved)
