"""On-policy distillation for generative LMs (GKD, Agarwal et al. 2024).

A student trained only on fixed text never sees its own mistakes; at generation time it
conditions on what it wrote. GKD therefore lets the student write part of its training data:
with probability ``lmbda`` a step's batch is replaced by the student's sampled continuations of
the batch's prompts (its first ``prompt_tokens`` tokens), and the teacher grades every written
token. The loss is the generalised JSD with ``beta`` (0: forward KL, 1: reverse KL) at the
written positions; other steps use the corpus batch. The teacher runs live on written batches
(the cache only covers the corpus). Not in GKD's (Tan et al.) catalogue: a decoder-LM method.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..engine.methods import METHODS, Method
from ..engine.spec import FeatureLoss, MethodSpec
from ..errors import AutoSKDError


@METHODS.register("on_policy")
class OnPolicy(Method):
    spec = MethodSpec(
        name="on_policy",
        description="GKD on-policy distillation (decoder LMs): a fraction lmbda of batches written by the "
                    "student, generalised JSD(beta) to the teacher on every token.",
        losses=(FeatureLoss("lm_logits", "lm_logits", "jsd", temperature=1.0, name="jsd", params=(("beta", 0.5),)),),
        hard_label_weight=0.0, stages=("task",),
        reference="Agarwal et al. 2024, On-Policy Distillation of Language Models: Learning from Self-Generated "
                  "Mistakes (ICLR)",
        extra={"decoder_only": True},
    )
    OPTIONS = {"lmbda": 0.5, "beta": 0.5, "prompt_tokens": 16, "max_new_tokens": 32, "sample_temperature": 1.0,
               "seed": 0}

    def configure(self, spec: MethodSpec, options: dict[str, Any]) -> MethodSpec:
        o = options
        if not 0.0 <= o["lmbda"] <= 1.0 or not 0.0 <= o["beta"] <= 1.0:
            raise AutoSKDError(f"method 'on_policy': lmbda and beta must be in [0, 1] (got {o['lmbda']}, {o['beta']})")
        if o["prompt_tokens"] < 1 or o["max_new_tokens"] < 1 or not o["sample_temperature"] > 0:
            raise AutoSKDError("method 'on_policy': prompt_tokens, max_new_tokens and sample_temperature must be > 0")
        self.generator = torch.Generator().manual_seed(int(o["seed"]))
        losses = tuple(dataclasses.replace(l, params=(("beta", o["beta"]),)) for l in spec.losses)
        return dataclasses.replace(spec, losses=losses)

    def prepare_batch(self, ctx, batch: dict) -> dict:
        """With probability ``lmbda``, the student's own continuation of this batch's prompts."""
        if float(torch.rand((), generator=self.generator)) >= self.options["lmbda"]:
            return batch
        p = int(self.options["prompt_tokens"])
        if batch["input_ids"].shape[1] <= p or not bool(batch["attention_mask"][:, :p].all()):
            return batch  # rows too short for a full prompt: keep the corpus batch
        from ..lm.generation import continue_prompts

        student = ctx.student
        config = getattr(student, "config", None)
        eos = getattr(config, "eos_token_id", None)
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        pad = getattr(config, "pad_token_id", None)
        ids, mask, targets = continue_prompts(
            student, batch["input_ids"][:, :p], int(self.options["max_new_tokens"]), eos,
            pad if pad is not None else (eos or 0), do_sample=True,
            temperature=float(self.options["sample_temperature"]), generator=self.generator)
        return {"input_ids": ids, "attention_mask": mask, "target_ids": targets, "on_policy": True}
