"""``autoskd tune``: a search space's points as Ray Tune trials, sampled by Optuna, on the one engine.

1. the driver loads the space, builds the team once (teachers into the shared cache) and opens
   the Optuna study in its storage (a killed tune resumes: see :mod:`autoskd.fanout.study`);
2. Ray Tune runs the missing trials (:func:`autoskd.fanout.trial.tune_trainable`) with
   ``OptunaSearch`` and the chosen sampler, and ASHA when ``scheduler="asha"`` (trials report their
   dev score per epoch through an engine callback);
3. :func:`autoskd.fanout.results.write_results`: table, best config, best student, plots.

What "better" means comes from the space's metric (:func:`autoskd.fanout.trial.space_metric`):
dev accuracy, maximised, for classification spaces; dev perplexity, minimised, for a ``kind: lm``
space on an ``lm:<corpus>`` task (:mod:`autoskd.fanout.lm_trial`). The study, the searcher and
ASHA all take their direction from it, and the study records it (``metric``,
``metric_direction``), so resuming a study with the other metric is one line.

Ray is started and stopped as for AutoSKD's arms (:func:`autoskd.ray_runtime.ray_session`):
locally on 127.0.0.1, or on the cluster at ``address`` (``auto`` inside ``ray job submit``).

A rerun resumes the study only for the same tune (:mod:`autoskd.rerun`): the study records what
its trials are computed from (space, team, task, base config, sampler, scheduler, seed, second
objective) in its user attribute ``autoskd_run``, and ``tune.json`` that plus the study's name
and storage; another configuration stops in one line naming the keys that differ. More trials,
other resources or another Ray address resume (:data:`RESUME_FREE`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..atomic import write_json
from ..errors import AutoSKDError
from ..rerun import check_stamp, stamp
from ..ray_runtime import progress_callback, quiet_tune_logs, ray_session
from ..search.early_stop import SCHEDULERS, evaluated_epochs, make_scheduler
from ..search.trials import TrialSpec, trial_worker_env
from .results import write_results
from .lm_trial import absolute_lm_task, is_lm_task, lm_evaluations, lm_values
from .space import SearchSpace, check_space_task
from .study import SAMPLERS, fail_stale_trials, finished_trials, make_sampler, open_storage, open_study, storage_url
from .trial import OBJECTIVES, distill_values, space_metric

__all__ = ["TuneSettings", "run_tune"]

_DEFAULT_TRIALS = 10

#: TuneSettings fields a rerun may change and still resume the study: how many trials, where and
#: how fast they run (``storage`` and ``study`` name the study itself; ``base`` is in the spec).
RESUME_FREE = ("trials", "address", "cpus_per_trial", "gpus_per_trial", "max_concurrent", "num_cpus", "storage",
               "study")
#: the study's user attribute holding its stamp
STUDY_STAMP = "autoskd_run"


@dataclass
class TuneSettings:
    """How to tune: sampler, scheduler, how many trials, where the study lives, resources."""

    sampler: str = "tpe"
    scheduler: str = "none"
    trials: int | None = None           # None: the grid's size (grid sampler) or 10
    storage: str | None = None          # None: sqlite:///<out>/optuna.db
    study: str | None = None            # None: the space's name
    objective2: str | None = None       # size | latency: a second objective (nsga2 defaults to size)
    seed: int = 0
    reduction_factor: float = 2.0
    grace_period: int = 1
    address: str | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int | None = None
    num_cpus: int | None = None
    base: dict = field(default_factory=dict)  # DistillConfig fields every trial starts from

    def check(self, space: SearchSpace) -> None:
        if self.sampler not in SAMPLERS:
            raise AutoSKDError(f"unknown sampler {self.sampler!r}; choose one of: {', '.join(SAMPLERS)}")
        if self.scheduler not in SCHEDULERS:
            raise AutoSKDError(f"unknown scheduler {self.scheduler!r}; choose one of: {', '.join(SCHEDULERS)}")
        if self.sampler == "nsga2" and self.objective2 is None:
            self.objective2 = "size"
        if self.objective2 is not None and self.objective2 not in OBJECTIVES:
            raise AutoSKDError(f"unknown second objective {self.objective2!r}; choose one of: {', '.join(OBJECTIVES)}")
        if self.objective2 and space.kind == "autoskd":
            raise AutoSKDError("a second objective needs kind 'distill' or 'lm' trials (an autoskd trial reports "
                               "dev accuracy only)")
        if self.trials is not None and self.trials < 1:
            raise AutoSKDError(f"--trials must be at least 1 (got {self.trials})")
        if self.cpus_per_trial <= 0:
            raise AutoSKDError(f"--cpus-per-trial must be > 0 (got {self.cpus_per_trial})")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise AutoSKDError(f"--max-concurrent must be at least 1 (got {self.max_concurrent})")

    def objectives(self, space: SearchSpace) -> list[str]:
        """The study's objectives: the space's dev metric (``dev_acc``, ``dev_ppl``), then the
        second objective's record key."""
        return [space_metric(space).key] + ([OBJECTIVES[self.objective2]] if self.objective2 else [])

    def directions(self, space: SearchSpace) -> list[str]:
        """Optuna's directions of :meth:`objectives`: the metric's own, then ``minimize``."""
        first = "maximize" if space_metric(space).higher_is_better else "minimize"
        return [first] + (["minimize"] if self.objective2 else [])


