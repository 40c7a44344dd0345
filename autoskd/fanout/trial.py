"""One ``autoskd tune`` trial: a search-space point turned into one engine run.

A ``distill`` trial is one :func:`autoskd.pipeline.distill` call with the point's
:class:`~autoskd.pipeline.DistillConfig` (and student depth); an ``autoskd`` trial is one AutoSKD
search (:func:`autoskd.search.run.run_search`, candidates run in-process); an ``lm`` trial is one
:func:`autoskd.lm.pipeline.distill_lm` on a decoder-LM team, scored by perplexity
(:mod:`autoskd.fanout.lm_trial`). The trial process is
prepared like every AutoSKD arm (:func:`autoskd.search.trials.prepare_worker`: the same
:class:`~autoskd.search.trials.TrialSpec`, environment and thread count), rebuilds task and team
from disk (teachers come from the cache the driver filled) and writes::

    <root>/trials/<trial>/trial.json    the record: values, dev/test accuracy, student size, ...
    <root>/trials/<trial>/student/      the student (save_pretrained; an autoskd trial: best_student/)
    <root>/trials/<trial>/error.txt     a failed trial's reason (first line) and traceback

A trial that raises (out of memory, a loss gone NaN, a bad option) fails alone: Ray Tune records
it as failed in the study, the others run on, and the results table names its reason.
"""

from __future__ import annotations

import dataclasses
import json
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from ..atomic import write_json
from ..errors import AutoSKDError
from ..search.early_stop import EpochReporter, dev_score, evaluated_epochs, record_score
from ..search.trials import TrialSpec, prepare_worker
from .space import SearchSpace

__all__ = ["distill_values", "run_distill_trial", "run_autoskd_trial", "tune_trainable", "trial_name",
           "OBJECTIVES", "TEST_KEYS", "RECORD_ATTRS", "space_metric", "final_report", "student_size",
           "student_latency_ms", "ERROR_FILE", "error_line", "read_error"]

#: second objectives for multi-objective samplers (both minimised), beside the space's metric
#: (dev accuracy maximised, or dev perplexity minimised on an LM space)
OBJECTIVES = {"size": "student_params_m", "latency": "latency_ms"}
#: the test score beside each dev metric key (what the results table shows next to it)
TEST_KEYS = {"dev_acc": "test_acc", "dev_ppl": "test_ppl"}
#: what a trial record may carry beside its objectives, kept as the Optuna trial's user attributes
RECORD_ATTRS = ("test_acc", "test_ppl", "val_ppl", "test_top1_agreement", "student_layers", "student_params_m",
                "latency_ms", "trial", "history")


def space_metric(space: SearchSpace):
    """The metric a space's trials are ranked by: dev perplexity (lower is better) for ``kind: lm``,
    dev accuracy (higher is better) otherwise (:mod:`autoskd.engine.metrics`)."""
    if space.kind == "lm":
        from ..lm.evaluate import perplexity_metric

        return perplexity_metric()
    from ..engine.metrics import accuracy_metric

    return accuracy_metric()


#: a failed trial's reason (first line) and traceback, in its folder
ERROR_FILE = "error.txt"


def trial_name(number: int | None, fallback: str) -> str:
    return f"trial-{number:04d}" if number is not None else fallback


def error_line(err: BaseException) -> str:
    """``Type: first line of the message`` (``OutOfMemoryError: CUDA out of memory. ...``)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def write_error(out: Path, err: BaseException) -> None:
    """``error.txt``: the reason on its first line, then the traceback."""
    try:
        (Path(out) / ERROR_FILE).write_text(f"{error_line(err)}\n\n{traceback.format_exc()}")
    except OSError:
        pass  # the trial's failure must surface, not a second one


def read_error(trial_dir: Path) -> str | None:
    """The first line of a failed trial's ``error.txt``, if it has one."""
    try:
        lines = (Path(trial_dir) / ERROR_FILE).read_text().splitlines()
    except OSError:
        return None
    return lines[0].strip() if lines and lines[0].strip() else None


def distill_values(base: dict, values: dict) -> tuple[Any, dict]:
    """``(DistillConfig, student overrides)`` from a base config dict and one point's flat values."""
    from ..pipeline import DistillConfig

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
        return DistillConfig(**config, method_options=options), student
    except TypeError as err:
        raise AutoSKDError(f"trial config: {err}") from None


def student_size(model) -> float:
    """Parameters of the student, in millions."""
    return sum(p.numel() for p in model.parameters()) / 1e6


def student_latency_ms(model, loader, batches: int = 3) -> float:
    """Mean forward time per example (a dev row) on up to ``batches`` dev batches (milliseconds),
    after one warm-up batch; a dev split of one batch is timed on that batch again, never 0."""
    import torch

    from ..engine.batches import model_inputs

    model.eval()
    kept = []
    for batch in loader:
        kept.append(batch)
        if len(kept) > batches:
            break
    if not kept:
        raise AutoSKDError("latency needs dev rows; the dev split is empty")
    seconds, examples = 0.0, 0
    with torch.no_grad():
        model(**model_inputs(kept[0]))  # the first batch warms caches up
        for batch in kept[1:] or kept:
            start = time.perf_counter()
            model(**model_inputs(batch))
            seconds += time.perf_counter() - start
            examples += int(batch["input_ids"].shape[0])
    return 1000.0 * seconds / max(examples, 1)


