"""Methods combined by config (GKD's MixBaseline): ``"tinybert+minilmv2"`` or a YAML list.

Each listed method keeps its own spec, options (a per-method temperature included) and
auxiliary model; the combination asks each for the features it needs and hands every model
the *union*, so the student and each teacher run one forward pass per step. The loss is the
sum of each method's terms times the method's weight (each keeps its internal weights), keys
prefixed by the method (``minilmv2/...``); the hard-label term is counted once (the largest
weight). Stages are the union of the methods' stages in order; a method simply has no term
in a stage it does not define. Two methods that both replace the student's forward pass
(Theseus, DIITO) cannot be combined, nor single- and multi-teacher methods.

YAML form (``--method mix.yaml``)::

    methods:
      - {name: tinybert, weight: 1.0}
      - {name: minilmv2, weight: 1.0, options: {relation_heads: 48}}
      - {name: kd, weight: 1.0, options: {temperature: 1}}
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

from torch import Tensor, nn

from ..errors import AutoSKDError
from .methods import Method
from .spec import MethodSpec


def parse_combination(spec: Any) -> list[tuple[str, float, dict]]:
    """``"a+b"``, a YAML path, or a list of names / ``{name, weight, options}`` dicts."""
    if isinstance(spec, str) and spec.endswith((".yaml", ".yml")):
        import yaml

        path = Path(spec)
        if not path.is_file():
            raise AutoSKDError(f"method file {spec!r} not found; give a YAML file with a 'methods:' list")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise AutoSKDError(f"method file {path} is not valid YAML ({str(err).splitlines()[0]}); fix the "
                               "syntax") from None
        spec = data.get("methods") if isinstance(data, dict) else data
        if not isinstance(spec, list):
            raise AutoSKDError(f"{path}: expected a 'methods:' list of {{name, weight, options}}")
    if isinstance(spec, str):
        spec = [part.strip() for part in spec.split("+") if part.strip()]
    entries = []
    for item in spec:
        if isinstance(item, str):
            entries.append((item, 1.0, {}))
        elif isinstance(item, dict) and "name" in item:
            unknown = set(item) - {"name", "weight", "options"}
            if unknown:
                raise AutoSKDError(f"method entry {item!r}: unknown key(s) {', '.join(sorted(unknown))}; "
                                   f"use name, weight, options")
            try:
                weight = float(item.get("weight", 1.0))
            except (TypeError, ValueError):
                raise AutoSKDError(f"method entry {item['name']!r}: weight must be a number") from None
            entries.append((str(item["name"]), weight, dict(item.get("options") or {})))
        else:
            raise AutoSKDError(f"method entry {item!r} must be a name or {{name, weight, options}}")
    if len(entries) < 2:
        raise AutoSKDError("a combination needs at least two methods, e.g. tinybert+minilmv2")
    return entries


class CombinedAuxiliary(nn.Module):
    """One auxiliary model per combined method (their projections stay separate)."""

    def __init__(self, parts: dict[str, nn.Module]):
        super().__init__()
        self.parts = nn.ModuleDict(parts)

    @property
    def last_distances(self) -> dict[str, float]:
        out = {}
        for name, part in self.parts.items():
            out.update({f"{name}/{k}": v for k, v in getattr(part, "last_distances", {}).items()})
        return out


class Combined(Method):
    """Several methods trained together with one forward pass per model."""

    def __init__(self, entries: Sequence[tuple[str, float, dict]], **shared: Any):
        from .methods import get_method
        from .multi_teacher import MultiTeacherMethod

        self.weights = {}
        self.methods: dict[str, Method] = {}
        for name, weight, options in entries:
            if name in self.methods:
                raise AutoSKDError(f"method {name!r} is listed twice in the combination")
            if weight < 0:
                raise AutoSKDError(f"method {name!r}: weight must be >= 0 (got {weight})")
            self.methods[name] = get_method(name, **{**shared, **options})
            self.weights[name] = weight
        forwards = [n for n, m in self.methods.items() if type(m).student_forward is not Method.student_forward]
        if len(forwards) > 1:
            raise AutoSKDError(f"{' and '.join(forwards)} both replace the student's forward pass; combine at most one")
        multi = {isinstance(m, MultiTeacherMethod) for m in self.methods.values()}
        if len(multi) > 1:
            raise AutoSKDError("single-teacher and multi-teacher methods cannot be combined; use methods of one kind")
        self.multi = multi == {True}
        specs = [m.spec for m in self.methods.values()]
        stages = list(dict.fromkeys(s for spec in specs for s in spec.stages))
        self.options = {"methods": [(n, w) for n, w in self.weights.items()], **shared}
        self.spec = MethodSpec(
            name="+".join(self.methods), description="combination of " + ", ".join(self.methods),
            losses=tuple(l for spec in specs for l in spec.losses), stages=tuple(stages),
            needs_teacher=any(spec.needs_teacher for spec in specs),
            hard_label_weight=max(spec.hard_label_weight for spec in specs),
            reference="GKD (Tan et al. 2023), MixBaseline",
            mlm_weight=max(spec.mlm_weight for spec in specs),
            mlm_stages=tuple(dict.fromkeys(s for spec in specs for s in spec.mlm_stages)))

    def _sub(self, ctx, name: str):
        sub = copy.copy(ctx)
        sub.auxiliary = ctx.auxiliary.parts[name]
        return sub

    def build_auxiliary(self, student_geom, teacher_geoms) -> CombinedAuxiliary:
        return CombinedAuxiliary({n: m.build_auxiliary(student_geom, teacher_geoms) for n, m in self.methods.items()})

    def setup(self, student: nn.Module, teachers: dict[str, nn.Module]) -> None:
        for m in self.methods.values():
            m.setup(student, teachers)

    def on_step(self, ctx) -> None:
        for n, m in self.methods.items():
            m.on_step(self._sub(ctx, n))

    def feature_requests(self, ctx, teacher_name):
        student: list[str] = []
        teacher: Any = {} if self.multi else []
        for n, m in self.methods.items():
            s, t = m.feature_requests(self._sub(ctx, n), teacher_name)
            student += s
            if self.multi:
                for k, v in t.items():
                    teacher[k] = list(dict.fromkeys([*teacher.get(k, []), *v]))
            else:
                teacher += t
        return list(dict.fromkeys(student)), (teacher if self.multi else list(dict.fromkeys(teacher)))

    def teacher_features(self, ctx, policy, teacher_name, batch, requests):
        first = next(iter(self.methods.values()))
        return first.teacher_features(ctx, policy, teacher_name, batch, requests)

    def student_forward(self, ctx, extractor, batch: dict) -> dict[str, Tensor]:
        for n, m in self.methods.items():
            if type(m).student_forward is not Method.student_forward:
                return m.student_forward(self._sub(ctx, n), extractor, batch)
        return extractor(batch)

    def losses(self, ctx, student_feats, teacher_feats, teacher_name, batch) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        hard: list[Tensor] = []
        for n, m in self.methods.items():
            for key, value in m.losses(self._sub(ctx, n), student_feats, teacher_feats, teacher_name, batch).items():
                if key in ("hard_ce", "mlm_ce"):
                    hard.append((key, value))
                else:
                    out[f"{n}/{key}"] = value * self.weights[n]
        for key in ("hard_ce", "mlm_ce"):  # the student's own terms once: the largest weight
            values = [v for k, v in hard if k == key]
            if values:
                out[key] = max(values, key=lambda v: float(v.detach()))
        return out

    def __repr__(self) -> str:
        return f"Combined({', '.join(f'{n}x{w:g}' for n, w in self.weights.items())})"


def combine_methods(spec: Any, **shared: Any) -> Combined:
    return Combined(parse_combination(spec), **shared)
