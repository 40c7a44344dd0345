"""Sequence-level KD (Kim & Rush 2016) for generative LMs.

The student is trained with plain next-token cross-entropy on the *teacher's* greedy
continuations of the training prompts (the first ``prompt_tokens`` of each training block),
instead of on the corpus: it learns the teacher's mode, not the data's. Kim & Rush decode with
beam search; greedy decoding (beam 1) is their cheapest variant and what runs here. The
continuations are generated once and cached (:mod:`autoskd.lm.generation`). Not in GKD's
catalogue (a decoder-LM method).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..engine.methods import METHODS, Method
from ..engine.spec import MethodSpec
from ..errors import AutoSKDError


@METHODS.register("seqkd")
class SeqKD(Method):
    spec = MethodSpec(
        name="seqkd",
        description="Sequence-level KD (decoder LMs): next-token cross-entropy on the teacher's greedy "
                    "continuations of the training prompts.",
        losses=(), hard_label_weight=1.0, stages=("task",), needs_teacher=True,
        reference="Kim & Rush 2016, Sequence-Level Knowledge Distillation (EMNLP)",
        extra={"decoder_only": True},
    )
    OPTIONS = {"prompt_tokens": 32, "max_new_tokens": 96, "generate_batch_size": 16}

    def configure(self, spec: MethodSpec, options: dict[str, Any]) -> MethodSpec:
        for key in self.OPTIONS:
            if options[key] < 1:
                raise AutoSKDError(f"method 'seqkd': {key} must be >= 1 (got {options[key]})")
        return spec

    @property
    def rows_id(self) -> str:
        o = self.options
        return f"seqkd-p{o['prompt_tokens']}-n{o['max_new_tokens']}"

    def train_rows(self, documents, tokenizer, block: int, teacher, cache_dir: Path, progress: bool = True):
        """The training rows: the teacher's continuations of the corpus's training blocks."""
        from ..lm.data import tokenize_lm_split
        from ..lm.generation import teacher_rows

        prompt = self.options["prompt_tokens"]
        if prompt >= block:
            raise AutoSKDError(f"method 'seqkd': prompt_tokens ({prompt}) must be below the block size ({block})")
        rows = tokenize_lm_split(documents, tokenizer, block, layout="packed")
        new = min(self.options["max_new_tokens"], block - prompt)
        data_id = f"{len(rows)}|{hash(rows.input_ids.numpy().tobytes())}"
        return teacher_rows(teacher, rows, prompt, new, tokenizer.eos_token_id, tokenizer.pad_token_id, cache_dir,
                            data_id, batch_size=self.options["generate_batch_size"], progress=progress)
