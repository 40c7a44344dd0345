"""Experiment files on disk: read one, write the resolved one beside a run's outputs, and the
fingerprint that names what a run computes.

The written ``experiment.yaml`` is the run's whole recipe (team inline, every default filled
in): ``autoskd run runs/x/experiment.yaml --out runs/y`` runs it again with the same numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..atomic import atomic_path
from ..errors import AutoSKDError
from ..rerun import RerunMismatch, canonical, flatten, fresh_out, keys_differ, without
from .sections import VOLATILE, resume_free

FILE_NAME = "experiment.yaml"


def load_experiment(path: str | os.PathLike) -> dict:
    """The mapping in an experiment file (not yet resolved)."""
    file = Path(path).expanduser()
    if not file.is_file():
        what = "is a folder, not a file" if file.is_dir() else "not found"
        raise AutoSKDError(f"experiment file {path} {what}; pass a YAML file such as runs/x/experiment.yaml")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise AutoSKDError(f"experiment file {file} is not valid YAML ({str(err).splitlines()[0]}); fix the "
                           "syntax") from None
    if not isinstance(data, Mapping):
        raise AutoSKDError(f"experiment file {file} must be a mapping (kind, team, task, ...), got "
                           f"{type(data).__name__}")
    return dict(data)


def experiment_fingerprint(resolved: Mapping[str, Any]) -> str:
    """sha256 of the canonical resolved experiment without the keys that never change its numbers
    (``out``, ``cache_dir``, ``progress``): two runs with one fingerprint compute the same thing,
    so an artifact can be resumed or reused under it."""
    stable = {k: v for k, v in resolved.items() if k not in VOLATILE}
    text = json.dumps(stable, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def dump_experiment(resolved: Mapping[str, Any]) -> str:
    """The resolved experiment as YAML, with a header saying how to run it again."""
    header = (f"# autoskd experiment (resolved; fingerprint {experiment_fingerprint(resolved)[:16]})\n"
              "# run it again: autoskd run <this file> --out <new folder>\n")
    return header + yaml.safe_dump(dict(resolved), sort_keys=False, default_flow_style=False, allow_unicode=True)


def write_experiment(resolved: Mapping[str, Any], out_dir: str | os.PathLike | None = None) -> Path:
    """``<out>/experiment.yaml``, written atomically (every rank of a launcher may write it)."""
    path = Path(out_dir if out_dir is not None else resolved["out"]) / FILE_NAME
    with atomic_path(path) as tmp:
        tmp.write_text(dump_experiment(resolved), encoding="utf-8")
    return path


def check_rerun(resolved: Mapping[str, Any]) -> None:
    """Before a run into ``out``: the experiment already there (``<out>/experiment.yaml``) must be
    this one, up to the keys a rerun may change (:func:`~autoskd.experiment.sections.resume_free`:
    where it writes, resources, how far it goes). Otherwise one line names the keys that differ
    and how to start fresh. The layers below check their own artifacts too (a search's records
    and arms, a study, a stage plan's stages, a chain's hops), also when called from Python."""
    path = Path(resolved["out"]) / FILE_NAME
    if not path.is_file():
        return
    what = f"--out {resolved['out']} holds an experiment that"
    try:
        before = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        before = None
    if not isinstance(before, Mapping):
        raise RerunMismatch(f"{what} cannot be read ({path}); start fresh: {fresh_out(resolved['out'])}")
    free = resume_free()
    old, new = (without(flatten(canonical(dict(x))), free) for x in (before, resolved))
    if old != new:
        raise RerunMismatch(f"{what} differs from this one ({keys_differ(old, new)}); rerun the same experiment to "
                            f"resume it (autoskd run {path}), or start fresh: {fresh_out(resolved['out'])}")
