"""GLMD (Tan et al. 2023): general language model distillation without intermediate layers.

Only word-prediction logits are distilled: KL at tau 15 over *every* non-padding token
(masked and unmasked) of MLM-masked text, no gold labels. Stages, as the paper:
``pretrain`` (unlabelled text, with ``--pretrain-epochs``) -> ``task_mlm`` (the same loss
on the task's own texts, from the fine-tuned teacher) -> ``task`` (soft cross-entropy at
tau 1 on the task logits). Teachers need an MLM head: the pipeline runs the short MLM
adaptation stage first (:func:`autoskd.engine.mlm.adapt_teacher_mlm`).

Vocabulary compression (``vocab_alpha`` < 1, :mod:`.glmd_vocab`): :meth:`GLMD.compress`
shrinks the student's embedding to the kept tokens before training; each step the student's
input ids and MLM labels are remapped and the teacher's word logits sliced to the kept ids.
Follows GKD's catalogue.

Deviations: ``vocab_alpha`` defaults to 1, the paper's GLMD-vc (no compression), not 0.5: a
compressed student has its own vocabulary and tokenizer, so it would no longer share the team's
or be the same architecture as every other method's student; ``vocab_alpha=0.5`` compresses.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..engine.methods import METHODS, Method
from ..engine.spec import FeatureLoss, MethodSpec
from .glmd_vocab import VocabMap, build_vocab_map, compress_student


def _word_kl(stage: str) -> FeatureLoss:
    return FeatureLoss("mlm_logits", "mlm_logits", "kl", temperature=15.0, stage=stage, name="word")


@METHODS.register("glmd")
class GLMD(Method):
    spec = MethodSpec(
        name="glmd",
        description="GLMD: word-prediction KL (tau 15) over all non-padding tokens in pre-training and on task "
                    "text, then soft CE (tau 1) on task logits; optional vocabulary compression (vocab_alpha).",
        losses=(_word_kl("pretrain"), _word_kl("task_mlm"),
                FeatureLoss("logits", "logits", "soft_ce", temperature=1.0, stage="task", name="soft")),
        stages=("pretrain", "task_mlm", "task"),
        reference="Tan et al. 2023, GKD / GLMD: General Language Model Distillation without Intermediate "
                  "Layer Features (ACL Findings)",
    )
    OPTIONS = {"vocab_alpha": 1.0}

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.vocab: VocabMap | None = None

    def compress(self, student, tokenizer, teacher, id_batches) -> VocabMap | None:
        """Vocabulary compression before training (``vocab_alpha`` < 1): returns the map used."""
        alpha = float(self.options["vocab_alpha"])
        if alpha >= 1.0:
            return None
        self.vocab = build_vocab_map(tokenizer, teacher, id_batches, alpha)
        compress_student(student, self.vocab)
        return self.vocab

    def build_auxiliary(self, student_geom, teacher_geoms):
        if self.vocab is not None:  # the teacher's word logits are sliced to the kept tokens
            import dataclasses

            teacher_geoms = {n: dataclasses.replace(g, vocab_size=self.vocab.size) for n, g in teacher_geoms.items()}
        return super().build_auxiliary(student_geom, teacher_geoms)

    def _student_batch(self, batch: dict) -> dict:
        if self.vocab is None:
            return batch
        out = dict(batch)
        out["input_ids"] = self.vocab.remap(batch["input_ids"])
        for key in ("mlm_labels", "target_ids"):  # an encoder's MLM targets, a decoder's next tokens
            if key in batch:
                out[key] = self.vocab.remap(batch[key])
        return out

    def teacher_features(self, ctx, policy, teacher_name, batch, requests):
        feats = super().teacher_features(ctx, policy, teacher_name, batch, requests)
        if self.vocab is not None:
            for key in ("mlm_logits", "lm_logits"):  # a cached decoder teacher is sliced already
                if isinstance(feats.get(key), Tensor) and feats[key].shape[-1] != self.vocab.size:
                    feats = {**feats, key: feats[key][..., self.vocab.kept.to(feats[key].device)]}
        return feats

    def losses(self, ctx, student_feats, teacher_feats, teacher_name, batch):
        return super().losses(ctx, student_feats, teacher_feats, teacher_name, self._student_batch(batch))

    def student_forward(self, ctx, extractor, batch: dict) -> dict[str, Tensor]:
        return extractor(self._student_batch(batch))
