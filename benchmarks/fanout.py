"""Fan-out layout on this 2-core machine: the same 8 short KD trials as 2 concurrent trials x 1
thread and as 1 trial x 2 threads (``autoskd tune``, grid sampler, local Ray on 127.0.0.1).

Each trial is the real thing: the ladder team's 2-layer MiniLM student distilled (kd) from its
best teacher on rotten_tomatoes (the search benchmarks' team, fine-tuned on the whole training
split and cached in ``benchmarks/runs/cache``); the 8 trials differ in learning rate. Both layouts must give identical results
per trial (same seeds, deterministic engine). Figures:

* ``speedup``: trials per hour of the faster layout over the slower (``faster`` names it; the
  default ``--cpus-per-trial 1`` is that layout when it is ``2x1``);
* ``overhead_fraction`` (the faster layout): wall time not spent in the trials' own training and
  evaluation, ``1 - sum(trial train+eval seconds) / (wall x concurrent slots)``: scheduling,
  process start, model and teacher loading, writing results. Target <= 0.10. Ray itself is
  started once before both layouts (``ray_start_seconds``, reported apart).

The team and the teacher-output cache are built before timing (a tune builds them once too).

    python benchmarks/fanout.py [--max-train N] [--epochs E]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import start_ray, write_result  # noqa: E402
from autoskd.fanout.space import SearchSpace  # noqa: E402
from autoskd.fanout.tune import TuneSettings, run_tune  # noqa: E402



TEAM = str(ROOT / "teams" / "minilm-ladder.yaml")
CACHE = ROOT / "benchmarks" / "runs" / "cache"  # the search benchmarks' team: no teacher is fine-tuned here
LRS = [1e-4, 1.5e-4, 2e-4, 3e-4, 4e-4, 5e-4, 7e-4, 1e-3]


def warm_up(task: dict, cache: Path, epochs: float) -> None:
    """Teachers fine-tuned and their outputs cached, as after a tune's first trial."""
    from autoskd.pipeline import DistillConfig, distill
    from autoskd.search.trials import TrialSpec

    spec = TrialSpec(team_path=TEAM, task=task, root=str(cache / "warm"), cache_dir=str(cache))
    t = spec.load_task()
    team = spec.build_team(t)
    distill(team, t, DistillConfig(method="kd", epochs=min(epochs, 0.05), seed=0), cache_dir=cache, progress=False)


def run_layout(name: str, cpus_per_trial: int, task: dict, cache: Path, work: Path, epochs: float) -> dict:
    space = SearchSpace.from_dict({"name": f"fanout-{name}", "fixed": {"method": "kd", "epochs": epochs},
                                   "params": {"lr": {"grid": LRS}}})
    out = work / name
    start = time.perf_counter()
    run_tune(space, TEAM, task, TuneSettings(sampler="grid", cpus_per_trial=cpus_per_trial, num_cpus=2, seed=0,
                                             base={"seed": 0}), out, cache_dir=cache, progress=False)
    wall = time.perf_counter() - start
    records = [json.loads(p.read_text()) for p in sorted(out.glob("trials/*/trial.json"))]
    busy = sum(r["train_eval_seconds"] for r in records)  # training, per-epoch dev and final test scoring
    slots = 2 // cpus_per_trial
    return {"layout": name, "concurrent": slots, "threads_per_trial": cpus_per_trial, "wall_seconds": round(wall, 1),
            "trials": len(records), "trials_per_hour": round(3600 * len(records) / wall, 1),
            "trial_train_eval_seconds": round(busy, 1),
            "overhead_fraction": round(1 - busy / (wall * slots), 4),
            "results": {str(r["values"]["lr"]): {"dev_acc": r["dev_acc"], "test_acc": r["test_acc"],
                                                 "history": r["history"]} for r in records}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-train", type=int, default=2000)
    ap.add_argument("--epochs", type=float, default=1.0)
    args = ap.parse_args()
    # dev and test whole and teachers on the whole training split: the cached medium team
    task = {"name_or_path": "rotten_tomatoes", "seed": 0, "max_train": args.max_train, "teachers_full_data": True}
    ray_start = start_ray()  # once for both layouts (reported; not part of either layout's wall)
    with tempfile.TemporaryDirectory(prefix="fanout-bench-") as tmp:
        work = Path(tmp)
        cache = CACHE
        warm_up(task, cache, args.epochs)
        layouts = [run_layout("2x1", 1, task, cache, work, args.epochs),
                   run_layout("1x2", 2, task, cache, work, args.epochs)]
    a, b = layouts
    faster, slower = (a, b) if a["trials_per_hour"] >= b["trials_per_hour"] else (b, a)
    identical = a["results"] == b["results"]
    result = {"speedup": round(faster["trials_per_hour"] / slower["trials_per_hour"], 3),
              "faster": faster["layout"], "default_layout": "2x1 (--cpus-per-trial 1)",
              "overhead_fraction": faster["overhead_fraction"], "identical_results": identical,
              "ray_start_seconds": ray_start, "trials": len(LRS), "epochs": args.epochs, "max_train": args.max_train,
              "team": "teams/minilm-ladder.yaml (teachers on the whole training split)", "task": "rotten_tomatoes", "layouts": layouts}
    path = write_result("fanout", result)
    for lay in layouts:
        print(f"{lay['layout']}: {lay['wall_seconds']} s wall, {lay['trials_per_hour']} trials/h, "
              f"overhead {lay['overhead_fraction']:.3f}")
    print(f"speedup {result['speedup']} ({faster['layout']} faster); overhead_fraction {result['overhead_fraction']}; "
          f"identical results per trial: {identical}  -> {path}")
    if not identical:
        sys.exit("results differ between layouts")


if __name__ == "__main__":
    main()
