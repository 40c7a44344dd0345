"""Preparing LM teachers that a team file describes as trained: healed cuts, domain copies.

A team of teachers that differ in size and quality can be made from one checkpoint: cut it to
fewer layers and *heal* the cut by distilling the full model into it for a few steps, or adapt a
copy to the corpus with plain LM training. A member with a ``train:`` mapping is built that way,
on the corpus's train split, by the one engine (:func:`~autoskd.lm.pipeline.distill_lm`), and
kept under ``<cache_dir>/lm_teachers/<name>-<hash>`` keyed by everything its weights depend on
(its spec, the settings, the data, the tokenizer, the seed, and the key of the teacher it learned
from), so a rerun reuses it and a changed spec rebuilds only that member.

    teachers:
      - {name: full, source: smollm2-135m}
      - {name: half, source: smollm2-135m, layers: 15,
         train: {method: kd, teacher: full, steps: 40, lr: 2.0e-4}}
      - {name: domain, source: smollm2-135m, train: {method: finetune, steps: 40, lr: 5.0e-5}}
      - {name: plots, source: smollm2-135m,
         train: {method: finetune, corpus: rotten_tomatoes_plots, steps: 40, lr: 1.0e-4}}

``corpus:`` trains a member on another corpus than the task's (a specialist of one genre, as a
user's code or chat model would be). Its train split is used minus every document the task holds
out (the task's val, dev and test), so a teacher never saw the text the student is selected and
scored on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import AutoSKDError

_TRAIN_KEYS = ("method", "teacher", "steps", "lr", "batch_size", "options", "corpus")


@dataclass
class TrainSettings:
    """How a member is trained before it teaches: ``method`` (``finetune`` or a decoder method
    that reads ``teacher``, another member built before it), ``steps`` at ``lr``."""

    method: str = "finetune"
    teacher: str | None = None
    steps: int = 40
    lr: float = 1e-4
    batch_size: int = 8
    options: dict = field(default_factory=dict)
    #: Train on this corpus (a source :func:`~autoskd.lm.data.load_corpus` reads) instead of the task's.
    corpus: str | None = None

    @classmethod
    def from_value(cls, value: Any, where: str) -> "TrainSettings":
        if not isinstance(value, Mapping):
            raise AutoSKDError(f"{where}.train must be a mapping such as {{method: kd, teacher: full, steps: 40}}")
        from .team import _unknown

        _unknown(value, _TRAIN_KEYS, f"{where}.train")
        out = cls(**{k: value[k] for k in value})
        if isinstance(out.steps, bool) or not isinstance(out.steps, int) or out.steps < 1:
            raise AutoSKDError(f"{where}.train.steps must be a whole number >= 1 (got {out.steps!r})")
        try:
            out.lr = float(out.lr)
        except (TypeError, ValueError):
            raise AutoSKDError(f"{where}.train.lr must be a number (got {out.lr!r})") from None
        if not out.lr > 0:
            raise AutoSKDError(f"{where}.train.lr must be > 0 (got {out.lr})")
        if isinstance(out.batch_size, bool) or not isinstance(out.batch_size, int) or out.batch_size < 1:
            raise AutoSKDError(f"{where}.train.batch_size must be a whole number >= 1 (got {out.batch_size!r})")
        if out.corpus is not None and (not isinstance(out.corpus, str) or not out.corpus.strip()):
            raise AutoSKDError(f"{where}.train.corpus must be a corpus name or path such as rotten_tomatoes_plots "
                               f"(got {out.corpus!r})")
        return out

    def to_dict(self) -> dict:
        out = asdict(self)
        if out["corpus"] is None:  # members without one keep the keys they were cached under
            del out["corpus"]
        return out


def member_corpus(settings: TrainSettings, task_corpus):
    """The corpus a member trains on: the task's, or ``settings.corpus`` split at seed 0 with the
    task's held-out documents (val, dev, test) removed from its train split."""
    if settings.corpus is None:
        return task_corpus
    from .data import LMCorpus, load_corpus

    own = load_corpus(settings.corpus.removeprefix("lm:").strip(), seed=0)
    held_out = {json.dumps(doc) for role in ("val", "dev", "test") for doc in task_corpus.split(role)}
    train = [doc for doc in own.split("train") if json.dumps(doc) not in held_out]
    if not train:
        raise AutoSKDError(f"train.corpus {settings.corpus} has no training document outside the task's held-out "
                           "splits; give the member a corpus of its own")
    return LMCorpus(own.name, {**own.splits, "train": train}, own.kind)


def member_key(member, settings: TrainSettings, corpus, tokenizer, block: int, seed: int,
               teacher_key: str | None) -> str:
    from .data import tokenizer_fingerprint

    payload = {"v": 1, "member": member.to_dict(), "train": settings.to_dict(), "data": corpus.fingerprint("train"),
               "tokenizer": tokenizer_fingerprint(tokenizer), "block": block, "seed": seed, "teacher": teacher_key}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def train_member(team, name: str, corpus, seed: int, cache_dir: Path, progress: bool = True):
    """Build member ``name`` (its ``train:`` settings) or read it from the cache; returns
    ``(model, key)``."""
    from .models import load_causal_lm
    from .pipeline import LMDistillConfig, distill_lm

    member = team.teacher_specs[name]
    settings = member.train
    teacher_key = None
    if settings.teacher is not None:
        if settings.teacher not in team.teacher_specs or settings.teacher == name:
            raise AutoSKDError(f"teacher '{name}' trains from '{settings.teacher}', which is not another member "
                               f"of the team ({', '.join(team.teacher_specs)})")
        teacher_key = team.fingerprints.get(settings.teacher)
        if teacher_key is None:
            raise AutoSKDError(f"teacher '{name}' trains from '{settings.teacher}': list '{settings.teacher}' "
                               "before it in the team file")
    corpus = member_corpus(settings, corpus)
    key = member_key(member, settings, corpus, team.tokenizer, team.max_length, seed, teacher_key)
    folder = Path(cache_dir) / "lm_teachers" / f"{name}-{key[:12]}"
    if (folder / "config.json").is_file():
        return load_causal_lm(str(folder)), key
    from .team import LMTeam

    source = {settings.teacher: team.teachers[settings.teacher]} if settings.teacher else {}
    sub = LMTeam(student=member.load(seed), teachers=source, tokenizer=team.tokenizer, max_length=team.max_length,
                 name=f"{team.name}:{name}")
    sub.teachers = dict(source)  # already built and frozen
    sub.fingerprints = {n: team.fingerprints[n] for n in source}
    config = LMDistillConfig(method=settings.method, method_options=dict(settings.options), epochs=1e9,
                             max_steps=settings.steps, lr=settings.lr, batch_size=settings.batch_size, seed=seed,
                             samples=0, agreement=False)
    outcome = distill_lm(sub, corpus, config, cache_dir=cache_dir, progress=progress)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    from .models import save_lm

    save_lm(outcome.student, team.tokenizer, tmp)
    (tmp / "built.json").write_text(json.dumps({"key": key, "scores": outcome.scores}, indent=2, default=str))
    try:
        os.replace(tmp, folder)
    except OSError:  # built by another process meanwhile: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return outcome.student, key
