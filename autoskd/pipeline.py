"""From (team, task, method) to a distilled student: the Python API behind ``autoskd distill``.

This module only wires things together: data -> loaders, team -> teacher policy, method
-> stages, then one :class:`~autoskd.engine.trainer.Distiller` run. Search candidates and
baselines call :func:`distill` too, with a different teacher policy.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .atomic import write_json
from .data.collate import make_loader, tokenize_split, unlabelled_split
from .data.tasks import TaskData, load_task
from .defaults import DEFAULT_BATCH_SIZE, DEFAULT_LR, DEFAULT_WARMUP_RATIO, DEFAULT_WEIGHT_DECAY
from .engine.methods import Method
from .engine.teachers import AverageTeachers, SampledTeacher, SingleTeacher, TeacherPolicy
from .engine.backends import parallel_options
from .engine.trainer import Distiller, Stage, TrainResult, evaluate
from .errors import AutoSKDError
from .methods import get_method
from .models.lazy import model_entry

DEFAULT_CACHE = Path(".cache/autoskd")


@dataclass
class DistillConfig:
    """Everything a distillation run needs besides the team and the data.

    ``teacher`` picks a team member (default: the best on dev); ``policy`` is ``single``,
    ``average`` (AvgKD) or ``sampled`` (draw a teacher from ``theta`` each step: AutoSKD, the sampled teacher's
    logits scaled as ``theta_scaling`` says, see :func:`~autoskd.engine.teachers.theta_logit_scale`).
    ``epochs`` apply to each of the method's stages; ``pretrain_epochs`` > 0 adds a
    pre-training-style stage on unlabelled text (the task's training texts by default).
    ``deepspeed`` (a DeepSpeed config dict or JSON/YAML path) trains under DeepSpeed ZeRO;
    ``tensor_parallel`` > 1 splits the teacher over that many ranks (README, "Scale").
    Multi-teacher methods ignore ``policy`` and read every member named in ``teachers``.
    """

    method: str = "kd"
    method_options: dict = field(default_factory=dict)
    teacher: str | None = None
    policy: str = "single"
    theta: list[float] | None = None
    theta_scaling: str = "theta"
    epochs: float = 3.0
    lr: float = DEFAULT_LR
    batch_size: int = DEFAULT_BATCH_SIZE
    warmup_ratio: float = DEFAULT_WARMUP_RATIO
    weight_decay: float = DEFAULT_WEIGHT_DECAY
    train_split: str = "train_full"
    seed: int = 0
    pretrain_epochs: float = 0.0
    max_length: int | None = None
    group_by_length: bool = False  # batch rows of similar length: less padding, faster epochs
    deepspeed: dict | str | None = None
    tensor_parallel: int = 1
    processes: int = 1  # a trial's worker-group size (Ray Train); a launcher sets it for distill
    #: Team members a multi-teacher method (tmkd, mt_bert, rl_kd, uncertainty, dgkd) reads
    #: (default: every teacher of the team).
    teachers: list[str] | None = None
    #: Steps of the MLM-head adaptation stage of each teacher whose word predictions are distilled.
    mlm_adapt_steps: int = 100
    mlm_probability: float = 0.15

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DistillOutcome:
    student: nn.Module
    tokenizer: Any
    dev_acc: float
    test_acc: float
    result: TrainResult
    out_dir: Path | None
    teacher_counts: dict[str, int] | None = None
    test_predictions: list[int] | None = None
    eval_seconds: float = 0.0  # the final scoring after training (test, and dev when fit did not)

    def summary(self) -> dict:
        return {"dev_acc": self.dev_acc, "test_acc": self.test_acc, "best_dev_acc": self.result.best_dev_acc,
                "steps": self.result.steps, "seconds": round(self.result.seconds, 2),
                "teacher_counts": self.teacher_counts}


@dataclass
class Loaders:
    train: DataLoader
    dev: DataLoader
    test: DataLoader
    train_id: str


def data_id(task: TaskData, split: str, tokenizer, max_length: int) -> str:
    """What keys a split's cached teacher outputs: its rows (in order), the truncation length and
    the tokenizer that cut them (vocabulary, probe ids, truncation and padding sides)."""
    from .rerun import fingerprint
    from .team.cache import tokenizer_identity

    return f"{task.fingerprint(split)}-L{max_length}-tok{fingerprint(tokenizer_identity(tokenizer))[:16]}"


def make_loaders(task: TaskData, tokenizer, max_length: int, batch_size: int, seed: int,
                 train_split: str = "train_full", group_by_length: bool = False) -> Loaders:
    """Tokenised, dynamically padded loaders; ``train_id`` keys the teacher-output cache
    (:func:`data_id`). ``group_by_length`` batches training rows of similar length together
    (less padding)."""
    def tok(split):
        return tokenize_split(task.split(split), tokenizer, max_length)

    train_id = data_id(task, train_split, tokenizer, max_length)
    return Loaders(train=make_loader(tok(train_split), tokenizer, batch_size, shuffle=True, seed=seed,
                                     group_by_length=group_by_length),
                   dev=make_loader(tok("dev"), tokenizer, batch_size * 2, shuffle=False),
                   test=make_loader(tok("test"), tokenizer, batch_size * 2, shuffle=False),
                   train_id=train_id)


def build_policy(team, config: DistillConfig, method: Method | None = None) -> TeacherPolicy | None:
    """The teacher policy a config asks for, over the built team's frozen teachers."""
    from .engine.multi_teacher import AllTeachers, MultiTeacherMethod

    method = method or get_method(config.method, **config.method_options)
    if not method.spec.needs_teacher:
        return None
    if not getattr(team, "teachers", None):
        raise AutoSKDError("the team has no built teachers; call team.build(task) first")
    from .engine.own_tokenizer import OwnTokenizerTeacher, check_logit_level, team_teacher

    fps = getattr(team, "fingerprints", {}) or {}
    teachers = {name: team_teacher(team, name, model_entry(team.teachers, name), fps.get(name), config.max_length)
                for name in team.teachers}
    own = [n for n, t in teachers.items() if isinstance(t, OwnTokenizerTeacher)]
    if isinstance(method, MultiTeacherMethod) or getattr(method, "multi", False):
        names = config.teachers or list(teachers)
        unknown = [n for n in names if n not in teachers]
        if unknown:
            raise AutoSKDError(f"teacher {unknown[0]!r} is not in the team; choose from: {', '.join(teachers)}")
        check_logit_level(method, [n for n in own if n in names])
        return AllTeachers({n: teachers[n] for n in names})
    if config.policy == "single":
        name = config.teacher or max(team.dev_accuracy, key=team.dev_accuracy.get)
        if name not in teachers:
            raise AutoSKDError(f"teacher {name!r} is not in the team; choose one of: {', '.join(teachers)}")
        check_logit_level(method, [n for n in own if n == name])
        return SingleTeacher(teachers[name])
    check_logit_level(method, own)
    if config.policy == "average":
        return AverageTeachers(teachers)
    if config.policy == "sampled":
        if config.theta is None:
            raise AutoSKDError("policy 'sampled' needs theta (one weight per teacher)")
        theta = torch.tensor(config.theta, dtype=torch.float64)
        if len(theta) != len(teachers) or (theta < 0).any() or float(theta.sum()) <= 0:
            raise AutoSKDError(f"theta must have {len(teachers)} non-negative weights with a positive sum; got {config.theta}")
        return SampledTeacher(teachers, theta / theta.sum(), seed=config.seed, scaling=config.theta_scaling)
    raise AutoSKDError(f"unknown teacher policy {config.policy!r}; choose single, average or sampled")


def method_stages(method: Method, config: DistillConfig, loaders: Loaders,
                  unlabelled: DataLoader | None, masked: dict[str, DataLoader] | None = None) -> list[Stage]:
    """The method's stages in order, after an optional pre-training stage on unlabelled text.

    A stage that trains on word predictions or the MLM loss reads MLM-masked batches
    (``masked["pretrain"]``: unlabelled text, ``masked["task"]``: the task's texts)."""
    masked = masked or {}
    names = [s for s in method.spec.stages if s != "pretrain"]
    common = dict(lr=config.lr, warmup_ratio=config.warmup_ratio, weight_decay=config.weight_decay)
    stages = []
    if config.pretrain_epochs > 0:
        data = masked.get("pretrain", unlabelled) if method.masked_stage("pretrain") else unlabelled
        stages.append(Stage("pretrain", data, epochs=config.pretrain_epochs, evaluate=False,
                            data_id=None, **common))
    for name in names:
        if method.masked_stage(name):  # word-level stage on the task's texts: no cached logits, no dev
            stages.append(Stage(name, masked["task"], epochs=config.epochs, data_id=None, evaluate=False, **common))
        else:
            stages.append(Stage(name, loaders.train, epochs=config.epochs, data_id=loaders.train_id, **common))
    return stages


def mlm_loaders(method: Method, config: DistillConfig, task: TaskData, tokenizer, max_length: int) -> dict:
    """MLM-masked loaders for the stages that need them (unlabelled pre-training, task texts)."""
    from .engine.mlm import mlm_loader

    names = list(method.spec.stages) + (["pretrain"] if config.pretrain_epochs > 0 else [])
    if not any(method.masked_stage(n) for n in names):
        return {}
    texts = tokenize_split(unlabelled_split(task.split(config.train_split)), tokenizer, max_length)
    loader = mlm_loader(texts, tokenizer, config.batch_size, seed=config.seed, mlm_probability=config.mlm_probability)
    return {"pretrain": loader, "task": loader}


def prepare_mlm_teachers(method: Method, policy: TeacherPolicy | None, loader: DataLoader | None,
                         config: DistillConfig, progress: bool = True) -> dict:
    """Run the MLM adaptation stage of every teacher whose word predictions the method reads
    (once per teacher model: the adapted head stays on it). Returns ``{teacher: MLM losses}``."""
    from .engine.mlm import adapt_teacher_mlm

    # any loss, not only those of the stages that run: the method checks its teachers' MLM heads
    # at set-up (DistilBERT without its pre-training stage still names word predictions)
    if policy is None or loader is None or not method.reads_teacher_mlm({loss.stage for loss in method.spec.losses}):
        return {}
    done = {}
    for name, model in policy.models.items():
        if getattr(model, "_autoskd_mlm_adapted", False):
            continue
        done[name] = adapt_teacher_mlm(model, loader, steps=config.mlm_adapt_steps, progress=progress, seed=config.seed)
        model._autoskd_mlm_adapted = True
    return done


def team_identity(team) -> dict:
    """What a built team's outputs depend on (:meth:`autoskd.team.TeacherTeam.identity`), for a
    finished run's stamp; a team-like object without it by its name and teachers."""
    if callable(getattr(team, "identity", None)):
        return team.identity()
    return {"name": getattr(team, "name", None), "teachers": sorted(getattr(team, "teachers", {}) or {})}


def run_identity(team, task: TaskData, config: DistillConfig, student: nn.Module | None = None) -> dict:
    """What a distillation computes from: its config, the team, the task's rows and the student
    it starts from (the team's spec, or the weights of one given as a module)."""
    from .engine.teacher_cache import model_fingerprint

    return {"config": config.to_dict(), "team": team_identity(team),
            "task": {split: task.fingerprint(split) for split in (config.train_split, "dev", "test")},
            "student": {"weights": model_fingerprint(student)} if student is not None else "team"}


def distill(team, task: TaskData | str, config: DistillConfig | None = None, *, out_dir: str | Path | None = None,
            cache_dir: str | Path = DEFAULT_CACHE, progress: bool = True, callbacks=(), student: nn.Module | None = None,
            loaders: Loaders | None = None, identity: dict | None = None) -> DistillOutcome:
    """Distil the team's student on ``task``; returns the trained student and its scores.

    ``team`` is a built :class:`~autoskd.team.TeacherTeam` (``team.build(task)`` first). With
    ``out_dir``, ``result.json`` records what the run was computed from (``identity``, default
    :func:`run_identity`) and its fingerprint (see :mod:`autoskd.rerun`).
    """
    config = config or DistillConfig()
    task = load_task(task, seed=config.seed) if isinstance(task, str) else task
    if out_dir is not None and identity is None:  # before training changes a given student
        identity = run_identity(team, task, config, student)
    method = get_method(config.method, **config.method_options)
    if method.spec.extra.get("decoder_only"):
        raise AutoSKDError(f"method {config.method!r} distils generative LMs; use an LM team and task "
                           "(--team teams/smollm2.yaml --task lm:rotten_tomatoes)")
    max_length = config.max_length or team.max_length
    loaders = loaders or make_loaders(task, team.tokenizer, max_length, config.batch_size, config.seed, config.train_split,
                                      config.group_by_length)
    unlabelled = None
    if config.pretrain_epochs > 0:
        texts = tokenize_split(unlabelled_split(task.split(config.train_split)), team.tokenizer, max_length)
        unlabelled = make_loader(texts, team.tokenizer, config.batch_size, shuffle=True, seed=config.seed)
    masked = mlm_loaders(method, config, task, team.tokenizer, max_length)
    student = student if student is not None else team.build_student(task, seed=config.seed)
    policy = build_policy(team, config, method)
    out_dir = Path(out_dir) if out_dir else None
    stages = method_stages(method, config, loaders, unlabelled, masked)
    prepare_mlm_teachers(method, policy, masked.get("pretrain"), config, progress)
    tokenizer = team.tokenizer
    if callable(getattr(method, "compress", None)) and policy is not None:  # GLMD's vocabulary compression
        teacher = next(iter(policy.models.values()))
        vocab = method.compress(student, team.tokenizer, teacher, (b["input_ids"] for b in loaders.train))
        if vocab is not None:
            from .methods.glmd_vocab import compress_tokenizer

            where = (out_dir or Path(cache_dir) / "glmd-vocab") / "tokenizer"
            tokenizer = compress_tokenizer(team.tokenizer, vocab, where)
            small = make_loaders(task, tokenizer, max_length, config.batch_size, config.seed, config.train_split)
            loaders = Loaders(train=loaders.train, dev=small.dev, test=small.test, train_id=loaders.train_id)
    distiller = Distiller(student, method, policy, out_dir=out_dir, seed=config.seed, progress=progress,
                          callbacks=callbacks, teacher_cache=Path(cache_dir) / "teacher_outputs",
                          checkpoint=out_dir is not None,
                          **parallel_options(config.deepspeed, config.tensor_parallel))
    result = distiller.fit(stages, dev=loaders.dev, resume=out_dir is not None)
    start = time.perf_counter()
    dev = result.student_dev_acc  # fit scored these very weights on dev already
    if dev is None:
        dev = evaluate(student, loaders.dev, distiller.device)["accuracy"]
    scored = evaluate(student, loaders.test, distiller.device, predictions=True)
    counts = dict(policy.counts) if isinstance(policy, SampledTeacher) else None
    outcome = DistillOutcome(student, tokenizer, dev, scored["accuracy"], result, out_dir, counts,
                             scored["predictions"], eval_seconds=time.perf_counter() - start)
    if out_dir is not None and distiller.backend.is_main:  # one rank writes the student
        save_run(outcome, config, team, task, identity)
    distiller.backend.barrier()
    return outcome


def save_run(outcome: DistillOutcome, config: DistillConfig, team, task: TaskData,
             identity: dict | None = None) -> None:
    """The student (``save_pretrained``), its scores and the config that reproduces it;
    ``result.json`` carries ``identity``'s stamp (what the run was computed from)."""
    from .models.loading import save_student
    from .rerun import stamp

    from .engine.mlm import detach_mlm_head

    out = outcome.out_dir
    out.mkdir(parents=True, exist_ok=True)
    head = detach_mlm_head(outcome.student)  # the saved student is a plain sequence classifier
    save_student(outcome.student, outcome.tokenizer, out / "student", label_names=task.label_names)
    if head is not None:
        outcome.student.add_module("mlm_head", head)
    write_json(out / "result.json", {"task": task.name, **outcome.summary(), "history": outcome.result.history,
                                     **(stamp(identity) if identity is not None else {})})
    if outcome.test_predictions is not None:  # for paired tests between runs on the same test rows
        write_json(out / "predictions.json", {"test": outcome.test_predictions}, indent=None)
    write_json(out / "config.json", {"task": task.name, "team": getattr(team, "name", None), **config.to_dict()})
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():  # the run finished: the saved student supersedes the resume point
        ckpt.unlink()
    shutil.rmtree(out / "deepspeed", ignore_errors=True)  # DeepSpeed's part of that resume point
