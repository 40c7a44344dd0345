"""``autoskd search``: the whole AutoSKD pipeline, resumable from its output folder.

1. build the team (cached teachers); m = the teachers smaller than the student (App. A.1);
2. the bilevel search, once per θ learning rate of the grid: one Distiller run on the
   ``train`` half with a SampledTeacher policy and the ThetaStep callback on the ``val`` half
   -> θ history + K candidates (one per phase-2 segment);
3. candidates and baselines as trials (Ray Tune by default), each a from-scratch
   distillation on the full training set scored on dev;
4. the best student of every arm trained (labelled with its arm), the best candidate's
   distribution, tables and plots.

Each step writes its result into ``out_dir`` first thing after finishing, and is skipped
when that result is already there, so a killed search resumes without redoing finished work.
Each result carries what it was computed from (:mod:`autoskd.rerun`): ``config.json`` the
search's settings, team and task; ``search.json`` (``search-lr<rate>.json``) those plus m and the
θ learning rate; every ``trials/<arm>/arm.json`` its arm and trial spec. A rerun into the same
folder with another configuration stops in one line naming the keys that differ, before any
work; only where and how fast it runs, and how far it goes, may change (:data:`RESUME_FREE`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from ..atomic import write_json
from ..data.collate import make_loader, tokenize_split
from ..defaults import DEFAULT_BATCH_SIZE, DEFAULT_LR
from ..engine.teacher_cache import TeacherOutputCache
from ..engine.own_tokenizer import team_teacher
from ..engine.teachers import SampledTeacher
from ..engine.trainer import Distiller, Stage
from ..errors import AutoSKDError
from ..models.lazy import LazyModel, model_entry
from ..models.loading import count_parameters
from ..pipeline import DistillConfig, data_id, make_loaders, team_identity
from ..rerun import check_stamp, stamp
from .arms import baseline_arms, candidate_arms, parse_baselines
from .distribution import TeacherDistribution, ineffective_teacher_count
from .presets import get_preset
from .report import best_arm, plot_arms, plot_theta_history, results_table, summary_text, write_theta_history
from .theta_step import ThetaConfig, ThetaStep
from .trials import TrialSpec, run_arms, task_identity, teacher_task

#: SearchConfig fields a rerun into the same folder may change and still resume: where and how
#: fast it runs, and how far it goes (θ search only, which baselines); every finished artifact
#: is checked against the rest.
RESUME_FREE = ("theta_only", "executor", "address", "cpus_per_trial", "gpus_per_trial", "max_concurrent",
               "baselines", "n_random")


@dataclass
class SearchConfig:
    """All settings of one search; ``from_preset`` fills them from a named preset.

    ``theta_lrs``: a grid of θ learning rates; the search runs once per rate and each run
    delivers K candidates (the paper's figure 3: 8 rates × 25). ``None``: ``theta.lr`` only.
    ``teachers_full_data``: fine-tune the teachers on the whole training split even when
    ``max_train`` subsamples the students' data (good teachers, cheaper students).
    """

    preset: str = "quick"
    search_epochs: float = 2.0
    eval_epochs: float = 2.0
    batch_size: int = DEFAULT_BATCH_SIZE
    lr: float = DEFAULT_LR
    seed: int = 0
    m: int | None = None
    theta: ThetaConfig = field(default_factory=ThetaConfig)
    theta_lrs: list[float] | None = None
    baselines: str = "all"
    n_random: int = 4
    executor: str = "ray"
    address: str | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int | None = None
    max_train: int | None = None
    max_eval: int | None = None
    teachers_full_data: bool = False
    scheduler: str | None = None  # "asha": candidates and baselines report per epoch; losing ones stop early
    method_options: dict = field(default_factory=lambda: {"temperature": 1.0})
    deepspeed: dict | None = None  # the search's phases and every trial train under DeepSpeed
    tensor_parallel: int = 1
    processes: int = 1  # processes per trial and for the θ search (a Ray Train worker group)
    group_by_length: bool = False  # batch training rows of similar length: less padding, faster steps
    theta_only: bool = False  # stop after the θ search (search.json, θ plot): see what θ learns before paying for trials
    # language-model tasks only (autoskd.search.lm_search): student steps of the search and of every
    # arm (equal steps), and the teachers' cached tokens per position
    max_steps: int | None = None
    top_k: int = 64

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> "SearchConfig":
        """Nested settings (``theta``, ``method_options``) are merged key by key, so overriding
        one of them keeps the preset's others; an override of ``None`` keeps the preset's value."""
        values = get_preset(preset)
        for key, value in overrides.items():
            if value is not None:
                values[key] = {**values[key], **value} if isinstance(values.get(key), dict) else value
        return cls(preset=preset, theta=ThetaConfig(**values.pop("theta")), **values)

    def __post_init__(self) -> None:
        if self.theta_lrs is not None:
            self.theta_lrs = [float(x) for x in self.theta_lrs]
            if not self.theta_lrs or any(not x > 0 for x in self.theta_lrs):
                raise AutoSKDError(f"theta learning rates must be a non-empty list of numbers > 0 (got {self.theta_lrs})")
            if len(set(self.theta_lrs)) != len(self.theta_lrs):
                raise AutoSKDError(f"theta learning rates must be distinct (got {self.theta_lrs})")
        for name in ("search_epochs", "eval_epochs", "lr"):
            if not getattr(self, name) > 0:
                raise AutoSKDError(f"{name.replace('_', '-')} must be > 0 (got {getattr(self, name)})")
        if self.batch_size < 1:
            raise AutoSKDError(f"batch size must be at least 1 (got {self.batch_size})")

    @property
    def grid(self) -> list[float]:
        """The θ learning rates the search runs with."""
        return self.theta_lrs or [self.theta.lr]

    def base_distill(self) -> DistillConfig:
        return DistillConfig(method="kd", method_options=dict(self.method_options), epochs=self.eval_epochs,
                             lr=self.lr, batch_size=self.batch_size, seed=self.seed, train_split="train_full",
                             theta_scaling=self.theta.scaling, deepspeed=self.deepspeed,
                             tensor_parallel=self.tensor_parallel, processes=self.processes,
                             group_by_length=self.group_by_length)

    def to_dict(self) -> dict:
        return asdict(self)

    def computed(self) -> dict:
        """The settings that decide what the search computes (all but :data:`RESUME_FREE`)."""
        return {k: v for k, v in self.to_dict().items() if k not in RESUME_FREE}

    @classmethod
    def from_dict(cls, data: dict) -> "SearchConfig":
        """The inverse of :meth:`to_dict` (a worker process rebuilds its search's settings); keys
        that are not settings (a ``config.json``'s stamp) are left out."""
        names = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in data.items() if k in names}, "theta": ThetaConfig(**data["theta"])})


