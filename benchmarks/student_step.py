"""Cost of one arm: a student KD epoch's throughput as a fraction of this machine's fp32 matmul rate.

A search arm is one student distillation, so its cost is (steps) x (one step). This measures a
quick-preset epoch (rotten_tomatoes, 1,000 training rows, the ladder's 2-layer MiniLM student,
batch 32, max_length 64, KD from cached teacher logits, one thread) through the real engine
(``Distiller.fit``) and reports:

* ``fraction_of_gemm``: the student's model FLOPs per second (forward + backward matmuls on the
  real, unpadded tokens) divided by the fp32 matmul rate measured here (``torch.mm``, same
  thread count), for the default configuration;
* where a step's time goes (forward incl. loss, backward, gradient clipping, optimizer,
  data/padding, teacher logits read), by timing the engine's own calls;
* before/after ratios within one run, arms interleaved: AdamW as before (torch's per-tensor CPU
  loop) vs fused; dynamic padding vs length-grouped batches; 1 vs 2 threads.

    python benchmarks/student_step.py [--quick] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch.utils.flop_counter import FlopCounterMode

import autoskd.engine.backends as trainer_mod  # where the engine builds its optimizer
from _common import write_result
from autoskd.data.collate import make_loader, tokenize_split
from autoskd.data.tasks import load_task
from autoskd.engine.batches import model_inputs
from autoskd.engine.teacher_cache import TeacherOutputCache
from autoskd.engine.teachers import SingleTeacher, Teacher
from autoskd.engine.trainer import Distiller, Stage
import autoskd.methods  # noqa: F401  (registers the built-in methods the runs name)
from autoskd.models.loading import load_classifier, load_tokenizer

BATCH, MAX_LEN, LR = 32, 64, 5e-4
KD_OPTIONS = {"temperature": 1.0, "alpha": 0.5}  # the quick preset's


# ---------------------------------------------------------------------------------------- GEMM rate
def gemm_rate(clock=time.process_time, reps: int = 5) -> dict:
    """Best fp32 ``torch.mm`` FLOP/s over a square and a student-shaped (FFN) product."""
    out = {}
    for name, (m, k, n) in {"square_1024": (1024, 1024, 1024), "ffn_2048x384x1536": (2048, 384, 1536)}.items():
        a, b = torch.randn(m, k), torch.randn(k, n)
        torch.mm(a, b)
        best = min(_timed(lambda: torch.mm(a, b), clock) for _ in range(reps))
        out[name] = 2 * m * k * n / best
    out["best"] = max(out.values())
    return out


def _timed(fn, clock) -> float:
    start = clock()
    fn()
    return clock() - start


# ---------------------------------------------------------------------------------------- FLOPs
def step_flops(lengths: list[int], padded: int, layers: int, hidden: int, labels: int) -> tuple[float, float]:
    """Matmul FLOPs of one forward+backward (3x forward) of a BERT classifier on a batch:
    (on the padded batch as executed, on the real tokens only)."""
    def forward(n: int) -> float:  # one sequence of n tokens
        per_layer = n * (24 * hidden ** 2 + 4 * n * hidden)  # QKVO + FFN, scores + context
        return layers * per_layer + 2 * hidden ** 2 + 2 * hidden * labels  # pooler, classifier
    return 3 * len(lengths) * forward(padded), 3 * sum(forward(n) for n in lengths)


def counted_flops(student, batch) -> float:
    """The same quantity counted by torch's FlopCounterMode on one real batch (a check)."""
    model = copy.deepcopy(student)
    with FlopCounterMode(display=False) as counter:
        model(**model_inputs(batch)).logits.float().logsumexp(-1).sum().backward()
    return float(counter.get_total_flops())


