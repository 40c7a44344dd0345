"""Progressive layer-wise distillation (MobileBERT, SID): the stage is cut into phases (L + 1,
L = student layers, unless the method says otherwise) and each phase switches layer terms on or
down by their student layer.

The resolved term keys carry the student layer (``attention_kl:s1-t3``); a subclass says,
per phase, which factor a layer's terms get (``layer_factor``) and whether the non-layer
terms (embeddings, logits) are on (``other_factor``). Dropped terms give the later layers
no gradient, so phase k trains layers up to k only, as the papers' freezing does.
"""

from __future__ import annotations

import re

from torch import Tensor

from ..engine.methods import Method

_LAYER = re.compile(r":s(\d+)-t\d+")


class Progressive(Method):
    #: Stages that run in phases; other stages are left as they are.
    progressive_stages: tuple[str, ...] = ("pretrain",)

    def num_phases(self) -> int:
        """How many phases the progressive stage is cut into (L + 1: the embeddings, then each layer)."""
        return max(1, int(self.num_layers)) + 1

    def phase(self, ctx) -> int:
        """0..num_phases-1: the phase of the current step within the stage."""
        phases = self.num_phases()
        return min(phases - 1, int(ctx.step * phases // max(1, ctx.total_steps)))

    def setup(self, student, teachers) -> None:
        from ..models.adapters import ArchitectureAdapter

        super().setup(student, teachers)
        self.num_layers = ArchitectureAdapter.for_model(student).geometry.num_layers

    def layer_factor(self, phase: int, layer: int) -> float:
        raise NotImplementedError

    def other_factor(self, phase: int, key: str) -> float:
        return 1.0

    def losses(self, ctx, student_feats, teacher_feats, teacher_name, batch) -> dict[str, Tensor]:
        out = super().losses(ctx, student_feats, teacher_feats, teacher_name, batch)
        if ctx.stage not in self.progressive_stages:
            return out
        phase = self.phase(ctx)
        scaled = {}
        for key, value in out.items():
            match = _LAYER.search(key)
            factor = self.layer_factor(phase, int(match.group(1))) if match else self.other_factor(phase, key)
            if factor:
                scaled[key] = value * factor
        return scaled
