"""BERT-of-Theseus (Xu et al. 2020): compression by progressive module replacing.

The teacher (predecessor, Lt layers, frozen) is cut into Ls groups of k = Lt/Ls consecutive
layers; the student (successor, Ls layers) has one layer per group. At every training step
each group is independently replaced, with probability p(t), by its student layer, and the
*hybrid* model -- the teacher's embeddings, a mix of teacher groups and student layers, the
teacher's pooler/classifier -- is trained with cross-entropy on the gold labels. No
distillation loss: the student layers learn to stand in for the groups.

Replacement rate (curriculum), ``t`` = 0-based step in the stage, ``T`` = its step count:

* default: ``p(t) = min(1, b + (1 - b) * t / ((T - 1) * schedule_end))`` -- from
  ``base_rate`` b = 0.3 linearly to 1, reached at the ``schedule_end`` fraction of the stage
  (0.66, GKD's catalogue: p(t) = .3 + .7t/(.66N); 1.0: at the last step); after it, every group
  is replaced (the successor trains alone, the paper's post-replacement fine-tuning);
* ``rate_slope=r``: ``p(t) = min(1, b + r * t)`` (the paper's linear scheduler, r per step);
* ``replace_rate=p``: constant p (the paper's constant scheduler).

Implementation: operation hooks (``replace_forward``) on the teacher -- a replaced group's
first teacher layer runs the student's layer g (same inputs, attention mask included), the
group's other layers return their input. Only the student's encoder layers receive
gradients: teacher modules are frozen and the student's own embeddings/pooler/classifier
are not in the hybrid (as in the authors' code, whose optimiser holds only the successor
layers). :meth:`Theseus.setup` copies every non-layer teacher parameter (embeddings,
pooler, classifier, ...) into the student, so the trained student alone is the compressed
model; that needs equal hidden widths, identical parameter names outside the layers, and Lt
divisible by Ls. Dropout follows each module's mode: the (eval-mode) teacher parts run
without it, the student layers with it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..engine.hooks import MODEL_INPUT_KEYS, OperationHooks, model_logits
from ..engine.methods import METHODS, Method
from ..engine.spec import MethodSpec
from ..errors import AutoSKDError
from ..models.adapters import ArchitectureAdapter, module_at


@METHODS.register("theseus")
class Theseus(Method):
    spec = MethodSpec(
        name="theseus",
        description="BERT-of-Theseus: teacher layer groups are randomly replaced by student layers with a "
                    "rate rising to 1; cross-entropy on the hybrid model's predictions.",
        losses=(),
        hard_label_weight=1.0,
        stages=("task",),
        reference="Xu et al. 2020, BERT-of-Theseus: Compressing BERT by Progressive Module Replacing (EMNLP)",
        extra={"needs_teacher_modules": True},
    )
    OPTIONS = {"base_rate": 0.3, "schedule_end": 0.66, "rate_slope": None, "replace_rate": None, "seed": 0}

    def configure(self, spec: MethodSpec, options: dict[str, Any]) -> MethodSpec:
        o = options
        if not 0.0 <= o["base_rate"] <= 1.0:
            raise AutoSKDError(f"method 'theseus': base_rate must be in [0, 1] (got {o['base_rate']})")
        if not 0.0 < o["schedule_end"] <= 1.0:
            raise AutoSKDError(f"method 'theseus': schedule_end must be in (0, 1] (got {o['schedule_end']})")
        if o["rate_slope"] is not None and o["rate_slope"] < 0:
            raise AutoSKDError(f"method 'theseus': rate_slope must be >= 0 (got {o['rate_slope']})")
        if o["replace_rate"] is not None and not 0.0 <= o["replace_rate"] <= 1.0:
            raise AutoSKDError(f"method 'theseus': replace_rate must be in [0, 1] (got {o['replace_rate']})")
        return spec

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.teacher: nn.Module | None = None
        self.teacher_layers: list[nn.Module] = []
        self.student_layers: list[nn.Module] = []
        self.group_size = 1
        self.input_keys: tuple[str, ...] = MODEL_INPUT_KEYS
        self.generator = torch.Generator().manual_seed(int(self.options["seed"]))
        self.rate = self.replace_rate_at(0, 1)
        self.replaced: list[bool] = []
        self._tuple_output = False

    # ------------------------------------------------------------------ schedule
    def replace_rate_at(self, step: int, total_steps: int) -> float:
        """p(t) for 0-based ``step`` of a stage with ``total_steps`` steps."""
        o = self.options
        if o["replace_rate"] is not None:
            return float(o["replace_rate"])
        b = float(o["base_rate"])
        if o["rate_slope"] is not None:
            return min(1.0, b + float(o["rate_slope"]) * step)
        progress = step / max(1, total_steps - 1)
        return min(1.0, b + (1.0 - b) * progress / float(o["schedule_end"]))

    # ------------------------------------------------------------------ setup
    def setup(self, student: nn.Module, teachers: dict[str, nn.Module]) -> None:
        if len(teachers) != 1:
            raise AutoSKDError(f"theseus replaces modules of exactly one teacher; got {len(teachers)} "
                               f"({', '.join(teachers) or 'none'})")
        teacher = next(iter(teachers.values()))
        ta, sa = ArchitectureAdapter.for_model(teacher), ArchitectureAdapter.for_model(student)
        lt, ls = ta.geometry.num_layers, sa.geometry.num_layers
        if ls > lt or lt % ls:
            raise AutoSKDError(f"theseus needs the teacher's layer count to be a multiple of the student's "
                               f"(teacher {lt}, student {ls} layers); pick a student with a divisor of {lt} layers")
        if ta.geometry.hidden_size != sa.geometry.hidden_size:
            raise AutoSKDError(f"theseus puts student layers inside the teacher, so the hidden sizes must match "
                               f"(teacher {ta.geometry.hidden_size}, student {sa.geometry.hidden_size})")
        self._copy_outside_layers(teacher, student, ta.layer, sa.layer)
        self.teacher = teacher
        self.teacher_layers = [module_at(teacher, ta.path("layer", i)) for i in range(lt)]
        self.student_layers = [module_at(student, sa.path("layer", i)) for i in range(ls)]
        self.group_size = lt // ls
        self.input_keys = tuple(k for k in MODEL_INPUT_KEYS if k in ta.input_keys)
        self.replaced = [False] * ls

    @staticmethod
    def _copy_outside_layers(teacher: nn.Module, student: nn.Module, t_layer: str, s_layer: str) -> None:
        """Copy every teacher parameter/buffer outside the encoder layers into the student."""
        t_prefix, s_prefix = t_layer.split("{i}")[0], s_layer.split("{i}")[0]
        t_state, s_state = teacher.state_dict(), student.state_dict()
        outside = {k: v for k, v in t_state.items() if not k.startswith((t_prefix, "mlm_head."))}
        missing = [k for k in outside if k not in s_state]
        wrong = [k for k in outside if k in s_state and s_state[k].shape != outside[k].shape]
        if missing or wrong:
            what = ", ".join((missing + wrong)[:4])
            raise AutoSKDError(f"theseus copies the teacher's embeddings and classifier into the student, but the "
                               f"student lacks or has other shapes for: {what}; use a student of the teacher's "
                               f"family and width")
        extra = [k for k in s_state if not k.startswith((s_prefix, "mlm_head.")) and k not in outside]
        if extra:
            raise AutoSKDError(f"the student has modules the teacher lacks ({', '.join(extra[:4])}); theseus "
                               f"needs a student of the teacher's family")
        with torch.no_grad():
            for k, v in outside.items():
                s_state[k].copy_(v)

    # ------------------------------------------------------------------ per step
    def on_step(self, ctx) -> None:
        """Update p(t) and draw which groups the student replaces this step."""
        if not self.student_layers:
            raise AutoSKDError("theseus: setup(student, teachers) must run before training")
        self.rate = self.replace_rate_at(int(ctx.step), int(ctx.total_steps))
        draws = torch.rand(len(self.student_layers), generator=self.generator)
        self.replaced = (draws < self.rate).tolist()

    def hybrid_hooks(self, replaced: list[bool] | None = None) -> OperationHooks:
        """Operation hooks turning the teacher into the hybrid for the ``replaced`` groups."""
        replaced = self.replaced if replaced is None else replaced
        ops = OperationHooks()
        k = self.group_size
        for g, swap in enumerate(replaced):
            if not swap:
                continue
            ops.replace_forward(self.teacher_layers[g * k], self._run_student_layer(self.student_layers[g]))
            for j in range(1, k):
                ops.replace_forward(self.teacher_layers[g * k + j], self._skip)
        return ops

    def _run_student_layer(self, layer: nn.Module):
        def forward(*args: Any, **kwargs: Any) -> Any:
            out = layer(*args, **kwargs)
            self._tuple_output = isinstance(out, tuple)
            return out
        return forward

    def _skip(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden,) if self._tuple_output else hidden

    def hybrid_forward(self, batch: dict, replaced: list[bool] | None = None) -> Tensor:
        """Logits of the hybrid model for ``batch``."""
        if self.teacher is None:
            raise AutoSKDError("theseus: setup(student, teachers) must run before training")
        inputs = {k: batch[k] for k in self.input_keys if k in batch and batch[k] is not None}
        with self.hybrid_hooks(replaced):
            return model_logits(self.teacher(**inputs))

    def student_forward(self, ctx, extractor, batch: dict) -> dict[str, Tensor]:
        # When no group is replaced the hybrid is the frozen teacher: the loss has no
        # gradient and the trainer skips the update for this step.
        return {"logits": self.hybrid_forward(batch)}
