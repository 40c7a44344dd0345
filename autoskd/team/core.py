"""The :class:`TeacherTeam` object: one student spec and named teachers, built for a task.

``TeacherTeam.build(task)`` validates the team (:mod:`.validation`), fine-tunes every teacher
given as a spec on the task's full training set (:mod:`.finetune`, the engine's one loop,
method ``finetune``) or reads it from the cache (:mod:`.cache`), scores it on ``dev``
(:mod:`.evaluation`) and prints the table (:mod:`.report`). ``build_student`` makes the
student (:mod:`.student`). This module only holds the team's state and orders those steps.
"""

from __future__ import annotations

import os
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from ..errors import AutoSKDError
from ..models.lazy import LazyModel, LazyModels, meta_skeleton
from ..models.loading import count_layers, count_parameters, freeze, load_tokenizer, save_student
from .cache import DEFAULT_CACHE_DIR, entry_dir, load_frozen, read_meta, teacher_cache_key
from .evaluation import dev_accuracy
from .finetune import finetune_teacher
from .probe import tokenizer_difference, tokenizer_fingerprint
from .report import majority_rate, safe, team_table, uninformative_teachers, uninformative_warning
from .spec import ModelSpec, TeamSpec, _integer
from .student import build_student
from .validation import validate_team

Member = ModelSpec | nn.Module


