"""Teacher cache entries: ``<cache_dir>/<teacher>-<hash12>``, keyed by what the weights depend on.

The key covers the teacher's spec, the training and dev data, the label count, ``max_length``,
the seed and the tokenizer that fed it, so a rerun reuses a fine-tuned teacher and a changed
spec rebuilds only the teachers it changed. An entry counts only once its ``meta.json`` (written
last, after the weights) carries the same key.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from torch import nn

from ..models.loading import freeze, load_classifier
from .probe import tokenizer_fingerprint
from .spec import ModelSpec, _sha256

DEFAULT_CACHE_DIR = Path(".cache/autoskd/teachers")


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "teacher"


def teacher_cache_key(spec: ModelSpec, task, max_length: int, seed: int, tokenizer) -> str:
    """Hash of everything a spec teacher's fine-tuned weights depend on."""
    return _sha256({"version": 1, "teacher": spec.to_dict(), "spec_hash": spec.spec_hash(),
                    "train": task.fingerprint("train_full"), "dev": task.fingerprint("dev"),
                    "num_labels": task.num_labels, "max_length": max_length, "seed": seed,
                    "tokenizer": tokenizer_fingerprint(tokenizer)})


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
