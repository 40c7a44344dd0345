"""Optuna's side of ``autoskd tune``: storage, samplers, the study and its resume.

Every sampler, grid and random included, is an Optuna sampler driven by Ray Tune's
``OptunaSearch``, so every tune lives in one Optuna study in an RDB storage (SQLite by default,
a PostgreSQL URL on a cluster) that optuna-dashboard can show. A killed tune resumes from the
study: finished trials (complete or stopped early) count, trials left running by the killed
driver are marked failed, and only the missing trials run; the samplers see every stored trial.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
from optuna.trial import TrialState

from ..errors import AutoSKDError
from .space import SearchSpace

__all__ = ["SAMPLERS", "storage_url", "open_storage", "make_sampler", "open_study", "finished_trials",
           "fail_stale_trials", "TuneSearch"]

SAMPLERS = ("grid", "random", "tpe", "cmaes", "nsga2")
DONE = (TrialState.COMPLETE, TrialState.PRUNED)


def storage_url(storage: str | None, out_dir: Path) -> str:
    """The storage URL: as given, a bare file path as SQLite, or ``sqlite:///<out>/optuna.db``."""
    if not storage:
        return f"sqlite:///{(Path(out_dir) / 'optuna.db').absolute()}"
    if "://" not in storage:
        return f"sqlite:///{Path(storage).absolute()}"
    return storage


def open_storage(url: str) -> "optuna.storages.RDBStorage":
    """An RDB storage; a SQLite file's folder is created; a bad URL is one line."""
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
    try:
        return optuna.storages.RDBStorage(url)
    except ImportError as err:
        raise AutoSKDError(f"storage {url.split('://')[0]}: driver missing ({err}); "
                           "for PostgreSQL: pip install psycopg2-binary") from None
    except Exception as err:  # noqa: BLE001 - SQLAlchemy raises many kinds; one line for the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AutoSKDError(f"cannot open Optuna storage {url!r}: {first}") from None


class ResumableGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler for ask-and-tell under Ray Tune: a grid point whose trial failed in an
    earlier run (or was left running by a killed tune) is run again on resume, and the exhausted
    grid does not call ``study.stop()`` (which raises outside ``study.optimize``; Tune runs exactly
    the missing points).

    A point that fails *in this run* counts as visited: otherwise a point that fails at once (a
    bad method option) is drawn again and again and uses up the run's samples, and points that
    never ran are left out. :meth:`start_run` marks where this run's trials begin."""

    _first_trial_of_run = 0

    def start_run(self, study) -> None:
        """Trials numbered from here on belong to this run (call before its first ask)."""
        self._first_trial_of_run = len(study._storage.get_all_trials(study._study_id, deepcopy=False))

    def after_trial(self, study, trial, state, values) -> None:
        pass

    def _get_unvisited_grid_ids(self, study) -> list[int]:
        done, running = set(), set()
        for t in study._storage.get_all_trials(study._study_id, deepcopy=False):
            if "grid_id" not in t.system_attrs or not self._same_search_space(t.system_attrs["search_space"]):
                continue
            if t.state in DONE or (t.state == TrialState.FAIL and t.number >= self._first_trial_of_run):
                done.add(t.system_attrs["grid_id"])
            elif t.state == TrialState.RUNNING:
                running.add(t.system_attrs["grid_id"])
        todo = set(range(self._n_min_trials)) - done
        return sorted(todo - running) or sorted(todo)

    def points_done(self, study) -> int:
        """Distinct grid points with a finished trial (complete or stopped early)."""
        return len({t.system_attrs["grid_id"] for t in study._storage.get_all_trials(study._study_id, deepcopy=False)
                    if t.state in DONE and "grid_id" in t.system_attrs
                    and self._same_search_space(t.system_attrs["search_space"])})


def make_sampler(name: str, space: SearchSpace, seed: int = 0, multi_objective: bool = False):
    name = name.lower()
    if name not in SAMPLERS:
        raise AutoSKDError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    if name == "cmaes" and multi_objective:
        raise AutoSKDError("sampler cmaes optimises one objective; use nsga2 (or tpe) with --objective2")
    samplers = optuna.samplers
    if name == "grid":
        return ResumableGridSampler(space.grid(), seed=seed)
    if name == "random":
        return samplers.RandomSampler(seed=seed)
    if name == "tpe":
        return samplers.TPESampler(seed=seed)
    if name == "cmaes":
        return samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return samplers.NSGAIISampler(seed=seed)


def open_study(storage, study_name: str, directions: list[str], space: SearchSpace,
               metric_names: list[str] | None = None) -> optuna.Study:
    """Create the study or load it; a stored study made for another space or objectives is one line."""
    signature = json.dumps({"params": space.to_dict()["params"], "kind": space.kind, "fixed": space.fixed},
                           sort_keys=True, default=str)
    study = optuna.create_study(storage=storage, study_name=study_name, directions=directions, load_if_exists=True)
    got = [d.name.lower() for d in study.directions]
    if got != directions:
        raise AutoSKDError(f"study {study_name!r} in the storage optimises {got}, not {directions}; "
                           "use another --study name")
    stored = study.user_attrs.get("space")
    if stored is None:
        study.set_user_attr("space", signature)
        study.set_user_attr("space_name", space.name)
        if metric_names:  # the dashboard's axis labels
            study.set_metric_names(metric_names)
    elif stored != signature:
        raise AutoSKDError(f"study {study_name!r} in the storage was made with another search space; "
                           "use another --study name (or the same space file)")
    return study


def finished_trials(study: optuna.Study) -> list:
    return study.get_trials(deepcopy=False, states=DONE)


def fail_stale_trials(study: optuna.Study) -> int:
    """Mark trials left RUNNING (by a killed tune) as FAIL so they are neither counted nor lost."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
    for t in stale:
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    return len(stale)


def _search_class():
    from ray.tune.search.optuna import OptunaSearch

    class TuneSearch(OptunaSearch):
        """Ray Tune's OptunaSearch that tells each trial its Optuna number (the trial's folder
        name) and stores what the trial reported as the Optuna trial's user attributes."""

        def suggest(self, trial_id: str):
            config = super().suggest(trial_id)
            if isinstance(config, dict):
                config["optuna_trial"] = self._ot_trials[trial_id].number
            return config

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
            ot_trial = self._ot_trials.get(trial_id)
            if ot_trial is not None and result and trial_id not in self._completed_trials:
                try:
                    record = json.loads(result["record_json"]) if "record_json" in result else None
                    ot_trial.set_user_attr("stopped_early", record is None)
                    ot_trial.set_user_attr("epochs", int(result.get("epochs") or result.get("training_iteration") or 0))
                    if record is not None:
                        for key in ("test_acc", "student_params_m", "latency_ms", "trial", "history"):
                            if record.get(key) is not None:
                                ot_trial.set_user_attr(key, record[key])
                except Exception:  # noqa: BLE001 - attributes are extras; the value must still be told
                    pass
            super().on_trial_complete(trial_id, result=result, error=error)

    return TuneSearch


def __getattr__(name):  # TuneSearch imports Ray lazily (Ray is slow to import)
    if name == "TuneSearch":
        return _search_class()
    raise AttributeError(name)
