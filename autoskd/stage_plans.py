"""A stage plan (:mod:`autoskd.engine.stages`) on a team: ``kind: stages`` in an experiment file,
or ``autoskd distill --method plan.yaml``.

This module only wires a plan to the team and the task: each stage's teacher policy comes from
:func:`autoskd.pipeline.build_policy` (its own method, teacher or teachers), its data from the
task (``data: task``, ``labels: false`` for unlabelled text, MLM-masked text where the method
reads word predictions) or from another data file, and the engine runs the stages in order on
one student. The trained student is saved as ``distill`` saves one (``student/``,
``result.json``), plus ``stages.json`` with what each stage trained and the loss terms it had.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

from .data.collate import make_loader, tokenize_split, unlabelled_split
from .data.tasks import TaskData, load_task
from .engine.backends import parallel_options
from .engine.stages import StageOutcome, StageSpec, check_plan, load_stage_plan, run_stages
from .engine.trainer import TrainResult, evaluate
from .errors import AutoSKDError
from .pipeline import (DEFAULT_CACHE, DistillConfig, DistillOutcome, Loaders, mlm_loaders, build_policy,
                       make_loaders, method_stages, prepare_mlm_teachers, run_identity, save_run)


class _StageData:
    """Loaders per (data source, labels), built once and shared by the stages that use them."""

    def __init__(self, task: TaskData, tokenizer, max_length: int, config: DistillConfig, loaders: Loaders):
        self.task, self.tokenizer, self.max_length, self.config = task, tokenizer, max_length, config
        self.cache: dict = {("task", True): loaders}

    def get(self, spec: StageSpec) -> tuple[Loaders, TaskData]:
        task = self.task
        if spec.data != "task":
            if not Path(spec.data).exists():
                raise AutoSKDError(f"stage {spec.name!r}: data {spec.data!r} is neither 'task' nor an existing data "
                                   "file (CSV/JSONL/Parquet with a text column)")
            task = load_task(spec.data, seed=self.config.seed)
            if spec.labels and task.num_labels != self.task.num_labels:
                raise AutoSKDError(f"stage {spec.name!r}: {spec.data} has {task.num_labels} labels but the task has "
                                   f"{self.task.num_labels}; use labels: false to train on its text only")
        key = (spec.data, spec.labels)
        if key not in self.cache:
            c = self.config
            base = self.cache.get((spec.data, True)) or make_loaders(task, self.tokenizer, self.max_length,
                                                                     c.batch_size, c.seed, c.train_split)
            self.cache[(spec.data, True)] = base
            if not spec.labels:
                texts = unlabelled_split(tokenize_split(task.split(c.train_split), self.tokenizer, self.max_length))
                base = dataclasses.replace(base, train=make_loader(texts, self.tokenizer, c.batch_size, shuffle=True,
                                                                   seed=c.seed), train_id=None)
            self.cache[key] = base
        return self.cache[key], task


def distill_stages(team, task: TaskData | str, plan, config: DistillConfig | None = None, *,
                   out_dir: str | Path | None = None, cache_dir: str | Path = DEFAULT_CACHE, progress: bool = True,
                   callbacks=(), before_training: Callable[[], None] | None = None
                   ) -> tuple[DistillOutcome, list[StageOutcome]]:
    """Train the team's student through ``plan`` (a YAML path, dict or list of stage entries).

    ``config`` gives what the plan leaves out: batch size, seed, ``max_length``, the default
    teacher; each stage's epochs, lr, method and teacher come from its entry.
    ``before_training`` is called once the whole plan is checked against the student and the
    team, before the first stage trains (a refused plan leaves no output folder behind)."""
    config = config or DistillConfig()
    specs = load_stage_plan(plan)
    task = load_task(task, seed=config.seed) if isinstance(task, str) else task
    max_length = config.max_length or team.max_length
    loaders = make_loaders(task, team.tokenizer, max_length, config.batch_size, config.seed, config.train_split)
    data = _StageData(task, team.tokenizer, max_length, config, loaders)
    student = team.build_student(task, seed=config.seed)
    check_plan(student, specs, list(team.teachers))
    # what the plan's finished stages and result.json were computed from (the plan is in each stage's stamp)
    identity = run_identity(team, task, dataclasses.replace(config, method="stages")) if out_dir is not None else None
    if before_training is not None:
        before_training()

    def prepare(spec: StageSpec, method):
        cfg = dataclasses.replace(config, method=spec.method, method_options=dict(spec.options), epochs=spec.epochs,
                                  lr=spec.lr, warmup_ratio=spec.warmup_ratio, weight_decay=spec.weight_decay,
                                  pretrain_epochs=0.0, teacher=spec.teacher or config.teacher,
                                  teachers=spec.teachers or config.teachers)
        stage_loaders, stage_task = data.get(spec)
        masked = mlm_loaders(method, dataclasses.replace(cfg, pretrain_epochs=1.0), stage_task, team.tokenizer,
                              max_length)
        wanted = spec.method_stages or method.spec.stages
        names = [s for s in wanted if s != "pretrain"]
        stages = [s for s in method_stages(method, dataclasses.replace(cfg, epochs=spec.epochs), stage_loaders,
                                           None, masked) if s.name in names]
        if "pretrain" in wanted:  # a pre-training-style stage on this stage's (unlabelled) text
            from .engine.trainer import Stage

            train = masked["pretrain"] if method.masked_stage("pretrain") else stage_loaders.train
            stages.insert(0, Stage("pretrain", train, epochs=spec.epochs, lr=spec.lr, warmup_ratio=spec.warmup_ratio,
                                   weight_decay=spec.weight_decay, evaluate=False))
        if not spec.labels or spec.data != "task":
            stages = [dataclasses.replace(s, evaluate=s.evaluate and spec.labels) for s in stages]
        policy = build_policy(team, cfg, method)
        prepare_mlm_teachers(method, policy, masked.get("pretrain"), cfg, progress)
        return policy, stages

    outcomes = run_stages(student, specs, prepare, dev=loaders.dev, out_dir=out_dir, seed=config.seed,
                          progress=progress, callbacks=callbacks, teacher_cache=Path(cache_dir) / "teacher_outputs",
                          distiller_options=parallel_options(config.deepspeed, config.tensor_parallel), identity=identity)
    dev = evaluate(student, loaders.dev)["accuracy"]
    scored = evaluate(student, loaders.test, predictions=True)
    results = [o.result for o in outcomes if o.result is not None]
    merged = TrainResult(history=[h for r in results for h in r.history], steps=sum(r.steps for r in results),
                         seconds=sum(r.seconds for r in results), out_dir=Path(out_dir) if out_dir else None,
                         best_dev_acc=max((r.best_dev_acc for r in results if r.best_dev_acc is not None), default=None),
                         final_dev_acc=dev)
    outcome = DistillOutcome(student, team.tokenizer, dev, scored["accuracy"], merged,
                             Path(out_dir) if out_dir else None, None, scored["predictions"])
    if out_dir is not None:
        save_run(outcome, dataclasses.replace(config, method="stages"), team, task,
                 {**identity, "plan": [dataclasses.asdict(s) for s in specs]})
        (Path(out_dir) / "stages.json").write_text(json.dumps([o.summary() for o in outcomes], indent=2))
    return outcome, outcomes
