"""The auxiliary model (GKD, section 3.3): a method's extra trainable parameters + its losses.

:class:`AuxiliaryModel` turns a :class:`~autoskd.engine.spec.MethodSpec` into concrete loss
terms for one student and a team of teachers (each teacher may have its own depth/width):

* layer maps are expanded (``map_layers``) and feature names resolved to non-negative layer
  indices, per teacher, at construction -- so every ``nn.Linear`` projection (TinyBERT's
  ``W_h``/``W_e``) exists from step 0 and is in the optimiser;
* :meth:`feature_requests` tells the trainer exactly which features to extract;
* :meth:`compute` returns one weighted scalar per term (``hidden_mse:s1-t3``) and the
  hard-label term ``hard_ce``; the trainer sums them.

Per term, the pipeline is: projection (student side) -> transform (both sides) -> distance
(with the term's temperature and the batch's attention mask). Two feature-specific rules
(TinyBERT / MiniLM) are applied on the way:

* ``attention_scores`` compared by an element-wise distance (``mse``, ``huber``, ``cosine``)
  have masked positions (``<= -1e2``) replaced by 0 on both sides, as TinyBERT does;
  ``kl``/``ce`` read the scores as logits and keep the mask.
* probability features (``attention_probs``, or a ``distribution`` transform such as
  ``pairwise_sdp``) are handed to ``kl``/``ce`` -- which take logits -- as log-probabilities,
  so the KL is between the distributions themselves (tau = 1).

The raw (unweighted) distance of every term is kept, detached, for feature-distance
analysis (GKD App. A.2); :attr:`last_distances` converts them to floats only when read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor, nn

from ..errors import AutoSKDError
from .features import ATTENTION_KINDS, FeatureRef, parse_feature
from .layer_maps import map_layers
from .losses import DISTANCES, hard_label_ce, next_token_ce, on_logits, probs_to_logits, zero_masked_scores
from .projections import PROJECTIONS
from .relations import get_transform
from .schedules import schedule_value
from .spec import FeatureLoss, MethodSpec

#: Feature kinds whose last dim is a per-token vector that a projection can map.
_PROJECTABLE = ("embeddings", "hidden", "query", "key", "value", "logits", "mlm_logits", "lm_logits")


@dataclass(frozen=True)
class ResolvedTerm:
    """One loss term for one teacher and one (student layer, teacher layer) pair."""

    key: str                   # loss key, e.g. "hidden_mse:s1-t3"
    base: str                  # the term's handle + distance, e.g. "hidden_mse"
    loss: FeatureLoss
    student: FeatureRef
    teacher: FeatureRef
    projection: str | None     # key in AuxiliaryModel.projections
    student_layer: int | None = None
    teacher_layer: int | None = None


def term_base(loss: FeatureLoss) -> str:
    """``{name}_{distance}``; the student feature kind stands in for a missing name."""
    handle = loss.name or parse_feature(loss.student.replace("{s}", "0").replace("{t}", "0")).kind
    return f"{handle}_{loss.distance}"


def term_handle(loss: FeatureLoss) -> str:
    """The name used for the term's weight option (``f"{handle}_weight"``)."""
    return loss.name or parse_feature(loss.student.replace("{s}", "0").replace("{t}", "0")).kind


def _width(kind: str, geom) -> int | None:
    if kind in ("embeddings", "hidden"):
        return geom.hidden_size
    if kind in ("query", "key", "value"):
        return geom.head_size
    if kind == "logits":
        return geom.num_labels
    if kind in ("mlm_logits", "lm_logits"):
        return geom.vocab_size
    return None


def _safe(name: str) -> str:
    return str(name).replace(".", "_") or "_"


