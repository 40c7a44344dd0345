"""From (LM team, text corpus, method) to a distilled causal-LM student: ``autoskd distill`` on
decoders.

The same :class:`~autoskd.engine.trainer.Distiller` as for classifiers runs the training; this
module only supplies what a language-modelling task brings: token blocks with next-token
targets, a teacher served from a top-k cache, the method's decoder recipe
(:mod:`.recipes`), perplexity as the metric, and a report with agreement and samples.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..defaults import DEFAULT_LR
from ..engine.backends import parallel_options
from ..engine.teachers import THETA_SCALINGS, SingleTeacher, TeacherPolicy
from ..engine.trainer import Distiller, Stage, TrainResult
from ..errors import AutoSKDError
from .data import LMCorpus, load_corpus, lm_data_id, make_lm_loader, tokenize_lm_split
from .evaluate import evaluate_lm, greedy_samples, perplexity_metric, top1_agreement
from .models import save_lm
from .recipes import cross_tokenizer_method, decoder_method, lm_temperatures
from .team import LMTeam
from .teachers import AverageLMTeachers, LMTeacher, SampledLMTeachers
from .topk_cache import TopKCache
from .vocab import RemappedLoader, build_lm_vocab_map, compress_causal_lm, save_vocab_map

DEFAULT_CACHE = Path(".cache/autoskd")
PRECISIONS = ("fp32", "bf16", "fp16")


#: How the team teaches: ``single`` (one teacher), ``average`` (AvgKD: the mean of the teachers'
#: next-token distributions), ``sampled`` (each step one teacher drawn from Cat(θ)), ``mixture``
#: (every step the θ-weighted mixture of the distributions: AvgKD with weights θ, the target a
#: CR search trains its own student on).
POLICIES = ("single", "average", "sampled", "mixture")


@dataclass
class LMDistillConfig:
    """Settings of one LM distillation run besides the team and the corpus.

    ``epochs`` apply to each of the method's stages (GLMD and TinyBERT have two: halve it to
    compare at equal student steps). ``top_k`` tokens per position of the teacher are cached
    (0: run the teacher live every step). ``layout``: ``packed`` blocks of ``max_length``
    tokens, or ``padded`` documents. ``max_steps`` caps each stage (benchmarks at equal steps).
    ``deepspeed`` (a DeepSpeed config dict or JSON/YAML path) trains the student under ZeRO with
    the decoder teachers partitioned beside it under ZeRO-3; ``tensor_parallel`` > 1 splits the
    teacher over that many ranks (launch with ``torchrun``; docs/scale.md).
    """

    method: str = "kd"
    method_options: dict = field(default_factory=dict)
    teacher: str | None = None
    #: see :data:`POLICIES`; ``theta`` weighs the teachers of ``sampled`` and ``mixture``
    policy: str = "single"
    theta: list[float] | None = None
    #: SSWO's θ-scaling of the sampled teacher (``none``: plain sampled KD; see SampledLMTeachers)
    theta_scaling: str = "none"
    epochs: float = 1.0
    max_steps: int | None = None
    lr: float = DEFAULT_LR
    batch_size: int = 8
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    seed: int = 0
    max_length: int | None = None
    layout: str = "packed"
    top_k: int = 64
    precision: str = "fp32"
    samples: int = 3
    agreement: bool = True  # top-1 agreement with the teacher on test (one more teacher pass)
    deepspeed: dict | str | None = None
    tensor_parallel: int = 1

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        if self.precision not in PRECISIONS:
            raise AutoSKDError(f"--precision {self.precision!r} unknown; choose one of: {', '.join(PRECISIONS)}")
        if self.top_k < 0:
            raise AutoSKDError(f"top_k must be >= 0 (0 runs the teacher live); got {self.top_k}")
        if self.policy not in POLICIES:
            raise AutoSKDError(f"policy {self.policy!r} unknown; use single, average (AvgKD), sampled or mixture")
        if self.theta_scaling not in THETA_SCALINGS:
            raise AutoSKDError(f"theta_scaling {self.theta_scaling!r} unknown; choose one of: {', '.join(THETA_SCALINGS)}")
        if self.method == "on_policy" and (self.tensor_parallel > 1 or self._zero_stage() == 3):
            raise AutoSKDError("on_policy writes batches by generation, which stops at a different step on each rank; "
                               "under ZeRO-3 or a tensor-parallel teacher every rank must stop together. Run it in "
                               "one process or under ZeRO-1/2")
        if self.deepspeed is not None and self.precision != "fp32":
            raise AutoSKDError("--precision applies to one-process runs; under DeepSpeed set bf16 or fp16 in the "
                               "DeepSpeed config (\"bf16\": {\"enabled\": true}) and drop --precision")


    def _zero_stage(self) -> int | None:
        if self.deepspeed is None:
            return None
        from ..engine.deepspeed_backend import load_deepspeed_config, zero_stage

        return zero_stage(load_deepspeed_config(self.deepspeed))


@dataclass
class LMOutcome:
    student: nn.Module
    tokenizer: Any
    scores: dict
    result: TrainResult
    out_dir: Path | None
    samples: list = field(default_factory=list)

    def summary(self) -> dict:
        return {**self.scores, "steps": self.result.steps, "seconds": round(self.result.seconds, 2),
                "best_dev_ppl": self.result.best_score}


@dataclass
class LMLoaders:
    train: Any
    dev: Any
    val: Any
    test: Any
    train_id: str


def lm_loaders(corpus: LMCorpus, tokenizer, config: LMDistillConfig, block: int, train_split: str = "train",
               train_rows=None) -> LMLoaders:
    """Token rows of every split; ``train_id`` keys the teacher cache (data + tokenizer + layout)."""
    def rows(split):
        return tokenize_lm_split(corpus.split(split), tokenizer, block, layout=config.layout, kind=corpus.kind)

    train = train_rows if train_rows is not None else rows(train_split)
    if len(train) == 0:
        raise AutoSKDError(f"the {train_split} split gives no training rows of {block} tokens; use a larger corpus "
                           "or a smaller --max-length")
    eval_bs = config.batch_size * 2
    return LMLoaders(train=make_lm_loader(train, config.batch_size, shuffle=True, seed=config.seed),
                     dev=make_lm_loader(rows("dev"), eval_bs, shuffle=False),
                     val=make_lm_loader(rows("val"), eval_bs, shuffle=False),
                     test=make_lm_loader(rows("test"), eval_bs, shuffle=False),
                     train_id=lm_data_id(corpus, train_split, tokenizer, block, config.layout))


def lm_policy(team: LMTeam, config: LMDistillConfig, method, cache_dir: Path) -> TeacherPolicy | None:
    """Frozen LM teachers behind the policy the config names, each with its top-k cache plan."""
    if not method.spec.needs_teacher:
        return None
    if not team.teachers:
        raise AutoSKDError(f"method {method.spec.name!r} needs a teacher, but the team has none")
    temps = lm_temperatures(method)
    cache = TopKCache(Path(cache_dir) / "lm_topk")
    teachers = {}
    for name, model in team.teachers.items():
        own = team.own_tokenizers.get(name)
        if own is not None:  # reads the same text with its own tokenizer (aligned positions, uld_hybrid)
            from .cross_tokenizer import CrossTokenizerTeacher

            teachers[name] = CrossTokenizerTeacher(name, model, own, team.tokenizer, team.fingerprints.get(name),
                                                   top_k=config.top_k, temperatures=temps, cache=cache)
        else:
            teachers[name] = LMTeacher(name, model, team.fingerprints.get(name), top_k=config.top_k,
                                       temperatures=temps, cache=cache)
    if config.policy in ("average", "mixture") and team.own_tokenizers:
        raise AutoSKDError(f"policy {config.policy} mixes distributions over one vocabulary; teachers with their own "
                           "tokenizer cannot be mixed (use policy single or sampled)")
    if config.policy == "average":
        return AverageLMTeachers(teachers)
    if config.policy in ("sampled", "mixture"):
        theta = torch.tensor(config.theta or [1.0] * len(teachers), dtype=torch.float64)
        if len(theta) != len(teachers) or (theta < 0).any() or float(theta.sum()) <= 0:
            raise AutoSKDError(f"theta must have {len(teachers)} non-negative weights with a positive sum")
        policy = SampledLMTeachers(teachers, theta / theta.sum(), seed=config.seed, scaling=config.theta_scaling)
        policy.mixture = config.policy == "mixture"  # every step the θ-mixture, no draw
        return policy
    name = config.teacher or next(iter(teachers))
    if name not in teachers:
        raise AutoSKDError(f"teacher {name!r} is not in the team; choose one of: {', '.join(teachers)}")
    return SingleTeacher(teachers[name])


def method_stages(method, config: LMDistillConfig, loaders: LMLoaders) -> list[Stage]:
    common = dict(lr=config.lr, warmup_ratio=config.warmup_ratio, weight_decay=config.weight_decay,
                  epochs=config.epochs, data_id=loaders.train_id)
    if config.max_steps is not None:
        common["epochs"] = min(config.epochs, config.max_steps / max(1, len(loaders.train)))
    return [Stage(name, loaders.train, **common) for name in method.spec.stages]


def distill_lm(team: LMTeam, corpus: LMCorpus | str, config: LMDistillConfig | None = None, *,
               out_dir: str | Path | None = None, cache_dir: str | Path = DEFAULT_CACHE, progress: bool = True,
               callbacks=(), student: nn.Module | None = None, search=None) -> LMOutcome:
    """Distil ``team``'s student on ``corpus`` (a loaded :class:`LMCorpus` or a source string).

    ``search(policy, loaders, student)`` -> callbacks: the AutoSKD θ search's hook, called once
    the teacher policy and the token loaders exist (it learns the policy's θ on ``loaders.val``
    between the student's steps); its callbacks run after ``callbacks``."""
    config = config or LMDistillConfig()
    config.check()
    method = decoder_method(config.method, **config.method_options)  # refuses encoder-only methods now
    used = list(team.teacher_specs) if config.policy != "single" else \
        [config.teacher or next(iter(team.teacher_specs), None)]
    own = next((n for n in used if getattr(team.teacher_specs.get(n), "tokenizer", None)), None)
    if own is not None and method.spec.needs_teacher:
        method = cross_tokenizer_method(method, own)
    corpus = load_corpus(corpus, seed=config.seed) if isinstance(corpus, str) else corpus
    team.build(seed=config.seed, corpus=corpus, cache_dir=cache_dir, progress=progress)
    tokenizer = team.tokenizer
    block = config.max_length or team.max_length
    student = student if student is not None else team.build_student(seed=config.seed)
    policy = lm_policy(team, config, method, Path(cache_dir))
    train_rows = None
    if callable(getattr(method, "train_rows", None)):  # sequence-level KD trains on the teacher's text
        teacher = next(iter(policy.teachers.values()))
        train_rows = method.train_rows(corpus.split("train"), tokenizer, block, teacher, Path(cache_dir),
                                       progress=progress)
    loaders = lm_loaders(corpus, tokenizer, config, block, train_rows=train_rows)
    if train_rows is not None:
        loaders.train_id = f"{loaders.train_id}|{method.rows_id}"
    vocab = compress_vocabulary(method, student, policy, tokenizer, loaders)
    out_dir = Path(out_dir) if out_dir else None
    if search is not None:
        callbacks = [*callbacks, *search(policy, loaders, student)]
    distiller = Distiller(student, method, policy, out_dir=out_dir, seed=config.seed, progress=progress,
                          callbacks=callbacks, teacher_cache=None, checkpoint=out_dir is not None,
                          metric=perplexity_metric(), precision=config.precision,
                          **parallel_options(config.deepspeed, config.tensor_parallel))
    result = distiller.fit(method_stages(method, config, loaders), dev=loaders.dev, resume=out_dir is not None)
    agreement = config.agreement and vocab is None  # a compressed student predicts other ids
    outcome = LMOutcome(student, tokenizer, score_student(student, loaders, policy if agreement else None,
                                                          distiller.device, result), result, out_dir)
    if vocab is not None:
        outcome.scores["compressed_vocab_size"] = vocab.size
    if config.samples:
        prompts = [" ".join(doc.split()[:6]) if isinstance(doc, str) else doc[0]
                   for doc in corpus.split("test")[: config.samples]]
        outcome.samples = greedy_samples(student, tokenizer, prompts, device=distiller.device, vocab=vocab)
    # every rank scored and sampled the same whole student (the backend leaves plain modules after
    # fit); one rank writes it, and no rank returns before the files are there
    if out_dir is not None and distiller.backend.is_main:
        save_lm_run(outcome, config, team, corpus)
        if vocab is not None:
            save_vocab_map(vocab, out_dir / "student")
    distiller.backend.barrier()
    return outcome


def compress_vocabulary(method, student, policy, tokenizer, loaders: LMLoaders):
    """GLMD with ``vocab_alpha`` < 1: shrink the student's vocabulary to the corpus's most frequent
    tokens, slice the teachers' distributions to them, and let the student read remapped ids."""
    alpha = float(getattr(method, "options", {}).get("vocab_alpha", 1.0))
    if alpha >= 1.0 or policy is None:
        return None
    teacher = next(iter(policy.teachers.values()))
    vocab = build_lm_vocab_map(tokenizer, teacher.model, [loaders.train.dataset.input_ids], alpha)
    compress_causal_lm(student, vocab)
    method.vocab = vocab  # GLMD remaps the student's ids and slices live teacher logits
    for t in policy.teachers.values():
        t.kept = vocab.kept
    loaders.train_id = f"{loaders.train_id}|vocab{vocab.size}"
    loaders.dev, loaders.val, loaders.test = (RemappedLoader(x, vocab) for x in (loaders.dev, loaders.val, loaders.test))
    return vocab


def score_student(student, loaders: LMLoaders, policy, device, result: TrainResult) -> dict:
    """Val/test perplexity and (with a teacher) top-1 agreement with it on test."""
    start = time.perf_counter()
    scores = {"val_ppl": evaluate_lm(student, loaders.val, device)["perplexity"],
              "test_ppl": evaluate_lm(student, loaders.test, device)["perplexity"],
              "dev_ppl": result.student_score}
    teacher = next(iter(policy.teachers.values())) if policy is not None else None
    if teacher is not None and not getattr(teacher, "own_tokenizer", False):  # same token ids only
        scores["test_top1_agreement"] = top1_agreement(student, teacher.model, loaders.test, device)
    scores["eval_seconds"] = round(time.perf_counter() - start, 2)
    return scores


def save_lm_run(outcome: LMOutcome, config: LMDistillConfig, team: LMTeam, corpus: LMCorpus) -> None:
    """The student (``save_pretrained`` + tokenizer), its scores and samples, and its config."""
    out = outcome.out_dir
    out.mkdir(parents=True, exist_ok=True)
    save_lm(outcome.student, outcome.tokenizer, out / "student")
    (out / "result.json").write_text(json.dumps({"task": f"lm:{corpus.name}", **outcome.summary(),
                                                 "samples": outcome.samples,
                                                 "history": outcome.result.history}, indent=2))
    (out / "config.json").write_text(json.dumps({"task": f"lm:{corpus.name}", "team": team.describe(),
                                                 **config.to_dict()}, indent=2))
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():  # finished: the saved student supersedes the resume point
        ckpt.unlink()
    shutil.rmtree(out / "deepspeed", ignore_errors=True)  # DeepSpeed's part of that resume point
