"""Run arms (candidates and baselines): each arm is one :func:`autoskd.pipeline.distill` call.

Two executors share one unit of work, :func:`run_arm`:

* ``ray`` (default): every arm is a Ray Tune trial with its own CPU/GPU share, so arms run in
  parallel on the local machine or on an existing cluster (``address="ray://head:10001"``).
* ``local``: the arms one after another in this process (debugging, tests, no Ray).

Nothing live crosses a process boundary: a trial gets a :class:`TrialSpec` (paths and plain
values) and an :class:`~autoskd.search.arms.Arm` as dicts, and rebuilds the task and the team
from disk. The team build hits the teacher cache, and every trial reads the same cache of
teacher outputs (its writes are atomic).

Output, per arm::

    <root>/trials/<arm>/arm.json     the record (arm fields, dev_acc, test_acc, seconds, ...)
    <root>/trials/<arm>/student/     the distilled student (saved by distill)
    <root>/trials/<arm>/error.txt    the traceback, when the arm failed
    <root>/ray/trials/               Ray Tune's own experiment folder (ray executor)

An arm whose ``arm.json`` exists is finished: running again loads it (resume) when its stamp
(:mod:`autoskd.rerun`: the arm and its :attr:`TrialSpec.identity`) matches; an arm of another
configuration under the same name (candidates are named by index) stops the run in one line,
before any arm trains.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from ..atomic import write_json
from ..errors import AutoSKDError
from ..ray_runtime import module_root, progress_callback, quiet_tune_logs, ray_session, worker_env
from ..rerun import canonical, check_stamp, path_identity, stamp
from .arms import Arm

__all__ = ["TrialSpec", "run_arm", "run_arms", "distill_arm", "load_record", "arm_dir", "prepare_worker",
           "trial_worker_env", "teacher_task", "task_identity", "arm_identity", "DEFAULT_RUNNER"]

DEFAULT_RUNNER = "autoskd.search.trials:distill_arm"
#: (dev, test) scores a runner returns: a classifier's accuracies or a language model's perplexities
SCORE_KEYS = (("dev_acc", "test_acc"), ("dev_ppl", "test_ppl"))


def task_identity(task: dict | str) -> dict:
    """A task's ``load_task`` arguments and, for a local data file or folder, its files' sizes and
    modification times (an edited data file is another task)."""
    task = {"name_or_path": task} if isinstance(task, (str, os.PathLike)) else dict(task)
    data = path_identity(task.get("name_or_path", ""))
    return {**task, **({"data": data} if data is not None else {})}


def _absolute_if_exists(path: str) -> str:
    """A relative path that exists here, made absolute; anything else (a task or team name) unchanged."""
    p = Path(str(path)).expanduser()
    return str(p.absolute()) if not p.is_absolute() and p.exists() else str(path)


@dataclass
class TrialSpec:
    """Everything a trial process needs to rebuild task and team and run one arm.

    * ``team_path``: the team YAML (or a bundled team's bare name);
    * ``task``: :func:`~autoskd.data.tasks.load_task` keyword arguments (``name_or_path``,
      ``text_column``, ``text_pair_column``, ``label_column``, ``seed``, ...) plus ``max_train`` /
      ``max_eval`` for :meth:`~autoskd.data.tasks.TaskData.subsample`; a plain string is a task name;
    * ``cache_dir``: the cache root (teachers under ``<cache_dir>/teachers``, teacher outputs under
      ``<cache_dir>/teacher_outputs``, as in the CLI);
    * ``base_config``: the base :class:`~autoskd.pipeline.DistillConfig` (dict or instance); each
      arm only changes its teacher policy;
    * ``root``: the output root (arms go to ``<root>/trials/<arm>/``);
    * ``runner``: import path ``module:function`` of ``runner(spec, arm, out_dir) -> dict`` (at
      least ``dev_acc``, ``test_acc``) that trains one arm; tests point it at a fake;
    * ``identity``: what every arm of this spec computes from (default, filled in where the spec is
      made: the team file and what its members' sources hold, the task and its data file, the
      base config, the runner); each ``arm.json`` records it with its arm (:func:`arm_identity`).

    Paths that exist are made absolute on construction (trials may run in another directory).
    """

    team_path: str
    task: dict | str
    root: str
    cache_dir: str = ".cache/autoskd"
    base_config: dict = field(default_factory=dict)
    runner: str = DEFAULT_RUNNER
    workdir: str = ""
    identity: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if dataclasses.is_dataclass(self.base_config):
            self.base_config = dataclasses.asdict(self.base_config)
        self.base_config = dict(self.base_config or {})
        task = {"name_or_path": self.task} if isinstance(self.task, (str, os.PathLike)) else dict(self.task)
        if "name_or_path" not in task:
            raise AutoSKDError(f"TrialSpec.task needs 'name_or_path' (got keys {sorted(task)})")
        task["name_or_path"] = _absolute_if_exists(task["name_or_path"])
        self.task = task
        self.team_path = _absolute_if_exists(self.team_path)
        self.root = str(Path(self.root).expanduser().absolute())
        self.cache_dir = str(Path(self.cache_dir).expanduser().absolute())
        self.workdir = self.workdir or os.getcwd()
        if not self.identity:  # where the spec is made (the driver): the team file is read here
            from ..team.cache import team_file_identity

            self.identity = canonical({"team": team_file_identity(self.team_path), "task": task_identity(self.task),
                                       "base_config": self.base_config, "runner": self.runner})

    @property
    def seed(self) -> int:
        return int(self.task.get("seed", self.base_config.get("seed", 0)) or 0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrialSpec":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    # ---- rebuilding the live objects inside a trial
    def distill_config(self):
        from ..pipeline import DistillConfig

        return DistillConfig(**self.base_config)

    def _full_task(self):
        from ..data.tasks import load_task

        kwargs = {k: v for k, v in self.task.items() if k not in ("max_train", "max_eval", "teachers_full_data")}
        kwargs.setdefault("seed", self.seed)
        return load_task(**kwargs)

    def load_task(self):
        """The students' task (subsampled as ``max_train``/``max_eval`` say)."""
        task = self._full_task()
        max_train, max_eval = self.task.get("max_train"), self.task.get("max_eval")
        if max_train or max_eval:
            task = task.subsample(max_train, max_eval, seed=self.seed)
        return task

    def build_team(self, task, progress: bool = False):
        """The team as the search built it: on the whole training split with ``teachers_full_data``."""
        from ..team import TeacherTeam

        if self.task.get("teachers_full_data"):
            task = teacher_task(self._full_task(), task)
        team = TeacherTeam.from_yaml(self.team_path)
        return team.build(task, cache_dir=Path(self.cache_dir) / "teachers", seed=self.seed, progress=progress)


def teacher_task(full, students):
    """The teachers' task with ``teachers_full_data``: the whole training split of ``full``, and
    the students' own dev and test rows (so teachers and students are scored on the same rows)."""
    from ..data.tasks import TaskData

    splits = {"train": full.splits["train"], "val": full.splits["val"],
              "dev": students.splits["dev"], "test": students.splits["test"]}
    return TaskData(full.name, list(full.label_names), full.text_column, full.text_pair_column, splits)


def arm_dir(root: str | Path, arm: Arm | str) -> Path:
    return Path(root) / "trials" / (arm.name if isinstance(arm, Arm) else arm)


def _resolve_runner(path: str) -> Callable:
    module, sep, attr = path.partition(":")
    if not sep or not module or not attr:
        raise AutoSKDError(f"trial runner {path!r} must look like 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise AutoSKDError(f"cannot import trial runner {path!r}: {err}") from err
    if not callable(fn):
        raise AutoSKDError(f"trial runner {path!r} is not a function")
    return fn


def distill_arm(spec: TrialSpec, arm: Arm, out_dir: Path) -> dict:
    """The real runner: rebuild task and team, distil a student with the arm's teacher policy."""
    from ..pipeline import distill

    from .early_stop import dev_score, epoch_reporters

    task = spec.load_task()
    team = spec.build_team(task)
    config = arm.distill_config(spec.distill_config())
    outcome = distill(team, task, config, out_dir=out_dir, cache_dir=spec.cache_dir, progress=False,
                      callbacks=epoch_reporters(config))  # per-epoch dev accuracy when a scheduler is on
    return {"dev_acc": float(outcome.dev_acc), "test_acc": float(outcome.test_acc),
            "dev_score": dev_score(outcome.result.history),  # what a scheduler ranks by
            "steps": int(outcome.result.steps), "train_seconds": round(float(outcome.result.seconds), 2),
            "teacher_counts": outcome.teacher_counts}


def arm_identity(spec: TrialSpec, arm: Arm) -> dict:
    """What an arm's record is computed from: the arm (kind, θ, teacher) and its spec's identity."""
    return {"arm": arm.to_dict(), "spec": spec.identity}


def load_record(root: str | Path, arm: Arm | str) -> dict | None:
    """The finished record of an arm, or None (not run, failed, or unreadable)."""
    path = arm_dir(root, arm) / "arm.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and any(dev in record for dev, _ in SCORE_KEYS) else None


def run_arm(spec: TrialSpec, arm: Arm) -> dict:
    """Train one arm (one ``distill`` call), write ``<root>/trials/<arm>/arm.json``, return the record.

    On failure the traceback goes to ``error.txt`` in the arm's folder and the error propagates.
    """
    spec = spec if isinstance(spec, TrialSpec) else TrialSpec.from_dict(spec)
    arm = arm if isinstance(arm, Arm) else Arm.from_dict(arm)
    out = arm_dir(spec.root, arm)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        result = dict(_resolve_runner(spec.runner)(spec, arm, out) or {})
    except BaseException:
        (out / "error.txt").write_text(traceback.format_exc())
        raise
    keys = next((pair for pair in SCORE_KEYS if set(pair) <= set(result)), None)
    if keys is None:
        raise AutoSKDError(f"trial runner {spec.runner!r} returned no dev_acc/test_acc (or dev_ppl/test_ppl) for "
                           f"arm {arm.name!r}")
    record = {**arm.to_dict(), **{k: float(result.pop(k)) for k in keys},
              "seconds": round(time.perf_counter() - start, 2), "steps": result.pop("steps", None),
              "student_trainings": 1, "teacher_counts": result.pop("teacher_counts", None), **result,
              **stamp(arm_identity(spec, arm))}
    write_json(out / "arm.json", record)
    (out / "error.txt").unlink(missing_ok=True)
    return record


def _one_line(err: BaseException | Any) -> str:
    """``Type: first line of the message`` of an error (Ray wraps trial errors; unwrap them)."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        err = cause
    if isinstance(err, BaseException):
        text = str(err).strip().splitlines()
        return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
    text = str(err).strip().splitlines()
    return text[-1] if text else "unknown error"


def _failed(arm: Arm, error: str) -> dict:
    return {**arm.to_dict(), "dev_acc": None, "test_acc": None, "seconds": None, "steps": None,
            "student_trainings": 0, "teacher_counts": None, "status": "failed", "error": error}


# ---------------------------------------------------------------------------------------- Ray
def trial_worker_env(spec: TrialSpec, cpus_per_trial: float) -> dict[str, str]:
    """The environment of a trial process running ``spec`` (the runner's package importable too);
    checks, in the driver, that ``spec.runner`` imports."""
    _resolve_runner(spec.runner)  # fail early, in the driver, on a bad runner path
    return worker_env(cpus_per_trial, (module_root(spec.runner.partition(":")[0]),))


def prepare_worker(spec: dict | TrialSpec, env: dict | None) -> TrialSpec:
    """Inside a trial process: the driver's environment, working directory and thread count."""
    for key, value in (env or {}).items():  # also when Ray was initialised without our runtime_env
        if key != "PYTHONPATH":
            os.environ.setdefault(key, value)
    spec = spec if isinstance(spec, TrialSpec) else TrialSpec.from_dict(spec)
    if os.path.isdir(spec.workdir):  # same relative-path behaviour as the driver
        os.chdir(spec.workdir)
    import torch

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    return spec


def _ray_trainable(config: dict, spec: dict | None = None, env: dict | None = None) -> None:
    """One Ray Tune trial: run the arm, report its record (as JSON, so nothing gets flattened)."""
    from ray import tune

    from .early_stop import record_score

    spec = prepare_worker(spec, env)
    try:
        record = run_arm(spec, Arm.from_dict(config["arm"]))
    except Exception as err:  # the arm's own error: a result, not a reason for Ray to retry it
        tune.report({"arm_error": _one_line(err), "dev_score": _FAILED_SCORE})
        return
    tune.report({"dev_acc": record.get("dev_acc"), "dev_score": record_score(record),
                 "record_json": json.dumps(record)})


#: the score a failed arm reports, so a scheduler ranks it last
_FAILED_SCORE = -1e9
#: Ray retries a trial whose worker died (killed, out of host memory) this many times; an arm that
#: raises reports its error as a result instead, so it is never retried (its error is final)
WORKER_RETRIES = 1


def _trial_name(trial) -> str:
    return str(trial.config["arm"]["name"])


def _arm_status(trial, status: str) -> str:
    return f"{_trial_name(trial)} {status}"


def _run_ray(spec: TrialSpec, arms: list[Arm], *, address: str | None, cpus_per_trial: float, gpus_per_trial: float,
             max_concurrent: int | None, num_cpus: int | None, progress: bool,
             scheduler: str | None = None) -> dict[str, dict]:
    from ray import tune

    env = trial_worker_env(spec, cpus_per_trial)
    tune_scheduler = None
    if scheduler not in (None, "none"):
        from .early_stop import REPORT_ENV, evaluated_epochs, make_scheduler

        env[REPORT_ENV] = "1"  # trials report dev accuracy per epoch, so the scheduler can stop them
        tune_scheduler = make_scheduler(scheduler, evaluated_epochs(spec.distill_config()))
    with ray_session(env, address=address, num_cpus=num_cpus):
        trainable = tune.with_resources(tune.with_parameters(_ray_trainable, spec=spec.to_dict(), env=env),
                                        {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
        tuner = tune.Tuner(
            trainable,
            param_space={"arm": tune.grid_search([a.to_dict() for a in arms])},
            tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, trial_name_creator=_trial_name,
                                        trial_dirname_creator=_trial_name, reuse_actors=False,
                                        scheduler=tune_scheduler),
            run_config=tune.RunConfig(storage_path=str(Path(spec.root) / "ray"), name="trials", verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=WORKER_RETRIES, fail_fast=False),
                                      callbacks=[progress_callback(len(arms), "arms (ray)", "arm", _arm_status)]
                                      if progress else None),
        )
        with quiet_tune_logs():  # a failed trial's traceback is in its error.txt and still logged as ERROR
            grid = tuner.fit()
        out: dict[str, dict] = {}
        for result in grid:
            name = (result.config or {}).get("arm", {}).get("name")
            if name is None:
                continue
            if result.metrics and result.metrics.get("arm_error"):
                out[name] = {"error": result.metrics["arm_error"]}
            elif result.error is not None:  # the worker died more often than it is retried
                out[name] = {"error": _one_line(result.error)}
            elif result.metrics and "record_json" in result.metrics:
                out[name] = json.loads(result.metrics["record_json"])
            elif result.metrics and result.metrics.get("dev_acc") is not None:  # the scheduler stopped it
                out[name] = {"stopped": dict(result.metrics)}
        return out


# ---------------------------------------------------------------------------------------- both
def run_arms(spec: TrialSpec, arms: Iterable[Arm], executor: str = "ray", address: str | None = None,
             cpus_per_trial: float = 1, gpus_per_trial: float = 0, max_concurrent: int | None = None,
             progress: bool = True, num_cpus: int | None = None, scheduler: str | None = None) -> list[dict]:
    """Run every arm not finished yet; one record per arm, in input order.

    A record is the arm's ``arm.json`` plus ``status``: ``finished`` (ran now), ``loaded`` (found
    on disk), ``stopped`` (``scheduler="asha"`` stopped it early: its dev accuracy when stopped,
    ``epochs_run`` of ``epochs_planned``, no test accuracy) or ``failed`` (``error`` holds one
    line; the traceback is in the arm's ``error.txt``).
    One failing arm never stops the others. ``address``: an existing Ray cluster (e.g.
    ``ray://head:10001``); by default a local Ray is started on 127.0.0.1 with ``num_cpus`` (all
    cores) and shut down afterwards. If Ray is already initialised it is used as is.
    """
    arms = [a if isinstance(a, Arm) else Arm.from_dict(a) for a in arms]
    names = [a.name for a in arms]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise AutoSKDError(f"arm names must be unique; repeated: {', '.join(dupes)}")
    if executor not in ("ray", "local"):
        raise AutoSKDError(f"unknown executor {executor!r}; choose ray or local")
    if scheduler not in (None, "none") and executor != "ray":
        raise AutoSKDError(f"scheduler {scheduler!r} stops Ray Tune trials; use executor 'ray'")
    if cpus_per_trial <= 0 or gpus_per_trial < 0:
        raise AutoSKDError(f"cpus_per_trial must be > 0 and gpus_per_trial >= 0 (got {cpus_per_trial}, {gpus_per_trial})")
    if max_concurrent is not None and max_concurrent < 1:
        raise AutoSKDError(f"max_concurrent must be at least 1 (got {max_concurrent})")

    records: dict[str, dict] = {}
    todo = []
    for arm in arms:
        done = load_record(spec.root, arm)
        # an arm of another configuration under this name stops the run now, before any arm trains
        check_stamp(done, arm_identity(spec, arm), f"arm {arm.name} ({arm_dir(spec.root, arm) / 'arm.json'})",
                    spec.root)
        if done is not None:
            records[arm.name] = {**done, "status": "loaded"}
        else:
            todo.append(arm)

    if todo and executor == "local":
        from tqdm.auto import tqdm

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        bar = tqdm(todo, desc="arms", unit="arm", disable=not progress)
        for arm in bar:
            bar.set_postfix_str(arm.name)
            try:
                records[arm.name] = {**run_arm(spec, arm), "status": "finished"}
            except KeyboardInterrupt:
                raise
            except Exception as err:  # noqa: BLE001 - one failed arm must not stop the search
                records[arm.name] = _failed(arm, _one_line(err))
    elif todo:
        results = _run_ray(spec, todo, address=address, cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial,
                           max_concurrent=max_concurrent, num_cpus=num_cpus, progress=progress, scheduler=scheduler)
        for arm in todo:
            got = results.get(arm.name)
            if got is None:
                records[arm.name] = _failed(arm, "the trial did not run (Ray returned no result)")
            elif "stopped" in got:
                from .early_stop import evaluated_epochs, stopped_record

                planned = evaluated_epochs(arm.distill_config(spec.distill_config()))
                record = stopped_record({**arm.to_dict(), "seconds": None, "steps": None, "student_trainings": 1,
                                         "teacher_counts": None, **stamp(arm_identity(spec, arm))},
                                        got["stopped"], planned)
                write_json(arm_dir(spec.root, arm) / "arm.json", record)  # finished work: not re-run on resume
                records[arm.name] = {**record, "status": "stopped"}
            elif "error" in got and not any(dev in got for dev, _ in SCORE_KEYS):
                records[arm.name] = _failed(arm, got["error"])
            else:
                if load_record(spec.root, arm) is None:  # remote cluster without shared storage
                    write_json(arm_dir(spec.root, arm) / "arm.json", got)
                records[arm.name] = {**got, "status": "finished"}
        if scheduler not in (None, "none"):
            from .early_stop import compute_report, evaluated_epochs

            saved = compute_report([records[a.name] for a in todo], evaluated_epochs(spec.distill_config()))
            print(f"{scheduler}: stopped {saved['stopped_early']} of {len(todo)} arms early; "
                  f"{saved['student_epochs']} of {saved['student_epochs_planned']} student-epochs run "
                  f"({100 * saved['saved_fraction']:.0f}% saved)")
    return [records[a.name] for a in arms]
