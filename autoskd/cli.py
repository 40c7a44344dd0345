"""The ``autoskd`` command line: a thin layer over the Python API.

Every user-fixable problem surfaces as one line, ``autoskd: error: ...``, and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .cli_types import (baseline_list, encoding_name, fraction, int_at_least, non_negative_float, non_negative_int, output_dir,
                        positive_float, positive_int)
from .errors import AutoSKDError
from .parallel_cli import add_parallel_args, parallel_config

DEFAULT_TEAM = "teams/minilm-ladder.yaml"


class OneLineParser(argparse.ArgumentParser):
    """argparse with the project's error format: one line, ``autoskd: error: ...``, exit 2."""

    def error(self, message: str):
        self.exit(2, f"autoskd: error: {self.prog}: {message} (see '{self.prog} --help')\n")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--task", default="rotten_tomatoes",
                   help="built-in task name, a CSV/JSONL/Parquet file, or a `datasets` name (default: rotten_tomatoes)")
    g.add_argument("--text-column", help="column with the text (default: text or sentence)")
    g.add_argument("--text-pair-column", help="second text column for sentence-pair tasks (e.g. RTE)")
    g.add_argument("--label-column", help="column with the label (default: label)")
    g.add_argument("--encoding", type=encoding_name,
                   help="text encoding of a CSV/TSV/JSON data file (default: utf-8), e.g. latin-1, cp1252")
    g.add_argument("--max-train", type=positive_int, help="keep at most N rows in each of train and val (quick runs)")
    g.add_argument("--max-eval", type=positive_int, help="keep at most N rows in each of dev and test")
    g.add_argument("--seed", type=non_negative_int, default=0, help="seed for splits, initialisation and data order")


def _add_team_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--team", default=DEFAULT_TEAM, help=f"teacher-team YAML (default: {DEFAULT_TEAM})")
    p.add_argument("--cache-dir", type=output_dir, default=".cache/autoskd",
                   help="where fine-tuned teachers and teacher outputs are cached")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _parse_options(pairs: list[str]) -> dict:
    """``key=value`` pairs; values parsed as JSON when possible (numbers, booleans)."""
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise AutoSKDError(f"--option {pair!r} must look like key=value, e.g. --option temperature=2")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _load_task(args):
    from .data.tasks import load_task

    task = load_task(args.task, text_column=args.text_column, text_pair_column=args.text_pair_column,
                     label_column=args.label_column, seed=args.seed, encoding=args.encoding)
    if args.max_train or args.max_eval:
        task = task.subsample(args.max_train, args.max_eval, seed=args.seed)
    return task


def _build_team(args, task):
    from .team import TeacherTeam

    team = TeacherTeam.from_yaml(args.team)
    return team.build(task, cache_dir=Path(args.cache_dir) / "teachers", seed=args.seed, progress=not args.no_progress)


# ---------------------------------------------------------------------------- commands
def cmd_methods(args) -> int:
    from .engine.methods import describe_methods

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
    task = _load_task(args)
    team = _build_team(args, task)
    print(json.dumps({"team": team.name, "dev_accuracy": team.dev_accuracy}, indent=2))
    return 0


def cmd_distill(args) -> int:
    from .engine.methods import get_method
    from .pipeline import DistillConfig, distill

    options = _parse_options(args.option)
    from .lm.cli import cmd_distill_lm, is_lm_task

    if is_lm_task(args.task):  # a language-modelling task: decoder teachers and student
        return cmd_distill_lm(args, options)
    from .engine.stages import is_stage_plan

    if is_stage_plan(args.method):  # a YAML 'stages:' plan, each stage its own method (autoskd.staged)
        from .staged import cmd_distill_stages

        return cmd_distill_stages(args, options)
    get_method(args.method, **options)  # a typo fails now, not after the teachers are built
    if (Path(args.out) / "result.json").exists():  # never overwrite a finished student
        raise AutoSKDError(f"--out {args.out} already holds a finished run (result.json); pass a new --out folder")
    if args.teacher is not None:  # a typo fails now, not after the teachers are built
        from .team.spec import TeamSpec

        names = [t.name for t in TeamSpec.from_yaml(args.team).teachers]
        if args.teacher not in names:
            raise AutoSKDError(f"--teacher {args.teacher!r} is not in team {args.team}; choose one of: {', '.join(names)}")
    parallel = parallel_config(args)  # so does a bad --deepspeed file
    task = _load_task(args)
    team = _build_team(args, task)
    config = DistillConfig(method=args.method, method_options=options, teacher=args.teacher,
                           policy=args.policy, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                           seed=args.seed, pretrain_epochs=args.pretrain_epochs, max_length=args.max_length,
                           teachers=args.teachers.split(",") if args.teachers else None, **parallel)
    outcome = distill(team, task, config, out_dir=args.out, cache_dir=args.cache_dir, progress=not args.no_progress)
    print_table([{"model": f"teacher {n}", "dev_acc": a, "test_acc": None} for n, a in team.dev_accuracy.items()]
                + [{"model": f"student ({args.method})", "dev_acc": outcome.dev_acc, "test_acc": outcome.test_acc}])
    print(f"student saved to {Path(args.out) / 'student'}")
    return 0


