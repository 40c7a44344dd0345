"""Language-modelling corpora: loading, document splits, token rows and loaders.

An LM task is a text corpus (or prompt/completion pairs). It is split by document into the same
four roles as a classification task (:mod:`autoskd.data.tasks`): weights are fitted on ``train``
and the teacher distribution on ``val`` (bilevel search), ``dev`` is for model selection and
``test`` is touched once. Splits are a pure function of ``seed``, and every tokenized row carries
``idx`` (its row number), the key of the on-disk teacher-output cache.

A row's ``target_ids[t]`` is the token position ``t`` must predict (``input_ids[t + 1]``) or
``-100`` where ``t`` has no loss, so every loss masks with ``target_ids != -100``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from autoskd.data.sources import TASKS, read_rotten_tomatoes_csv, read_source
from autoskd.errors import AutoSKDError

SPLITS = ("train", "val", "dev", "test")
LAYOUTS = ("packed", "padded")
KINDS = ("text", "prompt_completion")
IGNORE = -100  # target of a position without loss (cross_entropy's default ignore_index)
_COLUMNS = ("input_ids", "attention_mask", "target_ids")
_LOCAL_SUFFIXES = (".txt", ".csv", ".tsv", ".json", ".jsonl", ".parquet")
#: Built-in corpora for language modelling only (no labels), from the Rotten Tomatoes file: its
#: plot synopses, and synopses with the reviews (two genres of text, so that a team of genre
#: specialists has something to be complementary about; ``benchmarks/lm_search_vs_random.py``).
LM_SOURCES = {"rotten_tomatoes_plots": ("plot",), "rotten_tomatoes_all": ("plot", "fresh", "rotten")}
_PROBE = "Hello, world! 12 tokens?"  # shows whether a tokenizer adds BOS/EOS (see tokenizer_fingerprint)


@dataclass
class LMCorpus:
    """A corpus split by document: ``splits[role]`` is a list of texts, or of (prompt, completion)
    pairs when ``kind`` is ``"prompt_completion"``. Documents keep their source order in a split."""

    name: str
    splits: dict[str, list]
    kind: str = "text"
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def split(self, name: str) -> list:
        """One split by role; ``train_full`` is train followed by val (final fits)."""
        if name == "train_full":
            return self.splits["train"] + self.splits["val"]
        if name not in self.splits:
            raise AutoSKDError(f"unknown split '{name}'; use one of: {', '.join(SPLITS)}, train_full")
        return self.splits[name]

    def fingerprint(self, split: str) -> str:
        """sha256 hex digest of a split's documents in order. It keys cached teacher outputs, so it
        depends only on the data and its order, never on Python's hash seed or the process."""
        if split not in self._cache:
            digest = hashlib.sha256(f"autoskd-lm-split-v1|{self.kind}\n".encode())
            for doc in self.split(split):
                digest.update(json.dumps(doc, ensure_ascii=False).encode("utf-8") + b"\n")
            self._cache[split] = digest.hexdigest()
        return self._cache[split]

    def sizes(self) -> dict[str, int]:
        """Document count per split (for logs)."""
        return {role: len(docs) for role, docs in self.splits.items()}

    def subsample(self, max_train: int | None, max_eval: int | None, seed: int = 0) -> LMCorpus:
        """A smaller copy for quick presets: at most ``max_train`` documents in train and in val and
        ``max_eval`` in dev and in test (``None`` keeps a split whole), in their original order."""
        rng = np.random.default_rng(seed)
        splits = {}
        for role in SPLITS:
            docs, limit = self.splits[role], max_train if role in ("train", "val") else max_eval
            if limit is not None and limit < 1:
                raise AutoSKDError(f"subsample size must be at least 1 (got {limit} for {role})")
            keep = range(len(docs)) if limit is None or len(docs) <= limit else \
                np.sort(rng.choice(len(docs), size=limit, replace=False))
            splits[role] = [docs[i] for i in keep]
        return LMCorpus(self.name, splits, self.kind)


