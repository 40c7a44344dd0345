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

import hashlib
import json
from dataclasses import dataclass, field

import datasets
import numpy as np
import pandas as pd

from autoskd.errors import AutoSKDError

from .sources import TASKS, Source, check_encoding, read_source

SPLITS = ("train", "val", "dev", "test")

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
    source = read_source(str(name_or_path), split, check_encoding(encoding))
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
# Columns, cleaning, labels


def _resolve_columns(source: Source, text_col, pair_col, label_col) -> tuple[str, str | None, str]:
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


def _clean(source: Source, text_col: str, pair_col: str | None, label_col: str) -> dict[str, pd.DataFrame]:
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


def _encode_labels(source: Source, frames: dict[str, pd.DataFrame], label_col: str) -> list[str]:
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
