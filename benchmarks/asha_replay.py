"""Replay ASHA offline on a finished full tune: which trial would it have kept, for what compute?

A ``--scheduler none`` tune (every trial to the end) keeps each trial's per-epoch dev history.
Training is deterministic per trial, so what ASHA *would* have done is fixed by those histories and
the order results arrive in. This script feeds them, epoch by epoch, to the very scheduler
``autoskd tune`` builds (:func:`autoskd.search.early_stop.make_scheduler`, Ray's
``ASHAScheduler``), with ``--workers`` trials running at once in trial order and each epoch taking
its trial's measured time, and reports ``best_ratio`` and ``compute_ratio`` as ``asha.py`` defines
them. It decides an ASHA setting in seconds instead of a re-run; ``asha.py`` then measures it.

    python benchmarks/asha_replay.py benchmarks/runs/asha/train1000-eval1000-ep6/none-0 \
        [--grace 1 2] [--factor 2 3 4] [--workers 2] [--name asha_replay]
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import write_result  # noqa: E402
from autoskd.search.early_stop import SCORE, dev_score, make_scheduler  # noqa: E402


def load_histories(run: Path) -> list[dict]:
    """Per trial of a full tune: its grid values, the score it reports after each evaluated epoch
    (the scheduler's ``dev_score``, best so far) and its seconds per epoch. Failed trials (no
    evaluated epoch) are left out: they cost no student-epochs either way."""
    trials = []
    for path in sorted(run.glob("trials/*/result.json")):
        record = json.loads(path.read_text())
        meta = json.loads((path.parent / "trial.json").read_text())
        epochs = [h for h in record.get("history", []) if h.get("kind") == "epoch" and h.get("dev_acc") is not None]
        scores = [dev_score(epochs[: k + 1]) for k in range(len(epochs))]
        if scores:
            trials.append({"trial": meta["trial"], "values": meta["values"], "scores": scores,
                           "seconds_per_epoch": float(meta.get("train_seconds") or 1.0) / len(scores)})
    if not trials:
        raise SystemExit(f"{run}: no finished trials with a per-epoch history; point at a --scheduler none tune folder")
    return trials


def replay(trials: list[dict], grace: int, factor: float, workers: int) -> dict:
    """Run ``trials`` through ASHA as ``workers`` parallel slots in trial order; what it keeps and spends."""
    max_t = max(len(t["scores"]) for t in trials)
    scheduler = make_scheduler("asha", max_t, grace, factor)
    order = itertools.count()
    events: list[tuple[float, int, int, int]] = []  # (time, tie, trial index, epoch number)
    waiting = list(range(len(trials)))

    def launch(i: int, now: float) -> None:
        scheduler.on_trial_add(None, SimpleNamespace(trial_id=str(i)))
        heapq.heappush(events, (now + trials[i]["seconds_per_epoch"], next(order), i, 1))

    for _ in range(min(workers, len(waiting))):
        launch(waiting.pop(0), 0.0)
    spent, final = 0, {}
    while events:
        now, _, i, epoch = heapq.heappop(events)
        trial, t = SimpleNamespace(trial_id=str(i)), trials[i]
        score = t["scores"][epoch - 1]
        spent += 1
        result = {"training_iteration": epoch, SCORE: score}
        if epoch == len(t["scores"]):
            scheduler.on_trial_complete(None, trial, result)
            final[i] = {"score": score, "epochs": epoch, "stopped": False}
        elif scheduler.on_trial_result(None, trial, result) == "STOP":
            scheduler.on_trial_remove(None, trial)
            final[i] = {"score": score, "epochs": epoch, "stopped": True}
        else:
            heapq.heappush(events, (now + t["seconds_per_epoch"], next(order), i, epoch + 1))
            continue
        if waiting:
            launch(waiting.pop(0), now)
    full_best = max(range(len(trials)), key=lambda i: trials[i]["scores"][-1])
    kept_best = max(final, key=lambda i: final[i]["score"])
    full_epochs = sum(len(t["scores"]) for t in trials)
    return {"grace_period": grace, "reduction_factor": factor, "workers": workers,
            "best_ratio": round(final[kept_best]["score"] / trials[full_best]["scores"][-1], 4),
            "compute_ratio": round(spent / full_epochs, 4), "student_epochs": {"asha": spent, "full": full_epochs},
            "full_best": trials[full_best]["values"], "asha_best": trials[kept_best]["values"],
            "full_best_stopped_at_epoch": final[full_best]["epochs"] if final[full_best]["stopped"] else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="folders of finished --scheduler none tunes")
    ap.add_argument("--grace", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--factor", type=float, nargs="+", default=[2.0, 3.0, 4.0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--name", default="asha_replay", help="result name: benchmarks/results/<name>.json")
    args = ap.parse_args()
    rows = []
    for run in args.runs:
        trials = load_histories(run)
        for grace, factor in itertools.product(args.grace, args.factor):
            row = {"run": str(run.resolve().relative_to(ROOT)) if run.resolve().is_relative_to(ROOT) else str(run),
                   "trials": len(trials), **replay(trials, grace, factor, args.workers)}
            rows.append(row)
            print(f"{row['run']}  grace {grace} factor {factor:g}: best_ratio {row['best_ratio']:.4f}  "
                  f"compute_ratio {row['compute_ratio']:.3f}  ({row['trials']} trials)", flush=True)
    path = write_result(args.name, {"replays": rows})
    print(f"-> {path}")


if __name__ == "__main__":
    main()
