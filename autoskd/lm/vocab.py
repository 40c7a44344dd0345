"""GLMD's vocabulary compression on a causal LM (Tan et al. 2023, section 3.3).

The vocabulary is what most of a small LM's parameters are: SmolLM2-135M's 49,152 x 576
embedding is 28M of its 135M. GLMD keeps the K = ceil(alpha |V| / 128) * 128 most frequent
tokens of the training corpus (special tokens first) and maps every other token to its nearest
kept token by the teacher's input embeddings (argmax inner product; :mod:`autoskd.methods.glmd_vocab`
holds the selection, shared with the encoder path). On a decoder both ends shrink: the input
embedding and the LM head (tied or not) keep the K rows, the student reads and predicts
remapped ids, and the teacher's next-token distribution is sliced to the kept tokens (and
renormalised) before the top-k cache is taken, so every loss stays K-way and exact.

The student saves with the original tokenizer plus ``vocab_map.json`` (``kept[new] = old id``):
tokenise as usual, map ids with :meth:`VocabMap.remap`, map predictions back with ``kept``.
Its perplexity is over the compressed vocabulary (a mapped token counts as right), so it is
not comparable with an uncompressed student's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..methods.glmd_vocab import VocabMap, nearest_map, select_vocabulary, token_frequencies


def build_lm_vocab_map(tokenizer, teacher: nn.Module, id_batches, alpha: float) -> VocabMap:
    """Kept tokens (specials, then by corpus frequency) and the old -> new id map."""
    weight = teacher.get_input_embeddings().weight.detach().cpu()
    counts = token_frequencies(id_batches, weight.shape[0])
    kept = select_vocabulary(counts, tokenizer.all_special_ids, alpha)
    return VocabMap(kept=kept, old_to_new=nearest_map(weight, kept))


@torch.no_grad()
def compress_causal_lm(model: nn.Module, vocab: VocabMap) -> nn.Module:
    """Keep the kept rows of the input embedding and of the LM head (tied stays tied), in place."""
    old_in, old_out = model.get_input_embeddings(), model.get_output_embeddings()
    kept = vocab.kept.to(old_in.weight.device)
    tied = old_out is not None and old_out.weight.data_ptr() == old_in.weight.data_ptr()
    new_in = nn.Embedding(vocab.size, old_in.embedding_dim).to(old_in.weight.device, old_in.weight.dtype)
    new_in.weight.copy_(old_in.weight[kept])
    model.set_input_embeddings(new_in)
    if old_out is not None:
        new_out = nn.Linear(old_out.in_features, vocab.size, bias=old_out.bias is not None)
        new_out = new_out.to(old_out.weight.device, old_out.weight.dtype)
        if tied:
            new_out.weight = new_in.weight
        else:
            new_out.weight.copy_(old_out.weight[kept])
        if old_out.bias is not None:
            new_out.bias.copy_(old_out.bias[kept])
        model.set_output_embeddings(new_out)
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is None:
            continue
        if hasattr(config, "vocab_size"):
            config.vocab_size = vocab.size
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(config, key, None)
            if isinstance(value, int):
                setattr(config, key, int(vocab.old_to_new[value]))
            elif isinstance(value, list):
                setattr(config, key, [int(vocab.old_to_new[v]) for v in value])
    return model


class SlicedLogits(nn.Module):
    """A teacher whose next-token logits are restricted to the kept tokens (new id order), so
    its softmax is GLMD's K-way distribution (what the top-k cache then stores)."""

    def __init__(self, model: nn.Module, kept: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("kept", kept.clone(), persistent=False)

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return out.logits[..., self.kept.to(out.logits.device)]


class RemappedLoader:
    """A loader whose batches reach the student in the compressed vocabulary (inputs and
    targets remapped; ``-100`` kept). Used for evaluation, where only the student reads."""

    def __init__(self, loader, vocab: VocabMap):
        self.loader, self.vocab = loader, vocab

    def __iter__(self):
        for batch in self.loader:
            yield {**batch, "input_ids": self.vocab.remap(batch["input_ids"]),
                   "target_ids": self.vocab.remap(batch["target_ids"])}

    def __len__(self) -> int:
        return len(self.loader)


def save_vocab_map(vocab: VocabMap, folder: str | Path) -> Path:
    path = Path(folder) / "vocab_map.json"
    path.write_text(json.dumps({"kept": vocab.kept.tolist()}))
    return path


def load_vocab_map(folder: str | Path, original_vocab_size: int, teacher_embeddings: torch.Tensor | None = None) -> VocabMap:
    """The map saved beside a compressed student; ``teacher_embeddings`` rebuild the nearest-token
    map for dropped ids (without them, dropped ids map to the first kept token)."""
    kept = torch.tensor(json.loads((Path(folder) / "vocab_map.json").read_text())["kept"], dtype=torch.long)
    if teacher_embeddings is not None:
        return VocabMap(kept=kept, old_to_new=nearest_map(teacher_embeddings.detach().cpu(), kept))
    table = torch.zeros(original_vocab_size, dtype=torch.long)
    table[kept] = torch.arange(kept.numel())
    return VocabMap(kept=kept, old_to_new=table)
