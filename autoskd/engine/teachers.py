"""Teacher policies: which teacher's outputs the student learns from at each step.

One engine serves single-teacher KD, AvgKD, and AutoSKD's stochastic teacher, because the
trainer only asks a policy two questions per step: *which* teacher (``choose``) and *what*
it says about this batch (``features``). Logits come from the on-disk cache when the
training split has a ``data_id``; other features run the frozen teacher forward.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterable, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..errors import AutoSKDError
from ..models.lazy import LazyModel, LazyModels
from ..models.loading import freeze
from .teacher_cache import TeacherOutputCache, compute_logits_table, loader_rows, model_fingerprint


class Teacher:
    """A frozen teacher model and, once ``prepare``d, its logits table for a training split."""

    def __init__(self, name: str, model: nn.Module | LazyModel, fingerprint: str | None = None):
        self.name = name
        # A LazyModel is loaded on first use of ``model``: a run that reads every logit from the
        # cache never loads the weights (see autoskd.models.lazy).
        self._lazy = model if isinstance(model, LazyModel) else None
        self._model = None if self._lazy is not None else freeze(model)
        self._device: torch.device | str | None = None
        self._fingerprint = fingerprint
        self.logits_table: torch.Tensor | None = None
        self._extractor = None

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            model = freeze(self._lazy.get())
            self._model = model.to(self._device) if self._device is not None else model
        return self._model

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def shape_model(self) -> nn.Module:
        """A model with this teacher's architecture (weightless while the teacher is not loaded)."""
        return self._model if self._model is not None else self._lazy.shape_model()

    def to(self, device: torch.device | str) -> "Teacher":
        """Move the model to ``device`` now, or when it is loaded."""
        self._device = device
        if self._model is not None:
            self._model.to(device)
        return self

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    @property
    def num_classes(self) -> int | None:
        """The width of this teacher's logits when its config says (read from the weightless
        skeleton while the weights are not loaded, never loading them for it); None when unknown."""
        if self._model is None and not self._lazy.has_shape:
            return None
        value = getattr(getattr(self.shape_model, "config", None), "num_labels", None)
        return value if isinstance(value, int) else None

    def prepare(self, loader: DataLoader, data_id: str | None, cache: TeacherOutputCache | None,
                device: torch.device | str = "cpu", progress: bool = True) -> None:
        """Load (or compute once and store) this teacher's logits for ``loader``'s split."""
        self.logits_table = None if data_id is None else self.logits_for(loader, data_id, cache, device, progress)

    def logits_for(self, loader: DataLoader, data_id: str | None, cache: TeacherOutputCache | None,
                   device: torch.device | str = "cpu", progress: bool = True) -> torch.Tensor:
        """This teacher's ``[N, C]`` logits over ``loader``'s split: from the cache when it has a
        ``data_id`` (computed and stored once otherwise), else computed now."""
        desc = f"teacher {self.name} logits"
        if cache is None or data_id is None:
            return compute_logits_table(self.model, loader, device, desc, progress)
        # checked against the split's rows and the teacher's classes; read before touching self.model (lazy load)
        cached = cache.load(self.fingerprint, data_id, loader_rows(loader), self.num_classes)
        if cached is not None:
            return cached
        logits = compute_logits_table(self.model, loader, device, desc, progress)
        cache.store(self.fingerprint, data_id, logits)
        return logits

    @torch.no_grad()
    def features(self, batch: dict, names: Iterable[str]) -> dict[str, torch.Tensor]:
        names = list(names)
        if self.logits_table is not None and set(names) <= {"logits"}:
            idx = batch["idx"].to(self.logits_table.device)
            return {"logits": self.logits_table.index_select(0, idx).to(batch["input_ids"].device)}
        from .hooks import FeatureExtractor  # local: hooks import adapters, which import models

        if self._extractor is None:
            self._extractor = FeatureExtractor(self.model, names)
        elif set(self._extractor.features) != set(names):
            self._extractor.set_features(names)
        return {k: v.detach() for k, v in self._extractor(batch).items()}


