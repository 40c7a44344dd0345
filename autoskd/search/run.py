"""``autoskd search``: the whole AutoSKD pipeline, resumable from its output folder.

1. build the team (cached teachers) and fine-tune the student alone (its dev score sets m);
2. the bilevel search: one Distiller run on the ``train`` half with a SampledTeacher policy
   and the ThetaStep callback on the ``val`` half -> theta history + K candidates;
3. candidates and baselines as trials (Ray Tune by default), each a from-scratch
   distillation on the full training set scored on dev;
4. the best candidate's student, its distribution, tables and plots.

Each step writes its result into ``out_dir`` first thing after finishing, and is skipped
when that result is already there, so a killed search resumes without redoing finished work.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..data.collate import make_loader, tokenize_split
from ..engine.teacher_cache import TeacherOutputCache
from ..engine.teachers import SampledTeacher, Teacher
from ..engine.trainer import Distiller, Stage
from ..errors import AutoSKDError
from ..pipeline import DistillConfig, distill, make_loaders
from .arms import baseline_arms, candidate_arms, parse_baselines
from .distribution import TeacherDistribution, ineffective_teacher_count
from .presets import get_preset
from .report import best_arm, plot_arms, plot_theta_history, results_table, write_theta_history
from .theta_step import ThetaConfig, ThetaStep
from .trials import TrialSpec, run_arms


@dataclass
class SearchConfig:
    """All settings of one search; ``from_preset`` fills them from a named preset."""

    preset: str = "quick"
    search_epochs: float = 2.0
    eval_epochs: float = 2.0
    batch_size: int = 32
    lr: float = 1e-4
    seed: int = 0
    m: int | None = None
    theta: ThetaConfig = field(default_factory=ThetaConfig)
    baselines: str = "all"
    n_random: int = 4
    executor: str = "ray"
    address: str | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int | None = None
    max_train: int | None = None
    max_eval: int | None = None
    method_options: dict = field(default_factory=lambda: {"temperature": 1.0})
    deepspeed: dict | None = None  # trials (candidates, baselines) train under DeepSpeed
    tensor_parallel: int = 1
    processes: int = 1  # processes per trial (a Ray Train worker group)

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> "SearchConfig":
        values = get_preset(preset)
        theta = ThetaConfig(**{**values.pop("theta"), **(overrides.pop("theta", None) or {})})
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(preset=preset, theta=theta, **values)

    def base_distill(self) -> DistillConfig:
        return DistillConfig(method="kd", method_options=dict(self.method_options), epochs=self.eval_epochs,
                             lr=self.lr, batch_size=self.batch_size, seed=self.seed, train_split="train_full",
                             deepspeed=self.deepspeed, tensor_parallel=self.tensor_parallel, processes=self.processes)

    def to_dict(self) -> dict:
        return asdict(self)


def _read(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _write(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def student_alone(team, task, config: SearchConfig, out_dir: Path, cache_dir: Path, progress: bool) -> float:
    """Dev accuracy of the student fine-tuned without a teacher (App. A.1's reference for m)."""
    path = out_dir / "student_alone.json"
    if (done := _read(path)) is not None:
        return done["dev_acc"]
    cfg = replace(config.base_distill(), method="finetune", method_options={}, train_split="train_full")
    outcome = distill(team, task, cfg, cache_dir=cache_dir, progress=progress)
    _write(path, {"dev_acc": outcome.dev_acc, "test_acc": outcome.test_acc})
    return outcome.dev_acc


def bilevel_search(team, task, config: SearchConfig, m: int, out_dir: Path, cache_dir: Path, progress: bool) -> dict:
    """Phase 1, teacher selection, phase 2: returns theta history and the K candidates."""
    path = out_dir / "search.json"
    if (done := _read(path)) is not None:
        return done
    names = list(team.teachers)
    fps = getattr(team, "fingerprints", {}) or {}
    teachers = {n: Teacher(n, team.teachers[n], fps.get(n)) for n in names}
    dist = TeacherDistribution.uniform(len(names))
    policy = SampledTeacher(teachers, dist.theta, seed=config.seed)
    loaders = make_loaders(task, team.tokenizer, team.max_length, config.batch_size, config.seed, train_split="train")
    val_tok = tokenize_split(task.split("val"), team.tokenizer, team.max_length)
    val_loader = make_loader(val_tok, team.tokenizer, config.batch_size, shuffle=True, seed=config.seed + 1)
    cache = TeacherOutputCache(cache_dir / "teacher_outputs")
    step = ThetaStep(dist, policy, val_loader, config.theta, m, cache=cache,
                     val_id=f"{task.fingerprint('val')}-L{team.max_length}")
    student = team.build_student(task, seed=config.seed)
    distiller = Distiller(student, "kd", policy, seed=config.seed, progress=progress, callbacks=[step],
                          method_options=dict(config.method_options),
                          teacher_cache=cache, checkpoint=False, restore_best=False)
    result = distiller.fit([Stage("task", loaders.train, epochs=config.search_epochs, lr=config.lr,
                                  data_id=loaders.train_id)], dev=loaders.dev)
    record = {"teachers": names, "m": m, "dropped": [names[i] for i in step.dropped],
              "selection_step": step.selection_step, "final_theta": dist.probs().tolist(),
              "candidates": step.candidates, "history": step.history, "teacher_counts": policy.counts,
              "search_dev_acc": result.final_dev_acc, "search_seconds": result.seconds, "steps": result.steps}
    _write(path, record)
    return record


def run_search(team_path: str | Path, task_args: dict, config: SearchConfig, out_dir: str | Path,
               cache_dir: str | Path = ".cache/autoskd", progress: bool = True) -> dict:
    """Run (or resume) a whole search; returns the summary written to ``summary.json``."""
    from ..data.tasks import load_task
    from ..team import TeacherTeam

    out_dir, cache_dir = Path(out_dir).resolve(), Path(cache_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    # The split and the team depend on the data seed (default: the run seed); a benchmark fixes
    # it and varies only config.seed, the search's and the trainings' seed.
    task_args = {**task_args, "seed": task_args.get("seed", config.seed)}
    data_seed = task_args["seed"]
    max_train, max_eval = config.max_train, config.max_eval
    team_ref = str(Path(team_path).resolve()) if Path(team_path).exists() else str(team_path)
    _write(out_dir / "config.json", {"team": team_ref, "task": task_args,
                                     "cache_dir": str(cache_dir), **config.to_dict()})

    task = load_task(**task_args)
    if max_train or max_eval:
        task = task.subsample(max_train, max_eval, seed=data_seed)
    team = TeacherTeam.from_yaml(team_path).build(task, cache_dir=cache_dir / "teachers", seed=data_seed,
                                                  progress=progress)
    names = list(team.teachers)
    if config.m is None:
        alone = student_alone(team, task, config, out_dir, cache_dir, progress)
        m = ineffective_teacher_count([team.dev_accuracy[n] for n in names], alone)
    else:
        m = config.m
    if not 0 <= m < len(names):
        raise AutoSKDError(f"--m {m} must be between 0 and {len(names) - 1} for a team of {len(names)} teachers")

    search = bilevel_search(team, task, config, m, out_dir, cache_dir, progress)
    write_theta_history(out_dir / "theta_history.json", search["history"])
    plot_theta_history(search["history"], names, out_dir / "theta.png", selection_step=search["selection_step"])

    arms = candidate_arms([c["theta"] for c in search["candidates"]])
    arms += baseline_arms(names, parse_baselines(config.baselines), config.n_random, config.seed)
    spec = TrialSpec(team_path=team_ref, **parallel_runner(config),
                     task={**task_args, "max_train": max_train, "max_eval": max_eval},
                     cache_dir=str(cache_dir), base_config=config.base_distill().to_dict(), root=str(out_dir))
    records = run_arms(spec, arms, executor=config.executor, address=config.address,
                       cpus_per_trial=config.cpus_per_trial, gpus_per_trial=config.gpus_per_trial,
                       max_concurrent=config.max_concurrent, progress=progress)
    return summarise(records, search, team, m, out_dir)


def parallel_runner(config: SearchConfig) -> dict:
    """Trials of more than one process run as a Ray Train worker group (one trial = one parallel job)."""
    return {"runner": "autoskd.engine.ray_parallel:distill_arm_parallel"} if config.processes > 1 else {}


def summarise(records: list[dict], search: dict, team, m: int, out_dir: Path) -> dict:
    """Pick the best candidate by dev accuracy, keep its student, write tables and plots."""
    _write(out_dir / "results.json", records)
    plot_arms(records, out_dir / "arms.png")
    table = results_table(records)
    (out_dir / "results.txt").write_text(table + "\n")
    best = best_arm(records, group="autoskd")
    if best is None:
        raise AutoSKDError(f"every candidate trial failed; see {out_dir / 'results.json'} for the errors")
    src = out_dir / "trials" / best["name"] / "student"
    if src.exists():
        dst = out_dir / "best_student"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
    summary = {"teachers": list(team.teachers), "teacher_dev_accuracy": team.dev_accuracy, "m": m,
               "dropped": search["dropped"], "final_theta": search["final_theta"],
               "best": {"name": best["name"], "theta": best.get("theta"), "dev_acc": best["dev_acc"],
                        "test_acc": best["test_acc"]}}
    _write(out_dir / "best_distribution.json", summary["best"])
    _write(out_dir / "summary.json", summary)
    print(table)
    print(f"\nbest: {best['name']}  dev {best['dev_acc']:.4f}  test {best['test_acc']:.4f}  "
          f"theta {[round(t, 3) for t in best.get('theta') or []]}")
    print(f"outputs in {out_dir}")
    return summary