def load_corpus(source: str, *, text_column: str | None = None, prompt_column: str | None = None,
                completion_column: str | None = None, seed: int = 0, val_fraction: float = 0.1,
                dev_fraction: float = 0.1, test_fraction: float = 0.1,
                max_documents: int | None = None) -> LMCorpus:
    """Load ``source`` (``rotten_tomatoes``, one of :data:`LM_SOURCES`, a .txt file with one document per non-empty line, a
    .csv/.tsv/.json/.jsonl/.parquet file or directory, or a hub name ``path[:config]``) and split it.

    A source's own splits (a hub dataset's train/validation/test) are pooled and re-split by
    ``seed``, so every source yields the same four roles. ``max_documents`` keeps the first N
    non-empty documents (before splitting), for quick runs.
    """
    if max_documents is not None and max_documents < 1:
        raise AutoSKDError(f"--max-documents must be at least 1 (got {max_documents})")
    kind, docs = _documents(_read_frame(source), source, text_column, prompt_column, completion_column)
    if not docs:
        raise AutoSKDError(f"{source} has no non-empty documents; check the data and the column options")
    fractions = {"val": val_fraction, "dev": dev_fraction, "test": test_fraction}
    return LMCorpus(source, _split_documents(docs[:max_documents], source, seed, fractions), kind)


def _read_frame(source: str) -> pd.DataFrame:
    """All raw rows of ``source``. Table files and hub names go through the classification reader
    (:func:`autoskd.data.sources.read_source`), so both tasks read data the same way."""
    if source in LM_SOURCES:
        df = read_rotten_tomatoes_csv()
        return df.loc[df["category"].isin(LM_SOURCES[source]), ["text"]].reset_index(drop=True)
    path = Path(source).expanduser()
    if source not in TASKS and not path.exists() and _looks_local(source, path):
        raise AutoSKDError(f"corpus file not found: {source}; pass an existing .txt/.csv/.tsv/.json/.jsonl/"
                           f".parquet file, 'rotten_tomatoes', {', '.join(map(repr, LM_SOURCES))} or a hub "
                           "dataset name")
    if path.suffix.lower() == ".txt":
        try:
            return pd.DataFrame({"text": path.read_text(encoding="utf-8").splitlines()})
        except UnicodeDecodeError as err:
            raise AutoSKDError(f"{source} is not valid UTF-8 text ({err.reason}); re-save it as UTF-8") from None
    return pd.concat(list(read_source(source, None).frames.values()), ignore_index=True)


def _looks_local(source: str, path: Path) -> bool:
    """Whether a missing ``source`` was meant as a file (so it gets a file error, not a hub error)."""
    return (any(s.lower() in _LOCAL_SUFFIXES for s in path.suffixes) or source.startswith((".", "~", os.sep))
            or (os.sep in source and path.parent.exists()))


def _documents(df: pd.DataFrame, source: str, text_column: str | None, prompt_column: str | None,
               completion_column: str | None) -> tuple[str, list]:
    """The corpus kind and its non-empty documents (texts, or pairs with a non-empty completion)."""
    if prompt_column is None and completion_column is None:
        texts = _column(df, text_column or "text", source, "--text-column")
        return "text", [t for t in texts if t.strip()]
    if text_column is not None:
        raise AutoSKDError("--text-column cannot be combined with --prompt-column/--completion-column; pass one kind")
    if prompt_column is None or completion_column is None:
        raise AutoSKDError("prompt/completion data needs both --prompt-column and --completion-column; pass both")
    prompts = _column(df, prompt_column, source, "--prompt-column")
    completions = _column(df, completion_column, source, "--completion-column")
    return "prompt_completion", [(p, c) for p, c in zip(prompts, completions) if c.strip()]


def _column(df: pd.DataFrame, name: str, source: str, flag: str) -> list[str]:
    """A column as strings; missing cells become "" (and are dropped as empty documents)."""
    if name not in df.columns:
        raise AutoSKDError(f"column '{name}' not in {source} (columns: {', '.join(map(str, df.columns))}); "
                           f"choose one with {flag}")
    return ["" if v is None or (isinstance(v, float) and v != v) else str(v) for v in df[name].tolist()]


