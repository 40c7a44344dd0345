"""``autoskd distill`` on a language-modelling task (``--task lm:<corpus>``): the CLI's LM path.

It reads the same flags as the classification path plus the LM ones (``--precision``,
``--top-k``, ``--layout``, ``--prompt-column``/``--completion-column``, ``--max-steps``), so a
user switches kinds by changing the team and the task, not by learning another command.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import AutoSKDError

LM_PREFIX = "lm:"
DEFAULT_LM_TEAM = "smollm2"


def is_lm_task(task: str) -> bool:
    return str(task).startswith(LM_PREFIX)


def corpus_source(task: str) -> str:
    source = str(task)[len(LM_PREFIX):].strip()
    if not source:
        raise AutoSKDError("--task lm: needs a corpus after the colon, e.g. lm:rotten_tomatoes or lm:docs.txt")
    return source


def cmd_distill_lm(args, options: dict) -> int:
    from .data import load_corpus
    from .pipeline import LMDistillConfig, distill_lm
    from .recipes import decoder_method
    from .team import LMTeam

    decoder_method(args.method, **options)  # a method that cannot apply is refused before anything loads
    if (Path(args.out) / "result.json").exists():
        raise AutoSKDError(f"--out {args.out} already holds a finished run (result.json); pass a new --out folder")
    team_file = DEFAULT_LM_TEAM if args.team == getattr(args, "default_team", None) else args.team
    team = LMTeam.from_yaml(team_file)
    if args.teacher is not None and args.teacher not in team.teacher_specs:
        raise AutoSKDError(f"--teacher {args.teacher!r} is not in team {team_file}; choose one of: "
                           f"{', '.join(team.teacher_specs)}")
    corpus = load_corpus(corpus_source(args.task), text_column=args.text_column, prompt_column=args.prompt_column,
                         completion_column=args.completion_column, seed=args.seed)
    if args.max_train or args.max_eval:
        corpus = corpus.subsample(args.max_train, args.max_eval, seed=args.seed)
    config = LMDistillConfig(method=args.method, method_options=options, teacher=args.teacher, epochs=args.epochs,
                             max_steps=args.max_steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                             max_length=args.max_length, layout=args.layout, top_k=args.top_k,
                             precision=args.precision)
    outcome = distill_lm(team, corpus, config, out_dir=args.out, cache_dir=args.cache_dir,
                         progress=not args.no_progress)
    s = outcome.scores
    print(f"student ({args.method}): val perplexity {s['val_ppl']:.2f}, test perplexity {s['test_ppl']:.2f}"
          + (f", top-1 agreement with the teacher {s['test_top1_agreement']:.3f}" if "test_top1_agreement" in s else ""))
    for sample in outcome.samples:
        print(f"  {sample['prompt']!r} -> {sample['continuation']!r}")
    print(f"student saved to {Path(args.out) / 'student'} (loads with AutoModelForCausalLM)")
    return 0
