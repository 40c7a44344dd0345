"""Optuna's side of ``autoskd tune``: storage, samplers, the study and its resume.

Every sampler, grid and random included, is an Optuna sampler driven by Ray Tune's
``OptunaSearch``, so every tune lives in one Optuna study in an RDB storage (SQLite by default,
a PostgreSQL URL on a cluster) that optuna-dashboard can show. A killed tune resumes from the
study: finished trials (complete or stopped early) count, and only the missing trials run; the
samplers see every stored trial.

Several drivers may share one study (two ``autoskd tune`` runs on one PostgreSQL storage), so a
driver never touches another's running trials. Each driver keeps a heartbeat in the storage for
every trial it has asked and not yet told (:class:`TrialHeartbeats`, Optuna's heartbeat table);
a running trial whose heartbeat is older than ``GRACE_PERIOD`` belongs to a driver that died
(``kill -9``, a lost node) and is marked failed by the next driver that looks
(:func:`fail_stale_trials`), which queues it again with the same parameters (Optuna's
``RetryHeartbeatStaleTrialCallback``): the next trial asked runs it. A driver rerun right after a
kill leaves the killed trials alone until their grace period is over; nothing is lost, since only
finished trials count towards the study's size. A killed driver's trial that had already written
its record (``trials/<trial>/trial.json``) is told from that record at the next start
(:func:`record_finished_trials`), so it is not run again.
"""

from __future__ import annotations

import json
import threading
import time
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from ..errors import AutoSKDError
from .space import SearchSpace

__all__ = ["SAMPLERS", "METRIC_ATTR", "DIRECTION_ATTR", "storage_url", "open_storage", "make_sampler", "open_study",
           "finished_trials", "fail_stale_trials", "record_finished_trials", "TrialHeartbeats", "TuneSearch",
           "HEARTBEAT_INTERVAL", "GRACE_PERIOD", "MAX_RETRY"]

SAMPLERS = ("grid", "random", "tpe", "cmaes", "nsga2")
DONE = (TrialState.COMPLETE, TrialState.PRUNED)
#: seconds between two heartbeats of a running trial
HEARTBEAT_INTERVAL = 10
#: seconds without a heartbeat after which a running trial's driver is taken for dead
GRACE_PERIOD = 60
#: how often the trial of a dead driver is queued again (a trial that kills its driver every time
#: must not be retried for ever)
MAX_RETRY = 2
#: seconds a PostgreSQL/MySQL connection may take before the storage is reported unreachable
CONNECT_TIMEOUT = 10


def storage_url(storage: str | None, out_dir: Path) -> str:
    """The storage URL: as given, a bare file path as SQLite, or ``sqlite:///<out>/optuna.db``."""
    if not storage:
        return f"sqlite:///{(Path(out_dir) / 'optuna.db').absolute()}"
    if "://" not in storage:
        return f"sqlite:///{Path(storage).absolute()}"
    return storage


#: Optuna warns at every ``ask`` on a storage with heartbeats; here the driver keeps them itself
ASK_WARNING = "Heartbeat of storage is supposed to be used with Study.optimize"


def _retry_callback():
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) \
        or optuna.storages.RetryFailedTrialCallback  # Optuna < 4.9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return retry(max_retry=MAX_RETRY)


def open_storage(url: str, heartbeat_interval: int | None = None,
                 grace_period: int | None = None) -> "optuna.storages.RDBStorage":
    """An RDB storage with heartbeats (``HEARTBEAT_INTERVAL``, ``GRACE_PERIOD`` unless given) and
    the retry of a dead driver's trials; a SQLite file's folder is created; a bad URL, a missing
    driver or an unreachable server is one line (within ``CONNECT_TIMEOUT`` seconds)."""
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine_kwargs = {}
    if url.startswith(("postgresql", "mysql")):
        engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT}
    retry = _retry_callback()
    stale = ({"heartbeat_stale_trial_callback": retry}
             if "heartbeat_stale_trial_callback" in optuna.storages.RDBStorage.__init__.__code__.co_varnames
             else {"failed_trial_callback": retry})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                              heartbeat_interval=int(heartbeat_interval or HEARTBEAT_INTERVAL),
                                              grace_period=int(grace_period or GRACE_PERIOD), **stale)
    except ImportError as err:
        raise AutoSKDError(f"storage {url.split('://')[0]}: driver missing ({err}); "
                           "for PostgreSQL: pip install 'psycopg[binary]'") from None
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
            elif t.state in (TrialState.RUNNING, TrialState.WAITING):  # running elsewhere, or queued again
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
    return PicklableNSGAIISampler(seed=seed)


