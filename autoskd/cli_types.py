"""Value validators shared by every command's flags and by experiment files: numbers, ranges,
paths, encodings.

A bad value is refused before any data is read or any model trained, so it costs the user
nothing. On the command line argparse (``OneLineParser`` in :mod:`autoskd.cli`) turns the
:class:`argparse.ArgumentTypeError` into one line naming the flag::

    autoskd: error: autoskd distill: argument --batch-size: must be a whole number >= 1, got '0' (...)

and an experiment file's check (:mod:`autoskd.experiment.schema`) names the key instead. The
validators take the text of a flag or the value YAML read (``3``, ``3.0``, ``"1e-4"``).

New subcommands should reuse these instead of ``type=int``/``type=float``::

    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--out", type=output_dir, default="runs/x")
"""

from __future__ import annotations

import argparse
import codecs
import math
import os
from pathlib import Path
from typing import Callable

__all__ = ["int_at_least", "positive_int", "non_negative_int", "positive_float", "non_negative_float",
           "fraction", "float_range", "output_dir", "output_file", "existing_file", "encoding_name", "baseline_list",
           "port_number", "ray_address", "storage_url"]


def int_at_least(minimum: int) -> Callable[[str], int]:
    """A validator for whole numbers >= ``minimum``."""

    def parse(text: str) -> int:
        if isinstance(text, float) and text.is_integer():  # YAML's 3.0
            text = int(text)
        try:
            value = int(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"int_at_least_{minimum}"
    return parse


positive_int = int_at_least(1)
positive_int.__name__ = "positive_int"
non_negative_int = int_at_least(0)
non_negative_int.__name__ = "non_negative_int"


def _finite_float(text: str, rule: str) -> float:
    try:
        value = float(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number {rule}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number {rule}, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates, epochs, CPU shares)."""
    value = _finite_float(text, "> 0")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (optional epochs, GPU shares)."""
    value = _finite_float(text, ">= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1] (ratios such as warm-up)."""
    value = _finite_float(text, "between 0 and 1")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1, got {text!r}")
    return value


def float_range(above: float | None = None, at_least: float | None = None, below: float | None = None,
                at_most: float | None = None) -> Callable[[str], float]:
    """A validator for finite numbers within the given bounds (``above``/``below`` exclusive)."""
    rules = [f"> {above:g}" if above is not None else "", f">= {at_least:g}" if at_least is not None else "",
             f"< {below:g}" if below is not None else "", f"<= {at_most:g}" if at_most is not None else ""]
    rule = " and ".join(r for r in rules if r)

    def parse(text: str) -> float:
        value = _finite_float(text, rule)
        if ((above is not None and not value > above) or (at_least is not None and not value >= at_least)
                or (below is not None and not value < below) or (at_most is not None and not value <= at_most)):
            raise argparse.ArgumentTypeError(f"must be a number {rule}, got {text!r}")
        return value

    return parse


def output_dir(text: str) -> str:
    """A folder to write into: it may exist (a rerun resumes it) or will be created, but no part
    of it may be a file, and the nearest existing folder must be writable."""
    if not str(text).strip():
        raise argparse.ArgumentTypeError("must name a folder, got an empty string")
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is an existing file, not a folder; pass a folder path "
                                         "(it is created if missing)")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot create folder {text}: {parent} is a file; pass another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write to {parent} (permission denied); pass a folder you can "
                                         "write to")
    return str(text)


def output_file(text: str) -> str:
    """A file to write (a plot, a config): not a folder, its folder creatable and writable."""
    if not str(text).strip():
        raise argparse.ArgumentTypeError("must name a file, got an empty string")
    path = Path(text).expanduser()
    if path.is_dir() or str(text).endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"{text} is a folder; pass a file path, e.g. {Path(text) / 'plan.png'}")
    try:
        output_dir(str(path.parent))
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(f"cannot write {text}: {err}") from None
    return str(text)


def port_number(text: str) -> int:
    """A TCP port to listen on: a whole number from 1 to 65535."""
    try:
        value = int(str(text).strip())
    except ValueError:
        value = 0
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 1 to 65535, got {text!r}")
    return value


def ray_address(text: str) -> str:
    """A Ray cluster: ``ray://head:10001``, ``head:6379``, ``auto`` or ``local``, reachable now (a
    short connect, a few seconds at most), so an unreachable cluster is one line before any work
    (:func:`autoskd.ray_runtime.check_ray_address`)."""
    from .errors import AutoSKDError
    from .ray_runtime import check_ray_address

    try:
        return check_ray_address(str(text).strip())
    except AutoSKDError as err:
        # "--address X: why": argparse names the flag itself ("auto (= what it found): why" is kept whole)
        raise argparse.ArgumentTypeError(str(err).removeprefix(f"--address {str(text).strip()}: ")) from None


