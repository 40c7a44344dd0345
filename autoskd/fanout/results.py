"""What a finished tune leaves for people: a table, the best config, the best student and plots.

Plots come from Optuna's own matplotlib visualisations, drawn from the study in the storage:
``history.png`` (optimisation history), ``epochs.png`` (the dev score per epoch of every trial:
where ASHA stopped them), ``importance.png`` (parameter importance, fANOVA) and, for two
objectives, ``pareto.png`` (the Pareto front of the dev score against student size or latency).

The first objective names the metric (``dev_acc``: higher is better; ``dev_ppl``: lower is
better): the table is sorted best first by the study's own direction, and its test column is the
same metric on test (``test_acc``, ``test_ppl``).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from ..atomic import write_json
from .study import DONE
from .trial import TEST_KEYS, read_error

__all__ = ["trial_rows", "results_table", "best_trials", "write_results", "plot_study"]


def test_key(objectives: list[str]) -> str:
    """The test score shown beside the first objective (``test_acc``, ``test_ppl``)."""
    return TEST_KEYS.get(objectives[0], "test_acc")


def trial_rows(study: optuna.Study, objectives: list[str], out_dir: Path | None = None) -> list[dict]:
    """One row per trial of the study; a failed trial's ``error`` is the first line of its
    ``<out>/trials/<trial>/error.txt`` (a trial left by a dead driver has none: it says so)."""
    rows = []
    test = test_key(objectives)
    for t in study.get_trials(deepcopy=False):
        values = t.values or [None] * len(objectives)
        name = t.user_attrs.get("trial", f"trial-{t.number:04d}")
        row = {"number": t.number, "state": t.state.name.lower(), **dict(zip(objectives, values)),
               test: t.user_attrs.get(test), "epochs": t.user_attrs.get("epochs"),
               "stopped_early": bool(t.user_attrs.get("stopped_early")), "trial": name, "params": dict(t.params)}
        if t.state == TrialState.FAIL:
            error = read_error(Path(out_dir) / "trials" / name) if out_dir is not None else None
            row["error"] = error or ("its driver stopped (killed?) while it ran; queued again"
                                     if _retried(study, t) else "no reason recorded")
        rows.append(row)
    return rows


def _retried(study: optuna.Study, trial) -> bool:
    """Whether a later trial retries ``trial`` (Optuna's retry of a dead driver's trial)."""
    return any(trial.number in (t.system_attrs.get("retry_history") or ()) for t in study.get_trials(deepcopy=False))


def best_trials(study: optuna.Study) -> list:
    """The best trial (one objective) or the Pareto front (two), finished trials only."""
    done = [t for t in study.get_trials(deepcopy=False, states=DONE) if t.values is not None]
    if not done:
        return []
    if len(study.directions) == 1:
        sign = 1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1
        # a trial that ran to the end wins ties over one stopped early; then the lower number
        return [max(done, key=lambda t: (sign * t.values[0], not t.user_attrs.get("stopped_early"), -t.number))]
    return sorted(study.best_trials, key=lambda t: t.number)


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def results_table(rows: list[dict], objectives: list[str], best: set[int], maximize: bool | None = None) -> str:
    """The trials best first (by the first objective in ``maximize``'s direction; default: the
    direction of ``dev_acc`` for accuracy, lower first otherwise)."""
    params = sorted({k for r in rows for k in r["params"]})
    test = test_key(objectives)
    header = ["trial", "state", *objectives, test, "epochs", *params, "note"]
    lines = []
    key = objectives[0]
    maximize = key == "dev_acc" if maximize is None else maximize
    order = sorted(rows, key=lambda r: (r[key] is None, -(r[key] or 0) if maximize else (r[key] or 0)))
    for r in order:
        note = "best" if r["number"] in best else ""
        if r["stopped_early"]:
            note = (note + "; " if note else "") + "stopped early"
        if r.get("error"):
            note = f"FAILED: {r['error']}"
        lines.append([str(r["number"]), r["state"], *(_fmt(r[o]) for o in objectives), _fmt(r.get(test)),
                      _fmt(r["epochs"]), *(_fmt(r["params"].get(p)) for p in params), note])
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    done = sum(r["state"] in ("complete", "pruned") for r in rows)
    stopped = sum(r["stopped_early"] for r in rows)
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines]
                     + [f"{done} finished ({stopped} stopped early), {len(rows) - done} failed or unfinished"])


def _save(ax_or_axes, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ax = ax_or_axes[0] if hasattr(ax_or_axes, "__len__") and not hasattr(ax_or_axes, "figure") else ax_or_axes
    fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
    fig.set_size_inches(8, 5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_study(study: optuna.Study, out_dir: Path, objectives: list[str]) -> list[Path]:
    """The plots of a study that has finished trials; skips one a study cannot have (e.g. importance
    with fewer than two finished trials or a single varying parameter)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from optuna.visualization import matplotlib as ovm

    out_dir = Path(out_dir)
    made = []
    done = [t for t in study.get_trials(deepcopy=False, states=DONE) if t.values is not None]
    if not done:
        return made
    names = objectives
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if len(objectives) == 1:
            made.append(_save(ovm.plot_optimization_history(study, target_name=names[0]), out_dir / "history.png"))
            if any(t.intermediate_values for t in done):
                made.append(_save(ovm.plot_intermediate_values(study), out_dir / "epochs.png"))
        else:
            made.append(_save(ovm.plot_optimization_history(study, target=lambda t: t.values[0],
                                                            target_name=names[0]), out_dir / "history.png"))
            made.append(_save(ovm.plot_pareto_front(study, target_names=names), out_dir / "pareto.png"))
        varying = [p for p in {k for t in done for k in t.params}
                   if len({repr(t.params.get(p)) for t in done}) > 1]
        if len(done) >= 2 and varying:
            try:
                made.append(_save(ovm.plot_param_importances(study, target=lambda t: t.values[0],
                                                             target_name=names[0]), out_dir / "importance.png"))
            except (RuntimeError, ValueError, ZeroDivisionError):
                pass  # e.g. every finished trial scored the same: no importance to show
    return made


