"""``autoskd tune`` and ``autoskd dashboard`` (registered in :mod:`autoskd.cli` by :func:`add_commands`)."""

from __future__ import annotations

import argparse

from .early_stop import SCHEDULERS
from .study import SAMPLERS
from .trial import OBJECTIVES


def cmd_tune(args) -> int:
    from .space import load_space
    from .tune import TuneSettings, run_tune

    space = load_space(args.space)  # a malformed space fails before anything is built
    base = {"seed": args.seed, **({"batch_size": args.batch_size} if args.batch_size else {})}
    settings = TuneSettings(sampler=args.sampler, scheduler=args.scheduler, trials=args.trials, storage=args.storage,
                            study=args.study, objective2=args.objective2, seed=args.seed,
                            reduction_factor=args.reduction_factor, grace_period=args.grace_period,
                            address=args.address, cpus_per_trial=args.cpus_per_trial,
                            gpus_per_trial=args.gpus_per_trial, max_concurrent=args.max_concurrent, base=base)
    task = {"name_or_path": args.task, "text_column": args.text_column, "text_pair_column": args.text_pair_column,
            "label_column": args.label_column, "seed": args.seed, "max_train": args.max_train,
            "max_eval": args.max_eval}
    out = args.out or f"runs/tune/{args.study or space.name}"
    run_tune(space, args.team, {k: v for k, v in task.items() if v is not None}, settings, out,
             cache_dir=args.cache_dir, progress=not args.no_progress)
    return 0


def cmd_dashboard(args) -> int:
    from .dashboard import serve_dashboard

    serve_dashboard(args.storage, host=args.host, port=args.port)
    return 0


def add_commands(sub, add_team_args, add_data_args) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "tune", help="tune a search space: Ray Tune trials sampled by Optuna, optional ASHA early stopping")
    p.add_argument("--space", required=True, help="search-space YAML, e.g. search_spaces/kd-hparams.yaml")
    add_team_args(p)
    add_data_args(p)
    p.add_argument("--sampler", default="tpe", choices=SAMPLERS,
                   help="grid, random, or Optuna's tpe, cmaes, nsga2 (two objectives) (default: tpe)")
    p.add_argument("--scheduler", default="none", choices=SCHEDULERS, help="asha stops hopeless trials early")
    p.add_argument("--trials", type=int, help="trials in the study in all (default: the grid's size, else 10)")
    p.add_argument("--storage", help="Optuna storage: sqlite:///path.db or postgresql://... "
                                     "(default: sqlite:///<out>/optuna.db)")
    p.add_argument("--study", help="study name in the storage (default: the space's name); rerun to resume")
    p.add_argument("--objective2", choices=sorted(OBJECTIVES),
                   help="second objective, minimised beside dev accuracy (nsga2 default: size)")
    p.add_argument("--out", help="output folder (default: runs/tune/<study>)")
    p.add_argument("--batch-size", type=int, help="batch size of every trial (unless the space sets it)")
    p.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs every trial runs")
    p.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA: keep 1/N of trials at each rung")
    p.add_argument("--address", help="Ray cluster: auto (inside `ray job submit`), ray://head:10001 "
                                     "(default: local Ray on 127.0.0.1)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs (and torch threads) per trial")
    p.add_argument("--gpus-per-trial", type=float, default=0.0)
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: as resources allow)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("dashboard", help="serve optuna-dashboard for a tune's storage (on 127.0.0.1)")
    p.add_argument("--storage", required=True, help="the tune's storage, e.g. sqlite:///runs/tune/kd/optuna.db")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(func=cmd_dashboard)
