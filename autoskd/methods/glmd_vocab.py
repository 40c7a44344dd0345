"""GLMD's vocabulary compression (Tan et al. 2023, section 3.3).

Keep K = ceil(alpha |V| / 128) * 128 tokens: special tokens first, then by frequency in the
training corpus; map every other token v to its nearest kept token by the teacher's input
embeddings, argmax_u <W_t[v], W_t[u]>. The student gets a K-row embedding (rows copied from
its old ones), its input ids and MLM labels are remapped, and the teacher's word-prediction
logits are sliced to the kept tokens so the KL is K-way. The compressed student saves with a
K-token ``vocab.txt`` and reloads with plain ``transformers``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor, nn

from ..errors import AutoSKDError
from ..models.adapters import ArchitectureAdapter, module_at


@dataclass
class VocabMap:
    """``kept[new] = old id``; ``old_to_new[old] = new id`` (the nearest kept token)."""

    kept: Tensor
    old_to_new: Tensor

    @property
    def size(self) -> int:
        return int(self.kept.numel())

    def remap(self, ids: Tensor) -> Tensor:
        """Map token ids (``-100`` kept as it is, for MLM labels)."""
        table = self.old_to_new.to(ids.device)
        return torch.where(ids < 0, ids, table[ids.clamp_min(0)])


def token_frequencies(id_batches: Iterable[Tensor], vocab_size: int) -> Tensor:
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for ids in id_batches:
        counts += torch.bincount(ids.reshape(-1).long(), minlength=vocab_size)[:vocab_size]
    return counts


def kept_size(alpha: float, vocab_size: int) -> int:
    if not 0 < alpha <= 1:
        raise AutoSKDError(f"glmd: vocab_alpha must be in (0, 1] (got {alpha})")
    return min(vocab_size, math.ceil(alpha * vocab_size / 128) * 128)


def select_vocabulary(counts: Tensor, special_ids: Iterable[int], alpha: float,
                      first: Iterable[int] = ()) -> Tensor:
    """Ids to keep: specials (and ``first``, e.g. verbaliser tokens) then the most frequent."""
    k = kept_size(alpha, counts.numel())
    head = list(dict.fromkeys([*special_ids, *first]))
    order = torch.argsort(counts, descending=True, stable=True).tolist()
    seen = set(head)
    rest = [i for i in order if i not in seen][: max(0, k - len(head))]
    return torch.tensor(head + rest, dtype=torch.long)


@torch.no_grad()
def nearest_map(teacher_embeddings: Tensor, kept: Tensor, chunk: int = 4096) -> Tensor:
    """old id -> new id: kept tokens to themselves, others to argmax inner product."""
    w = teacher_embeddings.float()
    kept_w = w[kept]
    table = torch.empty(w.shape[0], dtype=torch.long)
    for start in range(0, w.shape[0], chunk):
        table[start:start + chunk] = (w[start:start + chunk] @ kept_w.T).argmax(-1)
    table[kept] = torch.arange(kept.numel())
    return table


@torch.no_grad()
def compress_student(student: nn.Module, vocab: VocabMap) -> nn.Module:
    """Shrink the student's word embeddings (and MLM-head bias) to the kept rows, in place."""
    adapter = ArchitectureAdapter.for_model(student)
    old = adapter.module(student, "word_embeddings")
    new = nn.Embedding(vocab.size, old.embedding_dim, padding_idx=None).to(old.weight.device)
    new.weight.copy_(old.weight[vocab.kept.to(old.weight.device)])
    parent_path, _, attr = adapter.path("word_embeddings").rpartition(".")
    parent = module_at(student, parent_path)
    setattr(parent, attr, new)
    student.config.vocab_size = vocab.size
    head = getattr(student, "mlm_head", None)
    if head is not None:
        head._tied = [new]
        head.bias = nn.Parameter(head.bias[vocab.kept.to(head.bias.device)].clone())
    pad = getattr(student.config, "pad_token_id", None)
    if pad is not None:
        student.config.pad_token_id = int(vocab.old_to_new[pad])
    return student


def compress_tokenizer(tokenizer, vocab: VocabMap, out_dir: str | Path):
    """A WordPiece tokenizer over the kept tokens in their new order, saved in ``out_dir``."""
    from transformers import BertTokenizer

    if not hasattr(tokenizer, "vocab") or getattr(tokenizer, "model_input_names", None) is None:
        raise AutoSKDError("glmd vocabulary compression needs a WordPiece (BERT) tokenizer")
    inverse = {i: t for t, i in tokenizer.get_vocab().items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(inverse[int(i)] for i in vocab.kept) + "\n")
    small = BertTokenizer(str(out / "vocab.txt"), do_lower_case=getattr(tokenizer, "do_lower_case", True),
                          model_max_length=tokenizer.model_max_length)
    if len(small) != vocab.size:
        raise AutoSKDError(f"the compressed tokenizer has {len(small)} tokens, expected {vocab.size}")
    small.save_pretrained(out)
    return small


def build_vocab_map(tokenizer, teacher: nn.Module, id_batches: Iterable[Tensor], alpha: float) -> VocabMap:
    emb = ArchitectureAdapter.for_model(teacher).module(teacher, "word_embeddings").weight
    counts = token_frequencies(id_batches, emb.shape[0])
    kept = select_vocabulary(counts, tokenizer.all_special_ids, alpha)
    return VocabMap(kept=kept, old_to_new=nearest_map(emb.detach().cpu(), kept))
