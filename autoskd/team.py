"""Teacher teams: a YAML spec (:class:`TeamSpec`) and the Python object (:class:`TeacherTeam`).

A team is one student spec and a list of teachers. ``TeacherTeam.build(task)`` fine-tunes every
teacher given as a spec on the task's full training set (through the engine's one training loop,
method ``finetune``), evaluates it on ``dev``, and caches the result under
``<cache_dir>/<teacher>-<hash12>``. The hash covers everything the weights depend on (the
teacher's spec, the training and dev data, ``max_length``, the seed and the tokenizer), so a
rerun reuses the cache and a changed spec rebuilds only the teachers it changed.

The default team (``teams/minilm-ladder.yaml``) cuts teachers of 1, 2, 3, 4 and 6 layers out of
all-MiniLM-L6-v2 for a 2-layer student, so the team holds members weaker and stronger than the
student (AutoSKDBERT, appendix A)::

    name: minilm-ladder
    student: {source: minilm-l6, layers: 2, init: pretrained}
    teachers:
      - {name: minilm-L1, source: minilm-l6, layers: 1, finetune: {epochs: 3, lr: 1e-4}}
      ...
    max_length: 64
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .errors import AutoSKDError
from .models.lazy import LazyModel, LazyModels, meta_skeleton
from .team_spec import FinetuneSettings, ModelSpec, TeamSpec, _integer, _sha256, bundled_teams  # noqa: F401  (re-exported)
from .models.loading import (
    _check_layers,
    config_num_layers,
    count_layers,
    count_parameters,
    hidden_size,
    init_from_teacher,
    load_classifier,
    load_config,
    load_tokenizer,
    num_labels_of,
    resolve_source,
    save_student,
    truncate_layers,
)

DEFAULT_CACHE_DIR = Path(".cache/autoskd/teachers")
#: Sentence whose token ids must agree between team members' tokenizers.
PROBE_SENTENCE = "The film's unexpectedly moving finale, 2 hours in, won over 97% of critics!"


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "teacher"


def _first_param_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _load_frozen(path: str, num_labels: int) -> nn.Module:
    return _freeze(load_classifier(path, num_labels=num_labels))


def _set_label_names(model: nn.Module, label_names: list[str]) -> None:
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "num_labels", None) == len(label_names):
        config.id2label = dict(enumerate(label_names))
        config.label2id = {n: i for i, n in enumerate(label_names)}


# ----------------------------------------------------------------------------------------------
# The team


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
    of the weights, for the teacher-output cache; absent for given modules), ``cache_dirs``.
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
        self.teachers: LazyModels = LazyModels()  # name -> module; cached ones load on first access
        self.dev_accuracy: dict[str, float] = {}
        self.status: dict[str, str] = {}
        self.fingerprints: dict[str, str] = {}
        self.cache_dirs: dict[str, Path] = {}
        self._table: list[tuple] = []
        for key, member in self.teacher_specs.items():
            if isinstance(member, nn.Module):
                self.teachers[key] = _freeze(member)
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

    # ------------------------------------------------------------------ basics
    @property
    def names(self) -> list[str]:
        return list(self.teacher_specs)

    @property
    def tokenizer(self):
        """The tokenizer every member shares (explicit, else the student's, else a teacher's)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self._tokenizer_reference())
        return self._tokenizer

    def _tokenizer_reference(self) -> Any:
        if self._tokenizer_source is not None:
            return self._tokenizer_source
        if isinstance(self.student_spec, ModelSpec) and self.student_spec.source:
            return self.student_spec.source
        for member in self.teacher_specs.values():
            if isinstance(member, ModelSpec) and member.source:
                return member.source
        raise AutoSKDError("no tokenizer: every team member is an nn.Module; pass tokenizer=<tokenizer, "
                           "local folder or hub id> to TeacherTeam")

    def _tokenizer_fingerprint(self) -> dict:
        tok = self.tokenizer
        return {"vocab": len(tok), "probe": list(tok(PROBE_SENTENCE)["input_ids"])}

    def cache_key(self, name: str, task, seed: int = 0) -> str:
        """Hash of everything teacher ``name``'s fine-tuned weights depend on."""
        spec = self.teacher_specs[name]
        if not isinstance(spec, ModelSpec):
            raise AutoSKDError(f"teacher '{name}' is a given nn.Module and is not built or cached")
        return _sha256({"version": 1, "teacher": spec.to_dict(), "spec_hash": spec.spec_hash(),
                        "train": task.fingerprint("train_full"), "dev": task.fingerprint("dev"),
                        "num_labels": task.num_labels, "max_length": self.max_length, "seed": seed,
                        "tokenizer": self._tokenizer_fingerprint()})

    # ------------------------------------------------------------------ validation
    def validate(self, task) -> None:
        """Raise :class:`AutoSKDError` for team input that cannot work on ``task``: members whose
        tokenizers differ from the team's, given modules with the wrong label count, ``layers``
        a model does not have, a truncated-teacher student that does not fit its teacher."""
        tok = self.tokenizer
        ref_vocab = len(tok)
        ref_ids = list(tok(PROBE_SENTENCE)["input_ids"])
        ref_source = self._tokenizer_reference()
        tokenizers: dict[str, Any] = {}
        configs: dict[str, Any] = {}

        def config_of(source: str):
            resolved = resolve_source(source)
            if resolved not in configs:
                configs[resolved] = load_config(source)
            return configs[resolved]

        members = [("student", "the student", self.student_spec)] if self.student_spec is not None else []
        members += [(n, f"teacher '{n}'", m) for n, m in self.teacher_specs.items()]
        for key, label, member in members:
            if isinstance(member, nn.Module):
                self._check_module(label, member, task, tok)
                continue
            if member is None:
                continue
            if member.source is not None:
                if not (isinstance(ref_source, str) and resolve_source(ref_source) == resolve_source(member.source)):
                    resolved = resolve_source(member.source)
                    if resolved not in tokenizers:
                        tokenizers[resolved] = load_tokenizer(member.source)
                    other = tokenizers[resolved]
                    vocab = len(other)
                    if vocab != ref_vocab or list(other(PROBE_SENTENCE)["input_ids"]) != ref_ids:
                        detail = (f"vocab {vocab} vs {ref_vocab}" if vocab != ref_vocab
                                  else "same vocab size but different token ids")
                        against = "the team's tokenizer" if self._tokenizer_source is not None else "the student"
                        raise AutoSKDError(f"{label} uses a different tokenizer ({detail}) than {against}; "
                                           "all team members must share one tokenizer")
                if member.layers is not None:
                    available = config_num_layers(config_of(member.source))
                    try:
                        _check_layers(available, member.layers)
                    except AutoSKDError as err:
                        raise AutoSKDError(f"{label}: {err}") from None
        student = self.student_spec
        if isinstance(student, ModelSpec) and student.init == "truncated-teacher":
            self._check_truncated_teacher(student, config_of)

    def _check_module(self, label: str, module: nn.Module, task, tok) -> None:
        expected = task.num_labels
        got = num_labels_of(module)
        if got is None:
            got = self._probe_num_labels(module, tok)
        if got is not None and got != expected:
            fix = ("fine-tune it on this task first, or pass a ModelSpec so autoskd fine-tunes it"
                   if label != "the student" else "build it with num_labels matching the task")
            raise AutoSKDError(f"{label} predicts {got} labels but task '{task.name}' has {expected}; {fix}")
        get = getattr(module, "get_input_embeddings", None)
        emb = None
        try:
            emb = get() if callable(get) else None
        except (NotImplementedError, AttributeError):
            emb = None
        if isinstance(emb, nn.Embedding) and emb.num_embeddings < len(tok):
            raise AutoSKDError(f"{label} has {emb.num_embeddings} token embeddings but the team tokenizer has "
                               f"{len(tok)} tokens; all team members must share one tokenizer")

    @staticmethod
    @torch.no_grad()
    def _probe_num_labels(module: nn.Module, tok) -> int | None:
        """Output width of a module without a config, from one forward on the probe sentence."""
        device = _first_param_device(module)
        batch = {k: v.to(device) for k, v in tok([PROBE_SENTENCE], return_tensors="pt").items()
                 if k in ("input_ids", "attention_mask", "token_type_ids")}
        was_training = module.training
        module.eval()
        try:
            try:
                out = module(**batch)
            except TypeError:
                batch.pop("token_type_ids", None)
                out = module(**batch)
        except Exception as err:  # a user's module we cannot call: report, don't guess
            raise AutoSKDError(f"cannot run {type(module).__name__} on a tokenised batch ({type(err).__name__}: "
                               f"{str(err).splitlines()[0][:120] if str(err) else ''}); its forward must accept "
                               "input_ids and attention_mask and return logits") from err
        finally:
            module.train(was_training)
        logits = out.logits if hasattr(out, "logits") else out
        if not torch.is_tensor(logits) or logits.dim() < 2:
            raise AutoSKDError(f"{type(module).__name__} must return logits [batch, labels] or an object "
                               "with .logits")
        return int(logits.shape[-1])

    def _check_truncated_teacher(self, student: ModelSpec, config_of) -> None:
        teacher = self.teacher_specs[student.teacher]
        if isinstance(teacher, nn.Module):
            t_layers = count_layers(teacher)
            t_width = hidden_size(teacher)
        else:
            cfg = config_of(teacher.source)
            t_layers = teacher.layers or config_num_layers(cfg)
            t_width = getattr(cfg, "hidden_size", None)
        if student.source is not None:
            cfg = config_of(student.source)
            s_width = getattr(cfg, "hidden_size", None)
            s_layers = student.layers or config_num_layers(cfg)
            if s_width is not None and t_width is not None and s_width != t_width:
                raise AutoSKDError(f"the student and teacher '{student.teacher}' widths differ ({s_width} vs "
                                   f"{t_width}); truncated-teacher init needs equal widths, use init: pretrained")
        else:
            s_layers = student.layers or t_layers
        if t_layers is not None and s_layers is not None and s_layers > t_layers:
            raise AutoSKDError(f"the student has {s_layers} layers but its teacher '{student.teacher}' only "
                               f"{t_layers}; truncated-teacher init needs a teacher at least as deep")

    # ------------------------------------------------------------------ build
    def build(self, task, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR, seed: int = 0, progress: bool = True,
              force: bool = False) -> "TeacherTeam":
        """Fine-tune (or load from cache) every spec teacher; evaluate every teacher on ``dev``.

        With ``progress`` it prints one line per teacher, the engine's progress bars, and the
        table (teacher, layers, params, dev acc, built/cached/given; also ``summary()``).
        """
        from .data.collate import make_loader, tokenize_split

        self.validate(task)
        cache_dir = Path(cache_dir)
        tok = self.tokenizer
        train_tok = None
        dev_tok = tokenize_split(task.split("dev"), tok, self.max_length)
        rows = []
        for index, (name, member) in enumerate(self.teacher_specs.items(), 1):
            if isinstance(member, nn.Module):
                model = _freeze(member)
                from .engine.trainer import evaluate

                loader = make_loader(dev_tok, tok, batch_size=64, shuffle=False)
                self.dev_accuracy[name] = evaluate(model, loader, _first_param_device(model))["accuracy"]
                self.teachers[name] = model
                self.status[name] = "given"
                self.fingerprints.pop(name, None)
            else:
                key = self.cache_key(name, task, seed)
                entry = cache_dir / f"{_safe_name(name)}-{key[:12]}"
                self.cache_dirs[name] = entry
                meta = self._read_meta(entry, key) if not force else None
                if meta is not None:
                    if progress:
                        print(f"[team] teacher {name} ({index}/{len(self.teacher_specs)}): cached at {entry}", flush=True)
                    # loaded on first use: a trial that reads cached logits never needs the weights
                    model = LazyModel(partial(_load_frozen, str(entry), task.num_labels),
                                      partial(meta_skeleton, str(entry)))
                    self.status[name] = "cached"
                else:
                    if train_tok is None:
                        train_tok = tokenize_split(task.split("train_full"), tok, self.max_length)
                    if progress:
                        print(f"[team] teacher {name} ({index}/{len(self.teacher_specs)}): fine-tuning "
                              f"({member.finetune.epochs:g} epochs, lr {member.finetune.lr:g})", flush=True)
                    model, meta = self._finetune(name, member, key, entry, task, train_tok, dev_tok, seed,
                                                 progress, force)
                    self.status[name] = "built"
                self.dev_accuracy[name] = float(meta["dev_accuracy"])
                self.fingerprints[name] = meta["weights_id"]
                self.teachers[name] = model if isinstance(model, LazyModel) else _freeze(model)
            if self.teachers.loaded(name):
                model = self.teachers[name]
                layers, params = _safe(lambda: count_layers(model)), count_parameters(model)
            else:
                layers, params = meta.get("layers"), meta.get("parameters", 0)
            rows.append((name, layers, params, self.dev_accuracy[name], self.status[name]))
        self._table = rows
        if progress:
            print(self.summary(), flush=True)
        return self

    @staticmethod
    def _read_meta(entry: Path, key: str) -> dict | None:
        meta_file = entry / "meta.json"
        if not meta_file.is_file():
            return None
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return meta if meta.get("hash") == key and "weights_id" in meta else None

    def _finetune(self, name: str, spec: ModelSpec, key: str, entry: Path, task, train_tok, dev_tok, seed: int,
                  progress: bool, force: bool) -> tuple[nn.Module, dict]:
        from .data.collate import TokenizedSplit, make_loader
        from .engine.trainer import Distiller, Stage, evaluate

        s = spec.finetune
        partial = entry.with_name(entry.name + ".partial")
        if force:
            shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True, exist_ok=True)
        data = train_tok
        if s.max_train_examples is not None and s.max_train_examples < len(train_tok):
            gen = torch.Generator().manual_seed(seed)
            keep = sorted(torch.randperm(len(train_tok), generator=gen)[: s.max_train_examples].tolist())
            data = TokenizedSplit({k: [v[i] for i in keep] for k, v in train_tok.columns.items()})
        train_loader = make_loader(data, self.tokenizer, batch_size=s.batch_size, shuffle=True, seed=seed)
        dev_loader = make_loader(dev_tok, self.tokenizer, batch_size=max(64, s.batch_size), shuffle=False)
        model = load_classifier(spec.source, num_labels=task.num_labels, layers=spec.layers, init=spec.init, seed=seed)
        _set_label_names(model, list(task.label_names))
        start = time.time()
        result = Distiller(student=model, method="finetune", teachers=None, out_dir=partial / "run", seed=seed,
                           progress=progress).fit(
            stages=[Stage(name="finetune", train=train_loader, epochs=s.epochs, lr=s.lr,
                          warmup_ratio=s.warmup_ratio, weight_decay=s.weight_decay)],
            dev=dev_loader, resume=True)
        dev_acc = result.best_dev_acc
        if dev_acc is None:
            dev_acc = evaluate(model, dev_loader, _first_param_device(model))["accuracy"]
        model = model.cpu()
        (partial / "run" / "checkpoint.pt").unlink(missing_ok=True)  # optimizer state: not needed once done
        save_student(model, self.tokenizer, partial, label_names=list(task.label_names))
        meta = {"name": name, "hash": key, "weights_id": _sha256({"hash": key, "built": time.time_ns()}),
                "dev_accuracy": float(dev_acc), "final_dev_accuracy": result.final_dev_acc,
                "spec": spec.to_dict(), "layers": _safe(lambda: count_layers(model)),
                "parameters": count_parameters(model), "task": task.name,
                "train_fingerprint": task.fingerprint("train_full"), "dev_fingerprint": task.fingerprint("dev"),
                "max_length": self.max_length, "seed": seed, "seconds": round(time.time() - start, 2),
                "history": result.history}
        (partial / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        if entry.exists():
            shutil.rmtree(entry)
        partial.rename(entry)
        return model, meta

    def summary(self) -> str:
        """The teacher table printed by ``build``."""
        rows = getattr(self, "_table", None)
        if not rows:
            return f"team {self.name}: not built"
        header = ("teacher", "layers", "params", "dev acc", "status")
        lines = [(n, "?" if l is None else str(l), f"{p / 1e6:.1f}M", f"{a:.4f}", s) for n, l, p, a, s in rows]
        widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(header)]
        fmt = "  ".join(f"{{:{'<' if i in (0, 4) else '>'}{w}}}" for i, w in enumerate(widths))
        out = [f"team {self.name}", fmt.format(*header), fmt.format(*("-" * w for w in widths))]
        out += [fmt.format(*r) for r in lines]
        return "\n".join(out)

    # ------------------------------------------------------------------ the student
    def build_student(self, task, seed: int = 0) -> nn.Module:
        """A fresh student per the team's student spec (trainable, train mode).

        ``pretrained``/``random`` load from the student's source; ``truncated-teacher`` copies the
        built teacher named by the spec (call ``build`` first). A student given as an
        ``nn.Module`` is deep-copied, so every call starts from the same weights.
        """
        spec = self.student_spec
        if spec is None:
            raise AutoSKDError("the team has no student; pass student=<ModelSpec, source or nn.Module>")
        if isinstance(spec, nn.Module):
            model = copy.deepcopy(spec)
        elif spec.init == "truncated-teacher":
            teacher = self.teachers.get(spec.teacher)
            if teacher is None:
                raise AutoSKDError(f"the student copies teacher '{spec.teacher}', which is not built yet; "
                                   "call team.build(task) first")
            if spec.source is None:
                model = copy.deepcopy(teacher)
                if spec.layers is not None:
                    truncate_layers(model, spec.layers)
            else:
                model = load_classifier(spec.source, num_labels=task.num_labels, layers=spec.layers,
                                        init="random", seed=seed)
                init_from_teacher(model, teacher)
        else:
            model = load_classifier(spec.source, num_labels=task.num_labels, layers=spec.layers, init=spec.init,
                                    seed=seed)
        got = num_labels_of(model)
        if got is not None and got != task.num_labels:
            raise AutoSKDError(f"the student predicts {got} labels but task '{task.name}' has {task.num_labels}; "
                               "build it with num_labels matching the task")
        _set_label_names(model, list(task.label_names))
        model.train()
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def save_student(self, model: nn.Module, out_dir: str | os.PathLike, task=None) -> Path:
        """Save a trained student with the team tokenizer (reloads with plain transformers)."""
        return save_student(model, self.tokenizer, out_dir, label_names=list(task.label_names) if task else None)

    def __repr__(self) -> str:
        return f"TeacherTeam(name={self.name!r}, teachers={self.names})"


def _safe(fn):
    try:
        return fn()
    except AutoSKDError:
        return None
