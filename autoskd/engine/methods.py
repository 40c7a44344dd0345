"""The :class:`Method` base class and the ``METHODS`` registry.

A method is data -- a :class:`~autoskd.engine.spec.MethodSpec` -- plus behaviour only where
it changes over training (``on_step`` schedules, operation hooks in ``student_forward``).
Built-in methods live in :mod:`autoskd.methods`, the layer above the engine, and register
themselves when that package is imported (the engine never imports it: it trains whatever
method it is handed, and looks names up in the registry as filled)::

    @METHODS.register("kd")
    class KD(Method):
        spec = MethodSpec(name="kd", description="...", losses=(FeatureLoss("logits", "logits", "kl"),))
        OPTIONS = {"alpha": 1.0}

        def configure(self, spec, options): ...   # turn options into a spec

Options (``get_method("kd", alpha=0.5, temperature=4)``) are the method's own ``OPTIONS``
plus these, shared by every method:

``hard_label_weight``  weight of the cross-entropy on gold labels
``stages``             the stage names to train, in order (list or ``"a,b"``)
``temperature``        temperature of every logit-reading term (``kl``/``ce`` distances)
``weights``            ``{term handle: weight}``
``<handle>_weight``    weight of one term, e.g. ``hidden_weight`` for TinyBERT
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, ClassVar

from torch import Tensor, nn

from ..errors import AutoSKDError
from ..registry import Registry
from .auxiliary import AuxiliaryModel, term_base, term_handle
from .losses import DISTANCES, on_logits
from .spec import FeatureLoss, MethodSpec

METHODS: Registry[type["Method"]] = Registry("method")

#: Options every method accepts (see the module docstring).
GENERIC_OPTIONS = ("hard_label_weight", "stages", "temperature", "weights")


def _coerce(method: str, name: str, value: Any, default: Any) -> Any:
    """Turn a CLI/YAML value into the type of ``default`` (str "0.5" -> 0.5, "true" -> True)."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if isinstance(default, int):
            number = float(value)
            if isinstance(value, bool) or number != int(number):
                raise ValueError(value)
            return int(number)
        if isinstance(default, (int, float)) or default is None:
            if value is None:
                return None
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if isinstance(default, tuple):
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            return tuple(value)
    except (TypeError, ValueError):
        raise AutoSKDError(f"method {method!r}: option {name}={value!r} is not a valid "
                           f"{type(default).__name__ if default is not None else 'number'}") from None
    return value


