"""One ``autoskd tune`` trial on a decoder-LM team: a ``kind: lm`` point as one
:func:`autoskd.lm.pipeline.distill_lm` run, ranked by dev perplexity.

A language model is scored by perplexity, and lower is better, so nothing here reads
``dev_acc``: the trial's metric is the LM pipeline's own :func:`~autoskd.lm.evaluate.perplexity_metric`
(a :class:`~autoskd.engine.metrics.Metric`, with its key ``dev_ppl`` and its direction), and
:class:`MetricReporter` reports it to Ray Tune after each evaluated epoch, so ASHA compares trials
by it (``mode="min"``) and Optuna's study minimises it.

The task of such a tune is ``lm:<corpus>`` (as for ``autoskd distill``): the trial process loads
the corpus (:func:`load_lm_corpus`) and the LM team from the team file itself, as every Ray trial
rebuilds what it needs from paths; the driver has already built the team once (teachers converted
or trained into the shared cache).

The student's depth is tuned as ``student.depth``: k of the team student's own layers, spread
evenly with the first and last kept (:func:`spread_layers`), so a 6-layer SmolLM2 student cut
from layers ``[0, 6, 12, 18, 24, 29]`` tunes k in 1..6 over exactly those layers rather than over
the first k of the source (which would drop the top of the network). ``student.layers`` and
``student.init`` set the member's own keys, as in a team file.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable

from ..engine.callbacks import Callback
from ..engine.metrics import Metric
from ..errors import AutoSKDError
from ..search.trials import TrialSpec

__all__ = ["LM_PREFIX", "is_lm_task", "lm_values", "load_lm_corpus", "spread_layers", "team_student_layers",
           "lm_team", "MetricReporter", "run_lm_trial", "lm_evaluations", "LM_RECORD_KEYS"]

LM_PREFIX = "lm:"
#: what an LM trial's record carries beside the study's objectives (stored as the Optuna trial's
#: user attributes)
LM_RECORD_KEYS = ("val_ppl", "test_ppl", "test_top1_agreement", "student_layers")


def is_lm_task(task: dict | str) -> bool:
    """Whether a trial spec's task (``load_task`` keywords or a name) is a language-model corpus."""
    name = task.get("name_or_path", "") if isinstance(task, dict) else task
    return str(name).startswith(LM_PREFIX)


def corpus_source(task: dict) -> str:
    """The corpus of an ``lm:<corpus>`` task, one line when there is none."""
    source = str(task["name_or_path"])[len(LM_PREFIX):].strip()
    if not source:
        raise AutoSKDError("task lm: needs a corpus after the colon, e.g. lm:rotten_tomatoes or lm:docs.txt")
    return source


def absolute_lm_task(task: dict) -> dict:
    """The task with a local corpus path made absolute (trials may run in another directory)."""
    source = corpus_source(task)
    path = Path(source).expanduser()
    if not path.is_absolute() and path.exists():
        source = str(path.absolute())
    return {**task, "name_or_path": f"{LM_PREFIX}{source}"}


def load_lm_corpus(task: dict):
    """The corpus of an ``lm:<corpus>`` trial task, split by ``seed`` and subsampled as
    ``max_train``/``max_eval`` say (as ``autoskd distill --task lm:...`` loads it)."""
    from ..lm.data import load_corpus

    seed = int(task.get("seed") or 0)
    corpus = load_corpus(corpus_source(task), text_column=task.get("text_column"),
                         prompt_column=task.get("prompt_column"), completion_column=task.get("completion_column"),
                         seed=seed)
    if task.get("max_train") or task.get("max_eval"):
        corpus = corpus.subsample(task.get("max_train"), task.get("max_eval"), seed=seed)
    return corpus


def lm_values(base: dict, values: dict) -> tuple[Any, dict]:
    """``(LMDistillConfig, student overrides)`` from a base config dict and one point's flat values."""
    from ..lm.pipeline import LMDistillConfig

    config = dict(base)
    options = dict(config.pop("method_options", None) or {})
    student: dict = {}
    for key, value in values.items():
        if key.startswith("method_options."):
            options[key.split(".", 1)[1]] = value
        elif key.startswith("student."):
            student[key.split(".", 1)[1]] = value
        else:
            config[key] = value
    try:
        return LMDistillConfig(**config, method_options=options), student
    except TypeError as err:
        raise AutoSKDError(f"trial config: {err}") from None


def spread_layers(layers: list[int], k: int) -> list[int]:
    """``k`` of ``layers`` spread evenly, first and last kept (DistilBERT-style initialisation);
    ``k = 1`` keeps the first. Rounds half up, so the picks stay distinct and in order."""
    n = len(layers)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise AutoSKDError(f"student depth {k!r} must be between 1 and the team student's {n} layers")
    if k == 1:
        return [layers[0]]
    return [layers[math.floor(i * (n - 1) / (k - 1) + 0.5)] for i in range(k)]


def team_student_layers(member) -> list[int]:
    """The source layers the team's student keeps (its ``layers`` list, the first k, or all of the
    source's), read from the config only: no weights load."""
    from ..lm.models import load_lm_config
    from ..lm.team import LMMember

    if not isinstance(member, LMMember):
        raise AutoSKDError("student depth is tuned on a team student given by source (a team file); "
                           "this team's student is a built model")
    if isinstance(member.layers, list):
        return list(member.layers)
    if isinstance(member.layers, int):
        return list(range(member.layers))
    n = (member.config or {}).get("num_hidden_layers")
    if n is None:
        config = load_lm_config(member.source)
        n = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if not isinstance(n, int) or n < 1:
        raise AutoSKDError(f"cannot tell how many layers the student '{member.source}' has; set its 'layers' "
                           "in the team file")
    return list(range(n))