class AuxiliaryModel(nn.Module):
    """Extra trainable parameters of a method and the computation of its losses.

    ``student_geom``/``teacher_geoms`` are :class:`~autoskd.models.adapters.Geometry`
    objects (``teacher_geoms`` maps teacher name -> geometry; empty for methods without a
    teacher). Projections live in :attr:`projections` under keys
    ``"{teacher}/{loss key}"``, e.g. ``"teacher/hidden_mse:s0-t2"``.
    """

    def __init__(self, spec: MethodSpec, student_geom, teacher_geoms: Mapping[str, object] | None = None):
        super().__init__()
        self.spec = spec
        self.student_geom = student_geom
        self.teacher_geoms = dict(teacher_geoms or {})
        self.projections = nn.ModuleDict()
        #: Parameters a method class adds itself (ALP-KD's attention, RAIL-KD's heads, RL-KD's agent).
        self.extra = nn.ModuleDict()
        self._plans: dict[tuple[str, str], list[ResolvedTerm]] = {}
        self._distances: dict[str, Tensor] = {}
        self._distance_stage: str | None = None
        stages = list(dict.fromkeys([*spec.stages, *(loss.stage for loss in spec.losses)]))
        if spec.losses and not self.teacher_geoms:
            raise AutoSKDError(f"method {spec.name!r} matches teacher features but no teacher was given")
        for teacher in self.teacher_geoms:
            for stage in stages:
                self._plans[(teacher, stage)] = self._resolve(stage, teacher)

    # ------------------------------------------------------------------ planning
    def _resolve(self, stage: str, teacher: str) -> list[ResolvedTerm]:
        sg, tg = self.student_geom, self.teacher_geoms[teacher]
        terms: list[ResolvedTerm] = []
        seen: dict[str, int] = {}
        for loss in self.spec.losses_for(stage):
            DISTANCES.get(loss.distance)  # unknown names fail here, with the known ones listed
            get_transform(loss.transform)
            if loss.projection is not None:
                PROJECTIONS.get(loss.projection)
            base = term_base(loss)
            if loss.layers == "none":
                if "{s}" in loss.student or "{t}" in loss.teacher:
                    raise AutoSKDError(f"loss term {base!r} uses {{s}}/{{t}} placeholders but has layers='none'; "
                                       f"set layers='uniform' or 'last'")
                pairs: list[tuple[int | None, int | None]] = [(None, None)]
            else:
                if not sg.num_layers or not tg.num_layers:
                    raise AutoSKDError(
                        f"method {self.spec.name!r}: term {base!r} maps layers but the student has "
                        f"{sg.num_layers} and teacher {teacher!r} {tg.num_layers} known layers; "
                        f"use a model family autoskd knows or pass adapter paths"
                    )
                pairs = list(map_layers(loss.layers, sg.num_layers, tg.num_layers))  # may be empty (uniform_upper)
            for s, t in pairs:
                s_name = loss.student.format(s=s, t=t) if s is not None else loss.student
                t_name = loss.teacher.format(s=s, t=t) if t is not None else loss.teacher
                s_ref = parse_feature(s_name).resolve(sg.num_layers)
                t_ref = parse_feature(t_name).resolve(tg.num_layers)
                key = base if s is None else f"{base}:s{s_ref.layer}-t{t_ref.layer}"
                if key in seen:
                    seen[key] += 1
                    key = f"{key}#{seen[key]}"
                else:
                    seen[key] = 1
                self._check_heads(key, s_ref, t_ref, teacher, loss)
                proj_key = self._projection(key, loss, s_ref, t_ref, teacher)
                terms.append(ResolvedTerm(key=key, base=base, loss=loss, student=s_ref, teacher=t_ref,
                                          projection=proj_key, student_layer=s_ref.layer, teacher_layer=t_ref.layer))
        return terms

    def _check_heads(self, key: str, s_ref: FeatureRef, t_ref: FeatureRef, teacher: str, loss: FeatureLoss) -> None:
        if s_ref.kind not in ATTENTION_KINDS and t_ref.kind not in ATTENTION_KINDS:
            return
        if getattr(get_transform(loss.transform), "merges_heads", False):
            return  # relation heads re-split the concatenated heads: head counts may differ
        hs, ht = self.student_geom.num_heads, self.teacher_geoms[teacher].num_heads
        if hs and ht and hs != ht:
            raise AutoSKDError(
                f"method {self.spec.name!r}: {key!r} compares per-head features, but the student has {hs} "
                f"attention heads and teacher {teacher!r} has {ht}; use a student with {ht} heads"
            )

    def _projection(self, key: str, loss: FeatureLoss, s_ref: FeatureRef, t_ref: FeatureRef,
                    teacher: str) -> str | None:
        ws = _width(s_ref.kind, self.student_geom)
        wt = _width(t_ref.kind, self.teacher_geoms[teacher])
        if loss.projection is None:
            transform = get_transform(loss.transform)
            if getattr(DISTANCES.get(loss.distance), "cross_vocab", False):
                return None  # the distance maps two vocabularies itself (a teacher with its own tokenizer)
            if ws and wt and ws != wt and not getattr(transform, "pairwise", False):
                raise AutoSKDError(
                    f"method {self.spec.name!r}: {key!r} compares a student feature of width {ws} with "
                    f"teacher {teacher!r}'s of width {wt}; set projection='linear' on the term"
                )
            return None
        if s_ref.kind not in _PROJECTABLE:
            raise AutoSKDError(f"{key!r}: a linear projection cannot map {s_ref.kind!r} features")
        if not ws or not wt:
            raise AutoSKDError(f"{key!r}: the width of {s_ref.kind!r} is unknown for the student or "
                               f"teacher {teacher!r}, so no projection can be built")
        name = PROJECTIONS.get(loss.projection)(teacher, key, term_base(loss)).replace(".", "_")
        if name in self.projections and self.projections[name].out_features != wt:
            raise AutoSKDError(f"{key!r}: projection {loss.projection!r} is shared, but teacher {teacher!r} has "
                               f"width {wt}, not {self.projections[name].out_features}; use projection='per_teacher'")
        if name not in self.projections:
            linear = nn.Linear(ws, wt)
            nn.init.normal_(linear.weight, std=0.02)  # BERT/TinyBERT initialisation
            nn.init.zeros_(linear.bias)
            self.projections[name] = linear
        return name

    def _plan(self, stage: str, teacher_name: str | None) -> tuple[str | None, list[ResolvedTerm]]:
        if teacher_name is None:
            if not self.spec.losses_for(stage):
                return None, []
            if len(self.teacher_geoms) != 1:
                raise AutoSKDError(f"method {self.spec.name!r} needs a teacher name in stage {stage!r}")
            teacher_name = next(iter(self.teacher_geoms))
        if teacher_name not in self.teacher_geoms:
            raise AutoSKDError(f"unknown teacher {teacher_name!r}; known: {', '.join(self.teacher_geoms) or 'none'}")
        key = (teacher_name, stage)
        if key not in self._plans:  # a stage name the spec does not list: plan it on first use
            self._plans[key] = self._resolve(stage, teacher_name)
        return teacher_name, self._plans[key]

    def terms(self, stage: str, teacher_name: str | None = None) -> list[ResolvedTerm]:
        """The resolved loss terms of ``stage`` for ``teacher_name``."""
        return self._plan(stage, teacher_name)[1]

    # ------------------------------------------------------------------ trainer API
    def feature_requests(self, stage: str, teacher_name: str | None) -> tuple[list[str], list[str]]:
        """(student feature names, teacher feature names) that ``compute`` will read in
        ``stage``; layer indices are resolved and non-negative; the student list always
        contains ``"logits"``; the teacher list is empty when no term needs the teacher."""
        _, terms = self._plan(stage, teacher_name)
        mlm = ["mlm_logits"] if self.spec.uses_mlm(stage) else []
        student = list(dict.fromkeys([*(t.student.name for t in terms), *mlm, "logits"]))
        teacher = list(dict.fromkeys(t.teacher.name for t in terms))
        return student, teacher

    def compute(self, stage: str, student_feats: Mapping[str, Tensor], teacher_feats: Mapping[str, Tensor],
                batch: Mapping[str, Tensor], teacher_name: str | None = None, *,
                include_hard: bool = True, progress: float = 0.0,
                hard_weight: float | None = None) -> dict[str, Tensor]:
        """One weighted scalar per loss term of ``stage`` plus ``hard_ce``.

        ``hard_ce`` (``spec.hard_label_weight`` x cross-entropy on ``batch["labels"]``) is
        added when the weight is positive, the stage is a task stage and the batch has
        labels; a caller combining several teachers in one step passes
        ``include_hard=False`` for all but one call.
        """
        teacher_name, terms = self._plan(stage, teacher_name)
        if stage != self._distance_stage:
            self._distances = {}
            self._distance_stage = stage
        out: dict[str, Tensor] = {}
        for term in terms:
            raw = self._distance(term, student_feats, teacher_feats, batch, progress)
            self._distances[f"{teacher_name}/{term.key}"] = raw.detach()
            out[term.key] = raw * (term.loss.weight * schedule_value(term.loss.weight_schedule, progress))
        if include_hard:
            out.update(self.label_losses(stage, student_feats, batch, hard_weight))
        return out

    def label_losses(self, stage: str, student_feats: Mapping[str, Tensor], batch: Mapping[str, Tensor],
                     hard_weight: float | None = None) -> dict[str, Tensor]:
        """The student's own terms: ``hard_ce`` on gold labels, ``mlm_ce`` on MLM targets."""
        out: dict[str, Tensor] = {}
        labels = batch.get("labels") if isinstance(batch, Mapping) else None
        weight = self.spec.hard_weight(stage) if hard_weight is None else hard_weight
        targets = batch.get("target_ids") if isinstance(batch, Mapping) else None
        if targets is not None and weight > 0:  # a language model's own next-token loss
            logits = student_feats.get("lm_logits", student_feats.get("logits"))
            if logits is None:
                raise AutoSKDError("the next-token loss needs the student's 'lm_logits'")
            out["hard_ce"] = next_token_ce(logits, targets) * weight
        elif labels is not None and weight > 0:
            if "logits" not in student_feats:
                raise AutoSKDError("the hard-label loss needs the student's 'logits'")
            out["hard_ce"] = hard_label_ce(student_feats["logits"], labels) * weight
        mlm_labels = batch.get("mlm_labels") if isinstance(batch, Mapping) else None
        if mlm_labels is not None and self.spec.uses_mlm(stage):
            if "mlm_logits" not in student_feats:
                raise AutoSKDError("the MLM loss needs the student's 'mlm_logits'")
            logits = student_feats["mlm_logits"].float()
            rows = batch.get("mlm_rows")
            if rows is not None and logits.dim() == 2:  # [N, V] at the selected positions (Method.mlm_rows)
                mlm_labels = mlm_labels[rows.to(mlm_labels.device)]
            out["mlm_ce"] = self.spec.mlm_weight * nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), mlm_labels.reshape(-1), ignore_index=-100)
        return out

    def _distance(self, term: ResolvedTerm, student_feats: Mapping[str, Tensor],
                  teacher_feats: Mapping[str, Tensor], batch: Mapping[str, Tensor], progress: float = 0.0) -> Tensor:
        try:
            s = student_feats[term.student.name]
            t = teacher_feats[term.teacher.name]
        except KeyError as missing:
            raise AutoSKDError(
                f"loss term {term.key!r} needs feature {missing.args[0]!r}, which was not extracted; "
                f"extract the names given by feature_requests()"
            ) from None
        loss = term.loss
        if term.student.kind == "lm_logits":
            return self._token_distance(term, s, t, batch, progress)
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        if loss.teacher_scale:
            t = t * schedule_value(loss.teacher_scale, progress)
        if term.projection is not None:
            proj = self.projections[term.projection]
            s = proj(s.to(proj.weight.dtype))
        transform = get_transform(loss.transform)
        if loss.transform:
            s, t = transform(s, mask=mask), transform(t, mask=mask)
        distance = DISTANCES.get(loss.distance)
        pairwise = bool(getattr(transform, "pairwise", False))
        if on_logits(distance):
            if getattr(transform, "distribution", False) or (not pairwise and term.student.kind == "attention_probs"):
                s = probs_to_logits(s)
            if getattr(transform, "distribution", False) or (not pairwise and term.teacher.kind == "attention_probs"):
                t = probs_to_logits(t)
        elif not pairwise:
            if term.student.kind == "attention_scores":
                s = zero_masked_scores(s)
            if term.teacher.kind == "attention_scores":
                t = zero_masked_scores(t)
        if loss.tokens == "masked":  # MLM-masked positions only (DistilBERT's soft loss)
            mask = (batch["mlm_labels"] != -100).long()
        rows = batch.get("mlm_rows") if isinstance(batch, Mapping) else None
        if rows is not None and term.student.kind == "mlm_logits" and s.dim() == 2:
            # word predictions at the selected positions only ([N, V], Method.mlm_rows): this term
            # reads those of them its mask keeps -- the same rows, and mean, as the [B, T, V] form
            keep = (torch.ones_like(rows) if mask is None else mask.bool())[rows]  # both are the batch's
            if not bool(keep.all()):
                s, t = s[keep.to(s.device)], t[keep.to(t.device)]
            if s.shape[0] == 0:  # no position to read: the masked mean of nothing is 0
                return s.sum() * 0.0
            mask = None
        feature_mask = None if getattr(transform, "own_mask", False) else self._feature_mask(term, s, mask, pairwise)
        tau = loss.temperature * schedule_value(loss.temperature_schedule, progress)
        return distance(s, t, temperature=tau, mask=feature_mask)

    def _token_distance(self, term: ResolvedTerm, s: Tensor, t, batch: Mapping[str, Tensor],
                        progress: float) -> Tensor:
        """A language model's next-token distributions, compared at the positions that carry a
        target (``target_ids != -100``); the teacher side may be a cached top-k (``TopK``) or a
        set of them, one per temperature (:class:`~autoskd.engine.token_losses.TopKSet`)."""
        loss = term.loss
        distance = DISTANCES.get(loss.distance)
        if not getattr(distance, "token_level", False):
            raise AutoSKDError(f"loss term {term.key!r} compares next-token distributions; use one of the "
                               f"token-level distances: forward_kl, reverse_kl, jsd, tvd (got {loss.distance!r})")
        tau = loss.temperature * schedule_value(loss.temperature_schedule, progress)
        targets = batch.get("target_ids") if isinstance(batch, Mapping) else None
        mask = None if targets is None else targets != -100
        if hasattr(t, "at"):  # TopKSet: the cached table made at this term's temperature
            t = t.at(tau)
        return distance(s, t, temperature=tau, mask=mask, **dict(loss.params))

    @staticmethod
    def _feature_mask(term: ResolvedTerm, x: Tensor, mask: Tensor | None, pairwise: bool) -> Tensor | None:
        """The attention mask laid out for ``x``, by the feature's kind (not guessed by shape)."""
        if mask is None:
            return None
        kind = term.student.kind
        if kind == "logits" or x.dim() < 3:
            return None
        m = mask.to(device=x.device, dtype=torch.float32)
        if pairwise or kind in ("attention_scores", "attention_probs"):
            pair = m[:, :, None] * m[:, None, :]          # [B, T(query), T(key)]
            return pair[:, None] if x.dim() == 4 else pair
        if kind in ("query", "key", "value"):
            return m[:, None, :, None]                     # [B, 1, T, 1]
        return m[:, :, None]                               # [B, T, 1]: embeddings, hidden, mlm_logits

    # ------------------------------------------------------------------ analysis
    @property
    def last_distances(self) -> dict[str, float]:
        """``"{teacher}/{term}" -> raw distance`` of the latest step of the current stage."""
        return {k: float(v) for k, v in self._distances.items()}

    def extra_repr(self) -> str:
        return f"method={self.spec.name!r}, teachers={list(self.teacher_geoms)}"