class Method:
    """A distillation method. Subclasses set ``spec`` (and ``OPTIONS``) and override only
    what changes over training.

    The trainer calls, in order: :meth:`build_auxiliary`, :meth:`setup` (once), then per
    step :meth:`on_step`, :meth:`student_forward`, :meth:`losses`. ``ctx`` is the trainer's
    step context (``student``, ``teachers``, ``auxiliary``, ``stage``, ``step`` (0-based in
    the stage), ``total_steps``, ``device``).
    """

    spec: ClassVar[MethodSpec]
    #: Method-specific options and their defaults (``None`` = an optional number).
    OPTIONS: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any):
        base: MethodSpec = type(self).spec
        name = base.name
        handles = {term_handle(loss) for loss in base.losses}
        allowed = set(self.OPTIONS) | set(GENERIC_OPTIONS) | {f"{h}_weight" for h in handles}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise AutoSKDError(f"method {name!r} has no option {', '.join(unknown)}; its options: "
                               f"{', '.join(sorted(allowed))}")
        self.options: dict[str, Any] = dict(self.OPTIONS)
        for key, value in options.items():
            if key in self.OPTIONS:
                self.options[key] = _coerce(name, key, value, self.OPTIONS[key])
        spec = self.configure(base, self.options)
        self.spec: MethodSpec = self._apply_generic(spec, options)

    # ------------------------------------------------------------------ options
    def configure(self, spec: MethodSpec, options: dict[str, Any]) -> MethodSpec:
        """Turn the method-specific ``options`` into a spec (default: unchanged)."""
        return spec

    def _apply_generic(self, spec: MethodSpec, options: dict[str, Any]) -> MethodSpec:
        name = spec.name
        losses = list(spec.losses)
        changes: dict[str, Any] = {}
        if "hard_label_weight" in options:
            w = _coerce(name, "hard_label_weight", options["hard_label_weight"], 1.0)
            if w < 0:
                raise AutoSKDError(f"method {name!r}: hard_label_weight must be >= 0 (got {w})")
            changes["hard_label_weight"] = w
        if "stages" in options:
            stages = _coerce(name, "stages", options["stages"], ())
            if not stages:
                raise AutoSKDError(f"method {name!r}: stages must name at least one stage")
            changes["stages"] = stages
        if "temperature" in options:
            tau = _coerce(name, "temperature", options["temperature"], 1.0)
            if not tau > 0:
                raise AutoSKDError(f"method {name!r}: temperature must be > 0 (got {tau})")
            if not any(on_logits(DISTANCES.get(l.distance)) for l in losses):
                raise AutoSKDError(f"method {name!r} has no temperature (no kl/ce loss term)")
            losses = [dataclasses.replace(l, temperature=tau) if on_logits(DISTANCES.get(l.distance)) else l
                      for l in losses]
        weights: dict[str, Any] = {}
        given = options.get("weights") or {}
        if not isinstance(given, dict):
            raise AutoSKDError(f"method {name!r}: weights must be a mapping term -> weight")
        weights.update(given)
        weights.update({k[: -len("_weight")]: v for k, v in options.items()
                        if k.endswith("_weight") and k != "hard_label_weight" and k not in self.OPTIONS})
        handles = {term_handle(l) for l in losses}
        for handle, value in weights.items():
            if handle not in handles:
                raise AutoSKDError(f"method {name!r} has no loss term {handle!r}; its terms: {', '.join(sorted(handles))}")
            w = _coerce(name, f"{handle}_weight", value, 1.0)
            if w < 0:
                raise AutoSKDError(f"method {name!r}: {handle}_weight must be >= 0 (got {w})")
            losses = [dataclasses.replace(l, weight=w) if term_handle(l) == handle else l for l in losses]
        changes["losses"] = tuple(losses)
        return dataclasses.replace(spec, **changes)

    # ------------------------------------------------------------------ trainer hooks
    def build_auxiliary(self, student_geom, teacher_geoms) -> AuxiliaryModel:
        """The auxiliary model (extra parameters + losses) for these model shapes."""
        return AuxiliaryModel(self.spec, student_geom, teacher_geoms)

    def setup(self, student: nn.Module, teachers: dict[str, nn.Module]) -> None:
        """Called once before training (e.g. copy teacher modules into the student).

        The default gives the student BERT's MLM head when the method reads its word
        predictions, and checks that teachers whose word predictions are read have one."""
        reads = lambda side: any(getattr(l, side).startswith("mlm_logits") for l in self.spec.losses)  # noqa: E731
        if self.spec.mlm_weight > 0 or reads("student"):
            from .mlm import attach_mlm_head

            attach_mlm_head(student)
        if reads("teacher"):
            for name, model in teachers.items():
                if not isinstance(getattr(model, "mlm_head", None), nn.Module):
                    raise AutoSKDError(
                        f"method {self.spec.name!r} distils word predictions but teacher {name!r} has no MLM head; "
                        f"run its MLM adaptation stage first (autoskd.engine.mlm.adapt_teacher_mlm; "
                        f"`autoskd distill` does it)")

    def reads_teacher_mlm(self, stages) -> bool:
        """Whether any of ``stages`` compares the teacher's word predictions."""
        return any(l.teacher.startswith("mlm_logits") for l in self.spec.losses if l.stage in set(stages))

    def masked_stage(self, stage: str) -> bool:
        """Whether ``stage`` trains on MLM-masked text (word predictions or the MLM loss)."""
        return self.spec.uses_mlm(stage) or any(
            l.student.startswith("mlm_logits") for l in self.spec.losses if l.stage == stage)

    def on_step(self, ctx) -> None:
        """Called at the start of every training step (schedules)."""

    def prepare_batch(self, ctx, batch: dict) -> dict:
        """The batch this step trains on (default: the loader's batch as it is). On-policy
        distillation replaces some batches by text the student generates."""
        return batch

    #: Whether :meth:`mlm_rows` may narrow this method's word predictions to the rows its losses
    #: read. A method whose own code needs ``mlm_logits`` as ``[B, T, V]`` sets it False.
    select_mlm_rows: ClassVar[bool] = True

    def mlm_rows(self, ctx, batch: dict) -> Tensor | None:
        """The token positions (``[B, T]`` bool) at which this step's word predictions are read,
        or None for all of them; the trainer puts them in ``batch["mlm_rows"]`` and every model's
        ``mlm_logits`` is then ``[N, V]``, the selected positions in row-major order.

        Why: the MLM head's ``[B, T, V]`` logits (V = 30,522 for MiniLM) and their softmax are
        most of an MLM stage's step, yet the MLM loss reads only the masked tokens (~7% of the
        positions of a padded batch) and a ``tokens="masked"`` term the same ones; ``"attention"``
        terms (GLMD) read every real token (~half). Rows nothing reads change no loss value, so
        they are not computed. None when a term transforms ``mlm_logits`` (a relation needs the
        ``[B, T, V]`` layout) or the method opts out."""
        if not self.select_mlm_rows or not isinstance(batch, dict) or batch.get("mlm_labels") is None:
            return None
        stage = getattr(ctx, "stage", "")
        terms = [l for l in self.spec.losses_for(stage)
                 if "mlm_logits" in (l.student.split(":")[0], l.teacher.split(":")[0])]
        if not terms and not self.spec.uses_mlm(stage):
            return None
        if any(l.transform not in (None, "identity") for l in terms):
            return None
        rows = batch["mlm_labels"] != -100
        if any(l.tokens != "masked" for l in terms):
            if batch.get("attention_mask") is None:
                return None
            rows = rows | batch["attention_mask"].bool()
        return rows

    def feature_requests(self, ctx, teacher_name: str | None) -> tuple[list[str], Any]:
        """(student feature names, what to ask the teacher(s) for) in this step."""
        return ctx.auxiliary.feature_requests(ctx.stage, teacher_name)

    def teacher_features(self, ctx, policy, teacher_name: str | None, batch: dict, requests: Any) -> Any:
        """The teacher side of this step: one teacher's features (multi-teacher methods return
        ``{teacher: features}``)."""
        if policy is None or not teacher_name or not requests:
            return {}
        return policy.features(teacher_name, batch, requests)

    def student_forward(self, ctx, extractor, batch: dict) -> dict[str, Tensor]:
        """The student's features for this step (default: the plain student forward)."""
        return extractor(batch)

    def losses(self, ctx, student_feats: dict[str, Tensor], teacher_feats: dict[str, Tensor],
               teacher_name: str | None, batch: dict) -> dict[str, Tensor]:
        """Weighted loss terms of this step; the trainer sums them."""
        return ctx.auxiliary.compute(ctx.stage, student_feats, teacher_feats, batch, teacher_name,
                                     progress=training_progress(ctx),
                                     hard_weight=getattr(ctx, "hard_label_weight", None))

    # ------------------------------------------------------------------ description
    @classmethod
    def describe(cls) -> dict[str, Any]:
        spec = cls.spec
        features = list(dict.fromkeys(
            ref.split(":")[0] for loss in spec.losses for ref in (loss.student, loss.teacher)))
        losses = []
        for loss in spec.losses:
            text = f"{loss.student} <- {loss.teacher}: {loss.distance}"
            extras = [x for x in (loss.transform, f"{loss.layers} layers" if loss.layers != "none" else None,
                                  f"{loss.projection} projection" if loss.projection else None,
                                  f"tau={loss.temperature:g}" if on_logits(DISTANCES.get(loss.distance)) else None)
                      if x]
            if extras:
                text += f" ({', '.join(extras)})"
            losses.append({"term": term_base(loss), "stage": loss.stage, "weight": loss.weight, "what": text})
        options = dict(cls.OPTIONS)
        options.setdefault("hard_label_weight", spec.hard_label_weight)
        for loss in spec.losses:
            options.setdefault(f"{term_handle(loss)}_weight", loss.weight)
            if on_logits(DISTANCES.get(loss.distance)):
                options.setdefault("temperature", loss.temperature)
        return {"name": spec.name, "description": spec.description, "stages": list(spec.stages),
                "features": features, "reference": spec.reference, "needs_teacher": spec.needs_teacher,
                "hard_label_weight": spec.hard_label_weight, "losses": losses, "options": options}

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.options.items() if self.OPTIONS.get(k) != v}
        args = ", ".join(f"{k}={v!r}" for k, v in changed.items())
        return f"{type(self).__name__}({args})"