def lm_team(team_path: str, student: dict | None = None):
    """The LM team of ``team_path`` (unbuilt), its student cut as the point says: ``depth`` (k of
    the team student's layers, spread), or the member's own ``layers``/``init``."""
    from ..lm.team import LMTeam

    team = LMTeam.from_yaml(team_path)
    student = dict(student or {})
    if not student:
        return team
    member = team.student_spec
    depth = student.pop("depth", None)
    if depth is not None:
        student["layers"] = spread_layers(team_student_layers(member), depth)
    unknown = sorted(set(student) - {"layers", "init"})
    if unknown:
        raise AutoSKDError(f"student.{unknown[0]} is not tunable on an LM team; use student.depth, student.layers "
                           "or student.init")
    if not dataclasses.is_dataclass(member):
        raise AutoSKDError("the student of this team is a built model; its depth cannot be tuned")
    team.student_spec = dataclasses.replace(member, **student)
    return team


def method_stages(config) -> tuple[str, ...]:
    from ..lm.recipes import decoder_method

    return tuple(decoder_method(config.method, **dict(config.method_options or {})).spec.stages)


def lm_evaluations(config) -> int:
    """At most how many dev evaluations one ``distill_lm`` run with ``config`` makes (every stage
    of an LM method is scored on dev each epoch): ASHA's ``max_t``. ``max_steps`` may make a run
    evaluate less (a trial that ends before a rung simply completes)."""
    return max(1, len(method_stages(config)) * math.ceil(float(config.epochs)))


class MetricReporter(Callback):
    """Reports the run's metric (``metric.key``, the best so far) to Ray Tune after each evaluated
    epoch but the run's last, which the trial reports with its final record, so a trial reports
    exactly once per evaluated epoch and its final value is the best it reported.

    The best restarts with each stage, because the engine restores the best epoch *of the last
    stage*: a multi-stage method's final student is never scored by an earlier stage's epoch.
    The last epoch is told by the engine itself (the last stage's epoch that reached its total
    steps), so nothing has to predict how many epochs ``max_steps`` leaves."""

    def __init__(self, metric: Metric, last_stage: str, report: Callable[[dict], None] | None = None):
        self.metric = metric
        self.last_stage = last_stage
        self.best: float | None = None
        self.count = 0
        self._report = report

    def on_stage_start(self, trainer, ctx) -> None:
        self.best = None

    def on_epoch_end(self, trainer, ctx, metrics: dict) -> None:
        value = metrics.get(self.metric.key)
        if value is None:
            return
        value = float(value)
        self.count += 1
        if self.metric.better(value, self.best):
            self.best = value
        if ctx.stage == self.last_stage and int(metrics.get("step", 0)) >= int(ctx.total_steps):
            return  # the trial's own final report carries the last epoch
        report = self._report
        if report is None:
            from ray import tune

            report = tune.report
        report({self.metric.key: self.best, f"epoch_{self.metric.key}": value, "epochs": self.count})


def lm_latency_ms(student, tokenizer, corpus, config, block: int, batches: int = 3) -> float:
    """Mean forward time per dev row of ``block`` tokens (milliseconds), after one warm-up batch."""
    from ..lm.data import make_lm_loader, tokenize_lm_split
    from .trial import student_latency_ms

    rows = tokenize_lm_split(corpus.split("dev"), tokenizer, block, layout=config.layout, kind=corpus.kind)
    return student_latency_ms(student, make_lm_loader(rows, config.batch_size, shuffle=False), batches)


def run_lm_trial(spec: TrialSpec, values: dict, out_dir: Path, report: Callable | None = None,
                 latency: bool = False) -> dict:
    """Distil one LM student with the point's config; ``report`` gets per-epoch dev perplexity.
    The record's ``dev_ppl`` is the restored student's (the best epoch of the last stage)."""
    from ..lm.evaluate import perplexity_metric
    from ..lm.pipeline import distill_lm
    from .trial import student_size

    config, student = lm_values(spec.base_config, values)
    if "seed" not in spec.base_config and "seed" not in values:
        config.seed = spec.seed  # the task's seed, as the corpus split uses
    corpus = load_lm_corpus(spec.task)
    team = lm_team(spec.team_path, student)
    metric = perplexity_metric()
    callbacks = [MetricReporter(metric, method_stages(config)[-1], report=report)] if report is not None else []
    outcome = distill_lm(team, corpus, config, out_dir=out_dir, cache_dir=spec.cache_dir, progress=False,
                         callbacks=callbacks)
    scores, result = outcome.scores, outcome.result
    history = [h[metric.key] for h in result.history if h.get(metric.key) is not None]
    record = {metric.key: float(scores["dev_ppl"]), "val_ppl": float(scores["val_ppl"]),
              "test_ppl": float(scores["test_ppl"]),
              "student_params_m": round(student_size(outcome.student), 4),
              "student_layers": int(getattr(outcome.student.config, "num_hidden_layers", 0) or 0) or None,
              "epochs": len(history), "steps": int(result.steps), "train_seconds": round(float(result.seconds), 3),
              "train_eval_seconds": round(float(result.seconds) + float(scores.get("eval_seconds", 0.0)), 3),
              "history": history}
    if scores.get("test_top1_agreement") is not None:
        record["test_top1_agreement"] = float(scores["test_top1_agreement"])
    if latency:
        record["latency_ms"] = round(lm_latency_ms(outcome.student, outcome.tokenizer, corpus, config,
                                                   config.max_length or team.max_length), 4)
    return record
