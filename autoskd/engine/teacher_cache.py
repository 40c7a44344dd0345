"""On-disk cache of teacher outputs.

A teacher in eval mode gives the same logits for an example every time, so computing them
every epoch (and again in every search candidate, baseline and Ray trial) is waste. The cache
stores one ``[N, C]`` logits table per (teacher, split) on disk, keyed by a fingerprint of the
teacher's weights and of the split's data, and serves rows by the batch's ``idx``.
Writes are atomic (temp file + rename), so concurrent processes can share one cache folder.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..atomic import atomic_path
from .batches import model_inputs, output_logits, to_device


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


class TeacherOutputCache:
    """A folder of ``<teacher-fp>-<data-fp>.safetensors`` logits tables."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, teacher_fp: str, data_id: str) -> Path:
        key = hashlib.sha256(f"{teacher_fp}|{data_id}".encode()).hexdigest()[:32]
        return self.root / f"{key}.safetensors"

    def load(self, teacher_fp: str, data_id: str) -> torch.Tensor | None:
        path = self.path(teacher_fp, data_id)
        return load_file(path)["logits"] if path.exists() else None

    def store(self, teacher_fp: str, data_id: str, logits: torch.Tensor) -> Path:
        path = self.path(teacher_fp, data_id)
        with atomic_path(path) as tmp:
            save_file({"logits": logits.contiguous()}, str(tmp))
        return path

    def get_or_compute(self, teacher_fp: str, data_id: str, model: nn.Module, loader: DataLoader,
                       device: torch.device | str = "cpu", progress: bool = True,
                       desc: str = "teacher logits") -> torch.Tensor:
        cached = self.load(teacher_fp, data_id)
        if cached is not None:
            return cached
        logits = compute_logits_table(model, loader, device=device, desc=desc, progress=progress)
        self.store(teacher_fp, data_id, logits)
        return logits
