"""Text a model writes, turned into training rows: the data of sequence-level KD and of
on-policy distillation.

Sequence-level KD (Kim & Rush 2016) trains the student with plain cross-entropy on the
teacher's own continuations of the training prompts; they are generated once per (teacher,
data, settings) and kept on disk, because generation is the costly part. On-policy
distillation (GKD, Agarwal et al. 2024) lets the *student* continue the prompts of a batch and
asks the teacher to grade every token it wrote.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..atomic import atomic_path
from .data import IGNORE, LMRows


@torch.no_grad()
def continue_prompts(model: nn.Module, prompts: torch.Tensor, max_new_tokens: int, eos_id: int | None,
                     pad_id: int, do_sample: bool = False, temperature: float = 1.0,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``prompts`` ``[B, P]`` (all real tokens) continued by up to ``max_new_tokens``.

    Returns ``(input_ids, attention_mask, target_ids)`` of ``[B, P + N]`` rows whose targets are
    the written tokens only (up to and including the first EOS); the prompt carries no loss.
    Written with an explicit KV-cache loop, not ``generate``, so sampling draws from
    ``generator`` and a run is reproducible whatever else used the global RNG.
    """
    was_training = model.training
    model.eval()
    b, p = prompts.shape
    ids = prompts
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    past, logits = out.cache, out.logits[:, -1]
    written, done = [], torch.zeros(b, dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        logits = logits.float()
        if do_sample:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(ids.device)
        else:
            nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        written.append(nxt)
        if eos_id is not None:
            done = done | (nxt == eos_id)
        if bool(done.all()):
            break
        mask = torch.ones(b, p + len(written), dtype=torch.long, device=ids.device)
        out = model(input_ids=nxt[:, None], attention_mask=mask, cache=past, use_cache=True)
        past, logits = out.cache, out.logits[:, -1]
    model.train(was_training)
    new = torch.stack(written, dim=1)                                   # [B, N]
    real = torch.ones_like(new, dtype=torch.bool)
    if eos_id is not None:  # tokens after the first EOS are padding
        after = (new == eos_id).long().cumsum(1) - (new == eos_id).long()
        real = after == 0
    input_ids = torch.cat([prompts, new], dim=1)
    attention = torch.cat([torch.ones_like(prompts), real.long()], dim=1)
    targets = torch.full_like(input_ids, IGNORE)
    targets[:, p - 1:-1] = torch.where(real, new, torch.full_like(new, IGNORE))
    return input_ids, attention, targets


def _key(*parts) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:32]


def teacher_rows(teacher, rows: LMRows, prompt_tokens: int, max_new_tokens: int, eos_id: int | None, pad_id: int,
                 cache_dir: Path | None, data_id: str, batch_size: int = 16, progress: bool = True) -> LMRows:
    """Every training row's first ``prompt_tokens`` continued greedily by ``teacher`` (a
    :class:`~autoskd.engine.teachers.Teacher`), cached under ``cache_dir`` by teacher and data."""
    path = None
    if cache_dir is not None:
        key = _key(teacher.fingerprint, data_id, prompt_tokens, max_new_tokens, eos_id, "greedy-v1")
        path = Path(cache_dir) / "lm_generations" / f"{key}.safetensors"
        if path.exists():
            t = load_file(path)
            return LMRows(t["input_ids"], t["attention_mask"], t["target_ids"])
    model = teacher.model
    device = next(model.parameters()).device
    parts = []
    for start in tqdm(range(0, len(rows), batch_size), desc=f"teacher {teacher.name} writes", disable=not progress,
                      leave=False):
        prompts = rows.input_ids[start:start + batch_size, :prompt_tokens].to(device)
        parts.append([t.cpu() for t in continue_prompts(model, prompts, max_new_tokens, eos_id, pad_id)])
    width = max(p[0].shape[1] for p in parts)

    def padded(i, value):
        return torch.cat([torch.nn.functional.pad(p[i], (0, width - p[i].shape[1]), value=value) for p in parts])

    out = LMRows(padded(0, pad_id), padded(1, 0), padded(2, IGNORE))
    if path is not None:
        with atomic_path(path) as tmp:
            save_file({"input_ids": out.input_ids.contiguous(), "attention_mask": out.attention_mask.contiguous(),
                       "target_ids": out.target_ids.contiguous()}, str(tmp))
    return out
