"""The experiment file's keys, as data: for each section, every key with its default and its check.

Why a table and not dataclasses: the file must be checked *whole* before anything runs, every
problem named by its dotted key (``distill.lr must be a number > 0, got -1``), an unknown key
answered with the nearest known one (``distill.lrr: unknown key; did you mean 'lr'?``), and
the resolved file written back with every default filled in. A table of ``key -> Field`` does
all three with one loop (:func:`check_section`); the engine's own dataclasses stay as they are
and receive the checked values.

A check returns the value normalised (``"1e-4"`` -> ``1e-4``: YAML 1.1 reads that as a
string) or raises :class:`Invalid` with what the value must be; the caller adds the key. Numbers,
folders, encodings and baselines use the command line's own validators
(:mod:`autoskd.cli_types`), so a flag and its key obey one rule.
"""

from __future__ import annotations

import argparse
import difflib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..cli_types import baseline_list, encoding_name, float_range, int_at_least, output_dir, ray_address, storage_url

Check = Callable[[Any], Any]


class Invalid(ValueError):
    """A value's problem, worded without its key (``must be a whole number >= 1, got 0``)."""


@dataclass(frozen=True)
class Field:
    """One key of a section: its default (already normalised) and its check."""

    default: Any
    check: Check


# ---------------------------------------------------------------------------------------------- checks
def _flag_check(parse: Callable[[Any], Any]) -> Check:
    """A command-line validator (:mod:`autoskd.cli_types`) as a check: one rule for a flag and
    for the file's key."""

    def check(value: Any) -> Any:
        try:
            return parse(value)
        except argparse.ArgumentTypeError as err:
            raise Invalid(str(err)) from None

    return check


def number(above: float | None = None, at_least: float | None = None, below: float | None = None,
           at_most: float | None = None) -> Check:
    """A finite number within the given bounds (``above``/``below`` exclusive)."""
    return _flag_check(float_range(above=above, at_least=at_least, below=below, at_most=at_most))


def whole(minimum: int) -> Check:
    """A whole number >= ``minimum`` (``3.0`` is accepted as 3)."""
    return _flag_check(int_at_least(minimum))


def optional(inner: Check) -> Check:
    """``inner``, or null."""

    def check(value: Any) -> Any:
        return None if value is None else inner(value)

    return check


def one_of(*choices: Any) -> Check:
    def check(value: Any) -> Any:
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise Invalid(f"must be one of {', '.join(str(c) for c in choices)}, got {value!r}{hint}")
        return value

    return check


def text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Invalid(f"must be a non-empty string, got {value!r}")
    return value


def flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"must be true or false, got {value!r}")
    return value


def mapping(value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise Invalid(f"must be a mapping of key: value, got {value!r}")
    return dict(value)


def names(value: Any) -> list[str]:
    """A list of names; ``"a,b"`` (the command line's form) is accepted."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise Invalid(f"must be a non-empty list of names, got {value!r}")
    return list(value)


def list_of(inner: Check, what: str) -> Check:
    """A non-empty list whose every item passes ``inner`` (a single item is accepted as a list)."""

    def check(value: Any) -> list:
        items = value if isinstance(value, (list, tuple)) else [value]
        if not items:
            raise Invalid(f"must be a non-empty list of {what}, got {value!r}")
        try:
            return [inner(v) for v in items]
        except Invalid:
            raise Invalid(f"must be a non-empty list of {what}, got {value!r}") from None

    return check


def encoding(value: Any) -> str:
    return _flag_check(encoding_name)(text(value))


def folder(value: Any) -> str:
    """A folder to write into (the command line's ``--out`` rules)."""
    return _flag_check(output_dir)(text(value))


def cluster(value: Any) -> str:
    """A Ray cluster address (``ray://head:10001``, ``head:6379``, ``auto``, ``local``), reachable
    now: a short connect, so an unreachable cluster stops the run in seconds, before any work."""
    return _flag_check(ray_address)(text(value))


def storage(value: Any) -> str:
    """An Optuna storage URL (SQLite file, PostgreSQL or MySQL server): its driver installed, its
    folder writable or its server reachable now."""
    return _flag_check(storage_url)(text(value))


def baselines(value: Any) -> str:
    """all, none, or a list (or comma list) of AutoSKD's baselines."""
    return _flag_check(baseline_list)(",".join(value) if isinstance(value, list) else text(value))


# ---------------------------------------------------------------------------------------------- sections
def unknown_key(key: Any, known: list[str], where: str) -> str:
    """The problem line for an unknown key: the nearest known key, else the list of them."""
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
    return f"{where}{key}: unknown key; {hint}"


def check_section(given: Any, table: Mapping[str, Field], where: str, problems: list[str],
                  skip: tuple[str, ...] = ()) -> dict:
    """``given`` checked against ``table``: every key present, in the table's order, defaults
    filled in. Problems are appended to ``problems`` (one line each); a bad value keeps its
    default so the rest of the file can still be checked. ``skip``: keys the caller checks."""
    prefix = f"{where}." if where else ""
    if given is None:
        given = {}
    if not isinstance(given, Mapping):
        problems.append(f"{where} must be a mapping of key: value, got {given!r}")
        given = {}
    for key in given:
        if key not in table and key not in skip:
            problems.append(unknown_key(key, list(table) + list(skip), prefix))
    out = {}
    for key, spec in table.items():
        value = given.get(key, spec.default)
        try:
            out[key] = spec.check(value)
        except Invalid as err:
            problems.append(f"{prefix}{key} {err}")
            out[key] = spec.default
    return out
