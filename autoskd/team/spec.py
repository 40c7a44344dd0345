"""Teacher-team specs: the YAML file format, parsed into dataclasses with clear errors.

A team file names one student and a list of teachers, each with its source (hub id, local
folder or alias), the layers to keep, its initialisation and its fine-tuning settings. Every
mistake a user can make in the file (an unknown key, a missing teacher, a duplicate name, a
non-number learning rate) is one :class:`~autoskd.errors.AutoSKDError` naming the key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from ..defaults import DEFAULT_BATCH_SIZE, DEFAULT_LR, DEFAULT_WARMUP_RATIO, DEFAULT_WEIGHT_DECAY
from ..errors import AutoSKDError
from ..models.loading import INIT_CHOICES

#: Where ``TeamSpec.from_yaml("minilm-ladder")`` looks for bundled team files.
TEAMS_DIR = Path(__file__).resolve().parents[2] / "teams"
_TEACHER_INITS = ("pretrained", "random")


# ----------------------------------------------------------------------------------------------
# Specs


@dataclass
class FinetuneSettings:
    """How a teacher is fine-tuned on the task (one engine stage, method ``finetune``)."""

    epochs: float = 3
    lr: float = DEFAULT_LR
    batch_size: int = DEFAULT_BATCH_SIZE
    warmup_ratio: float = DEFAULT_WARMUP_RATIO
    weight_decay: float = DEFAULT_WEIGHT_DECAY
    max_train_examples: int | None = None

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "FinetuneSettings":
        if isinstance(data, FinetuneSettings):
            return data
        data = _mapping(data, where, cls)
        out = cls(**data)
        out.check(where)
        return out

    def check(self, where: str) -> None:
        self.epochs = _number(self.epochs, f"{where}.epochs", positive=True)
        self.lr = _number(self.lr, f"{where}.lr", positive=True)
        self.batch_size = _integer(self.batch_size, f"{where}.batch_size", minimum=1)
        self.warmup_ratio = _number(self.warmup_ratio, f"{where}.warmup_ratio")
        if not 0 <= self.warmup_ratio < 1:
            raise AutoSKDError(f"{where}.warmup_ratio must be in [0, 1) (got {self.warmup_ratio})")
        self.weight_decay = _number(self.weight_decay, f"{where}.weight_decay")
        if self.weight_decay < 0:
            raise AutoSKDError(f"{where}.weight_decay must be >= 0 (got {self.weight_decay})")
        if self.max_train_examples is not None:
            self.max_train_examples = _integer(self.max_train_examples, f"{where}.max_train_examples", minimum=1)


@dataclass
class ModelSpec:
    """A team member described as data: where its weights come from and how to cut/initialise it.

    ``source``: alias (``minilm-l6``), local folder or hub id. ``layers``: keep the first k
    encoder layers. ``init`` (students): ``pretrained``, ``random`` or ``truncated-teacher`` (copy
    the built teacher named by ``teacher``; ``source`` may then be omitted). ``finetune``: teacher
    fine-tuning settings (ignored for the student). ``tokenizer`` (teachers only): ``own`` (the
    tokenizer in the teacher's model folder) or a tokenizer source, for a teacher whose vocabulary
    differs from the student's; it then tokenises the text itself and serves logit-level methods
    only (:mod:`autoskd.engine.own_tokenizer`). Without it every member must share one tokenizer.
    """

    source: str | None = None
    layers: int | None = None
    init: str = "pretrained"
    name: str | None = None
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    teacher: str | None = None
    tokenizer: str | None = None

    def __post_init__(self):
        if isinstance(self.finetune, Mapping):
            self.finetune = FinetuneSettings.from_dict(self.finetune, "finetune")
        if self.source is not None and not isinstance(self.source, str):
            self.source = str(self.source)

    @classmethod
    def from_dict(cls, data: Any, where: str, finetune_defaults: Mapping | None = None,
                  role: str = "student") -> "ModelSpec":
        if isinstance(data, str):
            data = {"source": data}
        data = dict(_mapping(data, where, cls))
        finetune = dict(finetune_defaults or {})
        finetune.update(_mapping(data.pop("finetune", None) or {}, f"{where}.finetune", FinetuneSettings))
        spec = cls(finetune=FinetuneSettings.from_dict(finetune, f"{where}.finetune"), **data)
        spec.check(where, role=role)
        return spec

    def check(self, where: str, role: str = "student") -> None:
        if self.layers is not None:
            self.layers = _integer(self.layers, f"{where}.layers", minimum=1)
        allowed = INIT_CHOICES if role == "student" else _TEACHER_INITS
        if self.init not in allowed:
            raise AutoSKDError(f"{where}: unknown init '{self.init}'; use one of: {', '.join(allowed)}")
        if self.source is None and self.init != "truncated-teacher":
            raise AutoSKDError(f"{where} has no 'source'; give an alias (minilm-l6), a local folder or a hub id")
        if self.teacher is not None and self.init != "truncated-teacher":
            raise AutoSKDError(f"{where}: 'teacher: {self.teacher}' only applies with init: truncated-teacher; "
                               "drop it or set init: truncated-teacher")
        if self.init == "truncated-teacher" and not self.teacher:
            raise AutoSKDError(f"{where}: init: truncated-teacher needs 'teacher: <name>' naming a team teacher")
        if self.tokenizer is not None:
            if role == "student":
                raise AutoSKDError(f"{where}: the student uses the team's tokenizer; set 'tokenizer:' at the top "
                                   "of the team file instead")
            if not isinstance(self.tokenizer, str) or not self.tokenizer:
                raise AutoSKDError(f"{where}.tokenizer must be 'own' or a tokenizer source (got {self.tokenizer!r})")
            if self.source is None:
                raise AutoSKDError(f"{where}: a teacher with its own tokenizer needs a 'source'")
        self.finetune.check(f"{where}.finetune")

    @property
    def own_tokenizer_source(self) -> str | None:
        """Where this teacher's own tokenizer loads from (None: it shares the team's)."""
        if self.tokenizer is None:
            return None
        return self.source if self.tokenizer == "own" else self.tokenizer

    def to_dict(self) -> dict:
        out = asdict(self)
        if out["tokenizer"] is None:  # absent = shared: cache keys of such teams stay as they were
            del out["tokenizer"]
        return out

    def spec_hash(self) -> str:
        """sha256 of this spec's canonical JSON (sorted keys, no whitespace)."""
        return _sha256(self.to_dict())

    def default_name(self) -> str:
        base = Path(str(self.source)).name if self.source else "model"
        return f"{base}-L{self.layers}" if self.layers else base