#: Optuna's RDB storages (SQLAlchemy dialects) and the default port of their servers
STORAGE_PORTS = {"sqlite": None, "postgresql": 5432, "mysql": 3306}


def storage_url(text: str) -> str:
    """An Optuna storage: a SQLite file (``sqlite:///path.db`` or a bare path) whose folder can be
    written, or a ``postgresql://`` / ``mysql://`` URL whose driver is installed and whose server
    accepts a connection now (a few seconds at most). Returns the text unchanged."""
    from .ray_runtime import probe_tcp

    value = str(text).strip()
    if not value:
        raise argparse.ArgumentTypeError("must be a storage URL such as sqlite:///runs/tune/optuna.db or "
                                         "postgresql://user@host/db, got an empty string")
    if "://" not in value:  # a bare path is a SQLite file
        _sqlite_file(value, value)
        return str(text)
    from sqlalchemy.engine import make_url

    try:
        url = make_url(value)
    except Exception:  # noqa: BLE001 - SQLAlchemy's parse errors vary
        raise argparse.ArgumentTypeError(f"{value} is not a database URL; use sqlite:///path/optuna.db or "
                                         "postgresql://user:password@host:5432/db") from None
    backend = url.get_backend_name()
    if backend not in STORAGE_PORTS:
        raise argparse.ArgumentTypeError(f"{value}: unknown database {backend!r}; Optuna stores studies in "
                                         f"{', '.join(STORAGE_PORTS)} (e.g. sqlite:///runs/tune/optuna.db)")
    try:
        dialect = url.get_dialect()
        (dialect.import_dbapi if hasattr(dialect, "import_dbapi") else dialect.dbapi)()
    except ImportError as err:
        hint = {"postgresql": "pip install 'psycopg[binary]' (or psycopg2-binary with postgresql+psycopg2://)",
                "mysql": "pip install mysqlclient (or PyMySQL with mysql+pymysql://)"}.get(backend, "install it")
        raise argparse.ArgumentTypeError(f"{value}: the {backend} driver is not installed ({err}); {hint}") from None
    except Exception as err:  # noqa: BLE001 - an unknown driver name after '+'
        raise argparse.ArgumentTypeError(f"{value}: {str(err).splitlines()[0]}; use e.g. postgresql://user@host/db") \
            from None
    if backend == "sqlite":
        if not url.database or url.database == ":memory:":
            raise argparse.ArgumentTypeError(f"{value} is an in-memory database: a tune could neither resume nor be "
                                             "shown; give a file, e.g. sqlite:///runs/tune/optuna.db")
        _sqlite_file(url.database, value)
        return str(text)
    if not url.host:
        return str(text)  # a local server's socket (postgresql:///db): the driver finds it
    port = url.port or STORAGE_PORTS[backend]
    why = probe_tcp(url.host, port)
    if why is not None:
        raise argparse.ArgumentTypeError(f"cannot reach the {backend} server at {url.host}:{port} ({why}); start it "
                                         "or fix the host and port")
    return str(text)


def _sqlite_file(path: str, shown: str) -> None:
    file = Path(path).expanduser()
    if file.is_dir():
        raise argparse.ArgumentTypeError(f"{shown}: {path} is a folder; name the database file, e.g. "
                                         f"{Path(path) / 'optuna.db'}")
    try:
        output_dir(str(file.parent))
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(f"{shown}: {err}") from None


def existing_file(text: str) -> str:
    """A file that must exist (e.g. a configuration to read)."""
    path = Path(text).expanduser()
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise argparse.ArgumentTypeError(f"{text}: {what}; check the path")
    return str(text)


def encoding_name(text: str) -> str:
    """A text encoding Python knows (``utf-8``, ``latin-1``, ``cp1252``, ``utf-16`` ...)."""
    try:
        codecs.lookup(text)
    except LookupError:
        raise argparse.ArgumentTypeError(f"unknown encoding {text!r}; use a Python codec name such as utf-8, "
                                         "latin-1, cp1252 or utf-16") from None
    return text


def baseline_list(text: str) -> str:
    """``--baselines``: all, none, or a comma list of known baselines (checked now, not after
    the search phase has run). Returns the text unchanged."""
    from .errors import AutoSKDError
    from .search.arms import parse_baselines

    try:
        parse_baselines(text)
    except AutoSKDError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text
