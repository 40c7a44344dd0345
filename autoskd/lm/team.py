"""A team of causal-LM teachers and one student, from a YAML file or Python objects.

An LM team file looks like::

    name: smollm2
    kind: lm
    max_length: 128            # tokens per training block
    tokenizer: smollm2-135m    # default: the student's source
    student: {source: smollm2-135m, layers: [0, 6, 12, 18, 24, 29]}
    teachers:
      - {name: full, source: smollm2-135m}
      - {name: half, source: smollm2-135m, layers: 15}

Unlike a classification team, LM teachers are used as they are (no fine-tuning on the task):
a pre-trained LM already predicts the next token. Every member must share the student's
tokenizer; a teacher whose vocabulary is smaller than the tokenizer's is refused at build time.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml
from torch import nn

from ..engine.teacher_cache import model_fingerprint
from ..errors import AutoSKDError
from ..models.loading import freeze
from .models import load_causal_lm, load_lm_tokenizer, weights_id

TEAMS_DIR = Path(__file__).resolve().parents[2] / "teams"
_TEAM_KEYS = ("name", "kind", "max_length", "tokenizer", "student", "teachers")
_MEMBER_KEYS = ("name", "source", "layers", "init", "config", "train", "tokenizer")


def _unknown(keys, allowed, where: str) -> None:
    for key in keys:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(allowed)}"
            raise AutoSKDError(f"{where}: unknown key '{key}'{hint}")


@dataclass
class LMMember:
    """Where a member's weights come from and how it is cut (``layers``: k or a list of indices)."""

    source: str
    layers: int | list[int] | None = None
    init: str = "pretrained"
    config: dict = field(default_factory=dict)
    name: str = ""
    #: Teachers only: train this member on the corpus before it teaches (:mod:`.teacher_prep`).
    train: Any = None
    #: Teachers only: ``own`` (the tokenizer beside the member's weights) or a tokenizer source, for a
    #: teacher whose vocabulary differs from the student's (:mod:`.cross_tokenizer`).
    tokenizer: str | None = None

    @classmethod
    def from_value(cls, value: Any, where: str) -> "LMMember":
        if isinstance(value, (str, os.PathLike)):
            return cls(source=str(value))
        if not isinstance(value, Mapping):
            raise AutoSKDError(f"{where} must be a source string or a mapping with 'source'")
        _unknown(value, _MEMBER_KEYS, where)
        if not value.get("source"):
            raise AutoSKDError(f"{where} needs 'source' (an alias such as smollm2-135m, a folder, a .gguf or a hub id)")
        layers = value.get("layers")
        if layers is not None and not (isinstance(layers, int) and not isinstance(layers, bool)
                                       or isinstance(layers, list) and all(isinstance(i, int) for i in layers)):
            raise AutoSKDError(f"{where}.layers must be a number of layers or a list of layer indices")
        init = value.get("init", "pretrained")
        if init not in ("pretrained", "random"):
            raise AutoSKDError(f"{where}.init must be pretrained or random (got {init!r})")
        config = value.get("config") or {}
        if not isinstance(config, Mapping):
            raise AutoSKDError(f"{where}.config must be a mapping of config overrides (e.g. hidden_size: 256)")
        train = None
        if value.get("train") is not None:
            from .teacher_prep import TrainSettings

            train = TrainSettings.from_value(value["train"], where)
        tokenizer = value.get("tokenizer")
        if tokenizer is not None and not isinstance(tokenizer, str):
            raise AutoSKDError(f"{where}.tokenizer must be 'own' or a tokenizer source")
        return cls(source=str(value["source"]), layers=layers, init=init, config=dict(config),
                   name=str(value.get("name", "")), train=train, tokenizer=tokenizer)

    def load(self, seed: int = 0) -> nn.Module:
        return load_causal_lm(self.source, layers=self.layers, init=self.init, seed=seed, config=self.config or None)

    def fingerprint(self, seed: int = 0) -> str:
        return weights_id(self.source, self.layers, self.init, seed, self.config)

    def to_dict(self) -> dict:
        return {"name": self.name, "source": self.source, "layers": self.layers, "init": self.init,
                "config": self.config, "train": self.train.to_dict() if self.train is not None else None,
                "tokenizer": self.tokenizer}


