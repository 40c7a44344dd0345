"""Ablation of the AutoSKD search on the medium preset: one factor changed per cell.

Each cell is the medium preset with one setting changed (objective, order, strategy, θ
learning rate, ξ, warm-up, temperature, alpha, SSWO's logit scaling, how candidates are
drawn). Per cell and seed: one search and its K candidates (no baselines: the baselines are
in ``search_vs_random``; fewer seeds than that benchmark). Reported per cell: the best
candidate's dev and test accuracy (mean and 95% interval over seeds), the mean test accuracy
of all K candidates (free of the best-of-K selection), the paired difference to the ``base``
cell, and how far θ moved (its largest weight at the end). Writes
``benchmarks/results/search_ablation.json`` and a plot.

    python benchmarks/search_ablation.py [--seeds 0 1 2] [--cells base scaling-max ...] [--workers 6]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from _common import write_result
from _search_runs import ROOT, build_team, load_run, run_jobs

from autoskd.search.stats import mean_ci, paired_ci, verdict

#: cell -> SearchConfig overrides (theta overrides under "theta")
CELLS: dict[str, dict] = {  # the most decision-relevant cells first: a partial run answers them first
    "base": {},
    "scaling-max": {"theta": {"scaling": "max"}},
    "scaling-n": {"theta": {"scaling": "n"}},
    "order-first": {"theta": {"order": "first"}},
    "alpha-1": {"method_options": {"temperature": 1.0, "alpha": 1.0}},
    "objective-task": {"theta": {"val_objective": "task"}},
    "strategy-cr": {"theta": {"strategy": "cr"}},
    "theta-lr-3e-2": {"theta": {"lr": 3e-2}},
    "theta-lr-1e-1": {"theta": {"lr": 1e-1}},
    "theta-lr-3e-3": {"theta": {"lr": 3e-3}},
    # the task objective has no direct path from θ to the loss (only the unrolled one), so a
    # larger θ step is needed before θ moves at all
    "task-lr-1e-1": {"theta": {"val_objective": "task", "lr": 1e-1}},
    "xi-student-lr": {"theta": {"xi": "student_lr"}},
    "warmup-0": {"theta": {"warmup": 0.0}},
    "temperature-2": {"method_options": {"temperature": 2.0, "alpha": 0.5}},
    "candidates-late": {"theta": {"candidate_span": 0.25}},
}
#: fewer candidates per cell than the benchmark's K (cost); the seeds are fewer too
CELL_CANDIDATES = 2


def cell_summary(runs: dict[int, dict], seeds: list[int]) -> dict:
    best_dev, best_test, mean_test, top_theta, dropped, thetas = [], [], [], [], [], []
    for s in seeds:
        cands = [r for r in runs[s]["records"].values() if r["group"] == "autoskd"]
        best = max(cands, key=lambda r: r["dev_acc"])
        best_dev.append(best["dev_acc"])
        best_test.append(best["test_acc"])
        mean_test.append(statistics.mean(r["test_acc"] for r in cands))
        top_theta.append(max(max(sr["final_theta"]) for sr in runs[s]["searches"]))
        dropped.append([t for sr in runs[s]["searches"] for t in sr.get("dropped", [])])
        thetas.append({t: round(v, 3) for sr in runs[s]["searches"] for t, v in zip(sr["teachers"], sr["final_theta"])})
    return {"best_dev": mean_ci(best_dev), "best_test": mean_ci(best_test), "mean_candidate_test": mean_ci(mean_test),
            "best_dev_per_seed": best_dev, "best_test_per_seed": best_test, "mean_candidate_test_per_seed": mean_test,
            "final_max_theta": statistics.mean(top_theta), "dropped_per_seed": dropped,
            "final_theta_per_seed": thetas}


def plot(result: dict, out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = sorted(result["cells"].items(), key=lambda kv: kv[1]["best_test"]["mean"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.42 * len(cells) + 1.6), sharey=True)
    for ax, key, label in zip(axes, ("best_dev", "best_test", "mean_candidate_test"),
                              ("best candidate, dev", "best candidate, test", "mean of K candidates, test")):
        for y, (name, c) in enumerate(cells):
            color = "tab:red" if name == "base" else "tab:blue"
            ax.errorbar(c[key]["mean"], y, xerr=c[key]["half_width"], fmt="o", color=color, capsize=3)
        ax.set_yticks(range(len(cells)), [n for n, _ in cells])
        ax.set_xlabel(f"{label} (95% CI, {len(result['seeds'])} seeds)")
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle("AutoSKD search ablation (medium preset, one factor per cell)")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = {**out.get(k, {}), **v} if isinstance(v, dict) else v
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--cells", nargs="+", choices=list(CELLS), default=list(CELLS))
    ap.add_argument("--preset", default="medium", choices=["quick", "medium"])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", default=str(ROOT / "runs" / "search_ablation"))
    ap.add_argument("--no-run", action="store_true", help="only summarise the finished runs")
    args = ap.parse_args()
    # cells change one factor of the medium preset as it was ablated: the paper's theta_i scaling
    common = {"executor": "local", "baselines": "none", "theta": {"num_candidates": CELL_CANDIDATES, "scaling": "theta"}}
    cache = ROOT / "runs" / "cache"
    start = time.perf_counter()
    if not args.no_run:
        build_team(args.preset, cache, common)
        jobs = [(Path(args.out) / args.preset / cell / f"seed{s}", merge({**common, "seed": s}, CELLS[cell]))
                for cell in args.cells for s in args.seeds]
        run_jobs(args.preset, jobs, cache, workers=args.workers, threads=args.threads)
    cells = {}
    for cell in args.cells:
        dirs = {s: Path(args.out) / args.preset / cell / f"seed{s}" for s in args.seeds}
        if not all((d / "summary.json").exists() for d in dirs.values()):
            print(f"cell {cell}: not finished, left out")
            continue
        runs = {s: load_run(d) for s, d in dirs.items()}
        cells[cell] = {"overrides": CELLS[cell], **cell_summary(runs, args.seeds)}
    if "base" in cells:
        for name, c in cells.items():
            if name != "base":
                d = paired_ci(c["best_test_per_seed"], cells["base"]["best_test_per_seed"])
                m = paired_ci(c["mean_candidate_test_per_seed"], cells["base"]["mean_candidate_test_per_seed"])
                c["vs_base"] = {"best_test_diff": d, "best_test_verdict": verdict(d),
                                "mean_candidate_test_diff": m, "mean_candidate_test_verdict": verdict(m)}
    result = {"preset": args.preset, "seeds": args.seeds, "cells": cells, "candidates_per_cell": CELL_CANDIDATES,
              "note": f"per cell and seed: one search + its {CELL_CANDIDATES} candidates (the benchmark uses the "
                      "preset's K), no baselines (see search_vs_random)",
              "total_seconds": round(time.perf_counter() - start, 1)}
    write_result("search_ablation", result)
    plot(result, ROOT / "results" / "search_ablation.png")
    for name, c in sorted(cells.items(), key=lambda kv: -kv[1]["best_test"]["mean"]):
        vs = c.get("vs_base")
        tail = "" if vs is None else f"  vs base {vs['best_test_diff']['mean']:+.4f} ({vs['best_test_verdict']})"
        print(f"{name:<16} best dev {c['best_dev']['mean']:.4f}  best test {c['best_test']['mean']:.4f} "
              f"± {c['best_test']['half_width']:.4f}  mean-cand test {c['mean_candidate_test']['mean']:.4f}  "
              f"max θ {c['final_max_theta']:.2f}{tail}")


if __name__ == "__main__":
    main()
