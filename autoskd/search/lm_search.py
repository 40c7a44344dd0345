"""``autoskd search`` on a team of language models: the AutoSKD pipeline with perplexity as the score.

1. the bilevel search: one :func:`~autoskd.lm.pipeline.distill_lm` run with a sampled teacher
   policy and the :class:`~autoskd.search.lm_theta.LMThetaStep` callback on the corpus's ``val``
   documents -> θ history + K candidate distributions (once per θ learning rate of the grid);
2. candidates and baselines (each single teacher, AvgKD on distributions, uniform, random) as
   arms, each a from-scratch ``distill_lm`` run on ``train`` scored on dev/val/test perplexity,
   run by the same executors as the classifier search (:func:`~autoskd.search.trials.run_arms`:
   Ray Tune trials or in-process);
3. the best arm by dev perplexity (lower is better) kept as ``<out>/student``; ``result.json``,
   ``arms.csv`` and a plot of θ and of every arm.

Each step writes its result first thing after finishing and is skipped when it is there (with
the same stamp), so a killed search resumes. The arms' training split is the search's own
``train`` split: the LM corpus has four document splits (train, val for θ, dev for best-epoch
restore, test), so no half of the training data is set aside for θ.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..atomic import write_json
from ..errors import AutoSKDError
from ..rerun import check_stamp, stamp
from .arms import Arm, baseline_arms, candidate_arms, parse_baselines
from .distribution import TeacherDistribution
from .presets import PRESETS
from .theta_step import ThetaConfig
from .trials import TrialSpec, run_arms

#: The runner of every LM arm (``save_students=False``: :func:`score_lm_arm`, benchmarks).
LM_RUNNER = "autoskd.search.lm_search:distill_lm_arm"
LM_SCORE_RUNNER = "autoskd.search.lm_search:score_lm_arm"

logger = logging.getLogger(__name__)


def lm_theta_defaults() -> ThetaConfig:
    """θ settings for LM teams: preset ``lm-quick``'s, the one place they are written (so the
    Python API and ``autoskd search`` agree). Why each differs from the classifier presets:

    * ``cr`` strategy, ``none`` scaling: SSWO's θ_i-scaled logits flatten a 49k-way next-token
      distribution to near uniform at θ_i ≈ 1/n; under CR the search's student learns from the
      θ-mixture of the teachers' distributions, the target its candidates then train on
      (``candidate_policy: mixture``, :data:`DEFAULT_CANDIDATE_POLICY`);
    * ``teacher_mixture`` objective: θ descends the negative log-likelihood of the val text under
      the teachers' θ-mixture (one direct gradient from the cached val rows, no virtual step, so
      ``order``/``xi`` do not apply; they are kept at second order and the student's learning
      rate, what ``--val-objective task`` needs). The ``task`` objective's one-step gradient is linear in θ
      and drives θ to an edge of the simplex; on a team of complementary specialists it dropped
      the plot specialist on every seed and tied the best single teacher, while this objective
      beat AvgKD and the best single teacher on 10 of 10 seeds there and on 5 fresh seeds of the
      four-teacher specialists team; on the ladder it lowered AutoSKD's test perplexity by 524
      [339, 709] against the uncentred task search and by 209 [2, 416] against the centred one,
      at 2.6-2.8 student trainings instead of 4.3-4.4 (benchmarks/README.md, "AutoSKD on an LM team");
    * ``center`` (over the teachers with θ_j > 0): the objective needs it (:class:`ThetaConfig`);
    * ``every`` 2: a θ step every second student step (40 steps: 20 θ steps).
    """
    return ThetaConfig(**PRESETS["lm-quick"]["theta"])


#: How the candidates train on their θ: ``sampled`` (AutoSKD's: one teacher drawn per step) or
#: ``mixture`` (every step the θ-mixture of the distributions; :mod:`.arms` says why).
CANDIDATE_POLICIES = ("sampled", "mixture")
#: The LM search's default: candidates train on the mixture the CR search's student learned from.
DEFAULT_CANDIDATE_POLICY = "mixture"


@dataclass
class LMSearchConfig:
    """All settings of one LM search. ``max_steps`` caps the search run and every arm (compare
    at equal student steps); ``loss``/``alpha``/``temperature``: the ``kd`` method's options the
    search and every arm distil with; ``split_seed`` draws the document split and ``team_seed``
    the team members trained on the corpus (both default ``seed``), so seeds of a benchmark can
    share one team and the teachers' caches on one split. ``candidate_policy``: how the candidates
    train on their θ (:data:`CANDIDATE_POLICIES`)."""

    search_epochs: float = 1.0
    eval_epochs: float = 1.0
    max_steps: int | None = None
    lr: float = 2e-4
    batch_size: int = 8
    seed: int = 0
    split_seed: int | None = None
    team_seed: int | None = None
    m: int = 0
    loss: str = "forward_kl"
    alpha: float = 1.0
    temperature: float = 1.0
    beta: float = 0.5  # the jsd loss's β
    top_k: int = 64
    max_length: int | None = None
    precision: str = "fp32"
    theta: ThetaConfig = field(default_factory=lm_theta_defaults)
    theta_lrs: list[float] | None = None
    baselines: str = "all"
    n_random: int = 2
    executor: str = "local"
    address: str | None = None
    cpus_per_trial: float = 1.0
    max_concurrent: int | None = None
    max_train: int | None = None
    max_eval: int | None = None
    save_students: bool = True
    theta_only: bool = False
    candidate_policy: str = DEFAULT_CANDIDATE_POLICY

    def __post_init__(self) -> None:
        if isinstance(self.theta, dict):
            self.theta = ThetaConfig(**self.theta)
        for name in ("search_epochs", "eval_epochs", "lr"):
            if not getattr(self, name) > 0:
                raise AutoSKDError(f"{name.replace('_', '-')} must be > 0 (got {getattr(self, name)})")
        if self.max_steps is not None and self.max_steps < 1:
            raise AutoSKDError(f"max_steps must be at least 1 (got {self.max_steps})")
        if not 0.0 < self.alpha <= 1.0:
            raise AutoSKDError(f"alpha must be in (0, 1]: at 0 no teacher reaches the student (got {self.alpha})")
        if self.candidate_policy not in CANDIDATE_POLICIES:
            raise AutoSKDError(f"candidate_policy {self.candidate_policy!r} unknown; use "
                               f"{' or '.join(CANDIDATE_POLICIES)}")

    @property
    def grid(self) -> list[float]:
        return [float(x) for x in (self.theta_lrs or [self.theta.lr])]

    def method_options(self) -> dict:
        """The ``kd`` options of the search's student and of every arm. The θ step itself always
        differentiates forward KL's soft-CE form (:mod:`.lm_theta`), so with another loss its
        virtual step approximates the student's real step."""
        extra = {"beta": self.beta} if self.loss == "jsd" else {}
        return {"loss": self.loss, "alpha": self.alpha, "temperature": self.temperature, **extra}

    def base_distill(self, epochs: float):
        from ..lm.pipeline import LMDistillConfig

        return LMDistillConfig(method="kd", method_options=self.method_options(), epochs=epochs,
                               max_steps=self.max_steps, lr=self.lr, batch_size=self.batch_size, seed=self.seed,
                               max_length=self.max_length, top_k=self.top_k, precision=self.precision,
                               theta_scaling=self.theta.scaling, samples=0, agreement=False)

    def to_dict(self) -> dict:
        return asdict(self)

    def computed(self) -> dict:
        """What decides the results (where and how arms run, and how far, may change on resume)."""
        free = ("executor", "address", "cpus_per_trial", "max_concurrent", "baselines", "n_random", "theta_only")
        out = {k: v for k, v in self.to_dict().items() if k not in free}
        if out["team_seed"] is None:  # unset: the seed's own team, as before the setting existed
            del out["team_seed"]
        if out["candidate_policy"] == "sampled":  # the default keeps the stamps of searches made before it
            del out["candidate_policy"]
        if self.loss != "jsd":  # β is read by the jsd loss only
            del out["beta"]
        return out


