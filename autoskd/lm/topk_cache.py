"""On-disk cache of an LM teacher's top-k next-token log-probabilities.

The classification cache (:mod:`autoskd.engine.teacher_cache`) stores dense ``[N, C]`` logits.
For an LM that table is ``[N, T, V]``: 10k rows of 512 tokens at a 50k vocabulary is ~1 TB in
fp32. So this cache keeps, per token, the teacher's ``k`` most likely ids (int32) and their
log-probabilities under the full softmax at the distillation temperature (fp16): ``6 k`` bytes
per token, 384 at ``k = 64``. The token-level distances read it as a
:class:`~autoskd.engine.token_losses.TopK` and compare over ``k + 1`` buckets (the ids and the
tail). Files are keyed by teacher, data, ``k`` and temperature (a cache made at one
temperature cannot serve another), written atomically (temp file + ``os.replace``) so
processes can share one folder, and checked on load: a file that does not match what is
asked is a miss and is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..engine.batches import output_logits, to_device
from ..engine.teacher_cache import sequential_loader
from ..engine.token_losses import TopK
from ..errors import AutoSKDError

logger = logging.getLogger(__name__)

FORMAT = "autoskd-topk-v1"
#: Log-probability written where a row is shorter than the table (never counted by a loss):
#: finite, so even an unmasked read gives no NaN, and ``exp`` of it is 0 in fp16 and fp32.
PAD_LOGPROB = float(torch.finfo(torch.float16).min)
_LM_INPUT_KEYS = ("input_ids", "attention_mask")


@dataclass
class TopKTable:
    """A split's teacher top-k: ``ids`` int32 ``[N, T, k]``, ``logprobs`` float16 ``[N, T, k]``.

    ``retained_mass`` is the mean over counted positions (targets ``!= -100``) of the teacher
    mass its top k holds: how much of the distribution the cache keeps (1 when ``k = V``).
    """

    ids: Tensor
    logprobs: Tensor
    temperature: float
    k: int
    retained_mass: float = float("nan")

    def __post_init__(self) -> None:
        if self.ids.dim() != 3 or self.ids.shape != self.logprobs.shape or self.ids.shape[-1] != self.k:
            raise ValueError(f"top-k table: ids {tuple(self.ids.shape)} and logprobs {tuple(self.logprobs.shape)} "
                             f"must both be [N, T, k={self.k}]")

    @property
    def num_rows(self) -> int:
        return int(self.ids.shape[0])

    @property
    def length(self) -> int:
        return int(self.ids.shape[1])

    @property
    def bytes_per_token(self) -> int:
        """Stored bytes per position: ``k`` int32 ids and ``k`` fp16 log-probabilities."""
        return self.k * (4 + 2)

    def rows(self, idx: Tensor, length: int | None = None) -> TopK:
        """The batch's rows in ``idx`` order as a ``TopK`` (int64 ids, fp32 logprobs), cut to
        ``length`` positions (a batch trimmed to its longest row is shorter than the table)."""
        idx = torch.as_tensor(idx).reshape(-1).long().cpu()
        t = self.length if length is None else int(length)
        if t > self.length:
            raise AutoSKDError(f"the top-k cache holds {self.length} positions per row but the batch has {t}; "
                               "rebuild the cache for this block size")
        ids = self.ids.index_select(0, idx)[:, :t].long()
        logprobs = self.logprobs.index_select(0, idx)[:, :t].float()
        return TopK(ids=ids, logprobs=logprobs, temperature=self.temperature)


# --------------------------------------------------------------------------- computing
def _counted(batch: dict, shape: torch.Size) -> Tensor:
    """Positions that carry a loss: ``target_ids != -100``, else real tokens, else all."""
    if "target_ids" in batch:
        return batch["target_ids"] != -100
    if "attention_mask" in batch:
        return batch["attention_mask"].bool()
    return torch.ones(shape, dtype=torch.bool)


def _check_right_padded(batch: dict) -> None:
    """Rows are re-batched differently in training; only right padding keeps position ``t``
    of a row the same token in every batch."""
    mask = batch.get("attention_mask")
    if mask is not None and bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise AutoSKDError("the top-k cache needs right-padded rows (position t the same token in every batch); "
                           "set the tokenizer's padding_side='right'")


@torch.no_grad()
def _batch_topk(model: nn.Module, batch: dict, k: int, temperature: float,
                vocab_size: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """(ids int32, logprobs fp16) ``[B, T, k]`` and the fp32 retained mass ``[B, T]`` (taken
    before the fp16 rounding), on the CPU, for one batch."""
    logits = output_logits(model(**{key: batch[key] for key in _LM_INPUT_KEYS if key in batch}))
    if vocab_size is not None:
        logits = logits[..., :vocab_size]  # drop the embedding's padding rows, as the dense loss does
    if k > logits.shape[-1]:
        raise AutoSKDError(f"top_k={k} is larger than the teacher's vocabulary ({logits.shape[-1]}); lower top_k")
    logprobs, ids = torch.log_softmax(logits.float() / temperature, dim=-1).topk(k, dim=-1)
    return ids.to(torch.int32).cpu(), logprobs.to(torch.float16).cpu(), logprobs.exp().sum(-1).cpu()


@torch.no_grad()
def compute_topk_table(model: nn.Module, loader: DataLoader, k: int, temperature: float = 1.0,
                       device: torch.device | str = "cpu", progress: bool = True,
                       desc: str = "teacher top-k", vocab_size: int | None = None) -> TopKTable:
    """Run ``model`` once over every row (in order, the loader's shuffling untouched) and keep
    each position's top-k; rows are placed by the batch's ``idx`` (0..N-1, no gaps).

    Only one batch's fp32 ``[B, T, V]`` log-softmax is alive at a time. ``vocab_size`` cuts the
    teacher's logits to the student's vocabulary first (a teacher with padding rows).
    """
    if k < 1 or not temperature > 0:
        raise AutoSKDError(f"top-k cache: top_k must be >= 1 and temperature > 0 (got {k}, {temperature})")
    model.eval()
    rows: dict[int, tuple[Tensor, Tensor]] = {}
    mass_sum, counted = 0.0, 0
    for batch in tqdm(sequential_loader(loader), desc=desc, disable=not progress, leave=False):
        _check_right_padded(batch)
        batch = to_device(batch, device)
        ids, logprobs, mass = _batch_topk(model, batch, k, temperature, vocab_size)
        keep = _counted(batch, ids.shape[:2]).cpu()
        mass_sum += float(mass[keep].double().sum())
        if "attention_mask" in batch:  # padding holds what any batch would: the fill, not batch-dependent noise
            pad = ~batch["attention_mask"].bool().cpu()
            ids[pad], logprobs[pad] = 0, PAD_LOGPROB
        counted += int(keep.sum())
        for i, row_ids, row_lp in zip(batch["idx"].tolist(), ids, logprobs):
            rows[int(i)] = (row_ids, row_lp)
    return _assemble(rows, k, temperature, mass_sum / counted if counted else float("nan"))


def _assemble(rows: dict[int, tuple[Tensor, Tensor]], k: int, temperature: float, mass: float) -> TopKTable:
    """Stack per-row results into ``[N, T_max, k]``, shorter rows padded (never counted)."""
    n = max(rows) + 1 if rows else 0
    if len(rows) != n or min(rows, default=0) < 0:
        raise ValueError("batch 'idx' values must be 0..N-1 without gaps to be cached")
    length = max((r[0].shape[0] for r in rows.values()), default=0)
    ids = torch.zeros(n, length, k, dtype=torch.int32)
    logprobs = torch.full((n, length, k), PAD_LOGPROB, dtype=torch.float16)
    for i, (row_ids, row_lp) in rows.items():
        ids[i, : row_ids.shape[0]] = row_ids
        logprobs[i, : row_lp.shape[0]] = row_lp
    return TopKTable(ids=ids, logprobs=logprobs, temperature=float(temperature), k=k, retained_mass=mass)


# --------------------------------------------------------------------------- the cache
class TopKCache:
    """A folder of ``topk-<key>.safetensors`` tables, key = (teacher, data, k, temperature)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, teacher_fp: str, data_id: str, k: int, temperature: float, vocab_size: int | None = None) -> Path:
        key = f"{teacher_fp}|{data_id}|k={int(k)}|tau={float(temperature)!r}"
        if vocab_size is not None:
            key += f"|vocab={int(vocab_size)}"
        return self.root / f"topk-{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"

    def load(self, teacher_fp: str, data_id: str, k: int, temperature: float, expected_rows: int | None = None,
             expected_len: int | None = None, vocab_size: int | None = None) -> TopKTable | None:
        """The stored table, or ``None`` when absent, unreadable or not what is asked (``k``,
        temperature, dtypes, ``expected_rows`` rows, ``expected_len`` positions): a miss, so
        :meth:`get_or_compute` rebuilds it rather than serving a wrong teacher."""
        path = self.path(teacher_fp, data_id, k, temperature, vocab_size)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                ids, logprobs = f.get_tensor("ids"), f.get_tensor("logprobs")
        except Exception as exc:  # noqa: BLE001  (a truncated or foreign file is a miss)
            logger.warning("top-k cache %s is unreadable (%s); rebuilding it", path, exc)
            return None
        problem = _mismatch(meta, ids, logprobs, k, temperature, expected_rows, expected_len)
        if problem:
            logger.warning("top-k cache %s does not match (%s); rebuilding it", path, problem)
            return None
        return TopKTable(ids=ids, logprobs=logprobs, temperature=float(temperature), k=int(k),
                         retained_mass=float(meta.get("retained_mass", "nan")))

    def store(self, teacher_fp: str, data_id: str, table: TopKTable, vocab_size: int | None = None) -> Path:
        """Write ``table`` atomically (temp file in the same folder, then ``os.replace``)."""
        path = self.path(teacher_fp, data_id, table.k, table.temperature, vocab_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "k": str(table.k), "temperature": repr(float(table.temperature)),
                "rows": str(table.num_rows), "length": str(table.length),
                "retained_mass": repr(float(table.retained_mass)),
                "key": json.dumps({"teacher": teacher_fp, "data": data_id, "vocab_size": vocab_size})}
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file({"ids": table.ids.to(torch.int32).contiguous(),
                       "logprobs": table.logprobs.to(torch.float16).contiguous()}, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path

    def get_or_compute(self, teacher_fp: str, data_id: str, model: nn.Module, loader: DataLoader, k: int,
                       temperature: float = 1.0, device: torch.device | str = "cpu", progress: bool = True,
                       desc: str = "teacher top-k", vocab_size: int | None = None) -> TopKTable:
        """The cached table for this teacher/data/k/temperature, computed and stored on a miss."""
        rows = len(loader.dataset) if hasattr(loader.dataset, "__len__") else None
        cached = self.load(teacher_fp, data_id, k, temperature, expected_rows=rows, vocab_size=vocab_size)
        if cached is not None:
            return cached
        table = compute_topk_table(model, loader, k, temperature=temperature, device=device,
                                   progress=progress, desc=desc, vocab_size=vocab_size)
        self.store(teacher_fp, data_id, table, vocab_size=vocab_size)
        return table


def _mismatch(meta: dict, ids: Tensor, logprobs: Tensor, k: int, temperature: float,
              expected_rows: int | None, expected_len: int | None) -> str | None:
    """Why a stored table cannot serve this request, or ``None`` when it can."""
    if meta.get("format") != FORMAT:
        return f"format {meta.get('format')!r}"
    if ids.dtype != torch.int32 or logprobs.dtype != torch.float16 or ids.dim() != 3 or ids.shape != logprobs.shape:
        return f"tensors {ids.dtype}{tuple(ids.shape)} / {logprobs.dtype}{tuple(logprobs.shape)}"
    if int(meta.get("k", -1)) != int(k) or ids.shape[-1] != int(k):
        return f"k {meta.get('k')} (shape {tuple(ids.shape)}) instead of {k}"
    if not math.isclose(float(meta.get("temperature", "nan")), float(temperature), rel_tol=1e-9):
        return f"temperature {meta.get('temperature')} instead of {temperature!r}"
    if int(meta.get("rows", -1)) != ids.shape[0] or int(meta.get("length", -1)) != ids.shape[1]:
        return "metadata rows/length disagree with the tensors"
    if expected_rows is not None and ids.shape[0] != int(expected_rows):
        return f"{ids.shape[0]} rows instead of {expected_rows}"
    if expected_len is not None and ids.shape[1] != int(expected_len):
        return f"{ids.shape[1]} positions per row instead of {expected_len}"
    return None


# --------------------------------------------------------------------------- sizing
def dense_table_bytes(rows: int, length: int, vocab: int) -> int:
    """Bytes of a dense fp32 ``[rows, length, vocab]`` teacher-logits table."""
    return int(rows) * int(length) * int(vocab) * 4


def check_dense_size(rows: int, length: int, vocab: int, limit_bytes: int) -> None:
    """Refuse a dense LM teacher cache that would not fit in ``limit_bytes``, naming the fix."""
    size = dense_table_bytes(rows, length, vocab)
    if size > limit_bytes:
        topk = int(rows) * int(length) * 64 * 6
        raise AutoSKDError(
            f"a dense teacher cache of {rows} x {length} x {vocab} fp32 logits would take {size / 1e9:.1f} GB "
            f"(limit {limit_bytes / 1e9:.1f} GB); use a top-k cache, e.g. top_k=64 ({topk / 1e9:.2f} GB)")