class PicklableNSGAIISampler(optuna.samplers.NSGAIISampler):
    """Optuna's NSGA-II sampler that pickles: Ray Tune pickles the searcher (and the sampler in
    it) when a tune starts, and Optuna >= 5 gives the GA samplers a ``threading.Lock`` that cannot
    be pickled. The lock only guards the generation cache, so a copy gets a fresh one."""

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_thread_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        if "_thread_lock" not in state:
            self._thread_lock = threading.Lock()


#: the study's user attributes recording what it ranks by: the metric's name (``accuracy``,
#: ``perplexity``) and the first objective's direction (``maximize``, ``minimize``)
METRIC_ATTR, DIRECTION_ATTR = "metric", "metric_direction"


def _objective_words(names: list[str], directions: list[str], metric: str | None) -> str:
    """``maximises dev_acc (accuracy)`` / ``minimises dev_ppl (perplexity) and student_params_m``."""
    parts = []
    for i, (name, direction) in enumerate(zip(names, directions)):
        verb = "maximises" if direction == "maximize" else "minimises"
        label = f"{name} ({metric})" if i == 0 and metric and metric != name else name
        parts.append(f"{verb} {label}")
    return " and ".join(parts)


def open_study(storage, study_name: str, directions: list[str], space: SearchSpace,
               metric_names: list[str] | None = None, metric: str | None = None) -> optuna.Study:
    """Create the study or load it; a stored study made for another space, metric, direction or
    objectives is one line. A new study records its objectives' names (the dashboard's axis
    labels), the metric's name and its direction, so a later tune can tell what it ranked by."""
    signature = json.dumps({"params": space.to_dict()["params"], "kind": space.kind, "fixed": space.fixed},
                           sort_keys=True, default=str)
    study = optuna.create_study(storage=storage, study_name=study_name, directions=directions, load_if_exists=True)
    got = [d.name.lower() for d in study.directions]
    stored_metric = study.user_attrs.get(METRIC_ATTR)
    stored_names = list(study.metric_names or []) if study.metric_names else None
    if got != directions or (metric and stored_metric and stored_metric != metric) \
            or (metric_names and stored_names and stored_names != list(metric_names)):
        had = _objective_words(stored_names or [f"objective {i}" for i in range(len(got))], got, stored_metric)
        wants = _objective_words(list(metric_names or []) or [f"objective {i}" for i in range(len(directions))],
                                 directions, metric)
        raise AutoSKDError(f"study {study_name!r} in the storage {had}, but this tune {wants}; use another --study "
                           "name (or a new --storage)")
    stored = study.user_attrs.get("space")
    if stored is None:
        study.set_user_attr("space", signature)
        study.set_user_attr("space_name", space.name)
        if metric_names:  # the dashboard's axis labels
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(metric_names)
        if metric:
            study.set_user_attr(METRIC_ATTR, metric)
            study.set_user_attr(DIRECTION_ATTR, directions[0])
    elif stored != signature:
        raise AutoSKDError(f"study {study_name!r} in the storage was made with another search space; "
                           "use another --study name (or the same space file)")
    return study


def finished_trials(study: optuna.Study) -> list:
    return study.get_trials(deepcopy=False, states=DONE)


def record_finished_trials(study: optuna.Study, out_dir: str | Path, objectives: list[str]) -> int:
    """Tell the study the running trials whose record is already in ``<out>/trials/<trial>/trial.json``:
    they trained to the end, but their driver was killed before it told the study. Their values
    and attributes come from the record, so such a trial is neither lost nor run again. Returns
    how many were told."""
    from .trial import trial_name

    told = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        path = Path(out_dir) / "trials" / trial_name(t.number, "") / "trial.json"
        try:
            record = json.loads(path.read_text())
            values = [float(record[o]) for o in objectives]
            point = record.get("values") or {}
            if any(point.get(k, v) != v for k, v in t.params.items()):
                continue  # another point's record (not this trial's): leave it to the heartbeats
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        try:
            storage = study._storage
            storage.set_trial_user_attr(t._trial_id, "stopped_early", False)
            storage.set_trial_user_attr(t._trial_id, "recorded_from", "trial.json")
            from .trial import RECORD_ATTRS

            for key in ("epochs", *RECORD_ATTRS):
                if record.get(key) is not None:
                    storage.set_trial_user_attr(t._trial_id, key, record[key])
            study.tell(t.number, values if len(values) > 1 else values[0])
            told += 1
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError, RuntimeError):
            continue  # its own driver told it meanwhile
    return told


def fail_stale_trials(study: optuna.Study, out_dir: str | Path | None = None,
                      objectives: list[str] | None = None) -> int:
    """Mark as failed the running trials whose driver is dead, and queue each again (same
    parameters, a new trial); returns how many this call failed. With ``out_dir`` and
    ``objectives`` the running trials that finished on disk are told first
    (:func:`record_finished_trials`): a driver killed between a trial's end and its report loses
    nothing.

    With heartbeats (every storage :func:`open_storage` opens) a trial is dead when its heartbeat
    is older than the storage's grace period: the trials of a live driver, this one's or another's
    on the same storage, are never touched. An in-memory study belongs to one process, so at a
    driver's start every running trial in it is a dead run's. A shared storage without heartbeats
    is left alone: its running trials may be another driver's."""
    storage = study._storage
    if out_dir is not None and objectives:
        record_finished_trials(study, out_dir, objectives)
    if _heartbeat_enabled(storage):
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        after = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
        return len(after - before)
    if not isinstance(storage, optuna.storages.InMemoryStorage):
        return 0
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    return len(stale)