# ---------------------------------------------------------------------------------------------- task
def corpus_of(task: dict, seed: int):
    """The corpus a task dict names (``name_or_path`` without ``lm:``, columns, ``max_train`` /
    ``max_eval`` subsampling, ``split_seed``)."""
    from ..lm.data import load_corpus

    source = str(task["name_or_path"])
    source = source[3:].strip() if source.startswith("lm:") else source
    split_seed = task.get("split_seed")
    split_seed = seed if split_seed is None else int(split_seed)
    corpus = load_corpus(source, text_column=task.get("text_column"), prompt_column=task.get("prompt_column"),
                         completion_column=task.get("completion_column"), seed=split_seed)
    if task.get("max_train") or task.get("max_eval"):
        corpus = corpus.subsample(task.get("max_train"), task.get("max_eval"), seed=split_seed)
    return corpus


def build_lm_team(team_path, task: dict, seed: int, corpus, cache_dir, progress: bool = True):
    """The team with its corpus-trained members built at the task's ``team_seed`` (default
    ``seed``); ``distill_lm`` then finds every teacher built and keeps them."""
    from ..lm.team import LMTeam

    team_seed = task.get("team_seed")
    return LMTeam.from_yaml(team_path).build(seed=seed if team_seed is None else int(team_seed), corpus=corpus,
                                             cache_dir=cache_dir, progress=progress)