def print_table(rows: list[dict]) -> None:
    cols = list(rows[0])
    fmt = [lambda v: "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))] * len(cols)
    cells = [[f(r[c]) for f, c in zip(fmt, cols)] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _number(flag: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise AutoSKDError(f"{flag} {text!r} is not a number") from None


def cmd_search(args) -> int:
    from .search.run import SearchConfig, run_search

    xi = args.xi if args.xi in (None, "theta_lr", "student_lr") else _number("--xi", args.xi)
    theta = {k: v for k, v in {"strategy": args.strategy, "order": args.order, "lr": args.theta_lr,
                               "num_candidates": args.candidates, "val_objective": args.val_objective,
                               "xi": xi, "scaling": args.theta_scaling, "warmup": args.theta_warmup,
                               "center": args.theta_center}.items()
             if v is not None}
    config = SearchConfig.from_preset(
        args.preset, theta=theta, theta_lrs=args.theta_lrs, seed=args.seed, m=args.m, baselines=args.baselines,
        n_random=args.random,
        executor=args.executor, address=args.address, cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial, max_concurrent=args.max_concurrent, max_train=args.max_train,
        max_eval=args.max_eval, search_epochs=args.search_epochs, eval_epochs=args.eval_epochs,
        scheduler=args.scheduler, theta_only=args.theta_only, **parallel_config(args))
    task_args = {"name_or_path": args.task, "text_column": args.text_column,
                 "text_pair_column": args.text_pair_column, "label_column": args.label_column}
    if args.encoding:
        task_args["encoding"] = args.encoding
    run_search(args.team, task_args, config, args.out, cache_dir=args.cache_dir, progress=not args.no_progress)
    return 0


def cmd_demo(args) -> int:
    """The main job on the embedded default: the quick AutoSKD search of the ladder team."""
    return main(["search", "--team", DEFAULT_TEAM, "--task", "rotten_tomatoes", "--preset", "quick",
                 "--out", "runs/demo"])


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="autoskd", description="Distil a team of teacher language models into a small student.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    p = sub.add_parser("methods", help="list the distillation methods")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_methods)

    team = sub.add_parser("team", help="teacher teams").add_subparsers(dest="team_command", required=True,
                                                                        parser_class=OneLineParser)
    p = team.add_parser("build", help="fine-tune (or reuse cached) teachers of a team and print their dev accuracy")
    p.add_argument("team", help="teacher-team YAML, e.g. teams/minilm-ladder.yaml")
    p.add_argument("--cache-dir", type=output_dir, default=".cache/autoskd", help="where fine-tuned teachers are cached")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _add_data_args(p)
    p.set_defaults(func=cmd_team_build)

    p = sub.add_parser("distill", help="distil the team's student with one method")
    _add_team_args(p)
    _add_data_args(p)
    p.add_argument("--method", default="kd", help="method name (see `autoskd methods`), a combination "
                   "'tinybert+minilmv2', a YAML file listing methods with weights, or a YAML 'stages:' plan")
    p.add_argument("--teachers", help="comma list of members for multi-teacher methods (default: all)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="method option, e.g. temperature=2 (repeatable)")
    p.add_argument("--teacher", help="team member to distil from (default: best on dev)")
    p.add_argument("--policy", default="single", choices=["single", "average"], help="one teacher, or AvgKD over the team")
    p.add_argument("--epochs", type=positive_float, default=3.0, help="epochs per method stage")
    p.add_argument("--pretrain-epochs", type=non_negative_float, default=0.0, help="epochs of a pre-training-style stage on unlabelled text")
    p.add_argument("--lr", type=positive_float, default=1e-4)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--max-length", type=int_at_least(2), help="token limit (default: the team's max_length)")
    p.add_argument("--out", type=output_dir, default="runs/distill", help="output folder (student/, metrics.jsonl, training.png, result.json)")
    add_parallel_args(p)
    g = p.add_argument_group("language models (--task lm:<corpus>)")
    g.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="autocast precision of the forwards (bf16 works on CPU; fp16 needs CUDA)")
    g.add_argument("--top-k", type=non_negative_int, default=64,
                   help="teacher tokens cached per position (0: run the teacher live every step)")
    g.add_argument("--layout", default="packed", choices=["packed", "padded"],
                   help="packed blocks of --max-length tokens, or one padded row per document")
    g.add_argument("--prompt-column", help="prompt column of prompt/completion data (loss on completions only)")
    g.add_argument("--completion-column", help="completion column of prompt/completion data")
    g.add_argument("--max-steps", type=positive_int, help="cap on training steps per stage")
    p.set_defaults(func=cmd_distill, default_team=DEFAULT_TEAM)

    p = sub.add_parser("search", help="AutoSKD: learn which teachers to sample, evaluate candidates and baselines")
    _add_team_args(p)
    _add_data_args(p)
    p.add_argument("--preset", default="quick", choices=["quick", "medium", "paper"],
                   help="settings bundle (default: quick; medium: the benchmark's; paper: AutoSKDBERT's)")
    p.add_argument("--out", type=output_dir, default="runs/search", help="output folder; rerunning resumes it")
    p.add_argument("--strategy", choices=["sswo", "cr", "expected"],
                   help="theta update strategy (default: sswo; expected: SSWO's step averaged over the draw, "
                        "every entry each step, not in the paper)")
    p.add_argument("--order", choices=["first", "second"], help="unrolled-gradient order (default: second)")
    p.add_argument("--theta-lr", type=positive_float, help="Adam learning rate on theta (paper: 3e-4 to 1e-3)")
    p.add_argument("--theta-lrs", type=positive_float, nargs="+", metavar="LR",
                   help="a grid of theta learning rates: one search per rate, K candidates each (paper: 8 rates)")
    p.add_argument("--xi", help="virtual-step size: theta_lr (paper, default), student_lr, or a number")
    p.add_argument("--theta-scaling", choices=["theta", "max", "n"],
                   help="SSWO's logit scale for the sampled teacher: theta_i (paper), theta_i/max theta, n*theta_i")
    p.add_argument("--theta-warmup", type=fraction, help="fraction of phase 1 with theta held fixed (paper: 0)")
    p.add_argument("--theta-center", action="store_true", default=None,
                   help="centre theta's gradient on the team's mean (not in the paper; see the README's search results)")
    p.add_argument("--val-objective", choices=["distill", "task"],
                   help="theta's validation loss (default: distill; task needs --order second)")
    p.add_argument("--m", type=non_negative_int, help="teachers dropped at selection (default: those smaller than the student)")
    p.add_argument("--candidates", type=positive_int, help="K candidate distributions from phase 2")
    p.add_argument("--search-epochs", type=positive_float, help="epochs of the bilevel search")
    p.add_argument("--theta-only", action="store_true",
                   help="stop after the theta search (search.json and its plot): see what theta learns before "
                        "paying for the candidate and baseline trainings")
    p.add_argument("--eval-epochs", type=positive_float, help="epochs of each candidate/baseline training")
    p.add_argument("--baselines", type=baseline_list, default="all", help="all, none, or a comma list of single,avgkd,uniform,random")
    p.add_argument("--random", type=non_negative_int, help="number of random Dirichlet(1) distributions")
    p.add_argument("--executor", default="ray", choices=["ray", "local"], help="run trials on Ray Tune or in-process")
    p.add_argument("--address", help="existing Ray cluster, e.g. ray://head:10001 (default: local Ray on 127.0.0.1)")
    p.add_argument("--cpus-per-trial", type=positive_float, default=1.0)
    p.add_argument("--gpus-per-trial", type=non_negative_float, default=0.0)
    p.add_argument("--max-concurrent", type=positive_int, help="trials at once (default: as resources allow)")
    p.add_argument("--scheduler", choices=["none", "asha"], help="asha: stop clearly losing candidates/baselines early")
    add_parallel_args(p, trials=True)
    p.set_defaults(func=cmd_search)

    from .plan_cli import add_plan_parser
    add_plan_parser(sub)

    from .fanout.cli import add_commands as add_fanout_commands  # tune, dashboard

    add_fanout_commands(sub, _add_team_args, _add_data_args)

    from .cli_methods import add_commands as add_method_commands

    add_method_commands(sub)  # chain, analyse

    p = sub.add_parser("demo", help="run the main job on the built-in default team and task")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AutoSKDError as err:
        print(f"autoskd: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autoskd: interrupted; finished work is kept (rerun the same command to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
