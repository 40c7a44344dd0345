"""Measured peak memory per rank under DeepSpeed ZeRO 0/1/2/3 (+ offload) vs the memory planner.

One ``torchrun --nproc_per_node N`` launch of this file (``--worker``) runs the layouts one after
another; before each, memory is trimmed back to the OS and the kernel's peak-RSS counter is reset
(``/proc/self/clear_refs``), so each layout's peak is its own: a few KD steps of the real engine (``Distiller`` with a DeepSpeed
config) on synthetic batches, teacher = all-MiniLM-L6-v2 (6 layers, alias ``minilm-l6``, real
weights), student = its first 2 layers (the ladder team's student), fp32, micro-batch 8 per
rank, 128 tokens. Measured per rank:

* CPU: peak RSS (``VmHWM``) minus the RSS just before the layout's models are built (after
  imports and process-group setup) -- the training state the planner predicts (it leaves the
  runtime out);
* CUDA: ``torch.cuda.max_memory_allocated`` (the planner's "max allocated").

The planner's prediction is :func:`autoskd.planner.predict_memory` for the same layout;
``planner_rel_error`` is the median over layouts of |predicted - measured| / measured (mean
over ranks). Writes benchmarks/results/zero_cpu.json (CUDA: zero_cuda.json) and a plot.

    python benchmarks/zero_cpu.py                        # 2 CPU processes, gloo
    python benchmarks/zero_cpu.py --device cuda --teacher-size 1B --nproc 1 --micro-batch 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYOUTS = {
    "zero0": {"stage": 0},
    "zero1": {"stage": 1},
    "zero2": {"stage": 2},
    "zero3": {"stage": 3},
    "zero2+offload": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
    "zero3+offload": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}},
}
OFFLOAD = {"zero2+offload": "optimizer", "zero3+offload": "optimizer+params"}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak() -> int:
    """Give freed memory back to the OS, reset the peak-RSS counter; the RSS now (the baseline)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_bytes()


def teacher_source(args, tmp: Path) -> str:
    """``minilm-l6`` or, for ``--teacher-size``, a BERT config of that table-8 size saved to ``tmp``."""
    if not args.teacher_size:
        return "minilm-l6"
    from transformers import BertConfig

    from autoskd.planner import table8_shape

    shape = table8_shape(args.teacher_size)
    config = BertConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                        num_attention_heads=shape.heads, intermediate_size=shape.ffn,
                        max_position_embeddings=shape.max_positions, num_labels=2)
    path = tmp / f"bert-{args.teacher_size}"
    config.save_pretrained(path)
    return str(path)


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    from autoskd.engine.deepspeed_backend import init_distributed
    from autoskd.engine.trainer import Distiller, Stage
    import autoskd.methods  # noqa: F401  (registers the built-in methods the runs name)

    torch.set_num_threads(1)
    init_distributed()
    import deepspeed  # noqa: F401 - imported before the baseline, like torch

    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for layout in args.layouts.split(","):
        results[layout] = one_layout(args, layout, rank, world)
    records = [None] * world
    dist.all_gather_object(records, results)
    if rank == 0:
        Path(args.worker_out).write_text(json.dumps(records))
    dist.barrier()
    dist.destroy_process_group()


def one_layout(args, layout: str, rank: int, world: int) -> dict:
    import torch
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    from autoskd.engine.trainer import Distiller, Stage
    import autoskd.methods  # noqa: F401  (registers the built-in methods the runs name)

    cuda = args.device == "cuda"
    dist.barrier()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = reset_peak()
    teacher, student = build_models(args)
    g = torch.Generator().manual_seed(0)
    n = args.micro_batch * world * args.steps
    rows = [{"input_ids": torch.randint(1000, 20000, (args.seq_len,), generator=g),
             "attention_mask": torch.ones(args.seq_len, dtype=torch.long), "labels": torch.tensor(i % 2),
             "idx": torch.tensor(i)} for i in range(n)]
    loader = DataLoader(rows, batch_size=args.micro_batch * world, shuffle=False)
    config = {"zero_optimization": LAYOUTS[layout], "optimizer": {"type": "AdamW", "params": {
        "lr": "auto", "weight_decay": "auto", "torch_adam": True}}}
    if args.precision != "fp32":
        config[args.precision] = {"enabled": True}
    start = time.perf_counter()
    distiller = Distiller(student, "kd", teacher, deepspeed=config, progress=False, restore_best=False,
                          checkpoint=False)
    distiller.fit([Stage("task", loader, epochs=1, lr=1e-4, warmup_ratio=0.0)])
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()) - baseline
    del distiller, teacher, student
    return {"rank": rank, "peak_bytes": int(peak), "baseline_bytes": baseline, "seconds": round(seconds, 2)}