def _max_epochs(space: SearchSpace, base: dict) -> int:
    """The most dev evaluations any point of the space makes (ASHA's ``max_t``)."""
    if space.kind == "autoskd":
        return 1
    if space.kind == "lm":
        return _max_lm_evaluations(space, base)
    grid_keys = {k: d for k, d in space.params.items() if k in ("method", "epochs") and d.kind in ("grid", "choice")}
    methods = list(grid_keys["method"].values) if "method" in grid_keys else [space.fixed.get("method", base.get("method", "kd"))]
    epochs_dom = space.params.get("epochs")
    epochs = (max(epochs_dom.values) if epochs_dom.kind in ("grid", "choice") else epochs_dom.high) if epochs_dom \
        else space.fixed.get("epochs", base.get("epochs", 3.0))
    best = 1
    for m in methods:
        config, _ = distill_values(base, {**space.fixed, "method": m, "epochs": epochs})
        config.method_options = {}  # a space's tuned options never change the stage count
        best = max(best, evaluated_epochs(config))
    return best


def _max_lm_evaluations(space: SearchSpace, base: dict) -> int:
    """ASHA's ``max_t`` of an LM space: the most dev evaluations of any method and epoch count."""
    method_dom = space.params.get("method")
    methods = list(method_dom.values) if method_dom is not None \
        else [space.fixed.get("method", base.get("method", "kd"))]
    epochs_dom = space.params.get("epochs")
    epochs = (max(epochs_dom.values) if epochs_dom.kind in ("grid", "choice") else epochs_dom.high) if epochs_dom \
        else space.fixed.get("epochs", base.get("epochs", 1.0))
    best = 1
    for m in methods:
        config, _ = lm_values(base, {**space.fixed, "method": m, "epochs": epochs})  # tuned options keep the stages
        best = max(best, lm_evaluations(config))
    return best


def _check_lm_depth(space: SearchSpace, team_path: str) -> None:
    """The space's deepest ``student.depth`` must fit the team's student (its kept layers, read
    from the team file and the source's config: no weights load), checked before anything runs."""
    from .lm_trial import lm_team, team_student_layers

    depth = space.params.get("student.depth")
    deepest = (depth.high if depth.kind == "int" else max(depth.values)) if depth is not None \
        else space.fixed.get("student.depth")
    if deepest is None:
        return
    kept = team_student_layers(lm_team(team_path).student_spec)
    if deepest > len(kept):
        raise AutoSKDError(f"search space key 'student.depth' reaches {deepest} layers, but the team's student keeps "
                           f"{len(kept)} ({kept}); lower the depth to at most {len(kept)}")


