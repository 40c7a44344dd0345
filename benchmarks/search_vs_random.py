"""AutoSKD's best candidate against the baselines, over several seeds (AutoSKDBERT figure 3).

On rotten_tomatoes with the ladder team, for each seed: one full ``run_search`` (search,
K candidates, every baseline) with the data split and the teachers fixed and the run seed
varied. Arms: ``autoskd`` (best candidate by dev), ``single-<teacher>``, ``avgkd``,
``uniform``, ``random_best`` and ``random_median`` over as many random Dirichlet(1)
distributions as AutoSKD used student trainings (search + K candidates + the student-alone
run that sets m), so both get the same number of trainings. Target: AutoSKD's mean dev
accuracy >= every baseline's. Writes ``benchmarks/results/search_vs_random.json`` with
``arms.<name>.dev_acc_mean|dev_acc_std|test_acc_mean|student_trainings|seconds``.

    python benchmarks/search_vs_random.py [--quick] [--preset quick|paper] [--seeds 0 1 2] [--executor ray|local]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import write_result
from autoskd.search.run import SearchConfig, run_search

ROOT = Path(__file__).resolve().parent
TEAM = ROOT.parent / "teams" / "minilm-ladder.yaml"


def arm_scores(out_dir: Path, search_trainings: int) -> dict[str, dict]:
    """Per-arm dev/test accuracy, trainings and seconds of one seed's finished search."""
    records = [r for r in json.loads((out_dir / "results.json").read_text()) if r.get("dev_acc") is not None]
    search = json.loads((out_dir / "search.json").read_text())
    cands = [r for r in records if r["group"] == "autoskd"]
    best = max(cands, key=lambda r: r["dev_acc"])
    arms = {"autoskd": {"dev_acc": best["dev_acc"], "test_acc": best["test_acc"],
                        "student_trainings": len(cands) + search_trainings,
                        "seconds": sum(r["seconds"] for r in cands) + search["search_seconds"]}}
    for r in records:
        if r["group"] in ("single", "average", "uniform"):
            arms[r["name"]] = {"dev_acc": r["dev_acc"], "test_acc": r["test_acc"], "student_trainings": 1,
                               "seconds": r["seconds"]}
    randoms = sorted((r for r in records if r["group"] == "random"), key=lambda r: r["dev_acc"])
    n = arms["autoskd"]["student_trainings"]
    pool = randoms[:n] if len(randoms) >= n else randoms
    pool_sorted = sorted(pool, key=lambda r: r["dev_acc"])
    median = pool_sorted[len(pool_sorted) // 2]
    best_random = pool_sorted[-1]
    seconds = sum(r["seconds"] for r in pool)
    arms["random_best"] = {"dev_acc": best_random["dev_acc"], "test_acc": best_random["test_acc"],
                           "student_trainings": len(pool), "seconds": seconds}
    arms["random_median"] = {"dev_acc": median["dev_acc"], "test_acc": median["test_acc"],
                             "student_trainings": len(pool), "seconds": seconds}
    return arms


def plot(result: dict, out_png: Path) -> Path:
    """Mean dev accuracy per arm with the seed-to-seed spread, AutoSKD highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = sorted(result["arms"].items(), key=lambda kv: kv[1]["dev_acc_mean"])
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(arms) + 1.2))
    for y, (name, a) in enumerate(arms):
        color = "tab:red" if name == "autoskd" else "tab:blue"
        ax.errorbar(a["dev_acc_mean"], y, xerr=a["dev_acc_std"], fmt="o", color=color, capsize=3)
        ax.scatter(a["dev_acc_per_seed"], [y] * len(a["dev_acc_per_seed"]), s=10, color=color, alpha=0.35)
    ax.set_yticks(range(len(arms)), [n for n, _ in arms])
    ax.set_xlabel(f"dev accuracy (mean ± std over seeds {result['seeds']})")
    ax.set_title("AutoSKD best candidate vs baselines (rotten_tomatoes, ladder team)")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny data, 1 seed, 2 candidates: a smoke run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--preset", default="quick", choices=["quick", "paper"],
                    help="search settings (paper: full splits, 25 candidates; hours on a CPU)")
    ap.add_argument("--executor", default="ray", choices=["ray", "local"])
    ap.add_argument("--out", default=str(ROOT / "runs" / "search_vs_random"))
    args = ap.parse_args()
    seeds = args.seeds[:1] if args.quick else args.seeds
    overrides = dict(max_train=150, max_eval=150, search_epochs=1, eval_epochs=1,
                     theta={"num_candidates": 2}) if args.quick else {}
    per_seed: dict[int, dict] = {}
    start = time.perf_counter()
    for seed in seeds:
        config = SearchConfig.from_preset(args.preset, seed=seed, executor=args.executor, **overrides)
        search_trainings = 2 if config.m is None else 1  # the search itself (+ the student-alone run)
        config.n_random = config.theta.num_candidates + search_trainings
        out = Path(args.out) / ("smoke" if args.quick else args.preset) / f"seed{seed}"
        run_search(TEAM, {"name_or_path": "rotten_tomatoes", "seed": 0}, config, out,
                   cache_dir=ROOT / "runs" / "cache", progress=False)
        per_seed[seed] = arm_scores(out, search_trainings)
        print(f"seed {seed}: " + ", ".join(f"{k} {v['dev_acc']:.4f}" for k, v in per_seed[seed].items()), flush=True)

    arms = {}
    for name in per_seed[seeds[0]]:
        devs = [per_seed[s][name]["dev_acc"] for s in seeds]
        tests = [per_seed[s][name]["test_acc"] for s in seeds]
        arms[name] = {"dev_acc_mean": statistics.mean(devs), "dev_acc_std": statistics.pstdev(devs),
                      "test_acc_mean": statistics.mean(tests), "dev_acc_per_seed": devs,
                      "student_trainings": per_seed[seeds[0]][name]["student_trainings"],
                      "seconds": sum(per_seed[s][name]["seconds"] for s in seeds)}
    autoskd = arms["autoskd"]["dev_acc_mean"]
    beaten = {n: a["dev_acc_mean"] for n, a in arms.items() if n != "autoskd" and a["dev_acc_mean"] > autoskd}
    config = SearchConfig.from_preset(args.preset, **overrides)
    result = {"arms": arms, "seeds": seeds, "target": "autoskd dev_acc_mean >= every baseline's",
              "met": not beaten, "baselines_above_autoskd": beaten, "total_seconds": time.perf_counter() - start,
              "setup": {"task": "rotten_tomatoes", "team": "minilm-ladder", "preset": args.preset, "quick": args.quick,
                        "max_train": config.max_train, "max_eval": config.max_eval,
                        "candidates": config.theta.num_candidates, "eval_epochs": config.eval_epochs,
                        "search_epochs": config.search_epochs}}
    name = "search_vs_random" + ("_quick" if args.quick else "" if args.preset == "quick" else f"_{args.preset}")
    write_result(name, result)
    plot(result, ROOT / "results" / f"{name}.png")
    width = max(map(len, arms))
    for name, a in sorted(arms.items(), key=lambda kv: -kv[1]["dev_acc_mean"]):
        print(f"{name:<{width}}  dev {a['dev_acc_mean']:.4f} ± {a['dev_acc_std']:.4f}  test {a['test_acc_mean']:.4f}"
              f"  trainings {a['student_trainings']}")
    print("target met" if not beaten else f"target missed: {beaten}")


if __name__ == "__main__":
    main()