def _split_documents(docs: list, name: str, seed: int, fractions: dict[str, float]) -> dict[str, list]:
    """Seeded split by document: val/dev/test take their fractions (at least one document each)
    of a ``default_rng(seed)`` permutation, train keeps the rest; each split keeps source order."""
    for role, frac in fractions.items():
        if not 0 < frac < 1:
            raise AutoSKDError(f"--{role}-fraction must be between 0 and 1 (got {frac})")
    if sum(fractions.values()) >= 1:
        raise AutoSKDError("--val-fraction + --dev-fraction + --test-fraction must be below 1 so train "
                           "keeps documents; lower them")
    n = len(docs)
    counts = [max(1, round(n * fractions[role])) for role in ("val", "dev", "test")]
    if n - sum(counts) < 1:
        raise AutoSKDError(f"{name} has too few documents ({n}) for non-empty train/val/dev/test splits; "
                           "add documents (or raise --max-documents)")
    order = np.random.default_rng(seed).permutation(n)
    val, dev, test, train = np.split(order, np.cumsum(counts))
    return {role: [docs[i] for i in np.sort(rows)]
            for role, rows in (("train", train), ("val", val), ("dev", dev), ("test", test))}


def ensure_pad_token(tokenizer):
    """Give ``tokenizer`` a pad token, which batching needs and decoder LMs (GPT-2, Llama) often
    lack. Reusing EOS adds no embedding row; with neither, ``<pad>`` is added and the model's
    embeddings must be resized to ``len(tokenizer)``."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


class LMRows(Dataset):
    """Fixed-length training rows, one stacked LongTensor ``[N, T]`` per column (fast to index and
    to save). A row is ``{input_ids, attention_mask, target_ids, idx}``; ``idx`` is its row number."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_ids: torch.Tensor):
        self.input_ids, self.attention_mask, self.target_ids = input_ids, attention_mask, target_ids
        self.num_target_tokens = int((target_ids != IGNORE).sum())

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i],
                "target_ids": self.target_ids[i], "idx": int(i)}


def tokenize_lm_split(texts_or_pairs: Sequence, tokenizer, block_size: int, layout: str = "packed",
                      kind: str = "text") -> LMRows:
    """Tokenize a split into rows of ``block_size`` tokens.

    ``packed``: every document plus EOS, concatenated and cut into full blocks (the remainder is
    dropped); no padding, so no compute is wasted. ``padded``: one row per document (plus EOS),
    truncated and right-padded. Prompt/completion pairs are always padded rows with targets only on
    completion tokens and EOS: the model learns to answer, not to write prompts.
    """
    if block_size < 2:
        raise AutoSKDError(f"--block-size must be at least 2 tokens (got {block_size})")
    if layout not in LAYOUTS or kind not in KINDS:
        raise AutoSKDError(f"unknown layout '{layout}' or kind '{kind}'; use layout {'/'.join(LAYOUTS)} "
                           f"and kind {'/'.join(KINDS)}")
    if not texts_or_pairs:
        raise AutoSKDError("no documents to tokenize; the split is empty, check the corpus and its fractions")
    eos = tokenizer.eos_token_id
    if kind == "prompt_completion":
        prompts = _encode(tokenizer, [p for p, _ in texts_or_pairs], special=True)
        completions = _encode(tokenizer, [c for _, c in texts_or_pairs], special=False)
        seqs = [p + _with_eos(c, eos) for p, c in zip(prompts, completions)]
        rows = _padded_rows(seqs, [len(p) for p in prompts], block_size, _pad_id(tokenizer))
    else:
        seqs = [_with_eos(ids, eos) for ids in _encode(tokenizer, list(texts_or_pairs), special=True)]
        rows = _packed_rows(seqs, block_size) if layout == "packed" else \
            _padded_rows(seqs, [0] * len(seqs), block_size, _pad_id(tokenizer))
    if rows.num_target_tokens == 0:
        raise AutoSKDError(f"no tokens to learn within --block-size {block_size} (prompts fill the rows?); "
                           "raise --block-size")
    return rows


