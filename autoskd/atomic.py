"""Atomic file writes, one helper for every record, checkpoint and cache entry.

A search resumes from the files it finds, and trials running side by side share one cache, so
a reader must see a file's old content or its new content, never half of it: each write goes to
a temporary file beside its destination (same folder, so the same file system) and is renamed
over it with ``os.replace``, which is atomic.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["atomic_path", "write_json"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (its folder is created); write the content there.
    On a clean exit it replaces ``path``; on an error it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 2,
               default: Callable[[Any], Any] | None = None) -> Path:
    """Write ``data`` as JSON to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=indent, default=default))
    return Path(path)