class LMTeam:
    """A student spec and named causal-LM teachers; ``build()`` loads and freezes the teachers."""

    kind = "lm"

    def __init__(self, *, student: LMMember | nn.Module | str, teachers: Mapping[str, LMMember | nn.Module | str],
                 tokenizer: Any = None, max_length: int = 128, name: str = "lm-team"):
        self.name = name  # no teachers: only methods without a teacher can run (finetune)
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise AutoSKDError(f"max_length must be a whole number >= 2 (got {max_length!r})")
        self.max_length = max_length
        self.student_spec = student if isinstance(student, (LMMember, nn.Module)) else LMMember.from_value(student, "student")
        self.teacher_specs = {}
        for key, member in teachers.items():
            member = member if isinstance(member, (LMMember, nn.Module)) else LMMember.from_value(member, f"teacher '{key}'")
            if isinstance(member, LMMember):
                member.name = key
            self.teacher_specs[key] = member
        self._tokenizer_source = tokenizer
        self._tokenizer = None
        self.teachers: dict[str, nn.Module] = {}
        self.fingerprints: dict[str, str] = {}
        #: name -> tokenizer, for teachers that read the text with their own tokenizer
        self.own_tokenizers: dict[str, Any] = {}

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "LMTeam":
        path = Path(path)
        if not path.exists() and (TEAMS_DIR / f"{path}.yaml").exists():
            path = TEAMS_DIR / f"{path}.yaml"
        if not path.is_file():
            raise AutoSKDError(f"team file '{path}' not found; pass a YAML file such as teams/smollm2.yaml")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise AutoSKDError(f"team file '{path}' is not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(data, Mapping):
            raise AutoSKDError(f"team file '{path}' must be a mapping with student and teachers")
        _unknown(data, _TEAM_KEYS, str(path))
        if data.get("kind", "lm") != "lm":
            raise AutoSKDError(f"team file '{path}' is a {data.get('kind')!r} team, not an LM team (kind: lm)")
        if "student" not in data or not data.get("teachers"):
            raise AutoSKDError(f"team file '{path}' needs a student and at least one teacher")
        teachers = {}
        for i, entry in enumerate(data["teachers"]):
            member = LMMember.from_value(entry, f"{path}: teachers[{i}]")
            name = member.name or f"teacher{i}"
            if name in teachers:
                raise AutoSKDError(f"{path}: two teachers are named '{name}'; give each a unique name")
            teachers[name] = member
        return cls(student=LMMember.from_value(data["student"], f"{path}: student"), teachers=teachers,
                   tokenizer=data.get("tokenizer"), max_length=data.get("max_length", 128),
                   name=str(data.get("name", path.stem)))

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            source = self._tokenizer_source
            if source is None:
                member = self.student_spec
                if not isinstance(member, LMMember):
                    raise AutoSKDError("a team whose student is an nn.Module needs tokenizer= (a source or object)")
                source = member.source
            from .data import ensure_pad_token

            self._tokenizer = ensure_pad_token(load_lm_tokenizer(source))
        return self._tokenizer

    def build(self, seed: int = 0, corpus=None, cache_dir: str | Path = ".cache/autoskd",
              progress: bool = True) -> "LMTeam":
        """Load and freeze every teacher, in file order (a member trained from another comes
        after it); members with ``train:`` are trained on ``corpus`` once and cached. Checks each
        teacher covers the tokenizer's vocabulary."""
        vocab = len(self.tokenizer)
        for name, member in self.teacher_specs.items():
            if name in self.teachers:
                continue
            trained_key = None
            if isinstance(member, LMMember) and member.train is not None:
                if corpus is None:
                    raise AutoSKDError(f"teacher '{name}' is trained on the corpus before it teaches; "
                                       "build the team with its corpus (team.build(seed, corpus=...))")
                from .teacher_prep import train_member

                model, trained_key = train_member(self, name, corpus, seed, Path(cache_dir), progress)
            else:
                model = member if isinstance(member, nn.Module) else member.load(seed)
            rows = model.get_output_embeddings().weight.shape[0] if hasattr(model, "get_output_embeddings") else None
            own = self._own_tokenizer(name, member)
            if own is not None:  # it reads the text with its own tokenizer: check against that one
                if rows is not None and rows < len(own):
                    raise AutoSKDError(f"teacher '{name}' predicts {rows} tokens but its tokenizer has {len(own)}; "
                                       "name the tokenizer it was trained with ('tokenizer:')")
                self.own_tokenizers[name] = own
            elif rows is not None and rows < vocab:
                raise AutoSKDError(f"teacher '{name}' predicts {rows} tokens but the tokenizer has {vocab}; "
                                   "use the tokenizer the teacher was trained with (team 'tokenizer:')")
            self.teachers[name] = freeze(model)
            self.fingerprints[name] = trained_key or (member.fingerprint(seed) if isinstance(member, LMMember)
                                                      else model_fingerprint(model))
        return self

    def _own_tokenizer(self, name: str, member):
        source = getattr(member, "tokenizer", None)
        if source is None:
            return None
        from .data import ensure_pad_token

        return ensure_pad_token(load_lm_tokenizer(member.source if source == "own" else source))

    def build_student(self, seed: int = 0) -> nn.Module:
        member = self.student_spec
        model = member if isinstance(member, nn.Module) else member.load(seed)
        rows = model.get_input_embeddings().weight.shape[0] if hasattr(model, "get_input_embeddings") else None
        if rows is not None and rows < len(self.tokenizer):
            raise AutoSKDError(f"the student embeds {rows} tokens but the tokenizer has {len(self.tokenizer)}; "
                               "use the student's own tokenizer (team 'tokenizer:')")
        return model

    def describe(self) -> dict:
        def one(m):
            return m.to_dict() if isinstance(m, LMMember) else {"module": type(m).__name__}
        return {"name": self.name, "kind": "lm", "max_length": self.max_length,
                "student": one(self.student_spec), "teachers": {n: one(m) for n, m in self.teacher_specs.items()}}