def _encode(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    """Token ids of ``texts`` in one batched call. ``special`` lets the tokenizer add its own BOS
    (Llama, Gemma); length warnings are silenced because rows are cut here, not by the tokenizer."""
    return tokenizer(texts, add_special_tokens=special, return_attention_mask=False, verbose=False)["input_ids"]


def _with_eos(ids: list[int], eos: int | None) -> list[int]:
    """``ids`` ending in EOS (once, in case the tokenizer already appends it), so the model learns
    where documents end; unchanged when the tokenizer has no EOS."""
    return ids if eos is None or (ids and ids[-1] == eos) else ids + [eos]


def _pad_id(tokenizer) -> int:
    """The id written into padding. Its value never matters (attention mask 0, no target), so a
    tokenizer without a pad token falls back to EOS (as :func:`ensure_pad_token` would) or 0."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def _packed_rows(seqs: list[list[int]], block_size: int) -> LMRows:
    flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64)
    n = len(flat) // block_size
    if n == 0:
        raise AutoSKDError(f"the split has {len(flat)} tokens, fewer than one block of {block_size}; "
                           "lower --block-size or use --layout padded")
    ids = torch.from_numpy(flat[: n * block_size].reshape(n, block_size).copy())
    targets = torch.cat([ids[:, 1:], torch.full((n, 1), IGNORE, dtype=torch.long)], dim=1)
    return LMRows(ids, torch.ones_like(ids), targets)


def _padded_rows(seqs: list[list[int]], first_target: list[int], block_size: int, pad_id: int) -> LMRows:
    """One right-padded row per sequence; position ``t`` gets a target iff token ``t + 1`` is real
    and at or after ``first_target`` (the first completion token; 0 for plain text)."""
    ids = np.full((len(seqs), block_size), pad_id, dtype=np.int64)
    lengths = np.zeros(len(seqs), dtype=np.int64)
    for i, seq in enumerate(seqs):
        row = seq[:block_size]
        ids[i, : len(row)], lengths[i] = row, len(row)
    nxt = np.arange(1, block_size + 1)[None, :]
    has_target = (nxt < lengths[:, None]) & (nxt >= np.asarray(first_target)[:, None])
    targets = np.where(has_target, np.concatenate([ids[:, 1:], ids[:, :1]], axis=1), IGNORE)
    mask = (np.arange(block_size)[None, :] < lengths[:, None]).astype(np.int64)
    return LMRows(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(targets))


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of what decides token rows: the class, the vocabulary (with added tokens),
    BOS/EOS ids and how a probe text is encoded (catches e.g. a changed ``add_bos_token``)."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode("utf-8")
    parts = [type(tokenizer).__name__, len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
             tokenizer(_PROBE, add_special_tokens=True)["input_ids"], hashlib.sha256(vocab).hexdigest()]
    return hashlib.sha256(json.dumps(parts).encode("utf-8")).hexdigest()[:16]


def lm_data_id(corpus: LMCorpus, split: str, tokenizer, block_size: int, layout: str) -> str:
    """The teacher-cache key of a tokenized split: changes with the documents, the tokenizer, the
    block size or the layout (prompt/completion rows are always padded, so layout is not theirs)."""
    layout = "padded" if corpus.kind == "prompt_completion" else layout
    return (f"lm-v1|{corpus.kind}|{split}|{corpus.fingerprint(split)}|tok-{tokenizer_fingerprint(tokenizer)}"
            f"|block{block_size}|{layout}")


def collate_lm(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack rows into a batch, trimmed to its longest row (rows are right-padded, so this drops
    only padding columns; packed rows are full and stay whole)."""
    mask = torch.stack([row["attention_mask"] for row in rows])
    width = max(1, int(mask.sum(dim=1).max()))
    batch = {key: torch.stack([row[key] for row in rows])[:, :width] for key in _COLUMNS}
    batch["idx"] = torch.tensor([row["idx"] for row in rows], dtype=torch.long)
    return batch


def make_lm_loader(rows: LMRows, batch_size: int, shuffle: bool, seed: int = 0,
                   drop_last: bool = False) -> DataLoader:
    """A DataLoader with its own seeded generator (the trainer checkpoints
    ``loader.sampler.generator``), so epoch orders repeat per seed whatever else uses the RNG."""
    if batch_size < 1:
        raise AutoSKDError(f"--batch-size must be at least 1 (got {batch_size})")
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(rows, batch_size=batch_size, shuffle=shuffle, generator=generator, num_workers=0,
                      collate_fn=collate_lm, drop_last=drop_last)
