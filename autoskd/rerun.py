"""Reruns into one output folder: what a finished artifact was computed from, and the one line
that refuses to mix two experiments.

A search, a tune, a stage plan or a chain resumes from its output folder by reusing the work
already there. Reuse is only right when that work was computed from the same configuration, so
each finished artifact (``search.json``, ``trials/<arm>/arm.json``, a study's user attributes,
``done.json``, ``result.json``) carries a *stamp*: the canonical ``identity`` it was computed from
(a plain mapping: settings, team, data, ...) and its sha256 ``fingerprint``. A rerun computes the
identity it would compute now and compares (:func:`check_stamp`): equal fingerprints resume,
anything else stops with one line naming the keys that differ and how to start fresh.

Keys are dotted paths into the identity (``search.theta.strategy``, ``team.teachers.0.source``).
Each layer builds its own identity from its own inputs, so the check holds when the layer is
called from Python as well as from the command line.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import AutoSKDError

__all__ = ["canonical", "fingerprint", "flatten", "differences", "stamp", "check_stamp", "mismatch_line",
           "keys_differ", "fresh_out", "RerunMismatch", "path_identity", "without", "ADDED_SETTINGS",
           "only_added_settings"]


class RerunMismatch(AutoSKDError):
    """A rerun into an output folder whose finished work was computed from another configuration."""


def canonical(obj: Any) -> Any:
    """``obj`` as plain JSON values (tuples as lists, keys as strings, anything else via ``str``)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def fingerprint(identity: Any) -> str:
    """sha256 of the canonical JSON of ``identity`` (independent of key order)."""
    text = json.dumps(canonical(identity), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def stamp(identity: Mapping) -> dict:
    """``{"fingerprint": ..., "identity": ...}``: what an artifact records about its origin."""
    return {"fingerprint": fingerprint(identity), "identity": canonical(identity)}


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.0.c": leaf, ...}``: mappings and lists walked down to their leaves (an empty one,
    or a list of plain values such as a θ, is a leaf)."""
    if isinstance(obj, Mapping) and obj:
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(obj, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple)) for v in obj):
        out = {}
        for i, value in enumerate(obj):
            out.update(flatten(value, f"{prefix}.{i}" if prefix else str(i)))
        return out
    return {prefix: obj}


def without(flat: Mapping[str, Any], free: Iterable[str]) -> dict[str, Any]:
    """``flat`` without the keys in ``free`` (a key also frees everything below it)."""
    free = tuple(free)
    return {k: v for k, v in flat.items() if not any(k == f or k.startswith(f + ".") for f in free)}


_ABSENT = object()


def _short(value: Any) -> str | None:
    """A value as the message shows it (None: too long to show)."""
    text = "(absent)" if value is _ABSENT else repr(value)
    return text if len(text) <= 40 else None


def differences(old: Any, new: Any, limit: int = 6) -> tuple[int, str]:
    """``(count, text)`` of the leaves that differ between two identities, e.g.
    ``search.theta.strategy: 'sswo' -> 'cr', team.teachers.0.source``."""
    a, b = flatten(canonical(old)), flatten(canonical(new))
    keys = sorted(k for k in set(a) | set(b) if a.get(k, _ABSENT) != b.get(k, _ABSENT))
    parts = []
    for key in keys[:limit]:
        before, after = _short(a.get(key, _ABSENT)), _short(b.get(key, _ABSENT))
        parts.append(f"{key}: {before} -> {after}" if before is not None and after is not None else key)
    if len(keys) > limit:
        parts.append(f"... {len(keys) - limit} more")
    return len(keys), ", ".join(parts)


def keys_differ(old: Any, new: Any) -> str:
    """``2 keys differ: a: 1 -> 2, b`` (see :func:`differences`)."""
    count, text = differences(old, new)
    return f"1 key differs: {text}" if count == 1 else f"{count} keys differ: {text}"


def mismatch_line(what: str, old: Any, new: Any, fresh: str) -> str:
    """One line: ``what`` was computed with another configuration, the keys that differ, ``fresh``."""
    if old is None:
        reason = "carries no fingerprint (written before autoskd recorded one), so it cannot be matched"
    else:
        reason = f"was computed with another configuration ({keys_differ(old, new)})"
    return f"{what} {reason}; rerun with the same settings to resume it, or start fresh: {fresh}"


def fresh_out(folder: str | os.PathLike) -> str:
    """How to start fresh when ``folder`` (an output folder) holds another experiment."""
    return f"pass a new --out folder or delete {folder}"


#: Settings added to a configuration after artifacts were stamped without them, each with the
#: value that does what those artifacts did. A record that lacks such a key matches an identity
#: holding exactly that value, so adding a setting does not orphan finished work; any other
#: value is a real difference. Keys are leaf names (the last part of a dotted key).
ADDED_SETTINGS: dict[str, Any] = {
    "deepspeed": None,      # DistillConfig / LMDistillConfig / SearchConfig: no DeepSpeed
    "tensor_parallel": 1,   # ... : no tensor parallelism
}


def only_added_settings(old: Any, new: Any) -> bool:
    """True when every leaf that differs is missing from ``old`` and holds, in ``new``, the
    value :data:`ADDED_SETTINGS` gives for it (what ``old`` was computed with)."""
    a, b = flatten(canonical(old)), flatten(canonical(new))
    keys = [k for k in set(a) | set(b) if a.get(k, _ABSENT) != b.get(k, _ABSENT)]
    return bool(keys) and all(k not in a and k.rsplit(".", 1)[-1] in ADDED_SETTINGS
                              and b[k] == canonical(ADDED_SETTINGS[k.rsplit(".", 1)[-1]]) for k in keys)


def check_stamp(record: Mapping | None, identity: Mapping, what: str, folder: str | os.PathLike | None = None,
                fresh: str | None = None) -> None:
    """Return when ``record`` (an artifact's JSON, or None: nothing there) was computed from
    ``identity`` (or from it less settings added since, at the values that reproduce it:
    :data:`ADDED_SETTINGS`); else raise :class:`RerunMismatch` with one line. ``fresh`` says how
    to start fresh (default: a new --out, or deleting ``folder``)."""
    if record is None:
        return
    if record.get("fingerprint") == fingerprint(identity):
        return
    if "identity" in record and only_added_settings(record["identity"], identity):
        return
    raise RerunMismatch(mismatch_line(what, record.get("identity") if "fingerprint" in record else None, identity,
                                      fresh or fresh_out(folder)))


def path_identity(path: str | os.PathLike, patterns: tuple[str, ...] = ("*",)) -> dict | None:
    """What identifies a local file or folder's contents cheaply: its files' names, sizes and
    modification times (a folder: the top-level files matching ``patterns``); None when
    ``path`` is not local."""
    if not str(path):
        return None
    p = Path(str(path)).expanduser()
    try:
        if p.is_file():
            st = p.stat()
            return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        if p.is_dir():
            files = sorted({f for pattern in patterns for f in p.glob(pattern) if f.is_file()})
            return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}
    except OSError:
        return None
    return None
