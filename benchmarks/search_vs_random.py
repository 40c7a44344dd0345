"""AutoSKD's best candidate against the baselines, over several seeds (AutoSKDBERT figure 3).

On rotten_tomatoes with the ladder team (``--team`` takes another), one full ``run_search`` per seed (search, K
candidates, every baseline) with the data split and the teachers fixed and the run seed
varied, so the arms of one seed are paired. Arms:

* ``autoskd``: the best candidate by dev;
* ``single-<teacher>``, ``avgkd``, ``uniform``: one training each;
* ``random_best`` / ``random_median``: over the first N random Dirichlet(1) distributions,
  N = AutoSKD's compute in student-training equivalents (the search's seconds over a
  baseline training's, plus K), so random search gets the same budget.

Reported: per arm the mean and 95% interval over seeds (dev and test); the paired difference
AutoSKD − each baseline with its interval (a tie when it contains 0); McNemar's test on the
test predictions pooled over seeds; the fraction of all random distributions the best
candidate beats (figure 3); the compute per arm. Writes
``benchmarks/results/search_vs_random[_<preset>].json`` and a plot with the intervals.

    python benchmarks/search_vs_random.py --preset medium --seeds 0 1 2 3 4 [--workers 5]
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import time
from pathlib import Path

from _common import write_result
from _search_runs import ROOT, TEAM, build_team, load_run, run_jobs, set_override

from autoskd.search.stats import mcnemar, mean_ci, paired_ci, verdict

SMOKE = dict(max_train=150, max_eval=150, search_epochs=2, eval_epochs=1, theta={"num_candidates": 2})


def seed_arms(run: dict, test_labels: list[int] | None) -> dict[str, dict]:
    """One seed's arms: ``{arm: {dev_acc, test_acc, trainings, seconds, correct}}``."""
    recs = run["records"]
    singles = [r for r in recs.values() if r["group"] in ("single", "average", "uniform")]
    base_seconds = statistics.median(r["seconds"] for r in singles) if singles else 1.0
    search_seconds = sum(s["search_seconds"] for s in run["searches"])
    cands = [r for r in recs.values() if r["group"] == "autoskd"]
    best = max(cands, key=lambda r: (r["dev_acc"], -int(r["name"].split("-")[-1])))

    def arm(r, trainings, seconds):
        correct = None
        if test_labels is not None and r.get("test_predictions") is not None:
            correct = [p == y for p, y in zip(r["test_predictions"], test_labels)]
        return {"dev_acc": r["dev_acc"], "test_acc": r["test_acc"], "trainings": trainings, "seconds": seconds,
                "correct": correct, "name": r["name"]}

    budget = len(cands) + search_seconds / base_seconds
    arms = {"autoskd": arm(best, budget, search_seconds + sum(r["seconds"] for r in cands))}
    for r in singles:
        arms[r["name"]] = arm(r, 1, r["seconds"])
    randoms = sorted((r for r in recs.values() if r["group"] == "random"), key=lambda r: r["name"])
    n = min(len(randoms), max(1, math.ceil(budget - 1e-9)))
    pool = randoms[:n]  # the first N drawn, in the order they were generated: no peeking at scores
    if pool:
        seconds = sum(r["seconds"] for r in pool)
        ranked = sorted(pool, key=lambda r: r["dev_acc"])
        arms["random_best"] = arm(ranked[-1], len(pool), seconds)
        arms["random_median"] = arm(ranked[len(ranked) // 2], len(pool), seconds)
    arms["_distributions"] = {"candidates": [(r["dev_acc"], r["test_acc"]) for r in cands],
                              "random": [(r["dev_acc"], r["test_acc"]) for r in randoms]}
    arms["_fraction_random_beaten"] = {
        "dev": sum(r["dev_acc"] < best["dev_acc"] for r in randoms) / max(1, len(randoms)),
        "test": sum(r["test_acc"] < best["test_acc"] for r in randoms) / max(1, len(randoms)),
        "n_random": len(randoms), "budget_trainings": budget}
    return arms


def aggregate(per_seed: dict[int, dict], seeds: list[int]) -> dict:
    names = [n for n in per_seed[seeds[0]] if not n.startswith("_") and all(n in per_seed[s] for s in seeds)]
    arms = {}
    for name in names:
        devs = [per_seed[s][name]["dev_acc"] for s in seeds]
        tests = [per_seed[s][name]["test_acc"] for s in seeds]
        arms[name] = {"dev_acc_mean": statistics.mean(devs), "dev_ci95": mean_ci(devs),
                      "test_acc_mean": statistics.mean(tests), "test_ci95": mean_ci(tests),
                      "dev_acc_per_seed": devs, "test_acc_per_seed": tests,
                      "student_trainings": statistics.mean(per_seed[s][name]["trainings"] for s in seeds),
                      "seconds": sum(per_seed[s][name]["seconds"] for s in seeds)}
    comparisons = {}
    a = "autoskd"
    for name in names:
        if name == a:
            continue
        dev = paired_ci(arms[a]["dev_acc_per_seed"], arms[name]["dev_acc_per_seed"])
        test = paired_ci(arms[a]["test_acc_per_seed"], arms[name]["test_acc_per_seed"])
        pooled_a, pooled_b = [], []
        for s in seeds:
            ca, cb = per_seed[s][a]["correct"], per_seed[s][name]["correct"]
            if ca is not None and cb is not None:
                pooled_a += ca
                pooled_b += cb
        comparisons[name] = {"dev_diff": dev, "dev_verdict": verdict(dev), "test_diff": test,
                             "test_verdict": verdict(test),
                             "mcnemar_test": mcnemar(pooled_a, pooled_b) if pooled_a else None}
    fr = [per_seed[s]["_fraction_random_beaten"] for s in seeds]
    fraction = {"dev": statistics.mean(f["dev"] for f in fr), "test": statistics.mean(f["test"] for f in fr),
                "n_random_per_seed": fr[0]["n_random"]}
    return {"arms": arms, "comparisons": comparisons, "fraction_of_random_beaten": fraction,
            "learned_vs_random": learned_vs_random([per_seed[s]["_distributions"] for s in seeds])}


def best_of(pool: list[tuple[float, float]], k: int) -> tuple[float, float]:
    """Expected (dev, test) of the dev-best of ``k`` draws from ``pool``: the mean over every
    k-subset, so it does not depend on which ``k`` happened to be drawn first."""
    picks = [max(c, key=lambda r: r[0]) for c in itertools.combinations(pool, min(k, len(pool)))]
    return statistics.fmean(p[0] for p in picks), statistics.fmean(p[1] for p in picks)


def learned_vs_random(dists: list[dict]) -> dict:
    """The search's distributions against random ones, paired over seeds, compute aside:

    * ``mean``: a learned candidate's mean accuracy against a random distribution's mean (does
      the search find better distributions than chance?);
    * ``best_of_k``: AutoSKD's dev-best of its K candidates against the dev-best of K random
      distributions (the same number of student trainings after the search)."""
    if not dists or any(not d["random"] or not d["candidates"] for d in dists):
        return {}

    def mean(pool):
        return statistics.fmean(r[0] for r in pool), statistics.fmean(r[1] for r in pool)

    pairs = {"mean": [(mean(d["candidates"]), mean(d["random"])) for d in dists],
             "best_of_k": [(best_of(d["candidates"], len(d["candidates"])), best_of(d["random"], len(d["candidates"])))
                           for d in dists]}
    out: dict = {"k": [len(d["candidates"]) for d in dists]}
    for key, per_seed in pairs.items():
        out[key] = {}
        for i, split in enumerate(("dev", "test")):
            learned, random = [x[0][i] for x in per_seed], [x[1][i] for x in per_seed]
            diff = paired_ci(learned, random)
            out[key][split] = {"learned": statistics.fmean(learned), "random": statistics.fmean(random),
                               "diff": diff, "verdict": verdict(diff)}
    return out


def plot(result: dict, out_png: Path) -> Path:
    """Mean dev and test accuracy per arm with 95% intervals over seeds, AutoSKD in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = sorted(result["arms"].items(), key=lambda kv: kv[1]["dev_acc_mean"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(arms) + 1.6), sharey=True)
    for ax, split in zip(axes, ("dev", "test")):
        for y, (name, a) in enumerate(arms):
            color = "tab:red" if name == "autoskd" else "tab:blue"
            ci = a[f"{split}_ci95"]
            ax.errorbar(ci["mean"], y, xerr=ci["half_width"], fmt="o", color=color, capsize=3)
            ax.scatter(a[f"{split}_acc_per_seed"], [y] * len(a[f"{split}_acc_per_seed"]), s=10, color=color, alpha=0.35)
        ax.set_yticks(range(len(arms)), [n for n, _ in arms])
        ax.set_xlabel(f"{split} accuracy (mean, 95% CI over {len(result['seeds'])} seeds)")
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(f"AutoSKD best candidate vs baselines (rotten_tomatoes, {result['setup'].get('team', 'minilm-ladder')} team, preset {result['setup']['preset']})")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny data, 1 seed, 2 candidates: a smoke run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--preset", default="medium", choices=["quick", "medium", "paper"])
    ap.add_argument("--random", type=int, default=12, help="random distributions per seed (the budget-matched "
                                                             "arm uses the first N of them)")
    ap.add_argument("--workers", type=int, default=1, help="seeds run at once (processes)")
    ap.add_argument("--threads", type=int, help="torch threads per worker (default: cores / workers)")
    ap.add_argument("--team", type=Path, default=TEAM, help="teacher team YAML (default: the ladder team)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "search_vs_random"))
    ap.add_argument("--no-run", action="store_true", help="only summarise the seeds already finished")
    ap.add_argument("--name", help="result name (default search_vs_random_<preset>): keeps a run under other "
                                   "settings apart from the main result")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a preset setting, e.g. --set theta.scaling=n (repeatable; JSON values)")
    args = ap.parse_args()
    seeds = args.seeds[:1] if args.quick else args.seeds
    overrides = dict(SMOKE) if args.quick else {}
    overrides.update(executor="local", n_random=args.random)
    for item in args.set:
        set_override(overrides, item)
    base = Path(args.out) / ("smoke" if args.quick else args.preset)
    cache = ROOT / "runs" / "cache"
    start = time.perf_counter()
    if not args.team.is_file():
        ap.error(f"--team {args.team}: no such team YAML; pass a file like teams/minilm-ladder.yaml")
    teachers = build_team(args.preset, cache, overrides, args.team)
    team_seconds = time.perf_counter() - start
    if not args.no_run:
        jobs = [(base / f"seed{s}", {**overrides, "seed": s}) for s in seeds]
        run_jobs(args.preset, jobs, cache, workers=args.workers, threads=args.threads, team=args.team)
    seeds = [s for s in seeds if (base / f"seed{s}" / "summary.json").exists()]

    from _search_runs import TASK
    from autoskd.search.run import SearchConfig, load_search_task

    config = SearchConfig.from_preset(args.preset, **overrides)
    task, _ = load_search_task(dict(TASK), config)
    labels = [int(y) for y in task.split("test")["label"]]
    per_seed = {s: seed_arms(load_run(base / f"seed{s}"), labels) for s in seeds}
    result = aggregate(per_seed, seeds)
    autoskd = result["arms"]["autoskd"]
    above_dev = {n: a["dev_acc_mean"] for n, a in result["arms"].items() if n != "autoskd"
                 and a["dev_acc_mean"] > autoskd["dev_acc_mean"]}
    above_test = {n: a["test_acc_mean"] for n, a in result["arms"].items() if n != "autoskd"
                  and a["test_acc_mean"] > autoskd["test_acc_mean"]}
    singles = {n: a for n, a in result["arms"].items() if n.startswith("single-")}
    best_single = max(singles, key=lambda n: singles[n]["dev_acc_mean"]) if singles else None
    key_diffs = {n: result["comparisons"][n] for n in ("avgkd", best_single) if n in result["comparisons"]}
    met = (not above_dev and not above_test
           and all(d["dev_diff"]["mean"] > 0 and d["test_diff"]["mean"] > 0 for d in key_diffs.values()))
    result.update({
        "seeds": seeds, "met": met, "best_single_teacher": best_single,
        "target": "autoskd mean >= every arm's mean on dev and on test; paired difference to avgkd and to the "
                  "best single teacher above zero",
        "arms_above_autoskd": {"dev": above_dev, "test": above_test},
        "teachers_dev_accuracy": teachers, "team_build_seconds": round(team_seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "setup": {"task": "rotten_tomatoes", "team": args.team.stem, "preset": args.preset, "quick": args.quick,
                  "train_rows": task.sizes(), "max_train": config.max_train, "max_eval": config.max_eval,
                  "teachers_full_data": config.teachers_full_data, "candidates": config.theta.num_candidates,
                  "theta": config.theta.to_dict(), "eval_epochs": config.eval_epochs,
                  "search_epochs": config.search_epochs, "method_options": config.method_options}})
    for arm in result["arms"].values():
        arm.pop("correct", None)
    name = args.name or ("search_vs_random" + ("_smoke" if args.quick else "" if args.preset == "quick"
                                              else f"_{args.preset}"))
    if len(seeds) < len(args.seeds) and not args.quick:
        name += "_partial"  # fewer seeds finished than asked for: never mistaken for the full result
    write_result(name, result)
    plot(result, ROOT / "results" / f"{name}.png")
    width = max(map(len, result["arms"]))
    for n, a in sorted(result["arms"].items(), key=lambda kv: -kv[1]["dev_acc_mean"]):
        c = result["comparisons"].get(n)
        diff = "" if c is None else (f"  Δdev {c['dev_diff']['mean']:+.4f} [{c['dev_diff']['lo']:+.4f},"
                                     f"{c['dev_diff']['hi']:+.4f}] {c['dev_verdict']}  Δtest {c['test_diff']['mean']:+.4f}"
                                     f" {c['test_verdict']}")
        print(f"{n:<{width}}  dev {a['dev_acc_mean']:.4f} ± {a['dev_ci95']['half_width']:.4f}  "
              f"test {a['test_acc_mean']:.4f} ± {a['test_ci95']['half_width']:.4f}  "
              f"trainings {a['student_trainings']:.1f}{diff}")
    print(f"best candidate beats {result['fraction_of_random_beaten']['test']:.0%} of random distributions on test")
    for key, label in (("mean", "a learned candidate vs a random distribution (means)"),
                       ("best_of_k", "best of K candidates vs best of K random")):
        row = result["learned_vs_random"].get(key)
        if row is None:
            continue
        print(f"{label}: " + "  ".join(f"{sp} {row[sp]['learned']:.4f} vs {row[sp]['random']:.4f} "
                                      f"(Δ {row[sp]['diff']['mean']:+.4f} [{row[sp]['diff']['lo']:+.4f}, "
                                      f"{row[sp]['diff']['hi']:+.4f}] {row[sp]['verdict']})" for sp in ("dev", "test")))
    print("target met" if met else f"target missed: above autoskd {result['arms_above_autoskd']}")


if __name__ == "__main__":
    main()