def write_results(study: optuna.Study, out_dir: Path, objectives: list[str]) -> dict:
    """``results.json``/``results.txt``, ``best_config.json``, ``best_student/`` and the plots."""
    out_dir = Path(out_dir)
    rows = trial_rows(study, objectives, out_dir)
    best = best_trials(study)
    test = test_key(objectives)
    table = results_table(rows, objectives, {t.number for t in best},
                          maximize=study.directions[0] == optuna.study.StudyDirection.MAXIMIZE)
    write_json(out_dir / "results.json", rows, default=str)
    (out_dir / "results.txt").write_text(table + "\n")
    summary: dict = {"study": study.study_name, "objectives": objectives, "trials": len(rows),
                     "finished": sum(r["state"] in ("complete", "pruned") for r in rows),
                     "failed": {str(r["number"]): r["error"] for r in rows if r["state"] == "fail"},
                     "stopped_early": sum(r["stopped_early"] for r in rows),
                     "student_epochs": sum(int(r["epochs"] or 0) for r in rows if r["state"] != "fail")}
    if best:
        top = best[0]
        name = top.user_attrs.get("trial", f"trial-{top.number:04d}")
        summary["best"] = {"number": top.number, "trial": name, "values": dict(zip(objectives, top.values)),
                           "params": dict(top.params), test: top.user_attrs.get(test)}
        for key in ("val_ppl", "test_top1_agreement", "student_layers"):  # an LM trial's other scores
            if top.user_attrs.get(key) is not None and key not in summary["best"]["values"]:
                summary["best"][key] = top.user_attrs[key]
        if len(study.directions) > 1:
            summary["pareto_front"] = [{"number": t.number, "values": dict(zip(objectives, t.values)),
                                        "params": dict(t.params)} for t in best]
        trial_dir = out_dir / "trials" / name
        src = next((p for p in (trial_dir / "student", trial_dir / "best_student") if p.exists()), None)
        dst = out_dir / "best_student"
        if src is not None:
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(src, dst)
            summary["best_student"] = str(dst)
        write_json(out_dir / "best_config.json", summary["best"], default=str)
    summary["plots"] = [str(p) for p in plot_study(study, out_dir, objectives)]
    write_json(out_dir / "summary.json", summary, default=str)
    print(table)
    if best:
        print(f"\nbest: trial {summary['best']['number']}  {summary['best']['values']}  {summary['best']['params']}")
    print(f"outputs in {out_dir}")
    return summary


def failed_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