def lm_arm_config(arm: Arm, base):
    """``base`` (an LMDistillConfig) with the arm's teacher policy."""
    if arm.kind == "single":
        return dataclasses.replace(base, policy="single", teacher=arm.teacher, theta=None)
    if arm.kind == "average":
        return dataclasses.replace(base, policy="average", teacher=None, theta=None)
    policy = "mixture" if arm.kind == "mixture" else "sampled"
    return dataclasses.replace(base, policy=policy, teacher=None, theta=list(arm.theta))


def _train_arm(spec: TrialSpec, arm: Arm, out_dir: Path | None) -> dict:
    from ..lm.pipeline import LMDistillConfig, distill_lm

    base = LMDistillConfig(**spec.base_config)
    corpus = corpus_of(spec.task, base.seed)
    team = build_lm_team(spec.team_path, spec.task, base.seed, corpus, spec.cache_dir, progress=False)
    outcome = distill_lm(team, corpus, lm_arm_config(arm, base), out_dir=out_dir, cache_dir=spec.cache_dir,
                         progress=False)
    s = outcome.scores
    return {"dev_ppl": float(outcome.result.best_score if outcome.result.best_score is not None else s["dev_ppl"]),
            "val_ppl": float(s["val_ppl"]), "test_ppl": float(s["test_ppl"]), "steps": int(outcome.result.steps),
            "train_seconds": round(float(outcome.result.seconds), 2)}


def distill_lm_arm(spec: TrialSpec, arm: Arm, out_dir: Path) -> dict:
    """The LM arm runner: ``distill_lm`` with the arm's policy; the student saved in ``out_dir``."""
    return _train_arm(spec, arm, out_dir)


def score_lm_arm(spec: TrialSpec, arm: Arm, out_dir: Path) -> dict:
    """As :func:`distill_lm_arm`, but only the scores are kept (benchmarks run hundreds of arms)."""
    return _train_arm(spec, arm, None)


# ---------------------------------------------------------------------------------------------- θ search
def lm_bilevel_search(team, corpus, config: LMSearchConfig, theta_lr: float, cache_dir: Path,
                      progress: bool = True) -> dict:
    """One θ search (one student trained with θ learned beside it); its record."""
    from ..lm.data import lm_data_id
    from ..lm.pipeline import distill_lm
    from .lm_theta import LMThetaStep

    n = len(team.teacher_specs)
    if n < 2:
        raise AutoSKDError(f"the search needs a team of at least 2 teachers (this one has {n})")
    theta_config = dataclasses.replace(config.theta, lr=theta_lr)
    dist = TeacherDistribution([1.0 / n] * n)
    held: dict = {}

    def attach(policy, loaders, student):
        policy.theta = dist.theta  # the policy samples from the distribution θ learns in
        block = config.max_length or team.max_length
        val_id = lm_data_id(corpus, "val", team.tokenizer, block, "packed")
        held["step"] = LMThetaStep(dist, policy, loaders.val, theta_config, config.m, val_id=val_id,
                                   alpha=config.alpha, temperature=config.temperature)
        return [held["step"]]

    distill = dataclasses.replace(config.base_distill(config.search_epochs), policy="sampled", theta=[1.0 / n] * n)
    outcome = distill_lm(team, corpus, distill, cache_dir=cache_dir, progress=progress, search=attach)
    step = held["step"]
    names = list(team.teacher_specs)
    return {"theta_lr": theta_lr, "teachers": names, "theta": dist.probs().tolist(),
            "candidates": step.candidates, "history": step.history, "dropped": [names[i] for i in step.dropped],
            "theta_steps": step.theta_steps, "nonfinite_theta_steps": step.nonfinite_steps,
            "counts": dict(step.policy.counts), "steps": int(outcome.result.steps),
            "seconds": round(float(outcome.result.seconds), 2), "val_ppl": outcome.scores["val_ppl"],
            "test_ppl": outcome.scores["test_ppl"]}


