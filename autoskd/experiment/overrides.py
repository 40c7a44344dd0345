"""Overrides of an experiment: ``--set distill.lr=3e-4`` and every command's flags.

Why one mechanism: a command's flags and ``--set`` are both edits of the same tree, applied in
order (file, then flags, then ``--set``), so ``autoskd distill --lr 1e-3`` and ``autoskd run x.yaml
--set distill.lr=1e-3`` are the same experiment.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Iterable, Mapping

import yaml

from ..errors import AutoSKDError


def parse_set(pair: str) -> tuple[list[str], Any]:
    """``"distill.lr=3e-4"`` -> ``(["distill", "lr"], 3e-4)``: the value is read as YAML (numbers,
    booleans, null, ``[1, 2]``, ``{a: 1}``); anything else stays a string (``lm:`` too)."""
    key, sep, raw = pair.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise AutoSKDError(f"--set {pair!r} must look like key=value with a dotted key, e.g. --set distill.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (dict, list)) and not raw.strip().startswith(("{", "[")):
        value = raw  # "lm:docs.txt" or "a: b" is text; a mapping or list is written {..} or [..]
    if isinstance(value, str):
        value = _number_or_text(value)
    return key.split("."), value


def _number_or_text(text: str) -> Any:
    """YAML 1.1 reads ``3e-4`` as a string; a command line means the number."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        return text


def set_path(tree: dict, parts: list[str], value: Any) -> None:
    """Set ``tree[a][b]... = value``, creating mappings on the way. A key that itself holds dots
    (a search space's ``method_options.temperature``) is matched whole when the tree has it."""
    node = tree
    i = 0
    while i < len(parts) - 1:
        j = _longest_key(node, parts, i)
        key = ".".join(parts[i:j])
        if j == len(parts):
            break
        child = node.get(key)
        if not isinstance(child, dict):
            if child is not None and not isinstance(child, Mapping):
                raise AutoSKDError(f"--set {'.'.join(parts)}: {'.'.join(parts[:j])} is {child!r}, not a section")
            child = dict(child or {})
            node[key] = child
        node, i = child, j
    node[".".join(parts[i:])] = value


def _longest_key(node: dict, parts: list[str], start: int) -> int:
    for end in range(len(parts), start, -1):
        if ".".join(parts[start:end]) in node:
            return end
    return start + 1


def _copy(tree: Mapping) -> dict:
    """A deep copy, with ``task: name`` written as ``task: {name: ...}`` so ``task.*`` can be set."""
    out = copy.deepcopy(dict(tree))
    if isinstance(out.get("task"), str):
        out["task"] = {"name": out["task"]}
    return out


def apply_sets(tree: Mapping, pairs: Iterable[str] | None) -> dict:
    """A copy of ``tree`` with every ``key=value`` of ``pairs`` applied in order."""
    out = _copy(tree)
    for pair in pairs or ():
        parts, value = parse_set(pair)
        set_path(out, parts, value)
    return out


def apply_overrides(tree: Mapping, overrides: Mapping[str, Any]) -> dict:
    """A copy of ``tree`` with ``{"distill.lr": 1e-3, ...}`` applied (None values are skipped:
    a flag that was not given overrides nothing)."""
    out = _copy(tree)
    for key, value in overrides.items():
        if value is not None:
            set_path(out, key.split("."), value)
    return out


def parse_options(pairs: Iterable[str] | None, flag: str = "--option") -> dict:
    """A method's ``key=value`` options from the command line; values read as JSON when they can
    be (numbers, booleans, lists), else kept as strings (``loss=reverse_kl``)."""
    options = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise AutoSKDError(f"{flag} {pair!r} must look like key=value, e.g. {flag} temperature=2")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options
