"""Multi-stage runs: each stage carries its own method, teacher, trainable parameters and data.

MobileBERT's progressive phases, SID and TinyBERT's pre-training -> task -> prediction recipe
train different parameters with different losses in sequence. A *stage plan* says so as data::

    stages:
      - name: layers                     # optional (default: stage<i>-<method>)
        method: tinybert                 # any registered method, combination or options
        method_stages: [intermediate]    # which of the method's own stages (default: all)
        trainable: [bert.encoder.layer]  # name prefixes or globs (default: every parameter)
        teacher: big                     # team member (default: the best on dev)
        data: task                       # task, or a data file; labels: false drops the labels
        epochs: 1
      - {method: kd, epochs: 2, lr: 1.0e-4}

Every stage runs on the one engine: one :class:`~autoskd.engine.trainer.Distiller` per stage
(its own method, auxiliary model and teacher policy) trains the *same* student module, and
the optimiser of each of its loss stages is built from that stage's ``trainable`` parameters
only, before the first step (:meth:`Distiller.trainable_parameters`). Frozen parameters are
not in the optimiser, so they keep their values. A finished stage leaves its student weights
in ``<out>/stage<i>-<name>/``, so rerunning the plan resumes after the last finished stage, when
that stage's ``done.json`` was computed from the same plan up to it (the same student, seed and
run: see :mod:`autoskd.rerun`); a plan whose finished stages changed stops in one line.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..atomic import write_json
from ..defaults import DEFAULT_LR, DEFAULT_WARMUP_RATIO, DEFAULT_WEIGHT_DECAY
from ..errors import AutoSKDError
from ..rerun import check_stamp, stamp
from .methods import Method, get_method
from .teacher_cache import model_fingerprint
from .trainer import Distiller, Stage, TrainResult

GLOB_CHARS = "*?["


@dataclass
class StageSpec:
    """One stage of a plan (the keys of one YAML entry)."""

    method: str
    name: str | None = None
    options: dict = field(default_factory=dict)
    method_stages: tuple[str, ...] | None = None
    teacher: str | None = None
    teachers: list[str] | None = None
    trainable: tuple[str, ...] | None = None
    data: str = "task"
    labels: bool = True
    epochs: float = 1.0
    lr: float = DEFAULT_LR
    warmup_ratio: float = DEFAULT_WARMUP_RATIO
    weight_decay: float = DEFAULT_WEIGHT_DECAY
    hard_label_weight: float | None = None

    def build_method(self) -> Method:
        method = get_method(self.method, **self.options)
        if float(getattr(method, "options", {}).get("vocab_alpha", 1.0)) < 1.0:
            raise AutoSKDError(f"stage {self.name!r}: GLMD's vocabulary compression changes the student's tokenizer "
                               "and cannot run inside a stage plan; run it alone with `autoskd distill --method glmd`")
        if self.method_stages is not None:
            unknown = [s for s in self.method_stages if s not in method.spec.stages and s != "pretrain"]
            if unknown:
                raise AutoSKDError(f"stage {self.name!r}: method {method.spec.name!r} has no stage {unknown[0]!r}; "
                                   f"its stages: {', '.join(method.spec.stages)}")
        return method


def _number(value: Any, where: str, positive: bool = False, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise AutoSKDError(f"{where} must be a number (got {value!r})") from None
    if isinstance(value, bool) or number != number or (positive and number <= 0) or number < 0:
        raise AutoSKDError(f"{where} must be {'> 0' if positive else '>= 0'} (got {value!r})")
    return number


def _names(value: Any, where: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise AutoSKDError(f"{where} must be a name or a non-empty list of names (got {value!r})")
    return tuple(value)


def parse_stage(entry: Any, index: int, where: str) -> StageSpec:
    """One YAML entry -> :class:`StageSpec`, with one-line errors naming the key."""
    here = f"{where}: stages[{index}]"
    if not isinstance(entry, dict):
        raise AutoSKDError(f"{here} must be a mapping with at least 'method:' (got {entry!r})")
    allowed = [f.name for f in fields(StageSpec)]
    unknown = [k for k in entry if k not in allowed]
    if unknown:
        raise AutoSKDError(f"unknown key '{unknown[0]}' in {here}; allowed keys: {', '.join(allowed)}")
    if not entry.get("method"):
        raise AutoSKDError(f"{here} has no 'method'; name one, e.g. method: kd (see `autoskd methods`)")
    options = entry.get("options") or {}
    if not isinstance(options, dict):
        raise AutoSKDError(f"{here}.options must be a mapping of option: value (got {options!r})")
    labels = entry.get("labels", True)
    if not isinstance(labels, bool):
        raise AutoSKDError(f"{here}.labels must be true or false (got {labels!r})")
    spec = StageSpec(
        method=str(entry["method"]), name=str(entry.get("name") or f"stage{index}-{entry['method']}"),
        options=dict(options), method_stages=_names(entry.get("method_stages"), f"{here}.method_stages"),
        teacher=entry.get("teacher"), teachers=list(_names(entry.get("teachers"), f"{here}.teachers") or []) or None,
        trainable=_names(entry.get("trainable"), f"{here}.trainable"), data=str(entry.get("data", "task")),
        labels=labels, epochs=_number(entry.get("epochs", 1.0), f"{here}.epochs", positive=True),
        lr=_number(entry.get("lr", DEFAULT_LR), f"{here}.lr", positive=True),
        warmup_ratio=_number(entry.get("warmup_ratio", DEFAULT_WARMUP_RATIO), f"{here}.warmup_ratio"),
        weight_decay=_number(entry.get("weight_decay", DEFAULT_WEIGHT_DECAY), f"{here}.weight_decay"),
        hard_label_weight=_number(entry.get("hard_label_weight"), f"{here}.hard_label_weight", optional=True))
    spec.build_method()  # an unknown method, option or stage name fails now, before any training
    return spec


def load_stage_plan(plan: str | Path | dict | Sequence) -> list[StageSpec]:
    """A plan from a YAML file (``stages:`` list), a dict with ``stages``, or a list of entries."""
    where = "stage plan"
    if isinstance(plan, (str, Path)):
        import yaml

        path = Path(plan)
        if not path.is_file():
            raise AutoSKDError(f"stage plan {plan} not found; give a YAML file with a 'stages:' list")
        try:
            plan = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise AutoSKDError(f"{path} is not valid YAML ({str(err).splitlines()[0]}); fix the syntax") from None
        where = path.name
    if isinstance(plan, dict):
        extra = [k for k in plan if k not in ("stages", "description")]
        if extra:
            raise AutoSKDError(f"unknown key '{extra[0]}' in {where}; allowed keys: stages, description")
        plan = plan.get("stages")
    if not isinstance(plan, (list, tuple)) or not plan:
        raise AutoSKDError(f"{where} needs a non-empty 'stages:' list, each entry with a 'method:'")
    specs = [parse_stage(entry, i, where) for i, entry in enumerate(plan)]
    names = [s.name for s in specs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise AutoSKDError(f"{where}: two stages are named {dup!r}; give each stage a unique 'name'")
    return specs


def is_stage_plan(ref: Any) -> bool:
    """Whether ``ref`` (a ``--method`` value) is a YAML file holding a ``stages:`` list."""
    if not isinstance(ref, (str, Path)) or not str(ref).endswith((".yaml", ".yml")) or not Path(ref).is_file():
        return False
    import yaml

    try:
        data = yaml.safe_load(Path(ref).read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return False
    return isinstance(data, dict) and "stages" in data


def resolve_trainable(student: nn.Module, patterns: Sequence[str] | None, stage: str) -> tuple[str, ...] | None:
    """Name prefixes for :class:`Stage.trainable`: plain entries stay prefixes, globs
    (``*.attention.*``) become the exact names they match; a glob matching nothing is an error."""
    if patterns is None:
        return None
    names = [n for n, _ in student.named_parameters()]
    out: list[str] = []
    for pattern in patterns:
        if any(c in pattern for c in GLOB_CHARS):
            matched = fnmatch.filter(names, pattern)
            if not matched:
                raise AutoSKDError(f"stage {stage!r}: trainable pattern {pattern!r} matches no student parameter; "
                                   f"names look like {names[0]!r}")
            out += matched
        else:
            out.append(pattern)
    return tuple(dict.fromkeys(out))


def check_plan(student: nn.Module, plan: Sequence[StageSpec], teacher_names: Sequence[str]) -> None:
    """Everything about a plan that can fail, checked before its first stage trains: the
    teachers each stage names and the parameters its ``trainable`` entries select."""
    names = [n for n, _ in student.named_parameters()]
    for spec in plan:
        for teacher in ([spec.teacher] if spec.teacher else []) + list(spec.teachers or []):
            if teacher not in teacher_names:
                raise AutoSKDError(f"stage {spec.name!r}: teacher {teacher!r} is not in the team; choose from: "
                                   f"{', '.join(teacher_names)}")
        for prefix in resolve_trainable(student, spec.trainable, spec.name) or ():
            if not any(n.startswith(prefix) for n in names):
                raise AutoSKDError(f"stage {spec.name!r}: trainable prefix {prefix!r} matches no student parameter; "
                                   f"names look like {names[0]!r}")


@dataclass
class StageOutcome:
    name: str
    method: str
    result: TrainResult | None
    trainable_parameters: int
    resumed: bool = False

    def summary(self) -> dict:
        r = self.result
        return {"name": self.name, "method": self.method, "trainable_parameters": self.trainable_parameters,
                "resumed": self.resumed, "steps": r.steps if r else None,
                "seconds": round(r.seconds, 2) if r else None, "best_dev_acc": r.best_dev_acc if r else None,
                "final_dev_acc": r.final_dev_acc if r else None,
                "loss_terms": sorted({k for h in _train_records(r) for k in h}) if r else None}


def _train_records(result: TrainResult | None) -> list[dict]:
    if result is None or result.out_dir is None or not (result.out_dir / "metrics.jsonl").exists():
        return []
    skip = {"kind", "stage", "epoch", "step", "global_step", "lr", "loss"}
    rows = [json.loads(line) for line in (result.out_dir / "metrics.jsonl").read_text().splitlines() if line]
    return [{k: v for k, v in row.items() if k not in skip and not k.startswith("distance/")}
            for row in rows if row.get("kind") == "train"]


Prepare = Callable[[StageSpec, Method], tuple[Any, list[Stage]]]


def run_stages(student: nn.Module, plan: Sequence[StageSpec], prepare: Prepare, *, dev=None,
               out_dir: str | Path | None = None, seed: int = 0, progress: bool = True, callbacks=(),
               teacher_cache=None, distiller_options: dict | None = None,
               identity: dict | None = None) -> list[StageOutcome]:
    """Train ``student`` through ``plan``, one Distiller per stage on the same module.

    ``prepare(spec, method)`` returns the stage's teacher policy (or None) and its engine
    stages (data, epochs, learning rate); this function sets each one's ``trainable`` and
    ``hard_label_weight`` from the spec, so the optimiser sees only those parameters.
    Each finished stage's ``done.json`` carries the plan up to it, the seed, the student's
    starting weights and ``identity`` (the caller's: team, task, config)."""
    out = Path(out_dir) if out_dir is not None else None
    folders = [out / f"stage{i}-{s.name}" for i, s in enumerate(plan)] if out else [None] * len(plan)
    start = {"run": identity, "seed": seed, "student": model_fingerprint(student)} if out else {}

    def stage_identity(i: int) -> dict:
        return {**start, "plan": [dataclasses.asdict(s) for s in plan[: i + 1]]}

    done = max((i for i, f in enumerate(folders) if f is not None and (f / "done.json").exists()), default=-1)
    if done >= 0:  # resume after the last finished stage, if it finished this very plan
        record = json.loads((folders[done] / "done.json").read_text())
        check_stamp(record, stage_identity(done), f"finished stage {folders[done]}", out)
        student.load_state_dict(torch.load(folders[done] / "student.pt", map_location="cpu", weights_only=True))
    outcomes: list[StageOutcome] = []
    for i, spec in enumerate(plan):
        if i <= done:
            outcomes.append(StageOutcome(spec.name, spec.method, None, 0, resumed=True))
            continue
        method = spec.build_method()
        policy, stages = prepare(spec, method)
        if not stages:
            raise AutoSKDError(f"stage {spec.name!r} runs none of method {method.spec.name!r}'s stages")
        trainable = resolve_trainable(student, spec.trainable, spec.name)
        stages = [dataclasses.replace(s, trainable=trainable, hard_label_weight=spec.hard_label_weight)
                  for s in stages]
        distiller = Distiller(student, method, policy, out_dir=folders[i], seed=seed, progress=progress,
                              callbacks=callbacks, teacher_cache=teacher_cache, checkpoint=folders[i] is not None,
                              **(distiller_options or {}))
        count = sum(p.numel() for n, p in distiller.trainable_parameters(stages[0]) if n.startswith("student."))
        if progress:
            print(f"[stages] {i + 1}/{len(plan)} {spec.name}: {method.spec.name} "
                  f"({', '.join(s.name for s in stages)}), {count / 1e6:.2f}M student parameters trainable",
                  flush=True)
        result = distiller.fit(stages, dev=dev, resume=folders[i] is not None)
        outcomes.append(StageOutcome(spec.name, method.spec.name, result, count))
        if folders[i] is not None and distiller.backend.is_main:
            torch.save(student.state_dict(), folders[i] / "student.pt")
            write_json(folders[i] / "done.json", {**outcomes[-1].summary(), **stamp(stage_identity(i))})
            (folders[i] / "checkpoint.pt").unlink(missing_ok=True)
            for earlier in folders[:i]:  # only the latest finished stage's weights are needed to resume
                (earlier / "student.pt").unlink(missing_ok=True)
    return outcomes