class TeacherPolicy(ABC):
    """Base policy over a set of named teachers."""

    def __init__(self, teachers: Mapping[str, Teacher]):
        if not teachers:
            raise AutoSKDError("no teachers given; a distillation method needs at least one teacher")
        self.teachers = dict(teachers)

    @property
    def models(self) -> LazyModels:
        """name -> teacher model; a teacher not loaded yet loads when its entry is read."""
        return LazyModels({name: t.model if t.loaded else LazyModel(lambda t=t: t.model, lambda t=t: t.shape_model)
                           for name, t in self.teachers.items()})

    def to(self, device: torch.device | str) -> "TeacherPolicy":
        for teacher in self.teachers.values():
            teacher.to(device)
        return self

    def prepare(self, loader: DataLoader, data_id: str | None, cache: TeacherOutputCache | None,
                device: torch.device | str = "cpu", progress: bool = True) -> None:
        for teacher in self.teachers.values():
            teacher.prepare(loader, data_id, cache, device, progress)

    def state_dict(self) -> dict:
        """Sampling state to checkpoint (none for deterministic policies)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""

    @abstractmethod
    def choose(self, step: int) -> str:
        """The name of the teacher this step learns from."""

    def step_names(self) -> list[str]:
        """Every name :meth:`choose` may return (the trainer plans each one's loss terms)."""
        return list(self.teachers)

    def features(self, name: str, batch: dict, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return self.teachers[name].features(batch, names)

    def geometry_source(self, name: str) -> nn.Module:
        """The model whose shape a loss term for ``name`` refers to (weightless if not loaded)."""
        return self.teachers[name].shape_model


class SingleTeacher(TeacherPolicy):
    """Classic distillation from one teacher."""

    def __init__(self, teacher: Teacher):
        super().__init__({teacher.name: teacher})
        self.name = teacher.name

    def choose(self, step: int) -> str:
        return self.name


class AverageTeachers(TeacherPolicy):
    """AvgKD: the student learns from the mean of the team's logits (Hinton et al. 2015)."""

    NAME = "average"

    def choose(self, step: int) -> str:
        return self.NAME

    def step_names(self) -> list[str]:
        return [self.NAME]

    def features(self, name: str, batch: dict, names: Iterable[str]) -> dict[str, torch.Tensor]:
        names = set(names)
        if names - {"logits"}:
            raise AutoSKDError("AvgKD averages teacher logits only; use a logits-only method such as 'kd'")
        logits = [t.features(batch, ["logits"])["logits"] for t in self.teachers.values()]
        return {"logits": torch.stack(logits).mean(0)}

    def geometry_source(self, name: str) -> nn.Module:
        return next(iter(self.teachers.values())).shape_model


#: How SSWO scales the sampled teacher's logits by its weight (see :func:`theta_logit_scale`).
THETA_SCALINGS = ("theta", "max", "n", "none")


def draw_categorical(weights: torch.Tensor, generator: torch.Generator | None = None,
                     support: torch.Tensor | None = None) -> int:
    """One index ``i ~ Cat(weights)`` (negative weights count as 0), the one Cat(θ) sampler of the
    package. ``support`` (a bool mask) limits the draw to its indices; when the weights there have
    no finite positive mass the draw is uniform over it. The draw runs in ``weights``' dtype, which
    fixes the random stream a seeded ``generator`` gives."""
    w = weights.detach().clamp(min=0)
    if support is not None:
        w = torch.where(support, w, torch.zeros_like(w))
        if not torch.isfinite(w).all() or float(w.sum()) <= 0:
            w = support.to(w.dtype)
    return int(torch.multinomial(w, 1, generator=generator))


def theta_logit_scale(theta: torch.Tensor, i: int, scaling: str = "theta") -> torch.Tensor:
    """The factor SSWO multiplies teacher ``i``'s logits by (differentiable in θ_i).

    * ``theta``: θ_i, the paper's eq. 3. With n teachers near uniform θ_i ≈ 1/n, so the
      targets are n times flatter than single-teacher KD's.
    * ``max``: θ_i / max_j θ_j (the max held constant): the most likely teacher speaks at full
      strength, the others in proportion; same ordering and gradient direction as ``theta``.
    * ``n``: n_active · θ_i: 1 at the uniform distribution.
    * ``none``: 1 (plain sampled KD; no θ path through the loss, so not for the search).
    """
    if scaling == "theta":
        return theta[i]
    if scaling == "max":
        return theta[i] / theta.detach().max().clamp_min(1e-12)
    if scaling == "n":
        return theta[i] * float((theta.detach() > 0).sum())
    if scaling == "none":
        return torch.ones((), dtype=theta.dtype, device=theta.device)
    raise AutoSKDError(f"unknown theta scaling {scaling!r}; choose one of: {', '.join(THETA_SCALINGS)}")


class SampledTeacher(TeacherPolicy):
    """AutoSKD's stochastic teacher: each step samples teacher i ~ Cat(theta).

    The student learns from the sampled teacher's logits times :func:`theta_logit_scale`
    (``scaling="theta"``: θ_i · z_Ti, SSWO as in the paper's eq. 3, so a rarely-chosen
    teacher also speaks with less confidence). ``theta`` is read at every step, so the search
    can update it in place between steps.

    ``mixture = True`` (the search sets it under its ``cr`` strategy) makes every step learn from
    the θ-mixture ``Σ_i θ_i z_Ti`` instead (continuous relaxation, AutoSKDBERT section 2.4.1): the
    target CR's θ step differentiates, so its virtual step is the step the student takes. No
    teacher is drawn then.
    """

    #: the teacher name :meth:`choose` returns in mixture mode
    MIXTURE = "theta-mixture"

    def __init__(self, teachers: Mapping[str, Teacher], theta: torch.Tensor, seed: int = 0,
                 scale_logits: bool = True, scaling: str = "theta"):
        super().__init__(teachers)
        self.names = list(self.teachers)
        self.theta = theta
        self.scaling = scaling if scale_logits else "none"
        if self.scaling not in THETA_SCALINGS:
            raise AutoSKDError(f"unknown theta scaling {scaling!r}; choose one of: {', '.join(THETA_SCALINGS)}")
        self.generator = torch.Generator().manual_seed(seed)
        self.counts = {name: 0 for name in self.names}
        self.last_index: int | None = None
        self.preselected: int | None = None
        self.mixture = False
        if len(theta) != len(self.names):
            raise AutoSKDError(f"distribution has {len(theta)} weights but the team has {len(self.names)} teachers")

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "counts": dict(self.counts),
                "theta": self.theta.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.counts = dict(state["counts"])
        with torch.no_grad():
            self.theta.copy_(state["theta"])

    def draw(self) -> int:
        """Sample a teacher index from the current theta (and count it)."""
        i = draw_categorical(self.theta.detach().float(), self.generator)
        self.last_index = i
        self.counts[self.names[i]] += 1
        return i

    def choose(self, step: int) -> str:
        """This step's teacher: the one a callback already drew (the search's theta step
        must update the weight of the teacher the student then learns from), else a new draw;
        in mixture mode the θ-mixture."""
        if self.mixture:
            self.preselected = None
            return self.MIXTURE
        i, self.preselected = (self.preselected, None) if self.preselected is not None else (self.draw(), None)
        return self.names[i]

    def step_names(self) -> list[str]:
        return [self.MIXTURE] if self.mixture else list(self.teachers)

    def mixture_logits(self, batch: dict) -> torch.Tensor:
        """``Σ_i θ_i z_Ti`` over the teachers with θ_i > 0 (the dropped ones are exactly 0 and
        are not read)."""
        theta = self.theta.detach()
        out = None
        for j, name in enumerate(self.names):
            if float(theta[j]) > 0:
                z = self.teachers[name].features(batch, ["logits"])["logits"]
                term = theta[j].to(device=z.device, dtype=z.dtype) * z
                out = term if out is None else out + term
        if out is None:
            raise AutoSKDError("the teacher distribution has no positive weight; nothing to distil from")
        return out

    def features(self, name: str, batch: dict, names: Iterable[str]) -> dict[str, torch.Tensor]:
        if name == self.MIXTURE:
            if set(names) - {"logits"}:
                raise AutoSKDError("the CR search mixes teacher logits only; use a logits-only method such as 'kd'")
            return {"logits": self.mixture_logits(batch)}
        feats = dict(self.teachers[name].features(batch, names))
        if self.scaling != "none" and "logits" in feats:
            weight = theta_logit_scale(self.theta.detach(), self.names.index(name), self.scaling)
            feats["logits"] = feats["logits"] * weight.to(feats["logits"].dtype)
        return feats

    def geometry_source(self, name: str) -> nn.Module:
        if name == self.MIXTURE:
            return next(iter(self.teachers.values())).shape_model
        return super().geometry_source(name)


def as_policy(teachers, fingerprints: Mapping[str, str] | None = None) -> TeacherPolicy | None:
    """Accept a policy, one module, or a name->module mapping (one teacher -> SingleTeacher)."""
    if teachers is None or isinstance(teachers, TeacherPolicy):
        return teachers
    fingerprints = fingerprints or {}
    if isinstance(teachers, (nn.Module, LazyModel)):
        return SingleTeacher(Teacher("teacher", teachers, fingerprints.get("teacher")))
    if isinstance(teachers, Mapping):
        wrapped = {n: m if isinstance(m, Teacher) else Teacher(n, m, fingerprints.get(n)) for n, m in teachers.items()}
        if len(wrapped) == 1:
            return SingleTeacher(next(iter(wrapped.values())))
        raise AutoSKDError("several teachers given without a policy; use AverageTeachers or SampledTeacher")
    raise AutoSKDError(f"cannot use {type(teachers).__name__} as teachers; pass an nn.Module, a dict or a TeacherPolicy")