def one_vocabulary_settings(team_path, config: LMSearchConfig) -> LMSearchConfig:
    """``config`` fit for the team: mixtures (mixture candidates, the ``teacher_mixture``
    objective, CR's mixture) need every teacher on the student's vocabulary. On a team with a
    teacher that reads the text with its own tokenizer they fall back, with a log line, to sampled
    candidates and the ``task`` objective with the ``expected`` strategy (second order, ξ the
    student's learning rate), the settings that team was measured with."""
    from ..lm.team import LMTeam

    specs = LMTeam.from_yaml(team_path).teacher_specs  # the file only: nothing is loaded
    own = [n for n, m in specs.items() if getattr(m, "tokenizer", None) is not None]
    theta = config.theta
    mixes = config.candidate_policy == "mixture" or theta.val_objective == "teacher_mixture" or theta.strategy == "cr"
    if not own or not mixes:
        return config
    logger.warning("teacher %s reads the text with its own tokenizer and a mixture needs one vocabulary: the search "
                   "samples its candidates and learns θ on the task objective (expected strategy)", own[0])
    if theta.val_objective == "teacher_mixture":
        theta = dataclasses.replace(theta, val_objective="task", order="second", xi="student_lr")
    if theta.strategy == "cr":
        theta = dataclasses.replace(theta, strategy="expected")
    return dataclasses.replace(config, candidate_policy="sampled", theta=theta)


def lm_baselines(team, baselines) -> set[str]:
    """The baseline arms of an LM search on ``team`` (built). AvgKD averages next-token
    distributions over one vocabulary, so on a team with a teacher that reads the text with its
    own tokenizer it is left out of ``all`` and refused, in one line, when named."""
    which = parse_baselines(baselines)
    own = sorted(getattr(team, "own_tokenizers", None) or {})
    if own and "avgkd" in which:
        named = baselines.split(",") if isinstance(baselines, str) else list(baselines)
        if [str(b).strip().lower() for b in named if str(b).strip()] != ["all"]:
            raise AutoSKDError(f"baseline avgkd averages next-token distributions over one vocabulary, but teacher "
                               f"'{own[0]}' has its own tokenizer; leave avgkd out of the baselines")
        logger.info("AvgKD is left out of the baselines: teacher %s has its own tokenizer", own[0])
        which.discard("avgkd")
    return which


def _lr_tag(lr: float) -> str:
    return f"{lr:.6g}".replace(".", "p").replace("-", "m")


def run_lm_search(team_path: str | Path, task: dict, config: LMSearchConfig, out_dir: str | Path,
                  cache_dir: str | Path = ".cache/autoskd", progress: bool = True) -> dict:
    """The whole LM search into ``out_dir`` (resumable); returns the summary (``result.json``)."""
    out, cache_dir = Path(out_dir), Path(cache_dir)
    config = one_vocabulary_settings(team_path, config)
    out.mkdir(parents=True, exist_ok=True)
    task = {k: v for k, v in {**task, "split_seed": config.split_seed, "team_seed": config.team_seed,
                              "max_train": config.max_train, "max_eval": config.max_eval}.items() if v is not None}
    identity = {"team": str(Path(team_path).resolve()) if Path(team_path).exists() else str(team_path),
                "task": task, "config": config.computed()}
    config_path = out / "config.json"
    check_stamp(json.loads(config_path.read_text()) if config_path.exists() else None, identity,
                f"search settings ({config_path})", str(out))
    write_json(config_path, {**config.to_dict(), "task": task, **stamp(identity)})

    corpus = corpus_of(task, config.seed)
    team = build_lm_team(team_path, task, config.seed, corpus, cache_dir, progress)
    names = list(team.teacher_specs)
    baselines = lm_baselines(team, config.baselines)  # before anything trains: an impossible one is refused
    searches = []
    for lr in config.grid:
        path = out / (f"search-lr{_lr_tag(lr)}.json" if len(config.grid) > 1 else "search.json")
        record = json.loads(path.read_text()) if path.exists() else None
        check_stamp(record, {**identity, "theta_lr": lr}, f"θ search ({path})", str(out))
        if record is None:
            record = {**lm_bilevel_search(team, corpus, config, lr, cache_dir, progress),
                      **stamp({**identity, "theta_lr": lr})}
            write_json(path, record)
        searches.append(record)
    if config.theta_only:
        return {"searches": searches}

    thetas, cand_names = [], []
    for s in searches:
        for j, c in enumerate(s["candidates"]):
            thetas.append(c["theta"])
            cand_names.append(f"candidate-{j:02d}" if len(searches) == 1 else f"candidate-lr{_lr_tag(s['theta_lr'])}-{j:02d}")
    kind = "mixture" if config.candidate_policy == "mixture" else "candidate"
    arms = candidate_arms(thetas, cand_names, kind) + baseline_arms(names, baselines, config.n_random, config.seed)
    spec = TrialSpec(team_path=str(team_path), task=task, root=str(out), cache_dir=str(cache_dir),
                     base_config=config.base_distill(config.eval_epochs).to_dict(),
                     runner=LM_RUNNER if config.save_students else LM_SCORE_RUNNER)
    records = run_arms(spec, arms, executor=config.executor, address=config.address,
                       cpus_per_trial=config.cpus_per_trial, max_concurrent=config.max_concurrent, progress=progress)
    summary = summarise_lm(records, searches, names)
    if config.save_students and summary.get("best"):
        keep_best_student(out, summary["best"]["name"])
    write_json(out / "result.json", summary)
    write_arms_csv(records, out / "arms.csv")
    plot_lm_search(summary, searches, out / "search.png")
    return summary


