"""Where does θ go? The θ search alone (``run_search`` with ``theta_only``), over several seeds.

A pilot before paying for a full ``search_vs_random`` run: each seed runs the bilevel search
only (no candidate or baseline training), with the data split and the teachers fixed as in
``search_vs_random.py``. Reported per teacher: the final weight's mean and 95% interval over
seeds, on how many seeds it has the largest weight and on how many it ends above
1/n_active, and the search's cost. Writes ``benchmarks/results/<name>.json`` and a plot of
every seed's θ trajectory.

    python benchmarks/search_theta.py --seeds 10 11 --workers 2 --threads 1 \\
        --set theta.strategy=expected --set theta.val_objective=task --set theta.order=second \\
        --set theta.xi=theta_lr --set theta.center=true --name search_expected_pilot
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import write_result
from _search_runs import ROOT, TEAM, build_team, run_jobs, set_override

from autoskd.search.stats import mean_ci


def summarise(searches: dict[int, dict]) -> dict:
    """Per-seed outcome and, per teacher, the final weight over seeds (``searches``: seed -> search.json)."""
    seeds = sorted(searches)
    names = searches[seeds[0]]["teachers"]
    per_seed, teachers = {}, {}
    for s in seeds:
        d = searches[s]
        theta = d["final_theta"]
        n_active = sum(t > 0 for t in theta)
        per_seed[str(s)] = {"final_theta": dict(zip(names, theta)), "dropped": d["dropped"],
                            "argmax": names[max(range(len(theta)), key=theta.__getitem__)],
                            "above_uniform": [n for n, t in zip(names, theta) if t > 1.0 / n_active],
                            "candidates": [c["theta"] for c in d["candidates"]],
                            "teacher_counts": d.get("teacher_counts"), "search_seconds": d.get("search_seconds"),
                            "search_dev_acc": d.get("search_dev_acc")}
    for i, n in enumerate(names):
        finals = [searches[s]["final_theta"][i] for s in seeds]
        teachers[n] = {"final_theta": mean_ci(finals) if len(finals) > 1 else {"mean": finals[0]},
                       "argmax_seeds": sum(per_seed[str(s)]["argmax"] == n for s in seeds),
                       "above_uniform_seeds": sum(n in per_seed[str(s)]["above_uniform"] for s in seeds),
                       "dropped_seeds": sum(n in per_seed[str(s)]["dropped"] for s in seeds)}
    secs = [per_seed[str(s)]["search_seconds"] for s in seeds if per_seed[str(s)]["search_seconds"] is not None]
    return {"seeds": seeds, "teachers": teachers, "per_seed": per_seed,
            "search_seconds_mean": sum(secs) / len(secs) if secs else None}


def plot(searches: dict[int, dict], out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from autoskd.search.report import draw_theta_history

    seeds = sorted(searches)
    fig, axes = plt.subplots(1, len(seeds), figsize=(4.2 * len(seeds), 3.6), squeeze=False, sharey=True)
    for ax, s in zip(axes[0], seeds):
        d = searches[s]
        draw_theta_history(ax, d["history"], d["teachers"], d["selection_step"])
        ax.set_title(f"seed {s}: dropped {', '.join(d['dropped']) or 'none'}", fontsize=9)
    axes[0][0].set_ylabel("θ")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[10, 11],
                    help="run seeds (default 10 11: not the seeds search_vs_random reports)")
    ap.add_argument("--preset", default="medium", choices=["quick", "medium", "paper"])
    ap.add_argument("--workers", type=int, default=1, help="seeds run at once (processes)")
    ap.add_argument("--threads", type=int, help="torch threads per worker (default: cores / workers)")
    ap.add_argument("--team", type=Path, default=TEAM, help="teacher team YAML (default: the ladder team)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "search_theta"))
    ap.add_argument("--name", help="result name (default search_theta_<preset>)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a preset setting, e.g. --set theta.strategy=expected (repeatable; JSON values)")
    args = ap.parse_args(argv)
    if not args.team.is_file():
        ap.error(f"--team {args.team}: no such team YAML; pass a file like teams/minilm-ladder.yaml")
    overrides = {"executor": "local", "theta_only": True}
    for item in args.set:
        set_override(overrides, item)
    base, cache = Path(args.out) / args.preset, ROOT / "runs" / "cache"
    start = time.perf_counter()
    build_team(args.preset, cache, overrides, args.team)
    jobs = [(base / f"seed{s}", {**overrides, "seed": s}) for s in args.seeds]
    run_jobs(args.preset, jobs, cache, workers=args.workers, threads=args.threads, team=args.team, done="search.json")
    searches = {s: json.loads((base / f"seed{s}" / "search.json").read_text()) for s in args.seeds
                if (base / f"seed{s}" / "search.json").exists()}
    if not searches:
        raise SystemExit(f"error: no seed's search finished under {base}; see the messages above")
    name = args.name or f"search_theta_{args.preset}"
    result = {**summarise(searches), "preset": args.preset, "team": args.team.stem, "overrides": overrides,
              "total_seconds": round(time.perf_counter() - start, 1)}
    write_result(name, result)
    plot(searches, ROOT / "results" / f"{name}.png")
    for n, t in result["teachers"].items():
        print(f"{n:16s} final θ {t['final_theta']['mean']:.3f}  largest on {t['argmax_seeds']}/{len(searches)} seeds  "
              f"above 1/n on {t['above_uniform_seeds']}  dropped on {t['dropped_seeds']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
