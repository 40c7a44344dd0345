"""``autoskd chain`` and ``autoskd analyse``: the methods' own subcommands. :mod:`autoskd.cli`
creates their parsers with the shared team/data flags and adds theirs with
:func:`add_chain_args` and :func:`add_analyse_args`.

``chain`` is the experiment ``kind: chain`` written from flags; ``analyse`` trains one
``kind: distill`` experiment's student in memory while it measures, and writes its analysis.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .cli_types import int_at_least, output_dir, positive_float, positive_int
from .defaults import DEFAULT_BATCH_SIZE, DEFAULT_LR
from .errors import AutoSKDError
from .experiment.command import experiment_from_flags, run_tree
from .experiment.overrides import parse_options

CHAIN_FLAGS = {"method": "chain.method", "teacher": "chain.teacher", "epochs": "chain.epochs", "lr": "chain.lr",
               "batch_size": "chain.batch_size", "max_length": "chain.max_length"}
ANALYSE_FLAGS = {"method": "distill.method", "teacher": "distill.teacher", "epochs": "distill.epochs",
                 "lr": "distill.lr", "batch_size": "distill.batch_size", "max_length": "distill.max_length"}


def _training_args(p: argparse.ArgumentParser, epochs_default: str) -> argparse._ArgumentGroup:
    g = p.add_argument_group("training")
    g.add_argument("--option", action="append", metavar="KEY=VALUE", help="method option (repeatable)")
    g.add_argument("--teacher", metavar="NAME", help="team member to start from (default: best on dev)")
    g.add_argument("--epochs", type=positive_float, metavar="N",
                   help=f"epochs per method stage (default: {epochs_default})")
    g.add_argument("--lr", type=positive_float, metavar="X", help=f"peak learning rate (default: {DEFAULT_LR:g})")
    g.add_argument("--batch-size", type=positive_int, metavar="N", help=f"default: {DEFAULT_BATCH_SIZE}")
    g.add_argument("--max-length", type=int_at_least(2), metavar="N",
                   help="token limit (default: the team's max_length)")
    return g


def add_chain_args(p: argparse.ArgumentParser) -> None:
    g = _training_args(p, "1 per hop")
    g.add_argument("--method", choices=["takd", "dgkd"], help="default: takd")
    g.add_argument("--assistants", metavar="L,L", help="assistant layer counts, deepest first (default: 4)")
    p.add_argument("--out", type=output_dir, metavar="DIR",
                   help="output folder; rerunning resumes finished hops (default: runs/chain)")
    p.set_defaults(func=cmd_chain)


def cmd_chain(args) -> int:
    section: dict = {}
    if args.assistants is not None:
        try:
            section["assistants"] = [int(a) for a in str(args.assistants).split(",") if a.strip()]
        except ValueError:
            raise AutoSKDError(f"--assistants {args.assistants!r} must be layer counts, e.g. --assistants 4,3") from None
    if args.option:
        section["options"] = parse_options(args.option)
    return run_tree(experiment_from_flags(args, "chain", CHAIN_FLAGS, {"chain": section} if section else None), args)


def add_analyse_args(p: argparse.ArgumentParser) -> None:
    g = _training_args(p, "1")
    g.add_argument("--method", metavar="NAME",
                   help="method to train while measuring (see `autoskd methods`; default: kd)")
    g = p.add_argument_group("analysis")
    g.add_argument("--every", type=positive_int, default=10, metavar="N", help="measure every N steps")
    g.add_argument("--dev-batches", type=positive_int, default=4, metavar="N",
                   help="dev batches for the accuracy series")
    p.add_argument("--out", dest="analysis_out", type=output_dir, metavar="DIR", default="runs/analyse",
                   help="output folder (analysis.json, analysis.png)")
    p.set_defaults(func=cmd_analyse)


def cmd_analyse(args) -> int:
    from itertools import islice

    from .analysis import DistanceRecorder, write_report
    from .experiment import resolve_experiment
    from .experiment.runner import build_team, load_task
    from .pipeline import DistillConfig, distill, make_loaders

    base = {"distill": {"epochs": 1.0, "options": parse_options(args.option)}}  # a short run is enough to measure
    resolved = resolve_experiment(experiment_from_flags(args, "distill", ANALYSE_FLAGS, base))
    d = resolved["distill"]
    task = load_task(resolved)
    team = build_team(resolved, task)
    teacher = d["teacher"] or max(team.dev_accuracy, key=team.dev_accuracy.get)
    if teacher in (getattr(team, "own_tokenizers", None) or {}):
        raise AutoSKDError(f"analyse compares token-level features, but teacher {teacher!r} uses its own tokenizer; "
                           "pick a teacher that shares the student's tokenizer with --teacher")
    config = DistillConfig(method=d["method"], method_options=dict(d["options"]), teacher=teacher, epochs=d["epochs"],
                           lr=d["lr"], batch_size=d["batch_size"], seed=resolved["seed"], max_length=d["max_length"])
    loaders = make_loaders(task, team.tokenizer, config.max_length or team.max_length, config.batch_size, config.seed)
    recorder = DistanceRecorder(team.teachers[teacher], islice(loaders.dev, args.dev_batches), every=args.every)
    distill(team, task, config, out_dir=None, cache_dir=resolved["cache_dir"], progress=resolved["progress"],
            callbacks=[recorder], loaders=loaders)
    correlations = write_report(recorder, args.analysis_out, f"{d['method']}: Spearman of distance vs loss / dev accuracy")
    top = sorted(((k, v["spearman_loss"]) for k, v in correlations.items() if v["spearman_loss"] is not None),
                 key=lambda kv: -abs(kv[1]))[:8]
    print(json.dumps({"records": len(recorder.records), "strongest_vs_loss": dict(top)}, indent=2))
    print(f"analysis written to {Path(args.analysis_out) / 'analysis.json'} and analysis.png")
    return 0
