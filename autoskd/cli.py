"""The ``autoskd`` command line: a thin layer over experiment files and the Python API.

``autoskd run experiment.yaml`` runs one experiment file (:mod:`autoskd.experiment`). The
commands that train (``distill``, ``search`` and ``tune`` here, ``chain`` in
:mod:`autoskd.cli_methods`) are shorter ways of writing the same file: each flag overrides one
key of the experiment (``--lr`` is ``distill.lr``), ``--set key=value`` edits any key,
``--dry-run`` prints the resolved experiment without running it, and every run writes
``experiment.yaml`` beside its outputs.

Every user-fixable problem surfaces as one line, ``autoskd: error: ...``, and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .cli_types import (baseline_list, encoding_name, fraction, int_at_least, non_negative_float, non_negative_int,
                        output_dir, port_number, positive_float, positive_int, ray_address, storage_url)
from .defaults import DEFAULT_BATCH_SIZE, DEFAULT_LR
from .errors import AutoSKDError
from .experiment.command import SCALE_FLAGS, experiment_from_flags, run_tree
from .experiment.overrides import apply_overrides, parse_options
from .experiment.teams import DEFAULT_TEAM
from .parallel_cli import add_parallel_args

#: ``distill`` flags (dest -> experiment key)
DISTILL_FLAGS = {"method": "distill.method", "teacher": "distill.teacher", "teachers": "distill.teachers",
                 "policy": "distill.policy", "epochs": "distill.epochs", "pretrain_epochs": "distill.pretrain_epochs",
                 "lr": "distill.lr", "batch_size": "distill.batch_size", "max_length": "distill.max_length",
                 "precision": "distill.precision", "top_k": "distill.top_k", "layout": "distill.layout",
                 "max_steps": "distill.max_steps", "prompt_column": "task.prompt_column",
                 "completion_column": "task.completion_column", **SCALE_FLAGS}
#: ``search`` flags (dest -> experiment key)
SEARCH_FLAGS = {"preset": "search.preset", "strategy": "search.theta.strategy", "order": "search.theta.order",
                "theta_lr": "search.theta.lr", "theta_lrs": "search.theta_lrs", "xi": "search.theta.xi",
                "theta_scaling": "search.theta.scaling", "theta_warmup": "search.theta.warmup",
                "theta_center": "search.theta.center", "val_objective": "search.theta.val_objective",
                "m": "search.m", "candidates": "search.theta.num_candidates", "search_epochs": "search.search_epochs",
                "theta_only": "search.theta_only", "candidate_policy": "search.candidate_policy", "eval_epochs": "search.eval_epochs", "baselines": "search.baselines",
                "random": "search.n_random", "executor": "search.executor", "address": "search.address",
                "cpus_per_trial": "search.cpus_per_trial", "gpus_per_trial": "search.gpus_per_trial",
                "max_concurrent": "search.max_concurrent", "scheduler": "search.scheduler", **SCALE_FLAGS}
#: ``tune`` flags (dest -> experiment key)
TUNE_FLAGS = {"space": "tune.space", "sampler": "tune.sampler", "scheduler": "tune.scheduler", "trials": "tune.trials",
              "storage": "tune.storage", "study": "tune.study", "objective2": "tune.objective2",
              "batch_size": "tune.batch_size", "grace_period": "tune.grace_period",
              "reduction_factor": "tune.reduction_factor", "address": "tune.address",
              "cpus_per_trial": "tune.cpus_per_trial", "gpus_per_trial": "tune.gpus_per_trial",
              "max_concurrent": "tune.max_concurrent"}


class OneLineParser(argparse.ArgumentParser):
    """argparse with the project's error format: one line, ``autoskd: error: ...``, exit 2."""

    def error(self, message: str):
        self.exit(2, f"autoskd: error: {self.prog}: {message} (see '{self.prog} --help')\n")


def one_line(err: BaseException) -> str:
    """The error's message on one line, whatever a library put in it."""
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())


# ---------------------------------------------------------------------------------------------- shared flags
def add_team_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--team", metavar="FILE",
                   help=f"teacher-team YAML or bundled name (default: {DEFAULT_TEAM}; smollm2 for lm: tasks)")
    add_cache_args(p)


