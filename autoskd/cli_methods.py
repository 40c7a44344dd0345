"""``autoskd chain`` and ``autoskd analyse``: the methods' own subcommands (registered by
:func:`add_commands` from :mod:`autoskd.cli`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _common(p: argparse.ArgumentParser) -> None:
    from .cli import _add_data_args, _add_team_args

    _add_team_args(p)
    _add_data_args(p)
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="method option (repeatable)")
    p.add_argument("--teacher", help="team member to start from (default: best on dev)")
    p.add_argument("--epochs", type=float, default=1.0, help="epochs per method stage")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, help="token limit (default: the team's max_length)")


def _config(args, method: str):
    from .cli import _parse_options
    from .engine.methods import get_method
    from .pipeline import DistillConfig

    options = _parse_options(args.option)
    get_method(method, **options)  # a typo fails before any teacher is built
    return DistillConfig(method=method, method_options=options, teacher=args.teacher, epochs=args.epochs, lr=args.lr,
                         batch_size=args.batch_size, seed=args.seed, max_length=args.max_length)


def cmd_chain(args) -> int:
    from .chain import run_chain
    from .cli import _build_team, _load_task, print_table
    from .errors import AutoSKDError

    try:
        assistants = [int(a) for a in str(args.assistants).split(",") if a.strip()]
    except ValueError:
        raise AutoSKDError(f"--assistants {args.assistants!r} must be layer counts, e.g. --assistants 4,3") from None
    config = _config(args, args.method)
    task = _load_task(args)
    team = _build_team(args, task)
    outcome = run_chain(team, task, config, assistants, out_dir=args.out, cache_dir=args.cache_dir,
                        progress=not args.no_progress)
    print_table([{"hop": h.name, "teachers": "+".join(h.teachers), "dev_acc": h.dev_acc, "test_acc": h.test_acc}
                 for h in outcome.hops])
    print(f"chain written to {Path(args.out) / 'chain.json'}")
    return 0


def cmd_analyse(args) -> int:
    from itertools import islice

    from .analysis import DistanceRecorder, write_report
    from .cli import _build_team, _load_task
    from .pipeline import distill, make_loaders

    config = _config(args, args.method)
    task = _load_task(args)
    team = _build_team(args, task)
    teacher = config.teacher or max(team.dev_accuracy, key=team.dev_accuracy.get)
    config.teacher = teacher
    if teacher in (getattr(team, "own_tokenizers", None) or {}):
        from .errors import AutoSKDError

        raise AutoSKDError(f"analyse compares token-level features, but teacher {teacher!r} uses its own tokenizer; "
                           "pick a teacher that shares the student's tokenizer with --teacher")
    loaders = make_loaders(task, team.tokenizer, config.max_length or team.max_length, config.batch_size, config.seed)
    recorder = DistanceRecorder(team.teachers[teacher], islice(loaders.dev, args.dev_batches), every=args.every)
    distill(team, task, config, out_dir=None, cache_dir=args.cache_dir, progress=not args.no_progress,
            callbacks=[recorder], loaders=loaders)
    correlations = write_report(recorder, args.out, f"{args.method}: Spearman of distance vs loss / dev accuracy")
    top = sorted(((k, v["spearman_loss"]) for k, v in correlations.items() if v["spearman_loss"] is not None),
                 key=lambda kv: -abs(kv[1]))[:8]
    print(json.dumps({"records": len(recorder.records), "strongest_vs_loss": dict(top)}, indent=2))
    print(f"analysis written to {Path(args.out) / 'analysis.json'} and analysis.png")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("chain", help="teacher -> assistant(s) -> student (TAKD; DGKD: every earlier model teaches)")
    _common(p)
    p.add_argument("--method", default="takd", choices=["takd", "dgkd"])
    p.add_argument("--assistants", default="4", help="assistant layer counts, deepest first (default: 4)")
    p.add_argument("--out", default="runs/chain", help="output folder; rerunning resumes finished hops")
    p.set_defaults(func=cmd_chain)

    p = sub.add_parser("analyse", help="feature-distance analysis: per-layer distances vs loss and dev accuracy")
    _common(p)
    p.add_argument("--method", default="kd", help="method to train while measuring (see `autoskd methods`)")
    p.add_argument("--every", type=int, default=10, help="measure every N steps")
    p.add_argument("--dev-batches", type=int, default=4, help="dev batches for the accuracy series")
    p.add_argument("--out", default="runs/analyse", help="output folder (analysis.json, analysis.png)")
    p.set_defaults(func=cmd_analyse)
