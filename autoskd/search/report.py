"""Search output for people: the theta trajectory (paper, fig. 2), the arms table, the arms plot
(paper, fig. 3) and the best candidate.

Records are the dicts returned by :func:`autoskd.search.trials.run_arms` (``name``, ``group``,
``dev_acc``, ``test_acc``, ``seconds``, ``student_trainings``, ``error`` when failed, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from ..atomic import write_json

__all__ = ["write_theta_history", "plot_theta_history", "results_table", "plot_arms", "best_arm", "finished",
           "arm_scores", "summary_text"]

_GROUP_LABELS = {"autoskd": "AutoSKD candidates", "random": "random Dirichlet(1)", "single": "single teacher",
                 "average": "AvgKD", "uniform": "uniform"}


def finished(records: Iterable[dict]) -> list[dict]:
    """Records with a dev accuracy (ran now or loaded), i.e. not failed."""
    return [r for r in records if r.get("dev_acc") is not None and not r.get("error")]


def _rank_key(r: dict):
    return (-float(r["dev_acc"]), str(r.get("name", "")))


def best_arm(records: Iterable[dict], group: str | None = "autoskd") -> dict | None:
    """The finished arm of ``group`` (None: any group) with the highest dev accuracy; ties -> lower name."""
    pool = [r for r in finished(records) if group is None or r.get("group") == group]
    return min(pool, key=_rank_key) if pool else None


# ------------------------------------------------------------------------------------------ theta
def write_theta_history(path_json: str | Path, history: list[dict]) -> Path:
    """``history``: ``[{"step": int, "phase": int|str, "theta": [...]}, ...]`` as JSON (atomic write)."""
    rows = [{"step": int(h["step"]), "phase": h.get("phase"), "theta": [float(t) for t in h["theta"]]} for h in history]
    return write_json(path_json, rows, indent=1)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_theta_history(history: list[dict], teacher_names: list[str], out_png: str | Path,
                       selection_step: int | None = None, title: str | None = None) -> Path:
    """One line per teacher of theta_i over search steps; a dashed vertical line at teacher selection.

    When ``selection_step`` is None it is taken from the first entry whose ``phase`` differs
    from the first entry's (phase 1 -> phase 2), if there is one.
    """
    plt = _pyplot()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    draw_theta_history(ax, history, teacher_names, selection_step)
    ax.set_ylabel(r"$\theta_i$ (probability of sampling teacher $i$)")
    ax.set_title(title or "Teacher distribution during the search")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def draw_theta_history(ax, history: list[dict], teacher_names: list[str], selection_step: int | None = None) -> None:
    """The lines of :func:`plot_theta_history` on ``ax`` (several searches side by side share it)."""
    plt = _pyplot()
    history = sorted(history, key=lambda h: h["step"])
    if selection_step is None and history:
        first = history[0].get("phase")
        selection_step = next((h["step"] for h in history if h.get("phase") != first), None)
    steps = [h["step"] for h in history]
    n = len(teacher_names)
    cmap = plt.get_cmap("viridis" if n > 10 else "tab10")
    for i, name in enumerate(teacher_names):
        ys = [h["theta"][i] if i < len(h["theta"]) else float("nan") for h in history]
        color = cmap(i / max(n - 1, 1)) if n > 10 else cmap(i % 10)
        ax.plot(steps, ys, label=name, color=color, lw=1.6)
    if selection_step is not None:
        ax.axvline(selection_step, color="black", ls="--", lw=1, label="teacher selection")
    if n:
        ax.axhline(1.0 / n, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("search step")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    if not history:
        ax.text(0.5, 0.5, "no search steps recorded", ha="center", va="center", transform=ax.transAxes)


# ------------------------------------------------------------------------------------------ arms
def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _stopped_note(r: dict) -> str:
    """Why an arm has no test accuracy: ASHA stopped it (after k of n epochs), or it has none."""
    if r.get("stopped_early"):
        run, planned = r.get("epochs_run"), r.get("epochs_planned")
        after = f" after {run} of {planned} epochs" if run is not None and planned else ""
        return f"stopped early by ASHA{after}"
    return "not measured"


def arm_scores(r: dict) -> str:
    """``dev 0.8123  test 0.8012``; an arm ASHA stopped early has no test accuracy and says so."""
    test = f"test {float(r['test_acc']):.4f}" if r.get("test_acc") is not None else f"test n/a ({_stopped_note(r)})"
    dev = f"dev {float(r['dev_acc']):.4f}" if r.get("dev_acc") is not None else "dev n/a"
    return f"{dev}  {test}"


def summary_text(best_candidate: dict, best: dict, out_dir: str | Path) -> str:
    """The last lines of a search: the best candidate and the best student of all arms. An arm
    stopped early (no test accuracy, no saved student) is reported as such, never formatted as
    a number."""
    out_dir = Path(out_dir)
    theta = [round(float(t), 3) for t in best_candidate.get("theta") or []]
    student = (f"-> {out_dir / 'best_student'}" if best.get("test_acc") is not None
               else "(no student saved: it did not train to the end)")
    return "\n".join([f"\nbest candidate: {best_candidate['name']}  {arm_scores(best_candidate)}  theta {theta}",
                      f"best student of all arms: {best['name']} ({best.get('group')})  {arm_scores(best)}  {student}",
                      f"outputs in {out_dir}"])


def results_table(records: Iterable[dict]) -> str:
    """A text table of the arms, best dev accuracy first; failed arms last, with their error."""
    records = list(records)
    done = sorted(finished(records), key=_rank_key)
    failed = [r for r in records if r not in done]
    best = best_arm(records)
    header = ["arm", "group", "dev acc", "test acc", "trainings", "seconds", "note"]
    rows = []
    for r in done + failed:
        note = "best AutoSKD" if best is not None and r is best else ""
        if r.get("error"):
            note = f"FAILED: {r['error']}"
        elif r.get("status") == "loaded":
            note = (note + "; " if note else "") + "loaded"
        rows.append([str(r.get("name", "?")), str(r.get("group", "")), _fmt(r.get("dev_acc"), ".4f"),
                     _fmt(r.get("test_acc"), ".4f"), _fmt(r.get("student_trainings", 0 if r.get("error") else 1), "d"),
                     _fmt(r.get("seconds"), ".1f"), note])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    right = {2, 3, 4, 5}

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(header), line(["-" * w for w in widths])] + [line(row) for row in rows]
    trainings = sum(int(r.get("student_trainings") or 0) for r in done)
    seconds = sum(float(r.get("seconds") or 0) for r in done)
    out.append(f"{len(done)} finished, {len(failed)} failed; {trainings} student trainings, {seconds:.0f} s of trial time")
    return "\n".join(out)


def plot_arms(records: Iterable[dict], out_png: str | Path, title: str | None = None, metric: str = "dev_acc") -> Path:
    """Dev accuracy per arm group, like the paper's figure 3.

    Random Dirichlet(1) distributions: a box plus their points; AutoSKD candidates: points with
    the best one highlighted; single-teacher, AvgKD and uniform: horizontal lines across the plot.
    """
    import numpy as np

    plt = _pyplot()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = [r for r in finished(records) if r.get(metric) is not None]
    by_group: dict[str, list[dict]] = {}
    for r in done:
        by_group.setdefault(r.get("group", "?"), []).append(r)
    rng = np.random.default_rng(0)  # jitter only
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    columns = [g for g in ("random", "autoskd") if g in by_group]
    for x, group in enumerate(columns):
        ys = np.array([float(r[metric]) for r in by_group[group]])
        if group == "random":
            if len(ys) >= 3:
                ax.boxplot([ys], positions=[x], widths=0.5, showfliers=False,
                           medianprops={"color": "tab:blue"}, boxprops={"color": "tab:blue"})
            ax.scatter(x + rng.uniform(-0.15, 0.15, len(ys)), ys, s=14, color="tab:blue", alpha=0.6,
                       label=f"{_GROUP_LABELS['random']} (n={len(ys)})", zorder=3)
        else:
            ax.scatter(x + rng.uniform(-0.08, 0.08, len(ys)), ys, s=26, color="tab:red", alpha=0.8,
                       label=f"{_GROUP_LABELS['autoskd']} (n={len(ys)})", zorder=3)
            best = best_arm(done, "autoskd")
            if best is not None:
                ax.scatter([x], [float(best[metric])], s=220, marker="*", color="gold", edgecolor="black",
                           zorder=4, label=f"best candidate: {best['name']} ({float(best[metric]):.4f})")
    n_cols = max(len(columns), 1)
    styles = {"single": ("-", None), "average": ("--", "black"), "uniform": ("-.", "dimgrey")}
    tab10 = plt.get_cmap("tab10")
    palette = [tab10(i) for i in (2, 1, 4, 5, 6, 8, 9)]  # not blue/red (points) nor grey (uniform)
    k = 0
    for group in ("single", "average", "uniform"):
        for r in sorted(by_group.get(group, []), key=lambda r: str(r.get("name"))):
            ls, color = styles[group]
            if color is None:
                color, k = palette[k % len(palette)], k + 1
            label = f"single: {r.get('teacher') or r['name']}" if group == "single" else _GROUP_LABELS[group]
            ax.axhline(float(r[metric]), ls=ls, color=color, lw=1.3, label=f"{label} ({float(r[metric]):.4f})")
    ax.set_xlim(-0.6, n_cols - 0.4)
    ax.set_xticks(range(len(columns)), [_GROUP_LABELS[g] for g in columns])
    ax.set_ylabel("dev accuracy" if metric == "dev_acc" else metric)
    ax.set_title(title or "Teacher distributions: learned vs random vs baselines")
    ax.grid(axis="y", alpha=0.3)
    if not done:
        ax.text(0.5, 0.5, "no finished arms", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