def _build_lm_team(spec: TrialSpec, progress: bool) -> None:
    """Build the LM team once in the driver (a GGUF converted, ``train:`` teachers trained into
    the cache) on the trials' corpus, so trials read it from the cache instead of racing to make it."""
    from .lm_trial import lm_team, load_lm_corpus

    lm_team(spec.team_path).build(seed=spec.seed, corpus=load_lm_corpus(spec.task), cache_dir=spec.cache_dir,
                                  progress=progress)


def _build_team(spec: TrialSpec, progress: bool) -> None:
    """Fine-tune (or find cached) the team's teachers once, before any trial needs them: the
    same team the trials build (``TrialSpec.build_team``, whole training split with
    ``teachers_full_data``), never a second one on the students' rows."""
    spec.build_team(spec.load_task(), progress=progress)


def run_tune(space: SearchSpace, team_path: str, task_args: dict, settings: TuneSettings, out_dir: str | Path,
             cache_dir: str | Path = ".cache/autoskd", progress: bool = True) -> dict:
    """Run (or resume) a tune; returns the summary written to ``<out>/summary.json``."""
    import optuna

    settings.check(space)
    lm = is_lm_task(task_args)
    check_space_task(space, lm)
    if lm:
        task_args = absolute_lm_task(task_args)
        _check_lm_depth(space, team_path)
    objectives, directions = settings.objectives(space), settings.directions(space)
    metric = space_metric(space)
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    url = storage_url(settings.storage, out_dir)
    study_name = settings.study or space.name
    sampler = make_sampler(settings.sampler, space, seed=settings.seed, multi_objective=bool(settings.objective2))
    grid_size = space.grid_size() if settings.sampler == "grid" else None
    wanted = settings.trials or grid_size or _DEFAULT_TRIALS
    if grid_size is not None and wanted > grid_size:
        raise AutoSKDError(f"--trials {wanted} is more than the grid's {grid_size} points")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = TrialSpec(team_path=team_path, task=task_args, root=str(out_dir), cache_dir=str(cache_dir),
                     base_config=settings.base)
    identity = tune_identity(space, spec, settings)
    storage = open_storage(url)
    study = open_study(storage, study_name, directions, space, objectives, metric=metric.name)
    check_study(study, study_name, identity)
    run = {**identity, "study": study_name, "storage": url}
    # this folder's trials, tables and best student belong to one study of one configuration
    check_stamp(_read_json(out_dir / "tune.json"), run, f"--out {out_dir} (tune.json)", out_dir)
    stale = fail_stale_trials(study, out_dir, objectives)  # trials finished on disk are told first
    # a grid counts distinct points: a point run twice is still one point, a failed one runs again
    done = sampler.points_done(study) if grid_size is not None else len(finished_trials(study))
    if grid_size is not None:
        sampler.start_run(study)
    todo = max(0, wanted - done)
    write_json(out_dir / "tune.json", {"space": space.to_dict(), "storage": url, "study": study_name,
                                       "settings": asdict(settings), "team": spec.team_path, "task": spec.task,
                                       **stamp(run)}, default=str)
    if done or stale:
        print(f"study {study_name!r}: {done} finished trial(s) kept" + (f", {stale} unfinished marked failed" if stale
                                                                           else "") + f"; {todo} to run")
    if todo:
        if lm:
            _build_lm_team(spec, progress)
        else:
            _build_team(spec, progress)
        _run_trials(space, spec, settings, study_name, storage, sampler, todo, progress)
    study = optuna.load_study(study_name=study_name, storage=storage)
    summary = write_results(study, out_dir, objectives)
    summary.update(storage=url, sampler=settings.sampler, scheduler=settings.scheduler, metric=metric.name,
                   direction=directions[0])
    write_json(out_dir / "summary.json", summary, default=str)
    return summary


