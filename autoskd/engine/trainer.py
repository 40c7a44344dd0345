"""The one training loop.

Teacher fine-tuning, every distillation method, each AutoSKD candidate and the bilevel
search itself run through :class:`Distiller`. What differs between them is data: the
method (which features, which losses), the teacher policy (which teacher speaks each step)
and callbacks (the search's theta step). The loop itself knows none of them.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..defaults import DEFAULT_LR, DEFAULT_WARMUP_RATIO, DEFAULT_WEIGHT_DECAY
from ..errors import AutoSKDError
from .backends import make_backend
from .batches import model_inputs, output_logits, to_device
from .callbacks import Callback
from .metrics_log import MetricsLog, plot_history
from .methods import Method, get_method
from .metrics import Metric, accuracy_metric
from .teacher_cache import TeacherOutputCache
from .teachers import TeacherPolicy, as_policy


@dataclass
class Stage:
    """One training stage: which of the method's loss terms run, on which data, for how long.

    ``name`` selects the method's loss terms (``"task"``, ``"intermediate"``,
    ``"prediction"``, ``"pretrain"``…). ``data_id`` is a fingerprint of the training split;
    when given, teacher logits come from the on-disk cache. Unlabelled pre-training stages
    set ``evaluate=False``. A stage may also carry its own ``teacher`` (a policy member that
    speaks in every step of it), ``trainable`` (student parameter-name prefixes; only those
    go into this stage's optimiser) and ``hard_label_weight`` (overrides the method's).
    """

    name: str
    train: DataLoader
    epochs: float = 3.0
    lr: float = DEFAULT_LR
    warmup_ratio: float = DEFAULT_WARMUP_RATIO
    weight_decay: float = DEFAULT_WEIGHT_DECAY
    max_grad_norm: float = 1.0
    data_id: str | None = None
    evaluate: bool = True
    teacher: str | None = None
    trainable: tuple[str, ...] | None = None
    hard_label_weight: float | None = None

    def total_steps(self) -> int:
        if self.epochs <= 0:
            raise AutoSKDError(f"stage {self.name!r}: epochs must be > 0 (got {self.epochs})")
        if len(self.train) == 0:
            raise AutoSKDError(f"stage {self.name!r} has no training batches; check the training data is not empty")
        return max(1, math.ceil(self.epochs * len(self.train)))


@dataclass
class StepContext:
    """What a method or callback may look at during a step."""

    student: nn.Module
    teachers: dict[str, nn.Module]
    auxiliary: nn.Module | None
    method: Method
    device: torch.device
    stage: str = ""
    step: int = 0
    total_steps: int = 1
    epoch: int = 0
    global_step: int = 0
    teacher_name: str | None = None
    stage_teacher: str | None = None
    hard_label_weight: float | None = None

    @property
    def progress(self) -> float:
        """Fraction of the current stage done, in [0, 1) (what schedules read)."""
        return self.step / max(1, self.total_steps)


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    best_dev_acc: float | None = None
    final_dev_acc: float | None = None
    best_epoch: int | None = None
    steps: int = 0
    seconds: float = 0.0
    out_dir: Path | None = None
    #: dev accuracy of the weights the student holds after ``fit`` (the best epoch's when they
    #: were restored, else the last evaluation's), so callers need not evaluate dev again
    student_dev_acc: float | None = None
    #: The run's metric (``accuracy`` or ``perplexity``, :mod:`.metrics`) and its dev scores;
    #: for accuracy these equal the ``*_dev_acc`` fields above.
    metric: str = "accuracy"
    best_score: float | None = None
    final_score: float | None = None
    student_score: float | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu",
             predictions: bool = False) -> dict:
    """Accuracy and mean cross-entropy of ``model`` on a labelled loader; with ``predictions``
    also the predicted class of every row in loader order (paired tests such as McNemar's)."""
    was_training = model.training
    model.eval()
    correct, total, loss_sum, predicted = 0, 0, 0.0, []
    for batch in loader:
        batch = to_device(batch, device)
        out = model(**model_inputs(batch))
        logits = output_logits(out)
        labels = batch["labels"]
        loss_sum += float(nn.functional.cross_entropy(logits.float(), labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
        total += labels.numel()
        if predictions:
            predicted += logits.argmax(-1).tolist()
    model.train(was_training)
    if total == 0:
        raise AutoSKDError("evaluation data is empty; check the dev/test split")
    out = {"accuracy": correct / total, "loss": loss_sum / total}
    return {**out, "predictions": predicted} if predictions else out


def autocast(device: torch.device, precision: str):
    """Mixed precision for a step's forwards (``bf16`` works on CPU too); ``fp32``: none.
    Parameters and optimizer state stay fp32; the losses upcast to fp32 themselves."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in dtypes:
        raise AutoSKDError(f"precision {precision!r} unknown; choose fp32, bf16 or fp16")
    if precision == "fp16" and device.type != "cuda":
        raise AutoSKDError("fp16 training needs a CUDA GPU (loss scaling); use --precision bf16 on CPU")
    return torch.autocast(device_type=device.type, dtype=dtypes[precision])


def _geometry(model: nn.Module):
    """The model's shape, or an empty one for modules no adapter knows (logits-only use)."""
    from ..models.adapters import ArchitectureAdapter, Geometry

    try:
        return ArchitectureAdapter.for_model(model).geometry
    except AutoSKDError:
        return Geometry(num_layers=0, hidden_size=0, num_heads=0, vocab_size=0, num_labels=0)


def _generator_states(obj) -> dict:
    """States of the torch.Generators an object samples with (a method's replacement draws)."""
    return {k: g.get_state() for k, g in vars(obj).items() if isinstance(g, torch.Generator)}


def _set_generators(obj, states: dict) -> None:
    for k, g_state in states.items():
        getattr(obj, k).set_state(g_state)


def _loader_generators(stages) -> list:
    """The shuffling generators of the stages' loaders (one entry per stage; None: global RNG).

    All of them are checkpointed, not only the current stage's: stages often share one loader,
    and a run resumed at the start of a later stage must draw the order the unbroken run draws
    there (its generator has advanced through the earlier stages' epochs)."""
    return [getattr(s.train.sampler, "generator", None) for s in stages]


class Distiller:
    """Train ``student`` with ``method`` from ``teachers`` through a list of stages.

    ``teachers`` is a :class:`TeacherPolicy`, one ``nn.Module``, a one-entry dict, or None for
    methods that need no teacher (``finetune``). With ``out_dir`` the run writes
    ``metrics.jsonl``, ``training.png`` and ``checkpoint.pt`` (one per finished epoch,
    from which ``fit(..., resume=True)`` continues when it is the same run: method, options,
    seed, stages, data and teacher policy, see :meth:`run_signature`).

    ``restore_best``: at the end of ``fit`` the student gets the weights of the best dev epoch
    (by ``metric``) *of the last stage*, the stage that makes the final model (a prediction
    stage after an intermediate one); earlier stages' epochs are scored and logged but never
    restored, so no later stage's training is thrown away. When the last stage is not scored on
    dev the student keeps its final weights. ``TrainResult.best_*`` describe that stage's best.

    ``deepspeed`` (a DeepSpeed config: dict or JSON/YAML path) trains the student and the
    auxiliary model under DeepSpeed ZeRO in this same loop (see
    :mod:`autoskd.engine.deepspeed_backend`); ``tensor_parallel`` (a
    :class:`~autoskd.engine.tensor_parallel.TensorParallel`) shards the teachers over a mesh.
    """

    def __init__(self, student: nn.Module, method: str | Method = "kd", teachers: Any = None, *,
                 out_dir: str | Path | None = None, seed: int = 0, device: str | torch.device | None = None,
                 progress: bool = True, callbacks: Sequence[Callback] = (),
                 teacher_cache: TeacherOutputCache | str | Path | None = None, restore_best: bool = True,
                 checkpoint: bool = True, log_every: int = 20, method_options: dict | None = None,
                 teacher_fingerprints: dict[str, str] | None = None, deepspeed: Any = None,
                 tensor_parallel: Any = None, metric: Metric | None = None, precision: str = "fp32"):
        seed_everything(seed)
        self.metric = metric or accuracy_metric()
        self.precision = precision
        self.backend = make_backend(deepspeed, tensor_parallel)
        self.device = getattr(self.backend, "device", None) or torch.device(
            device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.student = student.to(self.device)
        autocast(self.device, precision)  # an unusable precision fails here, before any work
        self.method = get_method(method, **(method_options or {}))
        self.policy: TeacherPolicy | None = as_policy(teachers, teacher_fingerprints)
        if self.method.spec.needs_teacher and self.policy is None:
            raise AutoSKDError(f"method {self.method.spec.name!r} needs a teacher; pass teachers= or use method 'finetune'")
        if self.policy is not None:
            self.policy.to(self.device)  # a lazily held teacher moves there when it is loaded
        self.out_dir = Path(out_dir) if out_dir else None
        self.progress = progress and self.backend.is_main
        self.callbacks = list(callbacks)
        self.cache = TeacherOutputCache(teacher_cache) if isinstance(teacher_cache, (str, Path)) else teacher_cache
        self.restore_best = restore_best
        self.checkpoint = checkpoint and self.out_dir is not None
        self.log_every = max(1, log_every)
        self.seed = seed

        teacher_models = self.policy.models if self.policy else {}
        names = self._teacher_names()
        teacher_geoms = {n: _geometry(self.policy.geometry_source(n)) for n in names} if self.policy else {}
        self.auxiliary = self.method.build_auxiliary(_geometry(student), teacher_geoms).to(self.device)
        self.method.setup(self.student, teacher_models)
        self.ctx = StepContext(student=self.student, teachers=teacher_models, auxiliary=self.auxiliary,
                               method=self.method, device=self.device)
        from .hooks import FeatureExtractor

        self.extractor = FeatureExtractor(self.student, ["logits"])
        self.log = MetricsLog(self.out_dir / "metrics.jsonl" if self.out_dir and self.backend.is_main else None)
        if self.checkpoint and self.policy is not None:
            self._policy_signature()  # hashes given teachers' weights now, before tensor parallelism shards them
        if tensor_parallel is not None and self.policy is not None:
            tensor_parallel.shard_teachers(self.policy, batch_sharded=self.backend.world_size > 1)
        self.backend.setup(self)

    def _teacher_names(self) -> list[str]:
        if self.policy is None:
            return []
        return self.policy.step_names()  # what choose() may return (AvgKD: "average"; CR: the θ-mixture)

    def trainable_parameters(self, stage: Stage | None = None) -> list[tuple[str, nn.Parameter]]:
        only = stage.trainable if stage is not None else None
        if only is not None:
            unknown = [p for p in only if not any(n.startswith(p) for n, _ in self.student.named_parameters())]
            if unknown:
                raise AutoSKDError(f"stage {stage.name!r}: trainable prefix {unknown[0]!r} matches no student "
                                   f"parameter; use names from student.named_parameters()")
        params = [(f"student.{n}", p) for n, p in self.student.named_parameters()
                  if p.requires_grad and (only is None or n.startswith(tuple(only)))]
        params += [(f"auxiliary.{n}", p) for n, p in self.auxiliary.named_parameters() if p.requires_grad]
        return params

    # ------------------------------------------------------------------ one step
    def train_step(self, batch: dict, optimizer: torch.optim.Optimizer, max_grad_norm: float) -> dict[str, torch.Tensor]:
        """Forward student (and teacher), sum the method's losses, update. Returns detached terms."""
        ctx = self.ctx
        self.method.on_step(ctx)
        batch = self.method.prepare_batch(ctx, batch)  # e.g. on-policy: the student writes the batch
        rows = self.method.mlm_rows(ctx, batch)  # word predictions only where a loss reads them
        if rows is not None:
            batch = {**batch, "mlm_rows": rows}
        for cb in self.callbacks:
            cb.on_step_begin(self, ctx, batch)
        teacher_name = self.policy.choose(ctx.global_step) if self.policy is not None else None
        if ctx.stage_teacher is not None:  # the stage names its teacher
            teacher_name = ctx.stage_teacher
        ctx.teacher_name = teacher_name
        student_req, teacher_req = self.method.feature_requests(ctx, teacher_name)
        if set(student_req) != set(self.extractor.features):
            self.extractor.set_features(student_req)
        with autocast(self.device, self.precision):
            teacher_feats = self.method.teacher_features(ctx, self.policy, teacher_name, batch, teacher_req)

        def compute() -> dict[str, torch.Tensor]:  # under ZeRO-3 it runs inside the engine's forward
            with autocast(self.device, self.precision):
                student_feats = self.method.student_forward(ctx, self.extractor, batch)
                return self.method.losses(ctx, student_feats, teacher_feats, teacher_name, batch)

        losses = self.backend.compute(compute)
        if not losses:
            raise AutoSKDError(f"method {self.method.spec.name!r} has no loss in stage {ctx.stage!r}; "
                               f"its stages are: {', '.join(self.method.spec.stages)}")
        loss = torch.stack([v for v in losses.values()]).sum()
        if not torch.isfinite(loss):
            raise AutoSKDError(f"loss became {float(loss.detach())} at step {ctx.global_step}; lower the learning rate")
        self.backend.update(loss, optimizer, max_grad_norm)
        detached = {k: v.detach() for k, v in losses.items()}
        detached["loss"] = loss.detach()
        for cb in self.callbacks:
            cb.on_step_end(self, ctx, batch, detached)
        return detached

    # ------------------------------------------------------------------ the loop
    def fit(self, stages: Sequence[Stage], dev: DataLoader | None = None, resume: bool = False) -> TrainResult:
        start = time.perf_counter()
        result = TrainResult(out_dir=self.out_dir)
        best_state: dict | None = None
        done_stage, done_epoch = -1, 0
        ckpt_path = self.out_dir / "checkpoint.pt" if self.out_dir else None
        signature = self.run_signature(stages) if (self.checkpoint or resume) else None
        resumed_state = self._load_checkpoint(ckpt_path, signature) if resume else None
        if resumed_state is not None:
            state = resumed_state
            result.history, best_state = state["history"], state.get("best_state")
            result.best_score, result.best_epoch = state.get("best_score", state.get("best_dev_acc")), state.get("best_epoch")
            done_stage, done_epoch = state["stage_index"], state["epoch"]
            gen_states = state.get("sampler_states")
            if gen_states is None:  # a checkpoint from before all stages' generators were saved
                gen_states = [state.get("sampler_state") if i == done_stage else None for i in range(len(stages))]
            for gen, gen_state in zip(_loader_generators(stages), gen_states):
                if gen is not None and gen_state is not None:
                    gen.set_state(gen_state)  # data order where the unbroken run would be
        else:
            self.log.reset()

        for stage_index, stage in enumerate(stages):
            if stage_index < done_stage:
                continue
            total_steps = stage.total_steps()
            steps_per_epoch = len(stage.train)
            epochs = math.ceil(total_steps / steps_per_epoch)
            first_epoch = done_epoch if stage_index == done_stage else 0
            if first_epoch >= epochs:
                continue
            if first_epoch == 0:  # the best epoch restored at the end is the last stage's own
                result.best_score, result.best_epoch, best_state = None, None, None
            if self.policy is not None:
                self.backend.prepare_teachers(self.policy, stage.train, stage.data_id, self.cache, self.device,
                                              self.progress)
            ctx = self.ctx
            ctx.stage, ctx.total_steps = stage.name, total_steps
            ctx.hard_label_weight = stage.hard_label_weight
            ctx.stage_teacher = stage.teacher
            if stage.teacher is not None and (self.policy is None or stage.teacher not in self.policy.teachers):
                raise AutoSKDError(f"stage {stage.name!r} names teacher {stage.teacher!r}, which is not among the "
                                   f"run's teachers ({', '.join(self.policy.teachers) if self.policy else 'none'})")
            params = self.trainable_parameters(stage)
            optimizer, scheduler = self.backend.start_stage(self, stage, total_steps, params)
            self.optimizer = optimizer  # callbacks read the current learning rate from it
            if resumed_state is not None and stage_index == done_stage:
                self.backend.restore_stage(resumed_state, optimizer, scheduler)
            for cb in self.callbacks:
                cb.on_stage_start(self, ctx)
            step = first_epoch * steps_per_epoch
            self.student.train()
            label = self.method.spec.name  # a teacher's "finetune" stage of method finetune: said once
            bar = tqdm(total=total_steps, initial=step, desc=label if stage.name == label else f"{label}:{stage.name}",
                       disable=not self.progress, leave=False, dynamic_ncols=True)
            for epoch in range(first_epoch, epochs):
                ctx.epoch = epoch
                sums: dict[str, torch.Tensor] = {}
                count = 0
                for batch in self.backend.batches(stage.train):
                    if step >= total_steps:
                        break
                    ctx.step = step
                    terms = self.train_step(to_device(batch, self.device), optimizer, stage.max_grad_norm)
                    self.backend.step_scheduler(scheduler)
                    step += 1
                    ctx.global_step += 1
                    count += 1
                    for k, v in terms.items():
                        sums[k] = sums.get(k, 0) + v
                    bar.update(1)
                    if step % self.log_every == 0 or step == total_steps:
                        record = {k: float(v) / count for k, v in sums.items()}
                        bar.set_postfix(loss=f"{record['loss']:.4f}")
                        self.log.write({"kind": "train", "stage": stage.name, "epoch": epoch, "step": step,
                                        "global_step": ctx.global_step, "lr": scheduler.get_last_lr()[0], **record,
                                        **{f"distance/{k}": v for k, v in self._distances().items()}})
                        sums, count = {}, 0
                metrics: dict[str, Any] = {"kind": "epoch", "stage": stage.name, "epoch": epoch, "step": step,
                                           "global_step": ctx.global_step}
                if dev is not None and stage.evaluate:
                    scores = self.metric.evaluate(self.backend.eval_model(self.student), dev, self.device)
                    value = self.metric.score(scores)
                    metrics.update({self.metric.key: value, "dev_loss": scores["loss"]})
                    if self.metric.better(value, result.best_score):
                        result.best_score, result.best_epoch = value, len(result.history)
                        if self.restore_best:
                            best_state = self.backend.full_state(self.student)
                    result.final_score = value
                    bar.set_postfix({self.metric.key: f"{value:.4f}"})
                result.history.append(metrics)
                self.log.write(metrics)
                for cb in self.callbacks:
                    cb.on_epoch_end(self, ctx, metrics)
                if self.checkpoint:
                    self._save_checkpoint(ckpt_path, signature, stage_index, epoch + 1, optimizer, scheduler,
                                          stages, result, best_state)
            bar.close()
            self.backend.end_stage(self)
            for cb in self.callbacks:
                cb.on_stage_end(self, ctx)
            resumed_state = None

        self.backend.finish(self)
        if self.restore_best and best_state is not None:
            self.student.load_state_dict(best_state)
            result.student_score = result.best_score
        elif result.history and result.history[-1].get(self.metric.key) is not None:  # evaluated after the last step
            result.student_score = result.history[-1][self.metric.key]
        result.metric = self.metric.name
        if self.metric.name == "accuracy":
            result.best_dev_acc, result.final_dev_acc = result.best_score, result.final_score
            result.student_dev_acc = result.student_score
        result.steps = self.ctx.global_step
        result.seconds = time.perf_counter() - start
        if self.out_dir is not None and self.backend.is_main:
            plot_history(self.log.path, self.out_dir / "training.png",
                         title=f"{self.method.spec.name}: loss and dev accuracy")
        return result

    def _distances(self) -> dict[str, float]:
        distances = getattr(self.auxiliary, "last_distances", None) or {}
        return {k: float(v) for k, v in distances.items()}

    def run_signature(self, stages: Sequence[Stage]) -> dict:
        """What a checkpoint must agree with to be resumed: same method, options and stages, and
        the same teacher policy (its kind, each teacher's fingerprint, a sampled policy's starting
        θ: a checkpoint's policy state would otherwise overwrite the new run's)."""
        signature = {"method": self.method.spec.name, "options": repr(sorted(self.method.options.items())),
                     "seed": self.seed, "stages": [[s.name, s.epochs, s.lr, s.warmup_ratio, s.weight_decay,
                                                    s.max_grad_norm, s.data_id, len(s.train)]
                                                   + ([s.teacher, s.trainable, s.hard_label_weight]
                                                      if (s.teacher, s.trainable, s.hard_label_weight) != (None,) * 3
                                                      else [])
                                                   for s in stages],
                     **self.backend.signature()}
        if self.policy is not None:
            signature["policy"] = self._policy_signature()
        return signature

    def _policy_signature(self) -> dict:
        policy = self.policy
        out: dict[str, Any] = {"kind": type(policy).__name__,
                               "teachers": {n: t.fingerprint for n, t in policy.teachers.items()}}
        theta = getattr(policy, "theta", None)
        if torch.is_tensor(theta):
            out["theta"] = [round(float(x), 12) for x in theta.detach().cpu().reshape(-1)]
        return out

    def _load_checkpoint(self, path: Path | None, signature: dict) -> dict | None:
        """Restore the student, auxiliary model, random states and policy/method samplers."""
        if path is None:
            return None
        state = self.backend.load_meta(path, self.device)
        if state is None:
            return None
        if state.get("signature") != signature:
            from ..rerun import keys_differ

            raise AutoSKDError(f"{path.parent} holds an unfinished run with another configuration "
                               f"({keys_differ(state.get('signature') or {}, signature)}); rerun the same run to "
                               f"resume it, or start fresh: use a new --out folder or delete {path}")
        self.backend.restore_modules(self, state)
        self.ctx.global_step = state["global_step"]
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        _set_generators(self.method, state["rng"]["method"])
        if self.policy is not None:
            self.policy.load_state_dict(state["policy"])
        self.log.truncate(state["global_step"])  # drop records of a partly finished epoch
        return state

    def _save_checkpoint(self, path: Path, signature: dict, stage_index: int, epoch: int, optimizer, scheduler,
                         stages: Sequence[Stage], result: TrainResult, best_state: dict | None) -> None:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
               "method": _generator_states(self.method)}
        state = {"signature": signature, "stage_index": stage_index, "epoch": epoch,
                 "global_step": self.ctx.global_step,
                 "sampler_states": [g.get_state() if g is not None else None for g in _loader_generators(stages)],
                 "rng": rng,
                 "policy": self.policy.state_dict() if self.policy is not None else {},
                 "history": result.history, "best_score": result.best_score, "best_epoch": result.best_epoch,
                 "best_state": best_state}
        self.backend.save(path, state, self, optimizer, scheduler)
