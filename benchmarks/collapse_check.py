"""Do the majority-class students of a search_vs_random seed come from θ_i-flattened targets?

Re-trains arms of one finished seed (default: seed 7 of the first-order medium run, where
2 of 4 candidates, ``uniform`` and 4 of 8 random distributions ended at the majority class)
with the same config, once with SSWO's θ_i scaling (a control: the trainings are deterministic,
so a collapse should repeat) and once with n·θ_i (1 at the uniform distribution, so the targets
are as sharp as single-teacher KD's). Resumable: finished arms are read back, not re-trained.
Writes ``benchmarks/results/collapse_check.json``.

    python benchmarks/collapse_check.py [--seed-dir runs/search_vs_random_first/medium/seed7]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from _common import write_result
from _search_runs import ROOT

from autoskd.search.arms import Arm
from autoskd.search.run import SearchConfig, arm_spec
from autoskd.search.trials import run_arms

COLLAPSED = 0.62  # dev accuracy below this is the constant predictor on this split (0.591)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed-dir", default=str(ROOT / "runs" / "search_vs_random_first" / "medium" / "seed7"))
    ap.add_argument("--arms", nargs="+", default=["uniform", "candidate-00"])
    ap.add_argument("--scalings", nargs="+", default=["theta", "n"])
    ap.add_argument("--out", default=str(ROOT / "runs" / "collapse_check"))
    args = ap.parse_args()
    seed_dir = Path(args.seed_dir)
    cfg = json.loads((seed_dir / "config.json").read_text())
    config = SearchConfig.from_dict({k: v for k, v in cfg.items() if k not in ("team", "task", "cache_dir")})
    before = {r["name"]: r for r in json.loads((seed_dir / "results.json").read_text())}
    rows = []
    for scaling in args.scalings:
        scaled = replace(config, theta=replace(config.theta, scaling=scaling))
        spec = arm_spec(scaled, cfg["task"], cfg["team"], cfg["cache_dir"], Path(args.out) / f"{seed_dir.name}_{scaling}")
        arms = [Arm(n, "uniform" if n == "uniform" else "candidate", theta=before[n]["theta"]) for n in args.arms]
        for rec in run_arms(spec, arms, executor="local"):
            old = before[rec["name"]]
            rows.append({"arm": rec["name"], "scaling": scaling, "theta": old["theta"],
                         "dev_acc": rec.get("dev_acc"), "test_acc": rec.get("test_acc"),
                         "collapsed": rec.get("dev_acc") is not None and rec["dev_acc"] < COLLAPSED,
                         "in_benchmark": {"dev_acc": old["dev_acc"], "test_acc": old["test_acc"]}})
            print(f"{scaling:<6} {rec['name']:<14} dev {rec.get('dev_acc', float('nan')):.4f} "
                  f"test {rec.get('test_acc', float('nan')):.4f}  (in the benchmark, θ_i scaling: "
                  f"{old['dev_acc']:.4f} / {old['test_acc']:.4f})", flush=True)
    write_result("collapse_check", {"seed_dir": str(seed_dir.relative_to(ROOT)) if seed_dir.is_relative_to(ROOT)
                                    else str(seed_dir), "collapsed_below_dev": COLLAPSED, "rows": rows,
                                    "collapsed": {s: sum(r["collapsed"] for r in rows if r["scaling"] == s)
                                                  for s in args.scalings}, "arms_per_scaling": len(args.arms)})


if __name__ == "__main__":
    main()