def _heartbeat_enabled(storage) -> bool:
    interval = getattr(storage, "get_heartbeat_interval", None)
    return callable(interval) and interval() is not None and hasattr(storage, "record_heartbeat")


class TrialHeartbeats:
    """A driver's heartbeats: one daemon thread records a heartbeat every interval for each trial
    :meth:`add` ed and not yet :meth:`remove` d (asked and not yet told). The first heartbeat is
    recorded at once, so a trial is never without one (Optuna never fails a trial that has
    none). The thread ends by itself when no trial is left. A storage without heartbeats makes
    every call a no-op."""

    def __init__(self, storage):
        self.storage = storage
        self.enabled = _heartbeat_enabled(storage)
        self.interval = storage.get_heartbeat_interval() if self.enabled else None
        self._ids: set[int] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, trial_id: int) -> None:
        if not self.enabled:
            return
        self.storage.record_heartbeat(trial_id)
        with self._lock:
            self._ids.add(trial_id)
            if self._thread is None:
                self._thread = threading.Thread(target=self._beat, name="autoskd-heartbeats", daemon=True)
                self._thread.start()

    def remove(self, trial_id: int) -> None:
        with self._lock:
            self._ids.discard(trial_id)

    @property
    def trial_ids(self) -> set[int]:
        with self._lock:
            return set(self._ids)

    def _beat(self) -> None:
        while True:
            time.sleep(self.interval)
            with self._lock:
                ids = sorted(self._ids)
                if not ids:
                    self._thread = None
                    return
            for trial_id in ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception:  # noqa: BLE001 - a storage hiccup: the next beat tries again
                    pass


def _search_class():
    from ray.tune.search.optuna import OptunaSearch

    class TuneSearch(OptunaSearch):
        """Ray Tune's OptunaSearch that tells each trial its Optuna number (the trial's folder
        name), stores what the trial reported as the Optuna trial's user attributes, keeps a
        heartbeat for each trial it has asked and not yet told, and before each ask fails (and
        queues again) the trials of drivers that died (:func:`fail_stale_trials`)."""

        def _beats(self) -> TrialHeartbeats:
            beats = self.__dict__.get("_autoskd_beats")
            if beats is None:  # made on first use: Tune pickles the searcher, never a thread
                beats = self.__dict__["_autoskd_beats"] = TrialHeartbeats(self._ot_study._storage)
            return beats

        def __getstate__(self):
            return {k: v for k, v in self.__dict__.items() if k != "_autoskd_beats"}

        def save(self, checkpoint_path: str):
            beats = self.__dict__.pop("_autoskd_beats", None)
            try:
                super().save(checkpoint_path)
            finally:
                if beats is not None:
                    self.__dict__["_autoskd_beats"] = beats

        def suggest(self, trial_id: str):
            if (self._ot_study is not None and trial_id not in self._ot_trials
                    and _heartbeat_enabled(self._ot_study._storage)):  # never this driver's own trials
                fail_stale_trials(self._ot_study)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=ASK_WARNING)
                config = super().suggest(trial_id)
            ot_trial = self._ot_trials.get(trial_id)
            if ot_trial is not None:
                self._beats().add(ot_trial._trial_id)
            if isinstance(config, dict):
                config["optuna_trial"] = ot_trial.number
            return config

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
            ot_trial = self._ot_trials.get(trial_id)
            if ot_trial is not None and result and trial_id not in self._completed_trials:
                try:
                    record = json.loads(result["record_json"]) if "record_json" in result else None
                    ot_trial.set_user_attr("stopped_early", record is None)
                    ot_trial.set_user_attr("epochs", int(result.get("epochs") or result.get("training_iteration") or 0))
                    if record is not None:
                        from .trial import RECORD_ATTRS

                        for key in RECORD_ATTRS:
                            if record.get(key) is not None:
                                ot_trial.set_user_attr(key, record[key])
                except Exception:  # noqa: BLE001 - attributes are extras; the value must still be told
                    pass
            try:
                super().on_trial_complete(trial_id, result=result, error=error)
            finally:
                if ot_trial is not None:
                    self._beats().remove(ot_trial._trial_id)

    return TuneSearch


def __getattr__(name):  # TuneSearch imports Ray lazily (Ray is slow to import)
    if name == "TuneSearch":
        return _search_class()
    raise AttributeError(name)