class TeacherTeam:
    """A student spec and named teachers; ``build(task)`` makes the fine-tuned, frozen teachers.

    Build one from a :class:`TeamSpec` (``TeacherTeam(TeamSpec.from_yaml(...))`` or
    ``TeacherTeam.from_yaml(...)``) or directly::

        TeacherTeam(student=ModelSpec("minilm-l6", layers=2),
                    teachers={"big": "minilm-l6", "mine": my_finetuned_module},
                    tokenizer="minilm-l6")

    A teacher given as an ``nn.Module`` is used as given (already trained on the task); it is
    only evaluated on ``dev``. After ``build``: ``teachers`` (name -> frozen module in eval mode; a
    cached teacher's weights are read on first access, see :mod:`autoskd.models.lazy`),
    ``dev_accuracy``, ``status`` (``built``/``cached``/``given``), ``fingerprints`` (name -> id
    of the weights, for the teacher-output cache; absent for given modules), ``cache_dirs``,
    and ``own_tokenizers`` (name -> tokenizer, for teachers that tokenise the text themselves).
    """

    def __init__(self, spec: TeamSpec | None = None, *, student: Member | str | None = None,
                 teachers: Mapping[str, Member | str] | None = None, tokenizer: Any = None,
                 max_length: int | None = None, name: str | None = None):
        if spec is not None:
            if not isinstance(spec, TeamSpec):
                raise AutoSKDError(f"TeacherTeam(spec) takes a TeamSpec, got {type(spec).__name__}; "
                                   "use TeacherTeam.from_yaml(path) for a file")
            if student is not None or teachers is not None:
                raise AutoSKDError("pass either a TeamSpec or student=/teachers=, not both")
            student = spec.student
            teachers = {t.name: t for t in spec.teachers}
            tokenizer = tokenizer if tokenizer is not None else spec.tokenizer
            max_length = max_length if max_length is not None else spec.max_length
            name = name or spec.name
        if not teachers:
            raise AutoSKDError("a team needs at least one teacher; pass teachers={'name': <source or model>}")
        if not isinstance(teachers, Mapping):
            raise AutoSKDError("teachers must be a dict of name -> ModelSpec, source string or nn.Module")
        self.spec = spec
        self.name = name or "team"
        self.max_length = _integer(max_length if max_length is not None else 128, "max_length", minimum=2)
        self.student_spec: Member | None = self._member(student, "student", role="student") if student is not None else None
        self.teacher_specs: dict[str, Member] = {}
        for key, member in teachers.items():
            if not isinstance(key, str) or not key:
                raise AutoSKDError(f"teacher names must be non-empty strings (got {key!r})")
            self.teacher_specs[key] = self._member(member, f"teacher '{key}'", role="teacher", name=key)
        if isinstance(self.student_spec, ModelSpec) and self.student_spec.init == "truncated-teacher" \
                and self.student_spec.teacher not in self.teacher_specs:
            raise AutoSKDError(f"the student's teacher '{self.student_spec.teacher}' is not in the team "
                               f"(teachers: {', '.join(self.teacher_specs)})")
        self._tokenizer_source = tokenizer
        self._tokenizer = None
        self._teacher_tokenizers: dict[str, Any] = {}
        self.teachers: LazyModels = LazyModels()  # name -> module; cached ones load on first access
        self.dev_accuracy: dict[str, float] = {}
        self.uninformative: list[str] = []  # teachers no better than the majority class (set by build)
        self.status: dict[str, str] = {}
        self.fingerprints: dict[str, str] = {}
        self.cache_keys: dict[str, str] = {}  # name -> what a built teacher's weights depend on
        self.cache_dirs: dict[str, Path] = {}
        self._table: list[tuple] = []
        for key, member in self.teacher_specs.items():
            if isinstance(member, nn.Module):
                self.teachers[key] = freeze(member)
                self.status[key] = "given"

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "TeacherTeam":
        return cls(TeamSpec.from_yaml(path))

    @staticmethod
    def _member(member: Any, where: str, role: str, name: str | None = None) -> Member:
        if isinstance(member, nn.Module):
            return member
        if isinstance(member, (str, os.PathLike)):
            member = ModelSpec(source=str(member))
        elif isinstance(member, Mapping):
            member = ModelSpec.from_dict(member, where, role=role)
        if not isinstance(member, ModelSpec):
            raise AutoSKDError(f"{where} must be a ModelSpec, a source string or an nn.Module "
                               f"(got {type(member).__name__})")
        member = replace(member, finetune=replace(member.finetune))  # own copy
        if name is not None:
            member.name = name
        member.check(where, role=role)
        return member

    # ------------------------------------------------------------------ tokenizers
    @property
    def names(self) -> list[str]:
        return list(self.teacher_specs)

    @property
    def tokenizer(self):
        """The tokenizer the student and every shared-tokenizer teacher use (explicit, else the
        student's, else a teacher's)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self._tokenizer_reference())
        return self._tokenizer

    def _tokenizer_reference(self) -> Any:
        if self._tokenizer_source is not None:
            return self._tokenizer_source
        if isinstance(self.student_spec, ModelSpec) and self.student_spec.source:
            return self.student_spec.source
        for member in self.teacher_specs.values():
            if isinstance(member, ModelSpec) and member.source and member.tokenizer is None:
                return member.source
        raise AutoSKDError("no tokenizer: every team member is an nn.Module; pass tokenizer=<tokenizer, "
                           "local folder or hub id> to TeacherTeam")

    def _tokenizer_fingerprint(self) -> dict:
        return tokenizer_fingerprint(self.tokenizer)

    def teacher_tokenizer(self, name: str):
        """The tokenizer teacher ``name`` reads text with (its own, or the team's)."""
        spec = self.teacher_specs[name]
        source = spec.own_tokenizer_source if isinstance(spec, ModelSpec) else None
        if source is None:
            return self.tokenizer
        if name not in self._teacher_tokenizers:
            self._teacher_tokenizers[name] = load_tokenizer(source)
        return self._teacher_tokenizers[name]

    @property
    def own_tokenizers(self) -> dict[str, Any]:
        """name -> tokenizer of each teacher whose tokenizer differs from the team's."""
        out = {}
        for name, spec in self.teacher_specs.items():
            if isinstance(spec, ModelSpec) and spec.tokenizer is not None:
                tok = self.teacher_tokenizer(name)
                if tokenizer_difference(tok, self.tokenizer) is not None:
                    out[name] = tok
        return out

    def cache_key(self, name: str, task, seed: int = 0) -> str:
        """Hash of everything teacher ``name``'s fine-tuned weights depend on."""
        spec = self.teacher_specs[name]
        if not isinstance(spec, ModelSpec):
            raise AutoSKDError(f"teacher '{name}' is a given nn.Module and is not built or cached")
        return teacher_cache_key(spec, task, self.max_length, seed, self.teacher_tokenizer(name))

    def validate(self, task) -> None:
        """Raise :class:`AutoSKDError` for team input that cannot work on ``task`` (see
        :func:`autoskd.team.validation.validate_team`)."""
        validate_team(self, task)

    # ------------------------------------------------------------------ build
    def build(self, task, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR, seed: int = 0, progress: bool = True,
              force: bool = False) -> "TeacherTeam":
        """Fine-tune (or load from cache) every spec teacher; evaluate every teacher on ``dev``.

        With ``progress`` it prints one line per teacher, the engine's progress bars, and the
        table (teacher, layers, params, dev acc, built/cached/given; also ``summary()``).
        """
        from ..data.collate import tokenize_split

        self.validate(task)
        cache_dir = Path(cache_dir)
        tokenised: dict[int, dict] = {}  # id(tokenizer) -> {"train": ..., "dev": ...}

        def split(tok, which: str):
            cached = tokenised.setdefault(id(tok), {})
            if which not in cached:
                cached[which] = tokenize_split(task.split("train_full" if which == "train" else "dev"), tok,
                                               self.max_length)
            return cached[which]

        own = self.own_tokenizers
        rows = []
        for index, (name, member) in enumerate(self.teacher_specs.items(), 1):
            where = f"[team] teacher {name} ({index}/{len(self.teacher_specs)})"
            if isinstance(member, nn.Module):
                model = freeze(member)
                self.dev_accuracy[name] = dev_accuracy(model, split(self.tokenizer, "dev"), self.tokenizer)
                self.teachers[name] = model
                self.status[name] = "given"
                self.fingerprints.pop(name, None)
                self.cache_keys.pop(name, None)
            else:
                tok = self.teacher_tokenizer(name)
                key = self.cache_key(name, task, seed)
                entry = entry_dir(cache_dir, name, key)
                self.cache_dirs[name] = entry
                self.cache_keys[name] = key
                meta = read_meta(entry, key) if not force else None
                if progress and name in own:
                    print(f"{where}: own tokenizer (vocab {len(tok)}); logit-level methods only", flush=True)
                if meta is not None:
                    if progress:
                        print(f"{where}: cached at {entry}", flush=True)
                    # loaded on first use: a trial that reads cached logits never needs the weights
                    model = LazyModel(partial(load_frozen, str(entry), task.num_labels),
                                      partial(meta_skeleton, str(entry)))
                    self.status[name] = "cached"
                else:
                    if progress:
                        print(f"{where}: fine-tuning ({member.finetune.epochs:g} epochs, lr "
                              f"{member.finetune.lr:g})", flush=True)
                    model, meta = finetune_teacher(name, member, key, entry, task, split(tok, "train"),
                                                   split(tok, "dev"), tok, self.max_length, seed, progress, force)
                    self.status[name] = "built"
                self.dev_accuracy[name] = float(meta["dev_accuracy"])
                self.fingerprints[name] = meta["weights_id"]
                self.teachers[name] = model if isinstance(model, LazyModel) else freeze(model)
            if self.teachers.loaded(name):
                model = self.teachers[name]
                layers, params = safe(lambda: count_layers(model)), count_parameters(model)
            else:
                layers, params = meta.get("layers"), meta.get("parameters", 0)
            rows.append((name, layers, params, self.dev_accuracy[name], self.status[name]))
        self._table = rows
        majority = majority_rate(task.split("dev")["label"])
        self.uninformative = uninformative_teachers(self.dev_accuracy, majority)
        if progress:
            print(self.summary(), flush=True)
            if self.uninformative:
                print(uninformative_warning(self.uninformative, self.dev_accuracy, majority), flush=True)
        return self

    def identity(self) -> dict:
        """What the built team's outputs depend on, for the stamps of finished runs
        (:mod:`autoskd.rerun`): each teacher by its cache key (spec, source files, data, seed,
        tokenizer) or, given as a module, by its weights; the student spec (and its source's
        files) or weights; ``max_length`` and the tokenizer."""
        from ..engine.teacher_cache import model_fingerprint
        from ..models.lazy import model_entry
        from .cache import source_identity, tokenizer_identity

        teachers = {}
        for name in self.teachers:
            known = self.cache_keys.get(name) or self.fingerprints.get(name)
            if known is None:
                entry = model_entry(self.teachers, name)
                known = model_fingerprint(entry.get() if isinstance(entry, LazyModel) else entry)
            teachers[name] = known
        spec = self.student_spec
        if isinstance(spec, nn.Module):
            student = {"weights": model_fingerprint(spec)}
        elif isinstance(spec, ModelSpec):
            student = {"spec": spec.to_dict(), "source": source_identity(spec.source)}
        else:
            student = None
        return {"name": self.name, "max_length": self.max_length, "tokenizer": tokenizer_identity(self.tokenizer),
                "student": student, "teachers": teachers}

    def summary(self) -> str:
        """The teacher table printed by ``build``."""
        return team_table(self.name, getattr(self, "_table", None))

    # ------------------------------------------------------------------ the student
    def build_student(self, task, seed: int = 0) -> nn.Module:
        """A fresh student per the team's student spec (see :func:`autoskd.team.student.build_student`)."""
        return build_student(self, task, seed)

    def save_student(self, model: nn.Module, out_dir: str | os.PathLike, task=None) -> Path:
        """Save a trained student with the team tokenizer (reloads with plain transformers)."""
        return save_student(model, self.tokenizer, out_dir, label_names=list(task.label_names) if task else None)

    def __repr__(self) -> str:
        return f"TeacherTeam(name={self.name!r}, teachers={self.names})"
