"""Teacher-output cache: 3 epochs of KD from a 6-layer teacher, with and without the cache,
against training the 2-layer student alone (no teacher at all).

With the cache the teacher runs once, before the first epoch, and never again; every later
epoch should cost about what training the student alone costs. Target:
ratio_vs_student_alone = (mean cached epoch time, epochs 2..3) / (mean student-alone epoch) <= 1.10.

    python benchmarks/teacher_cache.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import write_result
from autoskd.data.collate import make_loader, tokenize_split
from autoskd.data.tasks import load_task
from autoskd.engine.callbacks import Callback
from autoskd.engine.trainer import Distiller, Stage
import autoskd.methods  # noqa: F401  (registers the built-in methods the runs name)
from autoskd.models.loading import load_classifier, load_tokenizer

EPOCHS = 3


class EpochTimer(Callback):
    """Wall time of each epoch, measured from the end of the previous one (or stage start)."""

    def __init__(self):
        self.times: list[float] = []
        self._last = 0.0

    def on_stage_start(self, trainer, ctx) -> None:
        self._last = time.perf_counter()

    def on_epoch_end(self, trainer, ctx, metrics) -> None:
        now = time.perf_counter()
        self.times.append(now - self._last)
        self._last = now


def run(arm: str, initial, teacher, data, tokenizer, data_id: str, cache_dir: Path) -> dict:
    timer = EpochTimer()
    loader = make_loader(data, tokenizer, 32, shuffle=True, seed=0)
    method, teachers, cache = {"alone": ("finetune", None, None), "live": ("kd", teacher, None),
                               "cached": ("kd", teacher, cache_dir)}[arm]
    distiller = Distiller(copy.deepcopy(initial), method, teachers, progress=False, checkpoint=False,
                          restore_best=False, callbacks=[timer], teacher_cache=cache)
    start = time.perf_counter()
    distiller.fit([Stage("task", loader, epochs=EPOCHS, lr=1e-4, data_id=data_id if arm == "cached" else None)])
    return {"epoch_seconds": timer.times, "total_seconds": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer examples (< 2 minutes)")
    args = ap.parse_args()
    n_train, repeats = (256, 1) if args.quick else (1024, 2)

    task = load_task("rotten_tomatoes").subsample(n_train, 64)
    tokenizer = load_tokenizer("minilm-l6")
    data = tokenize_split(task.split("train"), tokenizer, 64)
    teacher = load_classifier("minilm-l6", num_labels=2, layers=6).eval()
    initial = load_classifier("minilm-l6", num_labels=2, layers=2, seed=0)
    runs: dict[str, list[dict]] = {"alone": [], "live": [], "cached": []}
    for r in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:  # a cold cache each repeat: epoch 1 builds it
            for arm in (["alone", "live", "cached"] if r % 2 == 0 else ["cached", "live", "alone"]):
                runs[arm].append(run(arm, initial, teacher, data, tokenizer, f"bench-{n_train}", Path(tmp)))

    def later_epochs(arm):
        return statistics.mean(t for run_ in runs[arm] for t in run_["epoch_seconds"][1:])

    alone = statistics.mean(t for run_ in runs["alone"] for t in run_["epoch_seconds"])
    result = {"ratio_vs_student_alone": later_epochs("cached") / alone,
              "live_ratio_vs_student_alone": later_epochs("live") / alone,
              "first_epoch_cached_seconds": statistics.mean(r_["epoch_seconds"][0] for r_ in runs["cached"]),
              "student_alone_epoch_seconds": alone, "cached_later_epoch_seconds": later_epochs("cached"),
              "live_later_epoch_seconds": later_epochs("live"), "runs": runs, "target": 1.10,
              "met": later_epochs("cached") / alone <= 1.10,
              "setup": {"examples": n_train, "epochs": EPOCHS, "batch_size": 32, "max_length": 64,
                        "student_layers": 2, "teacher_layers": 6, "repeats": repeats, "quick": args.quick}}
    write_result("teacher_cache", result)
    print(f"cached epochs 2-3 / student alone: {result['ratio_vs_student_alone']:.3f} (target <= 1.10); "
          f"live teacher: {result['live_ratio_vs_student_alone']:.3f}; "
          f"first cached epoch {result['first_epoch_cached_seconds']:.1f}s incl. building the cache")


if __name__ == "__main__":
    main()