# ---------------------------------------------------------------------------------------- instrumenting
class Clock:
    """Accumulates CPU seconds (this process) per named part of a step: on a shared machine
    wall time also counts other processes' turns."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name, time.process_time() - start)
        return timed


def before_optimizer(params, lr, weight_decay):
    """The engine's AdamW before this change: torch's default on CPU, a per-tensor loop."""
    opt = ORIGINAL_OPTIMIZER(params, lr, weight_decay)
    for group in opt.param_groups:
        group["fused"], group["foreach"] = None, False
    return opt


ORIGINAL_OPTIMIZER = trainer_mod.adamw


@contextlib.contextmanager
def instrumented(clock: Clock, fused: bool):
    """Time the engine's own calls: backward and clipping (patched on torch), the optimizer
    (its step and zero_grad), for the duration of one fit."""
    make = ORIGINAL_OPTIMIZER if fused else before_optimizer

    def optimizer(params, lr, weight_decay):
        opt = make(params, lr, weight_decay)
        started = []  # step hooks, not a wrapper: the LR scheduler patches opt.step itself
        opt.register_step_pre_hook(lambda *_: started.append(time.process_time()))
        opt.register_step_post_hook(lambda *_: clock.add("optimizer", time.process_time() - started.pop()))
        opt.zero_grad = clock.wrap("optimizer", opt.zero_grad)
        return opt

    backward, clip = torch.Tensor.backward, torch.nn.utils.clip_grad_norm_
    trainer_mod.adamw = optimizer
    torch.Tensor.backward = clock.wrap("backward", backward)
    torch.nn.utils.clip_grad_norm_ = clock.wrap("clip_grad", clip)
    try:
        yield
    finally:
        trainer_mod.adamw, torch.Tensor.backward, torch.nn.utils.clip_grad_norm_ = ORIGINAL_OPTIMIZER, backward, clip


class RecordingCollator:
    """The loader's collator, timed, recording each batch's row lengths and padded length."""

    def __init__(self, collate, clock: Clock):
        self.collate, self.clock, self.batches = collate, clock, []

    def __call__(self, rows):
        start = time.process_time()
        batch = self.collate(rows)
        self.clock.add("data_padding", time.process_time() - start)
        self.batches.append((batch["attention_mask"].sum(1).tolist(), batch["input_ids"].shape[1]))
        return batch


def run_epoch(arm: dict, ctx: dict) -> dict:
    """One KD epoch of a fresh copy of the student through Distiller.fit, instrumented."""
    torch.set_num_threads(arm["threads"])
    clock = Clock()
    loader = make_loader(ctx["data"], ctx["tokenizer"], BATCH, shuffle=True, seed=0,
                         group_by_length=arm["grouped"])
    recorder = RecordingCollator(loader.collate_fn, clock)
    loader.collate_fn = recorder
    teacher = Teacher("teacher", ctx["teacher"], fingerprint="bench-teacher")
    distiller = Distiller(copy.deepcopy(ctx["student"]), "kd", SingleTeacher(teacher), progress=False,
                          checkpoint=False, restore_best=False, teacher_cache=ctx["cache"], method_options=KD_OPTIONS)
    distiller.train_step = clock.wrap("step", distiller.train_step)
    distiller.policy.features = clock.wrap("teacher_logits", distiller.policy.features)
    distiller.method.student_forward = clock.wrap("forward", distiller.method.student_forward)
    distiller.method.losses = clock.wrap("forward", distiller.method.losses)
    with instrumented(clock, arm["fused"]):
        start, cpu_start = time.perf_counter(), time.process_time()
        result = distiller.fit([Stage("task", loader, epochs=1, lr=LR, data_id=ctx["data_id"])])
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    geometry = ctx["geometry"]
    executed = useful = 0.0
    for lengths, padded in recorder.batches:
        e, u = step_flops(lengths, padded, *geometry)
        executed, useful = executed + e, useful + u
    real = sum(sum(lengths) for lengths, _ in recorder.batches)
    padded_tokens = sum(len(lengths) * padded for lengths, padded in recorder.batches)
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "steps": result.steps, "parts": clock.seconds, "useful_flops": useful,
            "executed_flops": executed, "real_tokens": real, "padded_tokens": padded_tokens}


ARMS = {
    "adamw_loop": {"fused": False, "grouped": False, "threads": 1},   # the engine before this change
    "fused": {"fused": True, "grouped": False, "threads": 1},         # the engine's default now
    "fused_grouped": {"fused": True, "grouped": True, "threads": 1},  # + DistillConfig(group_by_length=True)
}
TWO_THREADS = {"fused_2_threads": {"fused": True, "grouped": False, "threads": 2}}
PARTS = ("forward", "backward", "clip_grad", "optimizer", "data_padding", "teacher_logits")


def summarise(runs: list[dict], gemm: float, gemm_wall: float) -> dict:
    med = lambda xs: statistics.median(xs)  # noqa: E731
    seconds = med([r["seconds"] for r in runs])
    cpu_seconds = med([r["cpu_seconds"] for r in runs])
    steps = runs[0]["steps"]
    parts_ms = {p: 1000 * med([r["parts"].get(p, 0.0) for r in runs]) / steps for p in PARTS}
    step_ms = 1000 * med([r["parts"]["step"] for r in runs]) / steps
    parts_ms["other"] = 1000 * cpu_seconds / steps - sum(parts_ms.values())
    useful_rate = runs[0]["useful_flops"] / cpu_seconds
    return {"epoch_seconds": seconds, "epoch_seconds_all": [r["seconds"] for r in runs],
            "epoch_cpu_seconds": cpu_seconds, "epoch_cpu_seconds_all": [r["cpu_seconds"] for r in runs], "steps": steps,
            "step_cpu_ms": 1000 * cpu_seconds / steps, "step_wall_ms": 1000 * seconds / steps,
            "train_step_call_cpu_ms": step_ms, "step_breakdown_cpu_ms": parts_ms,
            "useful_gflops_per_cpu_s": useful_rate / 1e9, "fraction_of_gemm": useful_rate / gemm,
            "executed_fraction_of_gemm": runs[0]["executed_flops"] / cpu_seconds / gemm,
            "fraction_of_gemm_wall": runs[0]["useful_flops"] / seconds / gemm_wall,
            "token_fill": runs[0]["real_tokens"] / runs[0]["padded_tokens"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="320 training rows, 2 rounds (a smoke run)")
    ap.add_argument("--rows", type=int, default=500, help="rows per train/val half (default 500: the quick preset)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every arm (default 3)")
    ap.add_argument("--two-threads", action="store_true", help="also an arm at 2 threads (meaningless on a busy box)")
    args = ap.parse_args()
    rows, rounds = (160, 2) if args.quick else (max(16, args.rows), max(1, args.rounds))
    torch.set_num_threads(1)

    task = load_task("rotten_tomatoes").subsample(rows, 64, seed=0)
    tokenizer = load_tokenizer("minilm-l6")
    data = tokenize_split(task.split("train_full"), tokenizer, MAX_LEN)
    student = load_classifier("minilm-l6", num_labels=2, layers=2, seed=0)
    teacher = load_classifier("minilm-l6", num_labels=2, layers=1, seed=1)  # logits come from the cache
    config = student.config
    geometry = (config.num_hidden_layers, config.hidden_size, config.num_labels)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = {"data": data, "tokenizer": tokenizer, "student": student, "teacher": teacher,
               "cache": TeacherOutputCache(tmp), "data_id": "bench-train", "geometry": geometry}
        Teacher("teacher", teacher, "bench-teacher").prepare(make_loader(data, tokenizer, BATCH, False),
                                                             ctx["data_id"], ctx["cache"], progress=False)
        probe = next(iter(make_loader(data, tokenizer, BATCH, shuffle=True, seed=0)))
        lengths, padded = probe["attention_mask"].sum(1).tolist(), probe["input_ids"].shape[1]
        flop_check = {"analytic_executed": step_flops(lengths, padded, *geometry)[0],
                      "flop_counter": counted_flops(student, probe)}

        arm_specs = {**ARMS, **(TWO_THREADS if args.two_threads else {})}
        runs: dict[str, list[dict]] = {name: [] for name in arm_specs}
        gemm_runs, gemm_wall_runs = [gemm_rate()], [gemm_rate(time.perf_counter)]
        names = list(arm_specs)
        for r in range(rounds):
            order = names if r % 2 == 0 else names[::-1]
            for name in order:
                runs[name].append(run_epoch(arm_specs[name], ctx))
                print(f"round {r + 1}/{rounds} {name}: {runs[name][-1]['seconds']:.1f}s", flush=True)
            torch.set_num_threads(1)
            gemm_runs.append(gemm_rate())
            gemm_wall_runs.append(gemm_rate(time.perf_counter))
            setup = {"task": "rotten_tomatoes", "train_rows": len(data), "batch_size": BATCH, "max_length": MAX_LEN,
                     "student": "minilm-l6, 2 layers", "method": "kd", "method_options": KD_OPTIONS,
                     "teacher_logits": "cached", "threads": 1, "rounds": r + 1, "quick": args.quick}
            report(runs, gemm_runs, gemm_wall_runs, flop_check, setup)  # after every round: a busy box may stop us


def report(runs: dict, gemm_runs: list, gemm_wall_runs: list, flop_check: dict, setup: dict) -> None:
    gemm = statistics.median(g["best"] for g in gemm_runs)
    gemm_wall = statistics.median(g["best"] for g in gemm_wall_runs)
    arms = {name: summarise(rs, gemm, gemm_wall) for name, rs in runs.items()}
    base, fused = arms["adamw_loop"], arms["fused"]
    paired = lambda a, b, key="cpu_seconds": statistics.median(  # noqa: E731
        x[key] / y[key] for x, y in zip(runs[a], runs[b]))
    result = {
        "fraction_of_gemm": fused["fraction_of_gemm"],
        "fraction_of_gemm_wall": fused["fraction_of_gemm_wall"],
        "gemm_gflops_per_cpu_s": gemm / 1e9, "gemm_gflops_per_wall_s": gemm_wall / 1e9,
        "gemm_runs_gflops": [{k: v / 1e9 for k, v in g.items()} for g in gemm_runs],
        "step_cpu_ms": fused["step_cpu_ms"], "step_breakdown_cpu_ms": fused["step_breakdown_cpu_ms"],
        "ratios": {  # epoch CPU time, median of per-round ratios (arms interleaved)
            "fused_over_adamw_loop": paired("fused", "adamw_loop"),
            "grouped_over_dynamic_padding": paired("fused_grouped", "fused"),
            "all_over_before": paired("fused_grouped", "adamw_loop"),
        },
        "ratios_wall": {"fused_over_adamw_loop": paired("fused", "adamw_loop", "seconds"),
                        "grouped_over_dynamic_padding": paired("fused_grouped", "fused", "seconds"),
                        "all_over_before": paired("fused_grouped", "adamw_loop", "seconds")},
        "optimizer_cpu_ms_per_step": {"adamw_loop": base["step_breakdown_cpu_ms"]["optimizer"],
                                      "fused": fused["step_breakdown_cpu_ms"]["optimizer"]},
        "arms": arms, "flop_check": flop_check,
        "setup": {**setup, "fraction_of_gemm": "model matmul FLOPs (fwd+bwd, real tokens) per CPU second of a "
                  "'fused' epoch / best fp32 torch.mm FLOP/s per CPU second, both at one thread (CPU time: the "
                  "machine is shared; *_wall: the same on wall-clock time)"},
    }
    if "fused_2_threads" in runs:
        result["ratios_wall"]["two_threads_over_one"] = paired("fused_2_threads", "fused", "seconds")
    path = write_result("student_step", result)
    print(f"fp32 GEMM {gemm / 1e9:.1f} GFLOP/s; student epoch {fused['useful_gflops_per_cpu_s']:.1f} GFLOP/s "
          f"-> fraction_of_gemm {fused['fraction_of_gemm']:.3f}")
    print(f"step (fused) {fused['step_cpu_ms']:.0f} CPU ms: "
          + ", ".join(f"{k} {v:.1f}" for k, v in fused["step_breakdown_cpu_ms"].items()))
    print("ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in result["ratios"].items()))
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