def add_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", type=output_dir, metavar="DIR",
                   help="where fine-tuned teachers and teacher outputs are cached (default: .cache/autoskd)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="hide progress bars")


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data (experiment keys task.*, seed)")
    g.add_argument("--task", metavar="NAME",
                   help="built-in task name, a CSV/JSONL/Parquet file, a `datasets` name, or lm:<corpus> "
                        "(default: rotten_tomatoes)")
    g.add_argument("--text-column", metavar="COL", help="column with the text (default: text or sentence)")
    g.add_argument("--text-pair-column", metavar="COL", help="second text column for sentence-pair tasks (e.g. RTE)")
    g.add_argument("--label-column", metavar="COL", help="column with the label (default: label)")
    g.add_argument("--encoding", type=encoding_name, metavar="CODEC",
                   help="text encoding of a CSV/TSV/JSON data file (default: utf-8), e.g. latin-1, cp1252")
    g.add_argument("--max-train", type=positive_int, metavar="N",
                   help="keep at most N rows in each of train and val (quick runs)")
    g.add_argument("--max-eval", type=positive_int, metavar="N", help="keep at most N rows in each of dev and test")
    g.add_argument("--seed", type=non_negative_int, metavar="N",
                   help="seed for splits, initialisation and data order (default: 0)")


def add_experiment_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("experiment")
    g.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="set any experiment key, e.g. --set distill.lr=3e-4 --set task.max_train=100 (repeatable; "
                        "values read as YAML)")
    g.add_argument("--dry-run", action="store_true",
                   help="check everything and print the resolved experiment and what would run; load nothing")


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Team, data and experiment flags: what every training command shares."""
    add_team_args(p)
    add_data_args(p)
    add_experiment_args(p)


# ---------------------------------------------------------------------------------------------- commands
def cmd_methods(args) -> int:
    from .methods import describe_methods

    rows = describe_methods()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        stages = ", ".join(r.get("stages", []))
        print(f"{r['name']:<{width}}  [{stages}]  {r['description']}")
    return 0


def cmd_team_build(args) -> int:
    from .experiment import resolve_experiment
    from .experiment.runner import build_team, load_task

    resolved = resolve_experiment(experiment_from_flags(args, "distill", {}))
    team = build_team(resolved, load_task(resolved))
    print(json.dumps({"team": team.name, "dev_accuracy": team.dev_accuracy}, indent=2))
    return 0


def cmd_run(args) -> int:
    from .experiment import load_experiment

    tree = apply_overrides(load_experiment(args.file), {"out": args.out, "progress": args.progress})
    return run_tree(tree, args, source=args.file)


def cmd_distill(args) -> int:
    """``distill``: the experiment ``kind: distill`` (a stage plan as ``--method`` makes it ``kind:
    stages``; an ``lm:`` task distils language models)."""
    base = {"distill": {"options": parse_options(args.option)}} if args.option else None
    return run_tree(experiment_from_flags(args, "distill", DISTILL_FLAGS, base), args)


def cmd_search(args) -> int:
    return run_tree(experiment_from_flags(args, "search", SEARCH_FLAGS), args)


def cmd_tune(args) -> int:
    return run_tree(experiment_from_flags(args, "tune", TUNE_FLAGS), args)


def cmd_dashboard(args) -> int:
    from .fanout.dashboard import serve_dashboard

    serve_dashboard(args.storage, host=args.host, port=args.port)
    return 0


def cmd_demo(args) -> int:
    """The main job on the embedded default: the quick AutoSKD search of the ladder team."""
    return main(["search", "--team", DEFAULT_TEAM, "--task", "rotten_tomatoes", "--preset", "quick",
                 "--out", "runs/demo"])


# ---------------------------------------------------------------------------------------------- parser
RUN_EPILOG = """\
an experiment file (every key but one section is optional; `--dry-run` shows all of them):
  kind: distill                     # distill | stages | search | tune | chain
  team: teams/minilm-ladder.yaml    # or the team mapping inline
  task: {name: rotten_tomatoes, max_train: 200, max_eval: 200}   # or lm:<corpus>
  seed: 0
  out: runs/x
  distill: {method: kd, options: {temperature: 2}, epochs: 3, lr: 1.0e-4, batch_size: 32}
  # stages: {plan: plan.yaml}  search: {preset: quick, theta: {lr: 0.01}}
  # tune: {space: search_spaces/kd-hparams.yaml, trials: 8, scheduler: asha}
  # chain: {method: takd, assistants: [4]}  scale: {deepspeed: ds.json}