def tune_identity(space: SearchSpace, spec: TrialSpec, settings: TuneSettings) -> dict:
    """What a tune's trials are computed from: the space, the trial spec's identity (team file and
    its sources, task and data file, base config, runner) and the settings that shape the study's
    trials (all but :data:`RESUME_FREE`)."""
    kept = {k: v for k, v in asdict(settings).items() if k not in RESUME_FREE and k != "base"}
    identity = {"space": space.to_dict(), **spec.identity, "settings": kept}
    if is_lm_task(spec.task):  # an edited corpus file is another tune (the task name alone is a string)
        from ..rerun import path_identity
        from .lm_trial import corpus_source

        data = path_identity(corpus_source(spec.task))
        if data is not None:
            identity["corpus"] = data
    return identity


def check_study(study, study_name: str, identity: dict) -> None:
    """The study (possibly in a shared storage) must hold trials of this configuration only: it
    records its stamp when it has none, and a mismatch is one line."""
    stored = study.user_attrs.get(STUDY_STAMP)
    fresh = "use another --study name (a new study in the same storage), or a new --out with its own storage"
    if stored is None:
        if study.get_trials(deepcopy=False):  # trials of an unknown configuration
            check_stamp({}, identity, f"study {study_name!r}", fresh=fresh)
        study.set_user_attr(STUDY_STAMP, json.dumps(stamp(identity)))
        return
    try:
        record = json.loads(stored)
    except (TypeError, ValueError):
        record = {}
    check_stamp(record, identity, f"study {study_name!r} in the storage", fresh=fresh)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _trial_label(key: str):
    """The progress bar's label after a trial: its dev score (none after a failure)."""
    def label(trial, status: str) -> str | None:
        return f"{key} {trial.last_result.get(key, float('nan')):.4f}" if status == "done" else None

    return label


def _run_trials(space: SearchSpace, spec: TrialSpec, settings: TuneSettings, study_name: str, storage, sampler,
                todo: int, progress: bool) -> None:
    from ray import tune

    from .study import TuneSearch

    objectives = settings.objectives(space)
    modes = [d[:3] for d in settings.directions(space)]  # maximize -> max, minimize -> min
    multi = len(objectives) > 1
    search = TuneSearch(space=space.to_optuna(), metric=objectives if multi else objectives[0],
                        mode=modes if multi else modes[0], sampler=sampler, study_name=study_name,
                        storage=storage)
    # ASHA ranks accuracy by dev_score (accuracy with a dev-loss tie-break); other metrics by themselves
    rank = ("dev_score", "max") if objectives[0] == "dev_acc" else (objectives[0], modes[0])
    scheduler = make_scheduler(settings.scheduler, _max_epochs(space, settings.base), settings.grace_period,
                               settings.reduction_factor, metric=rank[0], mode=rank[1])
    env = trial_worker_env(spec, settings.cpus_per_trial)
    trainable = tune.with_parameters(tune_trainable_ref(), spec=spec.to_dict(), space=space.to_dict(), env=env,
                                     report_epochs=scheduler is not None, latency=settings.objective2 == "latency")
    trainable = tune.with_resources(trainable, {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial})
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with ray_session(env, address=settings.address, num_cpus=settings.num_cpus):
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=search, scheduler=scheduler, num_samples=todo,
                                        max_concurrent_trials=settings.max_concurrent, reuse_actors=True,
                                        trial_dirname_creator=lambda t: t.trial_id),
            run_config=tune.RunConfig(storage_path=str(Path(spec.root) / "ray"), name=f"tune-{stamp}", verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                                      callbacks=[progress_callback(todo, "trials (ray)", "trial",
                                                                   _trial_label(objectives[0]))]
                                      if progress else None),
        )
        with quiet_tune_logs():
            tuner.fit()


def tune_trainable_ref():
    from .trial import tune_trainable

    return tune_trainable