def _read(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _shape(entry):
    """A model, or a lazy one's weightless skeleton (counting parameters reads no weights)."""
    return entry.shape_model() if isinstance(entry, LazyModel) else entry


def capacity_m(team, task, seed: int = 0) -> tuple[int, str]:
    """Appendix A.1's m: the teachers with fewer parameters than the student, and why (one line)."""
    student = count_parameters(team.build_student(task, seed=seed))
    sizes = {name: count_parameters(_shape(model_entry(team.teachers, name))) for name in team.teachers}
    m = ineffective_teacher_count(list(sizes.values()), student)
    weak = [n for n, s in sizes.items() if s < student]
    why = (f"m = {m}: {len(weak)} of {len(sizes)} teachers have fewer parameters than the student "
           f"({student / 1e6:.1f}M){': ' + ', '.join(weak) if weak else ''} (AutoSKDBERT App. A.1; --m overrides)")
    if m < len(weak):
        why += f"; capped at {m} so that one teacher survives selection"
    return m, why


def _lr_tag(lr: float) -> str:
    """A θ learning rate in file and arm names: the shortest scientific form that reads back as
    the same float (``1e-2``, ``2.5e-4``), so distinct rates never share a record."""
    lr = float(lr)
    for digits in range(17):
        text = f"{lr:.{digits}e}"
        if float(text) == lr:
            break
    mantissa, exponent = text.split("e")
    return f"{mantissa}e{int(exponent)}"


def search_record_path(config: SearchConfig, out_dir: Path, theta_lr: float) -> Path:
    """Where the θ search at ``theta_lr`` writes its record (a finished one is not run again)."""
    return out_dir / (f"search-lr{_lr_tag(theta_lr)}.json" if config.theta_lrs is not None else "search.json")


def search_identity(team_ref: str, task_args: dict, config: SearchConfig) -> dict:
    """What a search computes from, known before anything loads: the team file (and what its
    members' sources hold), the task's arguments (and a data file's identity), the settings."""
    from ..team.cache import team_file_identity

    return {"team": team_file_identity(team_ref), "task": task_identity(task_args), "search": config.computed()}


def live_search_identity(team, task, config: SearchConfig) -> dict:
    """:func:`search_identity` from the live objects (``bilevel_search`` called from Python)."""
    return {"team": team_identity(team), "task": {s: task.fingerprint(s) for s in ("train", "val")},
            "search": config.computed()}


def bilevel_search(team, task, config: SearchConfig, m: int, out_dir: Path, cache_dir: Path, progress: bool,
                   theta_lr: float | None = None, identity: dict | None = None) -> dict:
    """Phase 1, teacher selection, phase 2 at one θ learning rate: θ history and the K candidates.

    The record carries ``identity`` (default :func:`live_search_identity`) with ``m`` and the θ
    learning rate; a record already in ``out_dir`` is returned when it matches, else refused."""
    theta_cfg = replace(config.theta, lr=theta_lr) if theta_lr is not None else config.theta
    grid = config.theta_lrs is not None
    path = search_record_path(config, out_dir, theta_cfg.lr)
    identity = {**(identity or live_search_identity(team, task, config)), "m": m, "theta_lr": theta_cfg.lr}
    if (done := _read(path)) is not None:
        check_stamp(done, identity, f"{path.name} in {out_dir}", out_dir)
        return done
    names = list(team.teachers)
    fps = getattr(team, "fingerprints", {}) or {}
    # weights load on first use: with a warm teacher-output cache the search reads logits only;
    # a teacher with its own tokenizer reads each row's text itself (autoskd.engine.own_tokenizer)
    teachers = {n: team_teacher(team, n, model_entry(team.teachers, n), fps.get(n)) for n in names}
    dist = TeacherDistribution.uniform(len(names))
    policy = SampledTeacher(teachers, dist.theta, seed=config.seed, scaling=theta_cfg.scaling)
    loaders = make_loaders(task, team.tokenizer, team.max_length, config.batch_size, config.seed, train_split="train",
                           group_by_length=config.group_by_length)
    val_tok = tokenize_split(task.split("val"), team.tokenizer, team.max_length)
    val_loader = make_loader(val_tok, team.tokenizer, config.batch_size, shuffle=True, seed=config.seed + 1)
    cache = TeacherOutputCache(cache_dir / "teacher_outputs")
    options = {"alpha": 1.0, "temperature": 1.0, **config.method_options}
    step = ThetaStep(dist, policy, val_loader, theta_cfg, m, cache=cache,
                     val_id=data_id(task, "val", team.tokenizer, team.max_length),
                     alpha=options["alpha"], temperature=options["temperature"])
    student = team.build_student(task, seed=config.seed)
    # under DeepSpeed the student trains as every trial does, and each θ step gathers its weights
    # (ZeRO-3) and averages the unrolled gradient over the ranks (autoskd.engine.functional_forward)
    distiller = Distiller(student, "kd", policy, seed=config.seed, progress=progress, callbacks=[step],
                          method_options=dict(config.method_options), deepspeed=config.deepspeed,
                          teacher_cache=cache, checkpoint=False, restore_best=False)
    result = distiller.fit([Stage("task", loaders.train, epochs=config.search_epochs, lr=config.lr,
                                  data_id=loaders.train_id)], dev=loaders.dev)
    tag = f"lr{_lr_tag(theta_cfg.lr)}-" if grid else ""
    candidates = [{**c, "name": f"candidate-{tag}{j:02d}", "theta_lr": theta_cfg.lr}
                  for j, c in enumerate(step.candidates)]
    record = {"teachers": names, "m": m, "theta_lr": theta_cfg.lr, "dropped": [names[i] for i in step.dropped],
              "selection_step": step.selection_step, "final_theta": dist.probs().tolist(),
              "candidates": candidates, "history": step.history, "teacher_counts": policy.counts,
              "search_dev_acc": result.final_dev_acc, "search_seconds": result.seconds, "steps": result.steps,
              "processes": distiller.backend.world_size,
              "theta_nonfinite_steps": step.nonfinite_steps, "theta_steps": step.theta_steps, **stamp(identity)}
    if distiller.backend.is_main:
        write_json(path, record)
    return record


def load_search_task(task_args: dict, config: SearchConfig):
    """``(students' task, teachers' task)``: the second is whole when ``teachers_full_data``."""
    from ..data.tasks import load_task

    full = load_task(**task_args)
    task = full.subsample(config.max_train, config.max_eval, seed=task_args["seed"]) \
        if (config.max_train or config.max_eval) else full
    return task, (teacher_task(full, task) if config.teachers_full_data else task)


def run_search(team_path: str | Path, task_args: dict, config: SearchConfig, out_dir: str | Path,
               cache_dir: str | Path = ".cache/autoskd", progress: bool = True) -> dict:
    """Run (or resume) a whole search; returns the summary written to ``summary.json``.

    With ``config.theta_only`` it stops after the θ search (``search.json``, ``theta_history.json``,
    the θ plot) and returns the searches' outcome without writing ``summary.json``."""
    from ..team import TeacherTeam

    out_dir, cache_dir = Path(out_dir).resolve(), Path(cache_dir).resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise AutoSKDError(f"--out {out_dir} is a file; give a folder (a new one, or a search's to resume it)")
    out_dir.mkdir(parents=True, exist_ok=True)
    # The split and the team depend on the data seed (default: the run seed); a benchmark fixes
    # it and varies only config.seed, the search's and the trainings' seed.
    task_args = {**task_args, "seed": task_args.get("seed", config.seed)}
    data_seed = task_args["seed"]
    team_ref = str(Path(team_path).resolve()) if Path(team_path).exists() else str(team_path)
    identity = search_identity(team_ref, task_args, config)
    # a folder holding another search's work is refused now, before anything loads or trains
    check_stamp(_read(out_dir / "config.json"), identity, f"the search in {out_dir}", out_dir)
    write_json(out_dir / "config.json", {"team": team_ref, "task": task_args,
                                         "cache_dir": str(cache_dir), **config.to_dict(), **stamp(identity)})

    task, team_task = load_search_task(task_args, config)
    team = TeacherTeam.from_yaml(team_path).build(team_task, cache_dir=cache_dir / "teachers", seed=data_seed,
                                                  progress=progress)
    names = list(team.teachers)
    if config.m is None:
        m, why = capacity_m(team, task, config.seed)
    else:
        m, why = config.m, f"m = {config.m} (given with --m)"
    if not 0 <= m < len(names):
        raise AutoSKDError(f"--m {m} must be between 0 and {len(names) - 1} for a team of {len(names)} teachers")
    print(f"[search] {why}", flush=True)

    if config.processes > 1:  # the θ search as one parallel job too (a Ray Train worker group)
        from .ray_parallel import bilevel_search_parallel

        searches = [bilevel_search_parallel(team_ref, task_args, config, m, out_dir, cache_dir,
                                            lr if config.theta_lrs else None, identity) for lr in config.grid]
    else:
        searches = [bilevel_search(team, task, config, m, out_dir, cache_dir, progress,
                                   lr if config.theta_lrs else None, identity) for lr in config.grid]
    history = [{**h, "theta_lr": s["theta_lr"]} for s in searches for h in s["history"]]
    write_theta_history(out_dir / "theta_history.json", history)
    for s in searches:
        png = out_dir / (f"theta-lr{_lr_tag(s['theta_lr'])}.png" if config.theta_lrs else "theta.png")
        plot_theta_history(s["history"], names, png, selection_step=s["selection_step"])

    if config.theta_only:
        for s in searches:
            print(f"[search] theta lr {s['theta_lr']:g}: dropped {s['dropped']}, final theta "
                  + ", ".join(f"{n} {t:.3f}" for n, t in zip(names, s["final_theta"])), flush=True)
        print(f"[search] --theta-only: no candidate or baseline trained; outputs in {out_dir}", flush=True)
        return {"teachers": names, "m": m, "m_reason": why, "theta_only": True,
                "dropped": {str(s["theta_lr"]): s["dropped"] for s in searches},
                "final_theta": {str(s["theta_lr"]): s["final_theta"] for s in searches}}
    candidates = [c for s in searches for c in s["candidates"]]
    arms = candidate_arms([c["theta"] for c in candidates], [c["name"] for c in candidates])
    arms += baseline_arms(names, parse_baselines(config.baselines), config.n_random, config.seed)
    spec = arm_spec(config, task_args, team_ref, cache_dir, out_dir)
    records = run_arms(spec, arms, executor=config.executor, address=config.address,
                       cpus_per_trial=config.cpus_per_trial, gpus_per_trial=config.gpus_per_trial,
                       max_concurrent=config.max_concurrent, progress=progress, scheduler=config.scheduler)
    return summarise(records, searches, team, m, why, out_dir)


def arm_spec(config: SearchConfig, task_args: dict, team_ref: str, cache_dir: str | Path,
             out_dir: str | Path) -> TrialSpec:
    """How every arm of a search trains (its task, team, cache and base config), under ``out_dir``."""
    return TrialSpec(team_path=team_ref, **parallel_runner(config),
                     task={**task_args, "max_train": config.max_train, "max_eval": config.max_eval,
                           "teachers_full_data": config.teachers_full_data},
                     cache_dir=str(cache_dir), base_config=config.base_distill().to_dict(), root=str(out_dir))


def parallel_runner(config: SearchConfig) -> dict:
    """Trials of more than one process run as a Ray Train worker group (one trial = one parallel job)."""
    return {"runner": "autoskd.search.ray_parallel:distill_arm_parallel"} if config.processes > 1 else {}


def _keep_student(out_dir: Path, arm: dict, dst_name: str) -> None:
    src = out_dir / "trials" / arm["name"] / "student"
    if src.exists():
        dst = out_dir / dst_name
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
        write_json(dst / "autoskd_arm.json",
                   {k: arm.get(k) for k in ("name", "group", "kind", "theta", "teacher", "dev_acc", "test_acc")})


def summarise(records: list[dict], searches: list[dict], team, m: int, why: str, out_dir: Path) -> dict:
    """Keep the best student of every arm trained (by dev) and the best candidate's; tables and plots.

    ``best_student/`` is the best arm of all, candidates and baselines alike, labelled with its
    arm (``autoskd_arm.json``), so a search never hands back a worse student than a baseline it
    ran; ``best_candidate_student/`` is the best learned distribution's.
    """
    write_json(out_dir / "results.json", records)
    plot_arms(records, out_dir / "arms.png")
    table = results_table(records)
    (out_dir / "results.txt").write_text(table + "\n")
    best_candidate = best_arm(records, group="autoskd")
    if best_candidate is None:
        raise AutoSKDError(f"every candidate trial failed; see {out_dir / 'results.json'} for the errors")
    best = best_arm(records, group=None)
    _keep_student(out_dir, best, "best_student")
    _keep_student(out_dir, best_candidate, "best_candidate_student")

    def brief(r: dict) -> dict:
        return {"name": r["name"], "group": r["group"], "theta": r.get("theta"), "teacher": r.get("teacher"),
                "dev_acc": r["dev_acc"], "test_acc": r["test_acc"]}

    summary = {"teachers": list(team.teachers), "teacher_dev_accuracy": team.dev_accuracy, "m": m, "m_reason": why,
               "dropped": {str(s["theta_lr"]): s["dropped"] for s in searches},
               "final_theta": {str(s["theta_lr"]): s["final_theta"] for s in searches},
               "best": brief(best), "best_candidate": brief(best_candidate)}
    write_json(out_dir / "best_distribution.json", summary["best_candidate"])
    write_json(out_dir / "summary.json", summary)
    print(table)
    print(summary_text(best_candidate, best, out_dir))  # a best arm ASHA stopped has no test accuracy
    return summary
