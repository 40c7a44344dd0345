"""Run a resolved experiment: one function per kind, each a thin hand-over to the Python API
(:func:`autoskd.pipeline.distill`, :func:`autoskd.stage_plans.distill_stages`,
:func:`autoskd.lm.pipeline.distill_lm`, :func:`autoskd.search.run.run_search`,
:func:`autoskd.fanout.tune.run_tune`, :func:`autoskd.chain.run_chain`).

Each writes ``experiment.yaml`` into its output folder once its inputs are checked and just
before its first training step, so a refused run leaves no folder behind and a started one
always says what it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import AutoSKDError
from .files import check_rerun, write_experiment
from .resolve import LM_PREFIX, is_lm_task
from .teams import classifier_team, lm_team, write_team


def run_experiment(resolved: dict) -> int:
    """Run ``resolved`` (from :func:`autoskd.experiment.resolve_experiment`); returns the exit code."""
    kind = resolved["kind"]
    check_rerun(resolved)  # a rerun into the same --out resumes only the same experiment
    if kind == "distill" and is_lm_task(resolved["task"]["name"]):
        return run_lm_distill(resolved)
    if kind == "search" and is_lm_task(resolved["task"]["name"]):
        return run_lm_search(resolved)
    runners: dict[str, Callable[[dict], int]] = {"distill": run_distill, "stages": run_stages, "search": run_search,
                                                  "tune": run_tune, "chain": run_chain}
    return runners[kind](resolved)


# ---------------------------------------------------------------------------------------------- shared pieces
def load_task(resolved: dict):
    """The classification task of ``resolved`` (subsampled as its ``task`` section says)."""
    from ..data.tasks import load_task as load

    t, seed = resolved["task"], resolved["seed"]
    task = load(t["name"], text_column=t["text_column"], text_pair_column=t["text_pair_column"],
                label_column=t["label_column"], seed=seed, encoding=t["encoding"])
    if t["max_train"] or t["max_eval"]:
        task = task.subsample(t["max_train"], t["max_eval"], seed=seed)
    return task


def build_team(resolved: dict, task):
    """The classification team of ``resolved``, its teachers fine-tuned (or read from the cache)."""
    team = classifier_team(resolved["team"])
    return team.build(task, cache_dir=Path(resolved["cache_dir"]) / "teachers", seed=resolved["seed"],
                      progress=resolved["progress"])


def refuse_finished(out: str) -> None:
    if (Path(out) / "result.json").exists():  # never overwrite a finished student
        raise AutoSKDError(f"--out {out} already holds a finished run (result.json); pass a new --out folder")


def _scale(resolved: dict) -> dict:
    """DistillConfig keywords of the ``scale`` section."""
    scale = resolved.get("scale") or {}
    return {"deepspeed": scale.get("deepspeed"), "tensor_parallel": scale.get("tensor_parallel", 1)}


def print_table(rows: list[dict]) -> None:
    cols = list(rows[0])
    cells = [["" if r[c] is None else (f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c])) for c in cols]
             for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _teacher_rows(team) -> list[dict]:
    return [{"model": f"teacher {n}", "dev_acc": a, "test_acc": None} for n, a in team.dev_accuracy.items()]


# ---------------------------------------------------------------------------------------------- kinds
def run_distill(resolved: dict) -> int:
    from ..pipeline import DistillConfig, distill

    d, out = resolved["distill"], resolved["out"]
    refuse_finished(out)
    task = load_task(resolved)
    team = build_team(resolved, task)
    config = DistillConfig(method=d["method"], method_options=dict(d["options"]), teacher=d["teacher"],
                           teachers=d["teachers"], policy=d["policy"], epochs=d["epochs"], lr=d["lr"],
                           batch_size=d["batch_size"], warmup_ratio=d["warmup_ratio"], weight_decay=d["weight_decay"],
                           seed=resolved["seed"], pretrain_epochs=d["pretrain_epochs"], max_length=d["max_length"],
                           **_scale(resolved))
    write_experiment(resolved)
    outcome = distill(team, task, config, out_dir=out, cache_dir=resolved["cache_dir"], progress=resolved["progress"])
    print_table(_teacher_rows(team) + [{"model": f"student ({d['method']})", "dev_acc": outcome.dev_acc,
                                        "test_acc": outcome.test_acc}])
    print(f"student saved to {Path(out) / 'student'}")
    return 0


def run_stages(resolved: dict) -> int:
    from ..pipeline import DistillConfig
    from ..stage_plans import distill_stages

    s, out = resolved["stages"], resolved["out"]
    refuse_finished(out)
    task = load_task(resolved)
    team = build_team(resolved, task)
    config = DistillConfig(teacher=s["teacher"], teachers=s["teachers"], batch_size=s["batch_size"],
                           seed=resolved["seed"], max_length=s["max_length"], **_scale(resolved))
    outcome, stages = distill_stages(team, task, s["plan"], config, out_dir=out, cache_dir=resolved["cache_dir"],
                                     progress=resolved["progress"], before_training=lambda: write_experiment(resolved))
    print_table(_teacher_rows(team) + [{"model": f"student ({' -> '.join(st.method for st in stages)})",
                                        "dev_acc": outcome.dev_acc, "test_acc": outcome.test_acc}])
    print(f"student saved to {Path(out) / 'student'}")
    return 0


def run_lm_distill(resolved: dict) -> int:
    """A language-model task (``lm:<corpus>``): decoder teachers and student, perplexity scores."""
    from ..lm.data import load_corpus
    from ..lm.pipeline import LMDistillConfig, distill_lm

    d, t, out, seed = resolved["distill"], resolved["task"], resolved["out"], resolved["seed"]
    refuse_finished(out)
    team = lm_team(resolved["team"])
    corpus = load_corpus(t["name"][len(LM_PREFIX):].strip(), text_column=t["text_column"],
                         prompt_column=t["prompt_column"], completion_column=t["completion_column"], seed=seed)
    if t["max_train"] or t["max_eval"]:
        corpus = corpus.subsample(t["max_train"], t["max_eval"], seed=seed)
    config = LMDistillConfig(method=d["method"], method_options=dict(d["options"]), teacher=d["teacher"],
                             epochs=d["epochs"], max_steps=d["max_steps"], lr=d["lr"], batch_size=d["batch_size"],
                             warmup_ratio=d["warmup_ratio"], weight_decay=d["weight_decay"], seed=seed,
                             max_length=d["max_length"], layout=d["layout"], top_k=d["top_k"],
                             precision=d["precision"], **_scale(resolved))
    write_experiment(resolved)
    outcome = distill_lm(team, corpus, config, out_dir=out, cache_dir=resolved["cache_dir"],
                         progress=resolved["progress"])
    s = outcome.scores
    print(f"student ({d['method']}): val perplexity {s['val_ppl']:.2f}, test perplexity {s['test_ppl']:.2f}"
          + (f", top-1 agreement with the teacher {s['test_top1_agreement']:.3f}" if "test_top1_agreement" in s else ""))
    for sample in outcome.samples:
        print(f"  {sample['prompt']!r} -> {sample['continuation']!r}")
    print(f"student saved to {Path(out) / 'student'} (loads with AutoModelForCausalLM)")
    return 0


def search_config(resolved: dict):
    """The :class:`~autoskd.search.run.SearchConfig` of a resolved search."""
    from ..search.run import SearchConfig
    from ..search.theta_step import ThetaConfig

    s, scale = dict(resolved["search"]), resolved["scale"]
    s.pop("candidate_policy")  # the LM search's (resolve refuses mixture on a classifier task)
    theta = ThetaConfig(**s.pop("theta"))
    return SearchConfig(**s, theta=theta, seed=resolved["seed"], max_train=resolved["task"]["max_train"],
                        max_eval=resolved["task"]["max_eval"], deepspeed=scale["deepspeed"],
                        tensor_parallel=scale["tensor_parallel"], processes=scale["processes_per_trial"])


def _task_args(resolved: dict) -> dict:
    """``load_task`` keywords of the trials (search, tune): they load the task themselves."""
    t = resolved["task"]
    args = {"name_or_path": t["name"], "text_column": t["text_column"], "text_pair_column": t["text_pair_column"],
            "label_column": t["label_column"]}
    if t["encoding"]:
        args["encoding"] = t["encoding"]
    return args


def run_search(resolved: dict) -> int:
    from ..search import run as search

    out = Path(resolved["out"])
    config = search_config(resolved)
    team_path = write_team(resolved["team"], out / "team.yaml")  # the trials read the team from a file
    write_experiment(resolved)
    search.run_search(str(team_path), _task_args(resolved), config, str(out), cache_dir=resolved["cache_dir"],
                      progress=resolved["progress"])
    return 0


def run_lm_search(resolved: dict) -> int:
    """The AutoSKD search on a language-model team (:func:`autoskd.search.lm_search.run_lm_search`)."""
    from ..search.lm_search import LMSearchConfig, run_lm_search as search

    s, t, out = dict(resolved["search"]), resolved["task"], Path(resolved["out"])
    options = {"loss": "forward_kl", "alpha": 1.0, "temperature": 1.0, **dict(s["method_options"] or {})}
    unknown = sorted(set(options) - {"loss", "alpha", "temperature", "beta"})
    if unknown:
        raise AutoSKDError(f"search.method_options {', '.join(unknown)} do not apply to a language-model search; "
                           "use loss, alpha, temperature, beta")
    config = LMSearchConfig(search_epochs=s["search_epochs"], eval_epochs=s["eval_epochs"], max_steps=s["max_steps"],
                            lr=s["lr"], batch_size=s["batch_size"], seed=resolved["seed"], m=s["m"] or 0,
                            theta=s["theta"], theta_lrs=s["theta_lrs"], baselines=s["baselines"],
                            n_random=s["n_random"], address=s["address"],
                            executor="ray" if s["address"] else s["executor"],  # a cluster named: arms run there
                            cpus_per_trial=s["cpus_per_trial"], max_concurrent=s["max_concurrent"],
                            max_train=t["max_train"], max_eval=t["max_eval"], top_k=s["top_k"],
                            theta_only=s["theta_only"], candidate_policy=s["candidate_policy"], **options)
    team_path = write_team(resolved["team"], out / "team.yaml")  # arms read the team from a file
    write_experiment(resolved)
    task = {"name_or_path": t["name"], "text_column": t["text_column"], "prompt_column": t["prompt_column"],
            "completion_column": t["completion_column"]}
    summary = search(str(team_path), {k: v for k, v in task.items() if v is not None}, config, out,
                     cache_dir=resolved["cache_dir"], progress=resolved["progress"])
    if config.theta_only:
        print(f"θ after the search: {summary['searches'][0]['theta']} ({out / 'search.json'})")
        return 0
    print_table([{"arm": a["name"], "group": a["group"], "dev_ppl": a["dev_ppl"], "test_ppl": a["test_ppl"]}
                 for a in sorted(summary["arms"], key=lambda a: a["dev_ppl"])])
    best = summary["best"]
    print(f"best: {best['name']} (dev perplexity {best['dev_ppl']:.2f}, test {best['test_ppl']:.2f}); "
          f"student saved to {out / 'student'} (loads with AutoModelForCausalLM)")
    return 0


def run_tune(resolved: dict) -> int:
    from ..fanout.space import SearchSpace
    from ..fanout.tune import TuneSettings, run_tune as tune

    t, seed, out = dict(resolved["tune"]), resolved["seed"], Path(resolved["out"])
    space = SearchSpace.from_dict(t.pop("space"), name="space")
    batch_size = t.pop("batch_size")
    settings = TuneSettings(**t, seed=seed, base={"seed": seed, **({"batch_size": batch_size} if batch_size else {})})
    task = resolved["task"]
    if is_lm_task(task["name"]):  # LM trials load the corpus themselves (lm:<corpus>, its columns)
        task_args = {"name_or_path": task["name"],
                     **{k: task[k] for k in ("text_column", "prompt_column", "completion_column")}}
    else:
        task_args = _task_args(resolved)
    task = {**task_args, "seed": seed, "max_train": task["max_train"], "max_eval": task["max_eval"]}
    team_path = write_team(resolved["team"], out / "team.yaml")
    write_experiment(resolved)
    tune(space, str(team_path), {k: v for k, v in task.items() if v is not None}, settings, out,
         cache_dir=resolved["cache_dir"], progress=resolved["progress"])
    return 0


def run_chain(resolved: dict) -> int:
    from ..chain import run_chain as chain
    from ..pipeline import DistillConfig

    c, out = resolved["chain"], resolved["out"]
    task = load_task(resolved)
    team = build_team(resolved, task)
    config = DistillConfig(method=c["method"], method_options=dict(c["options"]), teacher=c["teacher"],
                           epochs=c["epochs"], lr=c["lr"], batch_size=c["batch_size"], seed=resolved["seed"],
                           max_length=c["max_length"])
    write_experiment(resolved)
    outcome = chain(team, task, config, list(c["assistants"]), out_dir=out, cache_dir=resolved["cache_dir"],
                    progress=resolved["progress"])
    print_table([{"hop": h.name, "teachers": "+".join(h.teachers), "dev_acc": h.dev_acc, "test_acc": h.test_acc}
                 for h in outcome.hops])
    print(f"chain written to {Path(out) / 'chain.json'}")
    return 0