def build_models(args):
    import torch

    from autoskd.models.loading import load_classifier

    init = "random" if args.teacher_size else "pretrained"
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    teacher = load_classifier(args.teacher, num_labels=2, init=init, seed=1).to(device)
    student = load_classifier(args.teacher, num_labels=2, layers=args.student_layers, init=init, seed=2)
    return teacher, student


def predict(args, layout: str) -> dict:
    from autoskd.planner import predict_memory

    stage = LAYOUTS[layout]["stage"]
    est = predict_memory(args.teacher, args.teacher, student_layers=args.student_layers, zero=stage,
                         offload=OFFLOAD.get(layout, "none"), dp=args.nproc, micro_batch=args.micro_batch,
                         seq_len=args.seq_len, precision=args.precision, device=args.device, features="classifier")
    return est.to_dict()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--nproc", type=int, default=2, help="processes (CPU ranks or GPUs)")
    p.add_argument("--teacher-size", help="a table-8 size (e.g. 1B) built as a random-init BERT instead of MiniLM")
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="comma list of " + ", ".join(LAYOUTS))
    p.add_argument("--out", help="result JSON (default benchmarks/results/zero_<device>.json)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--teacher", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    from autoskd.engine.deepspeed_backend import _free_port

    tmp = Path(tempfile.mkdtemp(prefix="zero-bench-"))
    args.teacher = teacher_source(args, tmp)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if args.device == "cpu":
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    rows = []
    out = tmp / "measured.json"
    cmd = [sys.executable, "-W", "ignore", "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
           "--master_port", str(_free_port()), __file__, "--worker", "--layouts", args.layouts, "--teacher", args.teacher,
           "--worker-out", str(out), "--device", args.device, "--student-layers", str(args.student_layers),
           "--micro-batch", str(args.micro_batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
           "--precision", args.precision] + (["--teacher-size", args.teacher_size] if args.teacher_size else [])
    print(f"launching {args.nproc} processes for {args.layouts}", flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit("the measurement run failed")
    per_rank = json.loads(out.read_text())
    for layout in args.layouts.split(","):
        ranks = [r[layout] for r in per_rank]
        measured = statistics.mean(r["peak_bytes"] for r in ranks)
        pred = predict(args, layout)
        rel = abs(pred["peak_bytes"] - measured) / measured
        rows.append({"layout": layout, "measured_peak_bytes_per_rank": [r["peak_bytes"] for r in ranks],
                     "measured_peak_mib": round(measured / 2 ** 20, 1), "predicted_peak_mib": round(pred["peak_bytes"] / 2 ** 20, 1),
                     "rel_error": round(rel, 4), "seconds": max(r["seconds"] for r in ranks), "prediction": pred})
        print(f"[{layout}] measured {measured / 2**20:8.1f} MiB/rank  planner {pred['peak_bytes'] / 2**20:8.1f} MiB  "
              f"rel.err {rel:.3f}", flush=True)
    result = {"device": args.device, "processes": args.nproc, "teacher": args.teacher_size or "minilm-l6",
              "student_layers": args.student_layers, "micro_batch_per_rank": args.micro_batch, "seq_len": args.seq_len,
              "precision": args.precision, "steps": args.steps, "method": "kd",
              "measure": "peak RSS minus pre-model RSS" if args.device == "cpu" else "torch.cuda.max_memory_allocated",
              "planner_rel_error": round(statistics.median(r["rel_error"] for r in rows), 4), "layouts": rows}
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"zero_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(rows, out.with_suffix(".png"), result)
    print(f"planner_rel_error (median) = {result['planner_rel_error']}; wrote {out}")


def plot(rows: list[dict], path: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["layout"] for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([i - 0.2 for i in x], [r["measured_peak_mib"] for r in rows], 0.4, label="measured")
    ax.bar([i + 0.2 for i in x], [r["predicted_peak_mib"] for r in rows], 0.4, label="planner")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("peak MiB per rank")
    ax.set_title(f"ZeRO on {result['processes']} {result['device']} ranks: {result['teacher']} -> "
                 f"{result['student_layers']}-layer student")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
