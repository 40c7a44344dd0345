"""Tokenisation and batching: a split becomes batches of ``dict[str, Tensor]``.

Splits are tokenised once, without padding; each batch is padded only to its own longest row
(dynamic padding), which on short-text tasks is far cheaper than padding everything to
``max_length``. Every batch carries ``idx`` (row number in the split) so the engine can look up
cached teacher outputs for exactly these rows.
"""

from __future__ import annotations

from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


class TokenizedSplit(Dataset):
    """A tokenised split held as plain Python lists, one list per column.

    A list lookup per row is much cheaper than reading Arrow rows one at a time, which matters
    because the loader indexes row by row every epoch.
    """

    def __init__(self, columns: dict[str, list], texts: list[str] | None = None, pairs: list[str] | None = None):
        lengths = {len(v) for v in columns.values()}
        if len(lengths) > 1:
            raise ValueError(f"columns have different lengths: { {k: len(v) for k, v in columns.items()} }")
        self.columns = columns
        self._len = lengths.pop() if lengths else 0
        # The raw text of each row (not a column: batches never carry it). A teacher with its own
        # tokenizer reads it to tokenise the same rows itself (autoskd.engine.own_tokenizer).
        self.texts, self.pairs = texts, pairs

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {name: values[i] for name, values in self.columns.items()}

    @property
    def column_names(self) -> list[str]:
        return list(self.columns)

    @property
    def has_labels(self) -> bool:
        return "label" in self.columns


def tokenize_split(ds: datasets.Dataset, tokenizer, max_length: int) -> TokenizedSplit:
    """Tokenise ``text`` (and ``text_pair`` when present) in one batched call, truncating to
    ``max_length`` and not padding. Keeps ``label`` (if any) and ``idx`` (0..n-1 if absent)."""
    texts = list(ds["text"])
    pairs = list(ds["text_pair"]) if "text_pair" in ds.column_names else None
    columns: dict[str, list] = {}
    if texts:
        encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length, padding=False)
        columns = {key: list(encoded[key]) for key in MODEL_INPUT_KEYS if key in encoded}
    else:
        columns = {"input_ids": [], "attention_mask": []}
    if "label" in ds.column_names:
        columns["label"] = list(ds["label"])
    columns["idx"] = list(ds["idx"]) if "idx" in ds.column_names else list(range(len(texts)))
    return TokenizedSplit(columns, texts=texts, pairs=pairs)


def unlabelled_split(ds):
    """The same rows without labels (for a pre-training-style stage); batches then carry no
    ``labels``. Accepts a raw ``datasets.Dataset`` or a :class:`TokenizedSplit`."""
    if isinstance(ds, TokenizedSplit):
        return TokenizedSplit({k: v for k, v in ds.columns.items() if k != "label"}, ds.texts, ds.pairs)
    return ds.remove_columns("label") if "label" in ds.column_names else ds


class DynamicPaddingCollator:
    """Collate rows into one batch padded to the batch's longest row.

    Padding (pad id, side, attention mask, token type ids) is delegated to ``tokenizer.pad``
    so it matches how the model was trained. ``label`` becomes ``labels`` as a LongTensor and is
    left out when the rows have none; ``idx`` is always a LongTensor.
    """

    def __init__(self, tokenizer, pad_to_multiple_of: int | None = None):
        self.tokenizer = tokenizer
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        inputs = [{k: ex[k] for k in MODEL_INPUT_KEYS if k in ex} for ex in examples]
        batch = dict(self.tokenizer.pad(inputs, padding=True, pad_to_multiple_of=self.pad_to_multiple_of,
                                        return_tensors="pt"))
        label_key = "labels" if "labels" in examples[0] else "label"
        has_label = [label_key in ex for ex in examples]
        if any(has_label):
            if not all(has_label):
                raise ValueError("some rows in the batch have a label and some do not")
            batch["labels"] = torch.tensor([ex[label_key] for ex in examples], dtype=torch.long)
        if "idx" in examples[0]:
            batch["idx"] = torch.tensor([ex["idx"] for ex in examples], dtype=torch.long)
        return batch


class LengthGroupedSampler(Sampler[int]):
    """A shuffled order in which each run of ``batch_size`` rows has similar lengths.

    Each epoch: a random permutation, cut into windows of ``batch_size * window`` rows; each
    window is sorted by length and cut into batches; then the batches are shuffled. Dynamic
    padding then pads each batch to nearly its own rows' length (the idea of HF's
    ``group_by_length``). Sampling draws only from ``generator`` (checkpointed by the engine
    like a shuffling loader's).
    """

    def __init__(self, lengths: list[int], batch_size: int, generator: torch.Generator, window: int = 50):
        self.lengths = torch.as_tensor(lengths)
        self.batch_size = batch_size
        self.window = max(1, window) * batch_size
        self.generator = generator

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.generator)
        batches = []
        for chunk in order.split(self.window):
            by_length = chunk[torch.argsort(self.lengths[chunk], descending=True, stable=True)]
            batches += list(by_length.split(self.batch_size))
        for i in torch.randperm(len(batches), generator=self.generator).tolist():
            yield from batches[i].tolist()


def make_loader(tokenized, tokenizer, batch_size: int, shuffle: bool, seed: int = 0,
                drop_last: bool = False, group_by_length: bool = False) -> DataLoader:
    """A DataLoader with dynamic padding and its own seeded generator: the sequence of epoch
    orders is the same on every run with the same seed, independent of global RNG use.

    ``group_by_length`` (with ``shuffle``) batches rows of similar length together
    (:class:`LengthGroupedSampler`): far less padding on short-text tasks, at the price of
    batches that are less mixed by length.
    """
    generator = torch.Generator()
    generator.manual_seed(seed)
    collate = DynamicPaddingCollator(tokenizer)
    if shuffle and group_by_length:
        sampler = LengthGroupedSampler([len(ids) for ids in tokenized.columns["input_ids"]], batch_size, generator)
        return DataLoader(tokenized, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=0,
                          drop_last=drop_last)
    return DataLoader(tokenized, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      collate_fn=collate, num_workers=0, drop_last=drop_last)
