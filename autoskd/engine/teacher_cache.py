"""On-disk cache of teacher outputs.

A teacher in eval mode gives the same logits for an example every time, so computing them
every epoch (and again in every search candidate, baseline and Ray trial) is waste. The cache
stores one ``[N, C]`` logits table per (teacher, split) on disk, keyed by a fingerprint of the
teacher's weights and of the split's data (its rows, the tokenizer and the truncation length:
:func:`autoskd.pipeline.data_id`), and serves rows by the batch's ``idx``. A table is checked on
load: one that cannot be read, or whose row count is not the split's or whose class count is not
the teacher's, is computed again and replaced. Writes are atomic (temp file + rename), so
concurrent processes can share one cache folder.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..atomic import atomic_path
from .batches import model_inputs, output_logits, to_device

log = logging.getLogger(__name__)


def model_fingerprint(model: nn.Module) -> str:
    """A stable digest of a model's weights (names, shapes and bytes).

    Used when a teacher comes without a spec hash (a user's own module). Hashing 22M
    parameters takes a fraction of a second, far less than one epoch of teacher forwards.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def sequential_loader(loader: DataLoader) -> DataLoader:
    """The same data, batch size and collation as ``loader`` but in order and without
    touching ``loader``'s shuffling generator (so a cached and an uncached run see the same
    training batches)."""
    return DataLoader(loader.dataset, batch_size=loader.batch_size or 32, shuffle=False,
                      collate_fn=loader.collate_fn, num_workers=0, generator=torch.Generator())


@torch.no_grad()
def compute_logits_table(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu",
                         desc: str = "teacher logits", progress: bool = True) -> torch.Tensor:
    """Run ``model`` over every example once and return logits ordered by ``idx``."""
    model.eval()
    rows: dict[int, torch.Tensor] = {}
    for batch in tqdm(sequential_loader(loader), desc=desc, disable=not progress, leave=False):
        batch = to_device(batch, device)
        out = model(**model_inputs(batch))
        logits = output_logits(out)
        for i, row in zip(batch["idx"].tolist(), logits.float().cpu()):
            rows[i] = row
    n = max(rows) + 1
    if len(rows) != n:
        raise ValueError("batch 'idx' values must be 0..N-1 without gaps to be cached")
    return torch.stack([rows[i] for i in range(n)])


def loader_rows(loader: DataLoader) -> int | None:
    """Rows of ``loader``'s split (what a logits table for it must have), when it has a length."""
    try:
        return len(loader.dataset)
    except TypeError:
        return None


def table_problem(table: torch.Tensor, rows: int | None = None, classes: int | None = None) -> str | None:
    """Why ``table`` cannot be a ``[rows, classes]`` logits table (None: it can)."""
    if table.dim() != 2:
        return f"{table.dim()} dimensions, not 2"
    if rows is not None and table.shape[0] != rows:
        return f"{table.shape[0]} rows for a split of {rows}"
    if classes is not None and table.shape[1] != classes:
        return f"{table.shape[1]} classes for a teacher of {classes}"
    return None


class TeacherOutputCache:
    """A folder of ``<teacher-fp>-<data-fp>.safetensors`` logits tables."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, teacher_fp: str, data_id: str) -> Path:
        key = hashlib.sha256(f"{teacher_fp}|{data_id}".encode()).hexdigest()[:32]
        return self.root / f"{key}.safetensors"

    def load(self, teacher_fp: str, data_id: str, rows: int | None = None,
             classes: int | None = None) -> torch.Tensor | None:
        """The stored table, or None: absent, unreadable, or not ``[rows, classes]`` (each given
        one is checked), so the caller computes it again."""
        path = self.path(teacher_fp, data_id)
        if not path.exists():
            return None
        try:
            table = load_file(path)["logits"]
        except Exception as err:  # noqa: BLE001 - a damaged or foreign file is rebuilt, never trusted
            log.warning("teacher-output cache: %s cannot be read (%s); computing it again", path, err)
            return None
        problem = table_problem(table, rows, classes)
        if problem is not None:
            log.warning("teacher-output cache: %s has %s; computing it again", path, problem)
            return None
        return table

    def store(self, teacher_fp: str, data_id: str, logits: torch.Tensor) -> Path:
        path = self.path(teacher_fp, data_id)
        with atomic_path(path) as tmp:
            save_file({"logits": logits.contiguous()}, str(tmp))
        return path

    def get_or_compute(self, teacher_fp: str, data_id: str, model: nn.Module, loader: DataLoader,
                       device: torch.device | str = "cpu", progress: bool = True,
                       desc: str = "teacher logits", classes: int | None = None) -> torch.Tensor:
        """The stored table when it fits ``loader``'s split (and ``classes``), else computed and stored."""
        cached = self.load(teacher_fp, data_id, loader_rows(loader), classes)
        if cached is not None:
            return cached
        logits = compute_logits_table(model, loader, device=device, desc=desc, progress=progress)
        self.store(teacher_fp, data_id, logits)
        return logits