every run writes its resolved experiment as <out>/experiment.yaml;
`autoskd run <out>/experiment.yaml --out <new folder>` runs it again.
"""


def _experiment_command(sub, name: str, help: str, what: str, keys: str):
    """A subcommand that writes an experiment file: its common flags, and help that says so."""
    p = sub.add_parser(name, help=help, description=f"{what} Flags override keys of the experiment ({keys}); "
                                                      "see `autoskd run --help`.")
    add_common_args(p)
    return p


def _add_distill(sub) -> None:
    p = _experiment_command(sub, "distill", "distil the team's student with one method (or a stage plan)",
                            "Distil the team's student.", "kind: distill")
    g = p.add_argument_group("distillation (experiment keys distill.*)")
    g.add_argument("--method", metavar="NAME",
                   help="method name (see `autoskd methods`), a combination 'tinybert+minilmv2', a YAML "
                        "file listing methods with weights, or a YAML 'stages:' plan (default: kd)")
    g.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="method option, e.g. temperature=2 (repeatable)")
    g.add_argument("--teacher", metavar="NAME", help="team member to distil from (default: best on dev)")
    g.add_argument("--teachers", metavar="A,B", help="comma list of members for multi-teacher methods (default: all)")
    g.add_argument("--policy", choices=["single", "average"],
                   help="one teacher, or AvgKD over the team (default: single)")
    g.add_argument("--epochs", type=positive_float, metavar="N", help="epochs per method stage (default: 3)")
    g.add_argument("--pretrain-epochs", type=non_negative_float, metavar="N",
                   help="epochs of a pre-training-style stage on unlabelled text (default: 0)")
    g.add_argument("--lr", type=positive_float, metavar="X", help=f"peak learning rate (default: {DEFAULT_LR:g})")
    g.add_argument("--batch-size", type=positive_int, metavar="N", help=f"default: {DEFAULT_BATCH_SIZE}")
    g.add_argument("--max-length", type=int_at_least(2), metavar="N",
                   help="token limit (default: the team's max_length)")
    p.add_argument("--out", type=output_dir, metavar="DIR",
                   help="output folder: student/, metrics.jsonl, training.png, result.json, experiment.yaml "
                        "(default: runs/distill)")
    add_parallel_args(p)
    g = p.add_argument_group("language models (--task lm:<corpus>)")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   help="autocast precision of the forwards (bf16 works on CPU; fp16 needs CUDA; default: fp32)")
    g.add_argument("--top-k", type=non_negative_int, metavar="K",
                   help="teacher tokens cached per position (0: run the teacher live every step; default: 64)")
    g.add_argument("--layout", choices=["packed", "padded"],
                   help="packed blocks of --max-length tokens, or one padded row per document (default: packed)")
    g.add_argument("--prompt-column", metavar="COL",
                   help="prompt column of prompt/completion data (loss on completions only)")
    g.add_argument("--completion-column", metavar="COL", help="completion column of prompt/completion data")
    g.add_argument("--max-steps", type=positive_int, metavar="N", help="cap on training steps per stage")
    p.set_defaults(func=cmd_distill)


def _add_search(sub) -> None:
    p = _experiment_command(sub, "search", "AutoSKD: learn which teachers to sample, evaluate candidates and "
                            "baselines", "AutoSKD's search.", "kind: search; search.*, search.theta.*")
    p.add_argument("--preset", choices=["quick", "medium", "paper"],
                   help="settings bundle (default: quick; medium: the benchmark's; paper: AutoSKDBERT's)")
    p.add_argument("--out", type=output_dir, metavar="DIR",
                   help="output folder; rerunning resumes it (default: runs/search)")
    g = p.add_argument_group("theta search (search.theta.*)")
    g.add_argument("--strategy", choices=["sswo", "cr", "expected"],
                   help="theta update strategy (default: sswo; expected: SSWO's step averaged over the draw, "
                        "every entry each step, not in the paper)")
    g.add_argument("--order", choices=["first", "second"], help="unrolled-gradient order (default: the preset's)")
    g.add_argument("--theta-lr", type=positive_float, metavar="X",
                   help="Adam learning rate on theta (paper: 3e-4 to 1e-3)")
    g.add_argument("--theta-lrs", type=positive_float, nargs="+", metavar="LR",
                   help="a grid of theta learning rates: one search per rate, K candidates each (paper: 8 rates)")
    g.add_argument("--xi", metavar="X", help="virtual-step size: theta_lr (paper, default), student_lr, or a number")
    g.add_argument("--theta-scaling", choices=["theta", "max", "n"],
                   help="SSWO's logit scale for the sampled teacher: theta_i (paper), theta_i/max theta, n*theta_i")
    g.add_argument("--theta-warmup", type=fraction, metavar="F",
                   help="fraction of phase 1 with theta held fixed (paper: 0)")
    g.add_argument("--theta-center", action="store_true", default=None,
                   help="centre theta's gradient on the team's mean (not in the paper)")
    g.add_argument("--val-objective", choices=["distill", "task", "teacher_mixture"],
                   help="theta's validation loss (default: distill; task needs --order second; teacher_mixture: "
                        "the val labels' likelihood under the teachers' theta-mixture, the student not read)")
    g.add_argument("--candidates", type=positive_int, metavar="K", help="K candidate distributions from phase 2")
    g.add_argument("--search-epochs", type=positive_float, metavar="N", help="epochs of the bilevel search")
    g.add_argument("--theta-only", action="store_true", default=None,
                   help="stop after the theta search (search.json and its plot): see what theta learns before "
                        "paying for the candidate and baseline trainings")
    g = p.add_argument_group("candidates and baselines (search.*)")
    g.add_argument("--m", type=non_negative_int, metavar="N",
                   help="teachers dropped at selection (default: those smaller than the student)")
    g.add_argument("--eval-epochs", type=positive_float, metavar="N", help="epochs of each candidate/baseline training")
    g.add_argument("--baselines", type=baseline_list, metavar="LIST",
                   help="all (default), none, or a comma list of single,avgkd,uniform,random")
    g.add_argument("--random", type=non_negative_int, metavar="N", help="number of random Dirichlet(1) distributions")
    g.add_argument("--candidate-policy", choices=["sampled", "mixture"],
                   help="how candidates train on their theta: sampled (default: one teacher drawn per step) or "
                        "mixture (every step the theta-weighted mixture of the teachers' distributions; LM teams)")
    g.add_argument("--executor", choices=["ray", "local"], help="run trials on Ray Tune (default) or in-process")
    g.add_argument("--address", type=ray_address, metavar="URL",
                   help="existing Ray cluster, e.g. ray://head:10001 (checked reachable at once; default: local Ray "
                        "on 127.0.0.1)")
    g.add_argument("--cpus-per-trial", type=positive_float, metavar="N", help="default: 1")
    g.add_argument("--gpus-per-trial", type=non_negative_float, metavar="N", help="default: 0")
    g.add_argument("--max-concurrent", type=positive_int, metavar="N",
                   help="trials at once (default: as resources allow)")
    g.add_argument("--scheduler", choices=["none", "asha"], help="asha: stop clearly losing candidates/baselines early")
    add_parallel_args(p, trials=True)
    p.set_defaults(func=cmd_search)


def _add_tune(sub) -> None:
    from .fanout.study import SAMPLERS
    from .fanout.trial import OBJECTIVES
    from .search.early_stop import SCHEDULERS

    p = _experiment_command(sub, "tune", "tune a search space: Ray Tune trials sampled by Optuna, optional ASHA "
                            "early stopping", "Tune a search space.", "kind: tune; tune.*")
    g = p.add_argument_group("tune (experiment keys tune.*)")
    g.add_argument("--space", metavar="FILE",
                   help="search-space YAML, e.g. search_spaces/kd-hparams.yaml (required, here or as tune.space)")
    g.add_argument("--sampler", choices=SAMPLERS,
                   help="grid, random, or Optuna's tpe, cmaes, nsga2 (two objectives) (default: tpe)")
    g.add_argument("--scheduler", choices=SCHEDULERS, help="asha stops hopeless trials early (default: none)")
    g.add_argument("--trials", type=positive_int, metavar="N",
                   help="trials in the study in all (default: the grid's size, else 10)")
    g.add_argument("--storage", type=storage_url, metavar="URL",
                   help="Optuna storage: sqlite:///path.db or postgresql://user@host/db, shared by several drivers "
                        "(default: sqlite:///<out>/optuna.db)")
    g.add_argument("--study", metavar="NAME", help="study name in the storage (default: the space's name); rerun to resume")
    g.add_argument("--objective2", choices=sorted(OBJECTIVES),
                   help="second objective, minimised beside dev accuracy (nsga2 default: size)")
    g.add_argument("--batch-size", type=positive_int, metavar="N",
                   help="batch size of every trial (unless the space sets it)")
    g.add_argument("--grace-period", type=positive_int, metavar="N", help="ASHA: epochs every trial runs (default: 1)")
    g.add_argument("--reduction-factor", type=positive_float, metavar="N",
                   help="ASHA: keep 1/N of trials at each rung (default: 2)")
    g.add_argument("--address", type=ray_address, metavar="URL",
                   help="Ray cluster: auto (inside `ray job submit`), ray://head:10001 (checked reachable at once; "
                        "default: local Ray on 127.0.0.1)")
    g.add_argument("--cpus-per-trial", type=positive_float, metavar="N",
                   help="CPUs (and torch threads) per trial (default: 1)")
    g.add_argument("--gpus-per-trial", type=non_negative_float, metavar="N", help="default: 0")
    g.add_argument("--max-concurrent", type=positive_int, metavar="N",
                   help="trials at once (default: as resources allow)")
    p.add_argument("--out", type=output_dir, metavar="DIR", help="output folder (default: runs/tune/<study>)")
    p.set_defaults(func=cmd_tune)


def _add_dashboard(sub) -> None:
    p = sub.add_parser("dashboard", help="serve optuna-dashboard for a tune's storage (on 127.0.0.1)")
    p.add_argument("--storage", required=True, type=storage_url, metavar="URL",
                   help="the tune's storage, e.g. sqlite:///runs/tune/kd/optuna.db")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=port_number, default=8080, help="port to listen on, 1-65535 (default: 8080)")
    p.set_defaults(func=cmd_dashboard)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="autoskd", description="Distil a team of teacher language models into a small student. "
                           "One experiment = one file: `autoskd run experiment.yaml`.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser, metavar="COMMAND")

    p = sub.add_parser("run", help="run an experiment file (distill, stages, search, tune or chain)",
                       description="Run an experiment file; see the format below.", epilog=RUN_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", metavar="FILE", help="experiment YAML, e.g. runs/x/experiment.yaml")
    p.add_argument("--out", type=output_dir, metavar="DIR", help="output folder (overrides the file's out)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="hide progress bars")
    add_experiment_args(p)
    p.set_defaults(func=cmd_run)

    _add_distill(sub)
    _add_search(sub)

    _add_tune(sub)

    from . import cli_methods  # chain, analyse

    p = sub.add_parser("chain", help="teacher -> assistant(s) -> student (TAKD; DGKD: every earlier model teaches)",
                       description="A teacher-assistant chain. Flags override keys of the experiment (kind: chain; "
                                   "chain.*); see `autoskd run --help`.")
    add_common_args(p)
    cli_methods.add_chain_args(p)

    p = sub.add_parser("analyse", help="feature-distance analysis: per-layer distances vs loss and dev accuracy")
    add_team_args(p)
    add_data_args(p)
    cli_methods.add_analyse_args(p)

    team = sub.add_parser("team", help="teacher teams").add_subparsers(dest="team_command", required=True,
                                                                        parser_class=OneLineParser)
    p = team.add_parser("build", help="fine-tune (or reuse cached) teachers of a team and print their dev accuracy")
    p.add_argument("team", help="teacher-team YAML, e.g. teams/minilm-ladder.yaml")
    add_cache_args(p)
    add_data_args(p)
    p.set_defaults(func=cmd_team_build)

    p = sub.add_parser("methods", help="list the distillation methods")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_methods)

    from .plan_cli import add_plan_parser

    add_plan_parser(sub)
    _add_dashboard(sub)

    p = sub.add_parser("demo", help="run the main job on the built-in default team and task")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AutoSKDError as err:
        print(f"autoskd: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autoskd: interrupted; finished work is kept (rerun the same command to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
