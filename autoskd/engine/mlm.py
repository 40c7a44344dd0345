"""The masked-language-model path: BERT's MLM head, a masking collator, the ``mlm`` method.

Word-prediction distillation (PD, DistilBERT, DIITO, GLMD) compares ``mlm_logits``. Those
come from BERT's real MLM head -- a transform (dense, activation, LayerNorm), a decoder tied
to the input word embeddings, and a per-token bias -- attached to a sequence classifier as
``model.mlm_head`` by :func:`attach_mlm_head` (the extraction hooks use it when present).
A checkpoint that ships the head (``cls.predictions.*``) loads it; the MiniLM checkpoint has
none, so its head starts fresh and a teacher needs a short adaptation stage on unlabelled
text (:func:`adapt_teacher_mlm`: the ``mlm`` method on the head only) before its word
predictions mean anything.

:class:`MaskingCollator` turns unlabelled rows into MLM batches: BERT's 80/10/10 masking of
15% of the non-special tokens (``transformers.DataCollatorForLanguageModeling``), targets in
``batch["mlm_labels"]`` (-100 elsewhere), so they never mix with a task's ``labels``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..data.collate import DynamicPaddingCollator
from ..errors import AutoSKDError
from ..models.adapters import ArchitectureAdapter
from .callbacks import Callback
from .methods import METHODS, Method
from .spec import MethodSpec


class MLMHead(nn.Module):
    """BERT's ``cls.predictions``: transform, decoder tied to ``word_embeddings``, bias."""

    def __init__(self, config, word_embeddings: nn.Embedding):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

        self.transform = BertPredictionHeadTransform(config)
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))
        self._tied = [word_embeddings]  # a plain list: the embedding stays the model's own parameter

    @property
    def decoder_weight(self) -> torch.Tensor:
        return self._tied[0].weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform(hidden), self.decoder_weight, self.bias)


def attach_mlm_head(model: nn.Module, source: str | Path | None = None) -> MLMHead:
    """Give ``model`` BERT's MLM head as ``model.mlm_head`` (kept when already there); load
    ``cls.predictions.*`` weights from ``source`` (a local checkpoint folder) if it has them."""
    head = getattr(model, "mlm_head", None)
    if isinstance(head, MLMHead):
        return head
    adapter = ArchitectureAdapter.for_model(model)
    embeddings = adapter.module(model, "word_embeddings")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "hidden_act"):
        raise AutoSKDError(f"{type(model).__name__} has no BERT config; an MLM head needs hidden_act and "
                           f"layer_norm_eps")
    head = MLMHead(config, embeddings).to(embeddings.weight.device)
    model.add_module("mlm_head", head)
    if source is not None:
        load_mlm_head(head, source)
    return head


def load_mlm_head(head: MLMHead, source: str | Path) -> bool:
    """Load ``cls.predictions.{transform.*, bias}`` from a checkpoint folder; False if absent."""
    path = Path(source)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        return False
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update({k: v for k, v in load_file(str(f)).items() if "predictions." in k})
    prefix = next((k.split("predictions.")[0] + "predictions." for k in state), None)
    if prefix is None:
        return False
    mine = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and not k.endswith("decoder.weight")}
    mine.pop("decoder.bias", None)
    head.load_state_dict(mine, strict=False)
    return True


def detach_mlm_head(model: nn.Module) -> MLMHead | None:
    """Remove ``model.mlm_head`` (before ``save_pretrained`` of a plain classifier)."""
    head = getattr(model, "mlm_head", None)
    if isinstance(head, MLMHead):
        del model._modules["mlm_head"]
        return head
    return None


class MaskingCollator:
    """Dynamic padding + BERT masking; ``mlm_labels`` holds the targets (-100 = not masked)."""

    def __init__(self, tokenizer, mlm_probability: float = 0.15, seed: int = 0):
        from transformers import DataCollatorForLanguageModeling

        if tokenizer.mask_token is None:
            raise AutoSKDError("the tokenizer has no [MASK] token; masked-language-model stages need one")
        self.pad = DynamicPaddingCollator(tokenizer)
        self.masker = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability)
        self.masker.generator = torch.Generator().manual_seed(seed)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.pad(examples)
        specials = torch.tensor([self.masker.tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True)
                                 for ids in batch["input_ids"].tolist()], dtype=torch.bool)
        batch["input_ids"], batch["mlm_labels"] = self.masker.torch_mask_tokens(batch["input_ids"].clone(), specials)
        return batch


def mlm_loader(tokenized, tokenizer, batch_size: int, seed: int = 0, mlm_probability: float = 0.15) -> DataLoader:
    """Shuffled MLM batches over unlabelled tokenised rows (labels, if any, are dropped)."""
    from ..data.collate import unlabelled_split

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(unlabelled_split(tokenized), batch_size=batch_size, shuffle=True, generator=generator,
                      collate_fn=MaskingCollator(tokenizer, mlm_probability, seed), num_workers=0)


@METHODS.register("mlm")
class MLM(Method):
    """Masked-language modelling on unlabelled text, no teacher: pre-trains a student (PD's
    first stage) or adapts a teacher's fresh MLM head before word-prediction distillation."""

    spec = MethodSpec(
        name="mlm",
        description="Masked-language-model training on unlabelled text (no teacher): PD's pre-training, "
                    "a teacher's MLM-head adaptation stage.",
        mlm_weight=1.0, mlm_stages=("mlm", "pretrain", "task"), stages=("mlm",), needs_teacher=False,
        reference="Devlin et al. 2019, BERT (masked language model)",
    )


def adapt_teacher_mlm(model: nn.Module, loader: DataLoader, steps: int | None = None, lr: float = 1e-3,
                      head_only: bool = True, progress: bool = False, seed: int = 0) -> dict:
    """The MLM adaptation stage of a teacher: attach the head, train it (``head_only``: the
    head alone, so the teacher's encoder and classifier stay as fine-tuned) with ``mlm``
    on ``loader``; the model is frozen again afterwards. Returns the last MLM loss."""
    from .trainer import Distiller, Stage

    attach_mlm_head(model)
    was = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("mlm_head.") or not head_only)
    epochs = 1.0 if steps is None else steps / max(1, len(loader))
    seen: list[float] = []

    class _Last(Callback):
        def on_step_end(self, trainer, ctx, batch, terms):
            seen.append(float(terms["mlm_ce"]))

    trainer = Distiller(model, "mlm", None, progress=progress, checkpoint=False, restore_best=False, seed=seed,
                        callbacks=[_Last()])
    result = trainer.fit([Stage("mlm", loader, epochs=epochs, lr=lr, evaluate=False, warmup_ratio=0.0)])
    for n, p in model.named_parameters():
        p.requires_grad_(False if n.startswith("mlm_head.") else was[n])
    model.eval()
    return {"steps": result.steps, "first_mlm_ce": seen[0], "last_mlm_ce": seen[-1]}