def training_progress(ctx) -> float:
    """How far the stage is, in [0, 1): the step ``ctx`` is at over the stage's total steps (what
    schedules read)."""
    return float(getattr(ctx, "step", 0)) / max(1, int(getattr(ctx, "total_steps", 1) or 1))


#: the package whose import registers the built-in methods (named in errors, never imported here)
BUILTIN_METHODS_PACKAGE = "autoskd.methods"


def _registered(name: str) -> type[Method]:
    if name not in METHODS and BUILTIN_METHODS_PACKAGE not in sys.modules:
        raise AutoSKDError(f"unknown method {name!r}: the built-in methods are registered by importing "
                           f"{BUILTIN_METHODS_PACKAGE} (look methods up with {BUILTIN_METHODS_PACKAGE}.get_method)")
    return METHODS.get(name)


def get_method(name_or_method: str | Method | type[Method], **options: Any) -> Method:
    """A method instance by registered name (options applied), or the given instance."""
    if isinstance(name_or_method, Method):
        if options:
            raise AutoSKDError("options go to the method's constructor when passing a Method instance")
        return name_or_method
    if isinstance(name_or_method, type) and issubclass(name_or_method, Method):
        return name_or_method(**options)
    if isinstance(name_or_method, (list, tuple)) or "+" in str(name_or_method) \
            or str(name_or_method).endswith((".yaml", ".yml")):
        from .combine import combine_methods  # GKD's MixBaseline: "tinybert+minilmv2" or a YAML list

        return combine_methods(name_or_method, **options)
    return _registered(str(name_or_method))(**options)


def describe_methods() -> list[dict[str, Any]]:
    """One dict per registered method: name, description, stages, features, reference,
    losses, options (what ``autoskd methods`` prints)."""
    return [METHODS.get(name).describe() for name in METHODS.names()]


__all__ = ["METHODS", "GENERIC_OPTIONS", "Method", "get_method", "describe_methods", "training_progress", "FeatureLoss",
           "MethodSpec", "BUILTIN_METHODS_PACKAGE"]