# ---------------------------------------------------------------------------------------------- report
def summarise_lm(records: list[dict], searches: list[dict], teachers: list[str]) -> dict:
    """Best arm by dev perplexity (lower is better), per group; the search's cost in student
    trainings (the θ search is one, plus its θ steps' extra passes)."""
    done = [r for r in records if r.get("dev_ppl") is not None]
    failed = [{"name": r["name"], "error": r.get("error")} for r in records if r.get("dev_ppl") is None]

    def brief(r):
        return {k: r.get(k) for k in ("name", "kind", "group", "theta", "teacher", "dev_ppl", "val_ppl", "test_ppl",
                                      "steps", "seconds")}

    best = min(done, key=lambda r: r["dev_ppl"]) if done else None
    groups = {}
    for r in done:
        g = groups.setdefault(r["group"], r)
        if r["dev_ppl"] < g["dev_ppl"]:
            groups[r["group"]] = r
    return {"metric": "perplexity", "higher_is_better": False, "teachers": teachers,
            "best": brief(best) if best else None, "best_by_group": {g: brief(r) for g, r in groups.items()},
            "arms": [brief(r) for r in done], "failed": failed,
            "searches": [{k: s[k] for k in ("theta_lr", "theta", "dropped", "candidates", "val_ppl", "test_ppl",
                                            "seconds", "steps")} for s in searches]}


def keep_best_student(out: Path, name: str) -> None:
    """Copy the best arm's student to ``<out>/student`` and drop the other arms' copies (a 135M-
    parameter LM is half a gigabyte per arm)."""
    trials = out / "trials"
    best = trials / name / "student"
    if not best.exists():
        return
    dst = out / "student"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(best, dst)
    for folder in trials.iterdir():
        if folder.name != name and (folder / "student").exists():
            shutil.rmtree(folder / "student")


def write_arms_csv(records: list[dict], path: Path) -> None:
    import csv

    cols = ("name", "group", "kind", "teacher", "theta", "dev_ppl", "val_ppl", "test_ppl", "steps", "seconds", "status")
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for r in records:
            w.writerow([json.dumps(r.get(c)) if c == "theta" else r.get(c) for c in cols])


def plot_lm_search(summary: dict, searches: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    teachers = summary["teachers"]
    for s in searches:
        steps = [h["step"] for h in s["history"]]
        for j, name in enumerate(teachers):
            left.plot(steps, [h["theta"][j] for h in s["history"]], label=f"{name} (lr {s['theta_lr']:g})")
    left.set_xlabel("student step")
    left.set_ylabel("θ")
    left.set_title("θ during the search")
    left.legend(fontsize=7)
    arms = sorted(summary["arms"], key=lambda r: r["dev_ppl"])
    colors = {"autoskd": "#3b6ea8", "single": "#888888", "avgkd": "#b5651d", "uniform": "#6a9955", "random": "#c9c9c9"}
    right.barh([a["name"] for a in arms], [a["dev_ppl"] for a in arms],
               color=[colors.get(a["group"], "#999999") for a in arms])
    right.invert_yaxis()
    right.set_xlabel("dev perplexity (lower is better)")
    right.set_title("arms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
