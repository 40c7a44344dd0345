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
from .batches import to_device
from .teacher_cache import TeacherOutputCache, compute_logits_table, loader_rows, model_fingerprint, sequential_loader


class TeacherRows:
    """A frozen teacher's hooked module outputs, per row of one training split.

    Why: a method that matches intermediate features (hidden states, Q/K/V, attention scores)
    ran the frozen, eval-mode teacher forward in every step, although a row's outputs are the
    same in every epoch; the logits table (:mod:`.teacher_cache`) covers logits only. The first
    step that asks for a set of modules runs the teacher once over the split in order (as the
    logits table does) and keeps each row's outputs of those modules at its real tokens, and its
    logits; every batch is then rebuilt from them and the extractor derives the features from
    those outputs as after a forward (:meth:`~autoskd.engine.hooks.FeatureExtractor.derive`).
    Values at real tokens are a forward's in the split's order (they differ from an in-batch
    forward's by float rounding only; they do not depend on the data order, so a resumed run
    sees the unbroken run's); padded positions come back as zeros (every loss masks them; live,
    they depend on the batch's padding, not the row). A row is served only when its token ids
    are the kept ones. Rows past ``max_bytes`` run live. Only stages with a ``data_id`` keep
    rows: MLM-masked text changes every epoch, and the one method that changes the teacher's
    forward (DIITO's interchange, operation hooks) does so in its masked pre-training stage."""

    def __init__(self, loader: DataLoader | None = None, max_bytes: int = 1 << 30, keep_logits: bool = True):
        self.loader = loader  # the split, passed over in order to fill
        #: False for a causal LM: its ``[T, V]`` logits per row would dwarf everything else, and its
        #: next-token distribution comes from the top-k cache (lm/teachers.py), so only the hooked
        #: outputs are kept and :meth:`lookup` returns no logits
        self.keep_logits = keep_logits
        self.filled: set[str] = set()  # module paths one pass has kept
        self.max_bytes = max_bytes
        self.bytes = 0
        self.tokens: dict[int, torch.Tensor] = {}  # idx -> the row's real token ids (and token types)
        self.logits: dict[int, torch.Tensor] = {}
        self.outputs: dict[str, dict[int, torch.Tensor]] = {}  # module path -> idx -> [real tokens, ...]

    @staticmethod
    def _row_tokens(batch: dict, j: int, real: torch.Tensor) -> torch.Tensor:
        ids = batch["input_ids"][j][real]
        types = batch.get("token_type_ids")
        return ids if types is None else torch.stack([ids, types[j][real]])

    def lookup(self, batch: dict, paths: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
        """``(captured outputs, logits)`` for ``batch`` when every row has every path, else None."""
        if any(p not in self.outputs for p in paths):
            return None
        idx, mask = batch["idx"].tolist(), batch["attention_mask"].bool()
        for j, i in enumerate(idx):
            kept = self.tokens.get(i)
            if kept is None or any(i not in self.outputs[p] for p in paths) \
                    or not torch.equal(kept, self._row_tokens(batch, j, mask[j])):
                return None
        captured = {}
        for p in paths:
            rows = [self.outputs[p][i] for i in idx]
            out = rows[0].new_zeros((*mask.shape, *rows[0].shape[1:]), device=mask.device)
            out[mask] = torch.cat(rows).to(mask.device)  # row-major: each row's real tokens in order
            captured[p] = out
        logits = torch.stack([self.logits[i] for i in idx]).to(mask.device) if self.keep_logits else None
        return captured, logits

    def store(self, batch: dict, captured: dict[str, torch.Tensor], logits: torch.Tensor) -> None:
        """Keep each row's real-token outputs of a live forward (per-token outputs only)."""
        mask = batch["attention_mask"].bool()
        if (self.keep_logits and logits.dim() != 2) \
                or any(t.dim() < 3 or tuple(t.shape[:2]) != tuple(mask.shape) for t in captured.values()):
            return
        for j, i in enumerate(batch["idx"].tolist()):
            real = mask[j]
            tokens = self._row_tokens(batch, j, real)
            if i in self.tokens and not torch.equal(self.tokens[i], tokens):  # another row under this idx
                for rows in self.outputs.values():
                    rows.pop(i, None)
            outs = {p: t[j][real].detach() for p, t in captured.items() if i not in self.outputs.get(p, {})}
            size = sum(o.numel() * o.element_size() for o in outs.values())
            if self.bytes + size > self.max_bytes:
                return
            self.bytes += size
            self.tokens[i] = tokens.clone()
            if self.keep_logits:
                self.logits[i] = logits[j].detach().clone()
            for p, o in outs.items():
                self.outputs.setdefault(p, {})[i] = o


class Teacher:
    """A frozen teacher model and, once ``prepare``d, its logits table for a training split
    (and the per-row store of its intermediate outputs, :class:`TeacherRows`)."""

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
        self.rows: TeacherRows | None = None  # this split's kept outputs (feature methods)
        self._rows_id: str | None = None

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
        """Load (or compute once and store) this teacher's logits for ``loader``'s split, and keep
        its intermediate outputs per row from now on (:class:`TeacherRows`; for a split with a
        ``data_id`` and a cache: a sharded teacher, which gets none, runs every step on every rank)."""
        self.logits_table = None if data_id is None else self.logits_for(loader, data_id, cache, device, progress)
        if data_id is None or cache is None:
            self.rows = None
        elif self.rows is None or self._rows_id != data_id:
            self.rows = TeacherRows(loader)
        self._rows_id = data_id

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
        rows = getattr(self, "rows", None)
        if rows is None or "idx" not in batch or batch.get("attention_mask") is None \
                or not self._extractor.per_token_outputs:
            return {k: v.detach() for k, v in self._extractor(batch).items()}
        paths = self._extractor.hooked_paths
        if not set(paths) <= rows.filled and rows.loader is not None:  # first ask: one pass over the split
            device = batch["input_ids"].device
            for part in sequential_loader(rows.loader):
                part = to_device(part, device)
                self._extractor(part, sink=lambda captured, logits, part=part: rows.store(part, captured, logits))
            rows.filled.update(paths)
        kept = rows.lookup(batch, paths)
        if kept is None:  # a row the pass did not keep (memory bound, another split): live
            return {k: v.detach() for k, v in self._extractor(batch).items()}
        return {k: v.detach() for k, v in self._extractor.derive(batch, *kept).items() if v is not None}


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