def run_distill_trial(spec: TrialSpec, values: dict, out_dir: Path, report: Callable | None = None,
                      latency: bool = False) -> dict:
    """Distil one student with the point's config; ``report`` gets per-epoch dev accuracy."""
    from ..pipeline import distill, make_loaders

    config, student = distill_values(spec.base_config, values)
    task = spec.load_task()
    team = spec.build_team(task)
    if student:
        team.student_spec = dataclasses.replace(team.student_spec, **student)
        team.student_spec.check("student", role="student")
    callbacks = [EpochReporter(evaluated_epochs(config), report=report)] if report is not None else []
    outcome = distill(team, task, config, out_dir=out_dir, cache_dir=spec.cache_dir, progress=False,
                      callbacks=callbacks)
    record = {"dev_acc": float(outcome.dev_acc), "test_acc": float(outcome.test_acc),
              "dev_score": dev_score(outcome.result.history),  # what a scheduler ranks by
              "student_params_m": round(student_size(outcome.student), 4),
              "epochs": sum(1 for h in outcome.result.history if h.get("dev_acc") is not None),
              "steps": int(outcome.result.steps), "train_seconds": round(float(outcome.result.seconds), 3),
              # training with its per-epoch dev scoring, plus the final test scoring: the trial's own work
              "train_eval_seconds": round(float(outcome.result.seconds + outcome.eval_seconds), 3),
              "history": [h.get("dev_acc") for h in outcome.result.history if h.get("dev_acc") is not None]}
    if latency:
        loaders = make_loaders(task, team.tokenizer, config.max_length or team.max_length, config.batch_size,
                               config.seed, config.train_split)
        record["latency_ms"] = round(student_latency_ms(outcome.student, loaders.dev), 4)
    return record


def run_autoskd_trial(spec: TrialSpec, values: dict, out_dir: Path) -> dict:
    """One AutoSKD search with the point's settings (theta.* and SearchConfig fields)."""
    from ..search.run import SearchConfig, run_search

    values = dict(values)
    preset = values.pop("preset", "quick")
    theta = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("theta.")}
    options = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("method_options.")}
    rest = {k: v for k, v in values.items() if "." not in k}
    task = dict(spec.task)
    rest.setdefault("max_train", task.pop("max_train", None))
    rest.setdefault("max_eval", task.pop("max_eval", None))
    config = SearchConfig.from_preset(preset, theta=theta, executor="local", **rest)
    if options:
        config.method_options = {**config.method_options, **options}
    summary = run_search(spec.team_path, task, config, out_dir, cache_dir=spec.cache_dir, progress=False)
    test_acc = summary["best"].get("test_acc")  # none when the best arm was stopped early
    return {"dev_acc": float(summary["best"]["dev_acc"]), "test_acc": None if test_acc is None else float(test_acc),
            "best_candidate": summary["best"]["name"], "theta": summary["best"].get("theta"), "epochs": 1}


def tune_trainable(config: dict, spec: dict | None = None, space: dict | None = None, env: dict | None = None,
                   report_epochs: bool = False, latency: bool = False) -> None:
    """The Ray Tune function trainable of ``autoskd tune``."""
    from ray import tune

    spec = prepare_worker(spec, env)
    space = SearchSpace.from_dict(space)
    config = dict(config)
    name = trial_name(config.pop("optuna_trial", None), tune.get_context().get_trial_id())
    values = space.trial_values(config)
    out = Path(spec.root) / "trials" / name
    out.mkdir(parents=True, exist_ok=True)
    (out / ERROR_FILE).unlink(missing_ok=True)
    start = time.perf_counter()
    try:
        if space.kind == "autoskd":
            record = run_autoskd_trial(spec, values, out)
        elif space.kind == "lm":
            from .lm_trial import run_lm_trial

            record = run_lm_trial(spec, values, out, report=tune.report if report_epochs else None, latency=latency)
        else:
            record = run_distill_trial(spec, values, out, report=tune.report if report_epochs else None,
                                       latency=latency)
    except Exception as err:  # Ray Tune records the trial as failed; its reason stays beside it
        write_error(out, err)
        raise
    record = {"trial": name, "values": values, **record, "seconds": round(time.perf_counter() - start, 3)}
    write_json(out / "trial.json", record)
    tune.report(final_report(record, space_metric(space)))


def final_report(record: dict, metric) -> dict:
    """A finished trial's last report: its scores, and what the scheduler ranks by (``dev_score``
    for accuracy, with its dev-loss tie-break; the metric itself otherwise) and its record as JSON
    (the searcher stores it with the Optuna trial)."""
    keys = (metric.key, TEST_KEYS.get(metric.key), "val_ppl", "student_params_m", "latency_ms", "epochs")
    report = {k: record[k] for k in keys if k is not None and record.get(k) is not None}
    if metric.key == "dev_acc":
        report["dev_score"] = record_score(record)
    return report | {"record_json": json.dumps(record)}
