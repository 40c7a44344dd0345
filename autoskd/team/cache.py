"""Teacher cache entries: ``<cache_dir>/<teacher>-<hash12>``, keyed by what the weights depend on.

The key covers the teacher's spec, the weights its source holds now (:func:`source_identity`: a
local folder's weight files by name, size and modification time, a hub repo by its cached
commit), the training and dev data, the label count, ``max_length``, the seed and the tokenizer
that fed it (vocabulary, probe ids, truncation side), so a rerun reuses a fine-tuned teacher, a
changed spec rebuilds only the teachers it changed, and a folder whose weights were replaced is
fine-tuned again instead of served stale. An entry counts only once its ``meta.json`` (written
last, after the weights) carries the same key.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from torch import nn

from ..errors import AutoSKDError
from ..models.loading import freeze, load_classifier, resolve_source
from ..models.pooling import checkpoint_pooling
from ..rerun import path_identity
from .probe import tokenizer_fingerprint
from .spec import ModelSpec, TeamSpec, _sha256

DEFAULT_CACHE_DIR = Path(".cache/autoskd/teachers")

#: the files of a model folder its weights (and their shapes) are read from
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.msgpack", "*.h5", "config.json")


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "teacher"


def hub_commit(repo_id: str) -> str | None:
    """The commit of ``repo_id`` in the local Hugging Face cache (None: not cached, or unknown)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - not a repo id, no hub library: no commit to key on
        return None
    return Path(path).parent.name if isinstance(path, (str, os.PathLike)) else None


def source_identity(source: str | None) -> dict | None:
    """What a member's source holds now: a local folder (an alias's too) by its weight files'
    names, sizes and modification times; a hub id by the commit cached locally, when there is one."""
    if source is None:
        return None
    try:
        resolved = resolve_source(source)
    except AutoSKDError:
        return {"missing": str(source)}
    files = path_identity(resolved, WEIGHT_FILES)
    if files is not None:
        return {"files": files}
    return {"hub": resolved, "commit": hub_commit(resolved)}


def tokenizer_identity(tokenizer) -> dict:
    """A tokenizer's :func:`~autoskd.team.probe.tokenizer_fingerprint` and its truncation and
    padding sides (what turns a text into the ids a teacher reads)."""
    return {**tokenizer_fingerprint(tokenizer), "truncation_side": getattr(tokenizer, "truncation_side", None),
            "padding_side": getattr(tokenizer, "padding_side", None)}


def teacher_cache_key(spec: ModelSpec, task, max_length: int, seed: int, tokenizer) -> str:
    """Hash of everything a spec teacher's fine-tuned weights depend on (a mean-pooling head,
    :func:`~autoskd.models.pooling.checkpoint_pooling`, too: such a teacher is another model)."""
    head = {"pooling": "mean"} if _pooling(spec.source) == "mean" else {}  # [CLS] teachers keep their keys
    return _sha256({"version": 2, "teacher": spec.to_dict(), "spec_hash": spec.spec_hash(),
                    "source": source_identity(spec.source),
                    "train": task.fingerprint("train_full"), "dev": task.fingerprint("dev"),
                    "num_labels": task.num_labels, "max_length": max_length, "seed": seed,
                    "tokenizer": tokenizer_identity(tokenizer), **head})


def _pooling(source: str | None) -> str:
    try:
        return checkpoint_pooling(resolve_source(source)) if source is not None else "cls"
    except AutoSKDError:
        return "cls"


def team_spec_identity(spec: TeamSpec) -> dict:
    """A team file's settings and what each member's source holds now (see :func:`source_identity`)."""
    members = [spec.student, *spec.teachers]
    return {"spec": spec.to_dict(),
            "sources": {m.source: source_identity(m.source) for m in members if m.source is not None}}


def team_file_identity(path: str | os.PathLike) -> dict:
    """:func:`team_spec_identity` of a team file (or a bundled team's name); a file that does not
    parse as a team is identified by its bytes, a missing one by its name."""
    try:
        return team_spec_identity(TeamSpec.from_yaml(path))
    except AutoSKDError:
        file = Path(str(path)).expanduser()
        if file.is_file():
            return {"file": str(path), "sha256": hashlib.sha256(file.read_bytes()).hexdigest()}
        return {"name": str(path)}


def entry_dir(cache_dir: Path, name: str, key: str) -> Path:
    return Path(cache_dir) / f"{safe_name(name)}-{key[:12]}"


def read_meta(entry: Path, key: str) -> dict | None:
    """The entry's metadata when it is complete and built for ``key`` (else None: rebuild)."""
    meta_file = entry / "meta.json"
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return meta if meta.get("hash") == key and "weights_id" in meta else None


def load_frozen(path: str, num_labels: int) -> nn.Module:
    return freeze(load_classifier(path, num_labels=num_labels))
