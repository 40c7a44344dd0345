"""Engine overhead: one KD epoch through the Distiller against a minimal hand-written loop.

Same student initialisation, teacher, batches (same loader seed), optimiser recipe (AdamW, no
decay on biases/LayerNorm, linear warm-up/decay, clipping) and KD loss. Runs are interleaved
(hand, engine, engine, hand, ...) and the median of per-pair ratios is reported, so machine
noise hits both arms alike. Target: ratio = engine / hand <= 1.05.

    python benchmarks/engine_overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn
from torch.nn import functional as F
from transformers import get_linear_schedule_with_warmup

from _common import write_result
from autoskd.data.collate import make_loader, tokenize_split
from autoskd.data.tasks import load_task
from autoskd.engine.batches import model_inputs
from autoskd.engine.backends import adamw as _optimizer
from autoskd.engine.trainer import Distiller, Stage
import autoskd.methods  # noqa: F401  (registers the built-in methods the runs name)
from autoskd.models.loading import load_classifier, load_tokenizer

TEMPERATURE = 2.0


def hand_loop(student, teacher, loader, lr: float) -> float:
    """The reference: the smallest correct KD loop one would write by hand."""
    params = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    opt = _optimizer(params, lr, 0.01)
    steps = len(loader)
    sched = get_linear_schedule_with_warmup(opt, int(0.1 * steps), steps)
    student.train()
    start = time.perf_counter()
    for batch in loader:
        inputs = model_inputs(batch)
        with torch.no_grad():
            t_logits = teacher(**inputs).logits
        s_logits = student(**inputs).logits
        loss = F.kl_div(F.log_softmax(s_logits / TEMPERATURE, -1), F.log_softmax(t_logits / TEMPERATURE, -1),
                        reduction="batchmean", log_target=True) * TEMPERATURE ** 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        opt.step()
        sched.step()
    return time.perf_counter() - start


def engine_loop(student, teacher, loader, lr: float) -> float:
    distiller = Distiller(student, "kd", teacher, progress=False, checkpoint=False, restore_best=False,
                          method_options={"temperature": TEMPERATURE})
    start = time.perf_counter()
    distiller.fit([Stage("task", loader, epochs=1, lr=lr)])
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer examples and repeats (< 2 minutes)")
    args = ap.parse_args()
    n_train, repeats = (320, 3) if args.quick else (1024, 5)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    task = load_task("rotten_tomatoes").subsample(n_train, 64)
    tokenizer = load_tokenizer("minilm-l6")
    data = tokenize_split(task.split("train"), tokenizer, 64)
    teacher = load_classifier("minilm-l6", num_labels=2, layers=6).eval()
    initial = load_classifier("minilm-l6", num_labels=2, layers=2, seed=0)

    hand_times, engine_times = [], []
    for r in range(repeats):
        order = ["hand", "engine"] if r % 2 == 0 else ["engine", "hand"]
        for arm in order:
            student = copy.deepcopy(initial)
            torch.manual_seed(0)
            loader = make_loader(data, tokenizer, 32, shuffle=True, seed=0)
            if arm == "hand":
                hand_times.append(hand_loop(student, teacher, loader, 1e-4))
            else:
                engine_times.append(engine_loop(student, teacher, loader, 1e-4))
    ratios = [e / h for e, h in zip(engine_times, hand_times)]
    result = {"ratio": statistics.median(ratios), "ratios": ratios, "engine_seconds": engine_times,
              "hand_seconds": hand_times, "target": 1.05, "met": statistics.median(ratios) <= 1.05,
              "setup": {"examples": n_train, "batch_size": 32, "max_length": 64, "student_layers": 2,
                        "teacher_layers": 6, "repeats": repeats, "quick": args.quick}}
    write_result("engine_overhead", result)
    print(f"engine/hand median ratio {result['ratio']:.3f} (target <= 1.05) "
          f"engine {statistics.median(engine_times):.2f}s hand {statistics.median(hand_times):.2f}s")


if __name__ == "__main__":
    main()