@dataclass
class TeamSpec:
    """A team file: the student, the teachers, and the shared tokenisation settings."""

    name: str
    student: ModelSpec
    teachers: list[ModelSpec]
    max_length: int = 128
    tokenizer: str | None = None
    description: str = ""

    def __post_init__(self):
        self.check()

    def check(self, where: str = "team") -> None:
        if not self.teachers:
            raise AutoSKDError(f"{where} has no teachers; list at least one under 'teachers:'")
        self.max_length = _integer(self.max_length, f"{where}.max_length", minimum=2)
        self.student.check(f"{where}.student", role="student")
        seen: set[str] = set()
        for i, t in enumerate(self.teachers):
            if t.name is None:
                t.name = t.default_name()
            t.check(f"{where}.teachers[{i}] ({t.name})", role="teacher")
            if t.name in seen:
                raise AutoSKDError(f"{where} has two teachers named '{t.name}'; give each teacher a unique 'name'")
            seen.add(t.name)
        if self.student.init == "truncated-teacher" and self.student.teacher not in seen:
            raise AutoSKDError(f"{where}.student: teacher '{self.student.teacher}' is not in the team "
                               f"(teachers: {', '.join(t.name for t in self.teachers)})")

    @classmethod
    def from_dict(cls, data: Any, where: str = "team") -> "TeamSpec":
        data = dict(_mapping(data, where, cls, extra=("finetune",)))
        if "student" not in data:
            raise AutoSKDError(f"{where} has no 'student'; add e.g. student: {{source: minilm-l6, layers: 2}}")
        teachers_raw = data.pop("teachers", None)
        if not teachers_raw:
            raise AutoSKDError(f"{where} has no teachers; list at least one under 'teachers:'")
        if not isinstance(teachers_raw, list):
            raise AutoSKDError(f"{where}.teachers must be a list of teacher entries (got {type(teachers_raw).__name__})")
        defaults = _mapping(data.pop("finetune", None) or {}, f"{where}.finetune", FinetuneSettings)
        student = ModelSpec.from_dict(data.pop("student"), f"{where}.student")
        teachers = [ModelSpec.from_dict(t, f"{where}.teachers[{i}]", defaults, role="teacher")
                    for i, t in enumerate(teachers_raw)]
        data.setdefault("name", Path(where).stem)
        if data.get("description") is None:
            data["description"] = ""
        return cls(student=student, teachers=teachers, **data)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "TeamSpec":
        """Read a team file; a bare name (``minilm-ladder``) finds a bundled team under ``teams/``."""
        import yaml

        file = Path(path).expanduser()
        if not file.is_file():
            bundled = TEAMS_DIR / f"{path}.yaml"
            if os.sep not in str(path) and "/" not in str(path) and bundled.is_file():
                file = bundled
            else:
                names = ", ".join(bundled_teams()) or "none"
                raise AutoSKDError(f"team file '{path}' not found; pass a path to a YAML team file "
                                   f"(bundled teams: {names})")
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            line = str(err).replace("\n", " ")[:200]
            raise AutoSKDError(f"team file {file} is not valid YAML ({line}); fix the syntax") from err
        if data is None:
            raise AutoSKDError(f"team file {file} is empty; see teams/minilm-ladder.yaml for the format")
        return cls.from_dict(data, where=file.name)

    def to_dict(self) -> dict:
        return asdict(self)


def bundled_teams() -> list[str]:
    """Names of the team files shipped in ``teams/``."""
    return sorted(p.stem for p in TEAMS_DIR.glob("*.yaml")) if TEAMS_DIR.is_dir() else []


def _mapping(data: Any, where: str, cls: type, extra: tuple[str, ...] = ()) -> Mapping:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise AutoSKDError(f"{where} must be a mapping of keys to values (got {type(data).__name__}: {data!r})")
    allowed = [f.name for f in fields(cls)] + list(extra)
    for key in data:
        if key not in allowed:
            raise AutoSKDError(f"unknown key '{key}' in {where}; allowed keys: {', '.join(allowed)}")
    return data


def _number(value: Any, where: str, positive: bool = False) -> float:
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AutoSKDError(f"{where} must be a number (got {value!r})")
    if positive and value <= 0:
        raise AutoSKDError(f"{where} must be > 0 (got {value})")
    return float(value)


def _integer(value: Any, where: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise AutoSKDError(f"{where} must be a whole number (got {value!r})")
    if minimum is not None and value < minimum:
        raise AutoSKDError(f"{where} must be at least {minimum} (got {value})")
    return value


def _sha256(obj: Any) -> str:
    """Digest of a JSON-able object, independent of key order (cache keys, spec hashes)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()
