"""``--dry-run``: the resolved experiment and, in a few lines, what running it would do.

Nothing here loads a model or reads the data: it only reads the resolved mapping, so a dry run
costs a second whatever the experiment.
"""

from __future__ import annotations

from .files import dump_experiment, experiment_fingerprint
from .resolve import is_lm_task


def preview(resolved: dict) -> str:
    """The resolved experiment as YAML, then ``# would run:`` lines."""
    lines = [f"#   {line}" for line in what_would_run(resolved)]
    return (dump_experiment(resolved) + "# would run:\n" + "\n".join(lines)
            + f"\n# fingerprint: {experiment_fingerprint(resolved)}\n# dry run: nothing was loaded or trained\n")


def _task(resolved: dict) -> str:
    t = resolved["task"]
    limits = ", ".join(f"{k} {t[k]}" for k in ("max_train", "max_eval") if t.get(k))
    return f"task {t['name']}" + (f" ({limits})" if limits else "")


def _team(resolved: dict) -> str:
    team = resolved["team"]
    teachers = team.get("teachers") or []
    names = [t.get("name", "?") if isinstance(t, dict) else str(t) for t in teachers]
    return f"team {team.get('name')} ({len(names)} teacher{'s' if len(names) != 1 else ''}: {', '.join(names)})"


def what_would_run(resolved: dict) -> list[str]:
    kind, out = resolved["kind"], resolved["out"]
    where = f"outputs (and experiment.yaml) in {out}"
    if kind == "distill":
        d, lm = resolved["distill"], is_lm_task(resolved["task"]["name"])
        teacher = d["teacher"] or ("the team's first teacher" if lm else "the teacher best on dev")
        steps = f", at most {d['max_steps']} steps per stage" if d.get("max_steps") else ""
        what = "language-model distillation" if lm else "distillation"
        options = f" {d['options']}" if d["options"] else ""
        return [f"{what} with method {d['method']}{options} from {teacher} of {_team(resolved)}",
                f"on {_task(resolved)}: {d['epochs']:g} epoch(s) per stage{steps}, lr {d['lr']:g}, "
                f"batch {d['batch_size']}, seed {resolved['seed']}", where]
    if kind == "stages":
        plan = resolved["stages"]["plan"]
        rows = [f"stage {i}: {e.get('name') or e['method']} (method {e['method']}, {e.get('epochs', 1)} epoch(s)"
                + (f", teacher {e['teacher']}" if e.get("teacher") else "") + ")" for i, e in enumerate(plan)]
        return [f"a stage plan of {len(plan)} stage(s) on one student, {_team(resolved)}, {_task(resolved)}",
                *rows, where]
    if kind == "search":
        s = resolved["search"]
        theta = s["theta"]
        grid = s["theta_lrs"] or [theta["lr"]]
        arms = "no candidate or baseline (theta_only)" if s["theta_only"] else \
            f"{theta['num_candidates'] * len(grid)} candidate(s) and baselines {s['baselines']} " \
            f"({s['n_random']} random) trained {s['eval_epochs']:g} epoch(s) each, executor {s['executor']}"
        return [f"AutoSKD search (preset {s['preset']}) over {_team(resolved)} on {_task(resolved)}",
                f"theta search: {s['search_epochs']:g} epoch(s) per theta lr {', '.join(f'{x:g}' for x in grid)}, "
                f"strategy {theta['strategy']}, order {theta['order']}", f"then {arms}", where]
    if kind == "tune":
        t = resolved["tune"]
        space = t["space"]
        trials = t["trials"] or ("every grid point" if t["sampler"] == "grid" else "10")
        return [f"tune search space {space['name']} ({', '.join(space['params'])}) with {trials} trial(s), "
                f"sampler {t['sampler']}, scheduler {t['scheduler']}",
                f"{_team(resolved)} on {_task(resolved)}; study {t['study'] or space['name']} in "
                f"{t['storage'] or 'sqlite:///<out>/optuna.db'}", where]
    c = resolved["chain"]
    return [f"chain ({c['method']}): teacher -> assistants of {c['assistants']} layers -> student, "
            f"{c['epochs']:g} epoch(s) per hop", f"{_team(resolved)} on {_task(resolved)}", where]
