"""The planner on decoder LMs: predicted vs measured peak memory per rank, and two real plans.

Measured: one ``torchrun --nproc_per_node 2`` launch of this file (``--worker``, gloo,
``DS_ACCELERATOR=cpu``, one thread per rank) runs every point of ``POINTS`` one after another:
a few next-token KD steps (``kd``, forward KL over the vocabulary) of the real engine
(``Distiller`` + ``LMTeacher`` + DeepSpeed) from a random-init Llama-shaped teacher (grouped KV
heads, gated MLP, RMSNorm, tied or untied embeddings) into a smaller Llama student, fp32,
under ZeRO 0/2/3 (+ offload), with a live teacher or a top-k teacher cache. Before each point
memory is trimmed back to the OS and the kernel's peak-RSS counter reset
(``/proc/self/clear_refs``); the measured peak of a rank is its peak RSS (``VmHWM``) minus the
RSS just before the point's models are built, read at the end of the training epoch: the
training state the planner predicts. ``measured_run_peak_mib`` also covers what comes after
(under ZeRO-3 the backend gathers the trained student and the teacher back into plain modules).

The workers run with ``MALLOC_MMAP_THRESHOLD_=131072``: glibc then maps every block of more
than 128 KiB and returns it on free, so the peak RSS is the peak of live tensors, the quantity
a GPU's ``max_memory_allocated`` reports. With glibc's default the threshold rises after large
frees and freed blocks stay in the heap, which makes the RSS depend on the order of frees
rather than on what the step holds (``--malloc default`` measures that way).

ZeRO-3 points build both models under ``deepspeed.zero.Init`` (partitioned as they are made),
as a model too large for one rank must be; ``zero3-built-whole`` builds them whole first, as
``Distiller`` users do with small models, to show what that costs.

Predicted: :func:`autoskd.planner.predict_memory` for the same layout (``features="lm-logits"``,
``device="cpu"``, ``allocator="mmap"``). ``rel_error_median`` is the median over points of
|predicted - measured| / measured (mean over the ranks). Planned: 70B => 7B and 8B => 1B on
8 x 80 GB (``autoskd plan``'s search), and whether each fits with a live teacher or a top-k cache.

    python benchmarks/lm_planner.py              # ~10 min on 2 CPU cores
    python benchmarks/lm_planner.py --quick      # 3 points, a smoke test
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

#: Llama-shaped models (planner spec strings; the worker builds the same LlamaConfig).
MODELS = {
    "t-untied": "layers=4,hidden=512,heads=8,kv_heads=2,ffn=1408,vocab=32000,tied=0",
    "s-tied": "layers=2,hidden=256,heads=4,kv_heads=2,ffn=704,vocab=32000,tied=1",
    "t-deep": "layers=8,hidden=384,heads=6,kv_heads=2,ffn=1024,vocab=16000,tied=1",
    "s-small": "layers=2,hidden=192,heads=3,kv_heads=1,ffn=512,vocab=16000,tied=1",
    "t-wide": "layers=6,hidden=1024,heads=16,kv_heads=4,ffn=2816,vocab=8000,tied=0",
    "s-mini": "layers=2,hidden=256,heads=4,kv_heads=2,ffn=704,vocab=8000,tied=1",
}
ZERO = {
    "zero0": {"stage": 0},
    "zero2": {"stage": 2},
    "zero2+offload": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
    "zero3": {"stage": 3},
    "zero3+offload": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}},
    # at most 2e7 parameters gathered at once (DeepSpeed's default 1e9 gathers these teachers whole)
    "zero3 live2e7": {"stage": 3, "stage3_max_live_parameters": 20_000_000},
}
OFFLOAD = {"zero2+offload": "optimizer", "zero3+offload": "optimizer+params"}


def _point(name, teacher, student, zero, b=4, s=128, top_k=0, init=True, ce=False):
    return {"name": name, "teacher": teacher, "student": student, "zero": zero, "micro_batch": b, "seq_len": s,
            "top_k": top_k, "zero_init": init, "lm_ce": ce}


POINTS = [
    _point("A zero0", "t-untied", "s-tied", "zero0"),
    _point("A zero2", "t-untied", "s-tied", "zero2"),
    _point("A zero3", "t-untied", "s-tied", "zero3"),
    _point("A zero3-built-whole", "t-untied", "s-tied", "zero3", init=False),
    _point("A zero2+offload", "t-untied", "s-tied", "zero2+offload"),
    _point("A zero3+offload", "t-untied", "s-tied", "zero3+offload"),
    _point("A zero0 topk64", "t-untied", "s-tied", "zero0", top_k=64),
    _point("A zero0 b8 +ce", "t-untied", "s-tied", "zero0", b=8, ce=True),
    _point("B zero0", "t-deep", "s-small", "zero0", b=8, s=256),
    _point("B zero2", "t-deep", "s-small", "zero2", b=8, s=256),
    _point("B zero3", "t-deep", "s-small", "zero3", b=8, s=256),
    _point("B zero3+offload", "t-deep", "s-small", "zero3+offload", b=8, s=256),
    # C: the teacher's weights set the peak (short rows, a small vocabulary)
    _point("C zero0", "t-wide", "s-mini", "zero0", b=2, s=64),
    _point("C zero3", "t-wide", "s-mini", "zero3", b=2, s=64),
    _point("C zero3+offload", "t-wide", "s-mini", "zero3+offload", b=2, s=64),
    _point("C zero3 live2e7", "t-wide", "s-mini", "zero3 live2e7", b=2, s=64),
]
QUICK = ["A zero0", "A zero3", "A zero0 topk64"]
WARMUP = _point("warm-up", "s-small", "s-small", "zero0", b=2, s=32)


# ---------------------------------------------------------------------------------------- measuring
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


def llama(spec: str, seed: int, meta: bool = False):
    """A random-init ``LlamaForCausalLM`` of a planner spec string (the same numbers); ``meta``:
    weightless, for the shape of a teacher that is never loaded."""
    import contextlib

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    v = {k: int(x) for k, x in (p.split("=") for p in spec.split(","))}
    torch.manual_seed(seed)
    with torch.device("meta") if meta else contextlib.nullcontext():
        return LlamaForCausalLM(LlamaConfig(vocab_size=v["vocab"], hidden_size=v["hidden"], intermediate_size=v["ffn"],
                                        num_hidden_layers=v["layers"], num_attention_heads=v["heads"],
                                        num_key_value_heads=v["kv_heads"], max_position_embeddings=1024,
                                        tie_word_embeddings=bool(v["tied"])))


def lm_rows(n: int, seq_len: int, vocab: int):
    import torch

    from autoskd.lm.data import LMRows

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (n, seq_len + 1), generator=g)
    return LMRows(ids[:, :-1].contiguous(), torch.ones(n, seq_len, dtype=torch.long), ids[:, 1:].contiguous())


def ds_config(point: dict) -> dict:
    return {"zero_optimization": dict(ZERO[point["zero"]]),
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}}}


def build(point: dict, world: int):
    """Teacher and student; ZeRO-3 points partitioned as they are built (``zero.Init``)."""
    import contextlib

    teacher_spec, student_spec = MODELS[point["teacher"]], MODELS[point["student"]]
    context = contextlib.nullcontext()
    if point["zero"].startswith("zero3") and point["zero_init"]:
        import deepspeed

        cfg = ds_config(point)
        cfg["train_micro_batch_size_per_gpu"] = point["micro_batch"]
        context = deepspeed.zero.Init(config_dict_or_path=cfg)
    with context:
        teacher = None if point["top_k"] else llama(teacher_spec, 1)
        student = llama(student_spec, 2)
    return teacher, student


def fill_topk_cache(point: dict, cache_dir: Path, rows) -> dict:
    """The top-k cache build: the teacher alone over this rank's rows (measured as its own phase)."""
    from autoskd.lm.data import make_lm_loader
    from autoskd.lm.topk_cache import TopKCache

    teacher = llama(MODELS[point["teacher"]], 1).eval()
    cache = TopKCache(cache_dir)
    cache.get_or_compute("bench-teacher", "bench-data", teacher, make_lm_loader(rows, point["micro_batch"], False),
                         point["top_k"], progress=False)
    del teacher


def steps_peak_callback():
    """A callback reading the peak RSS at the end of the training epoch: before the backend
    hands back plain modules (under ZeRO-3 it gathers every weight again then), i.e. what
    training itself needed."""
    from autoskd.engine.callbacks import Callback

    class StepsPeak(Callback):
        peak = 0

        def on_epoch_end(self, trainer, ctx, metrics) -> None:
            self.peak = peak_rss_bytes()

    return StepsPeak()


def one_point(point: dict, rank: int, world: int, cache_dir: Path) -> dict:
    import torch
    import torch.distributed as dist

    from autoskd.engine.teachers import SingleTeacher
    from autoskd.engine.trainer import Distiller, Stage
    from autoskd.lm.data import make_lm_loader
    from autoskd.lm.recipes import decoder_method, lm_temperatures
    from autoskd.lm.teachers import LMTeacher
    from autoskd.lm.topk_cache import TopKCache
    from autoskd.models.lazy import LazyModel

    b, s = point["micro_batch"], point["seq_len"]
    vocab = int(MODELS[point["student"]].split("vocab=")[1].split(",")[0])
    rows = lm_rows(b * world * 3, s, vocab)
    out = {"rank": rank}
    dist.barrier()
    if point["top_k"]:
        base = reset_peak()
        fill_topk_cache(point, cache_dir / f"rank{rank}", rows)
        out["cache_build_peak_bytes"] = peak_rss_bytes() - base
    dist.barrier()
    base = reset_peak()
    teacher, student = build(point, world)
    method = decoder_method("kd", **({"alpha": 0.5} if point["lm_ce"] else {}))
    temps = lm_temperatures(method)
    if point["top_k"]:  # a teacher that is loaded only on a cache miss (never, here)
        lazy = LazyModel(lambda: llama(MODELS[point["teacher"]], 1), lambda: llama(MODELS[point["teacher"]], 1, True))
        t = LMTeacher("t", lazy, "bench-teacher", top_k=point["top_k"], temperatures=temps,
                      cache=TopKCache(cache_dir / f"rank{rank}"))
    else:
        t = LMTeacher("t", teacher, "bench-teacher", top_k=0, temperatures=temps)
    start = time.perf_counter()
    steps_peak = steps_peak_callback()
    distiller = Distiller(student, method, SingleTeacher(t), deepspeed=ds_config(point), progress=False,
                          restore_best=False, checkpoint=False, device="cpu", callbacks=[steps_peak])
    data_id = "bench-data" if point["top_k"] else None
    distiller.fit([Stage("task", make_lm_loader(rows, b * world, shuffle=False), epochs=1, lr=1e-4,
                         warmup_ratio=0.0, data_id=data_id)])
    out["seconds"] = round(time.perf_counter() - start, 2)
    out["train_peak_bytes"] = steps_peak.peak - base
    out["run_peak_bytes"] = peak_rss_bytes() - base  # + leaving plain modules behind (ZeRO-3 unshard)
    out["teacher_loaded"] = bool(t.loaded)
    out["peak_bytes"] = max(out["train_peak_bytes"], out.get("cache_build_peak_bytes", 0))
    del distiller, t, teacher, student
    torch.distributed.barrier()
    return out


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from autoskd.engine.deepspeed_backend import init_distributed

    torch.set_num_threads(1)
    init_distributed()
    import deepspeed  # noqa: F401 - imported before the baselines, like torch

    rank, world = dist.get_rank(), dist.get_world_size()
    points = {p["name"]: p for p in POINTS}
    cache_dir = Path(args.worker_out).parent / "topk"
    one_point(WARMUP, rank, world, cache_dir)  # lazily loaded kernels and DeepSpeed ops: not a point's cost
    results = {}
    for name in args.points.split(";"):
        results[name] = one_point(points[name], rank, world, cache_dir)
        if rank == 0:
            print(f"[{name}] {results[name]}", flush=True)
    records = [None] * world
    dist.all_gather_object(records, results)
    if rank == 0:
        Path(args.worker_out).write_text(json.dumps(records))
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------- predicting
def predict(point: dict, world: int) -> dict:
    from autoskd.planner import predict_memory

    from autoskd.planner import Layout, estimate, resolve_shape

    zero = ZERO[point["zero"]]
    layout = Layout(dp=world, zero=zero["stage"], offload=OFFLOAD.get(point["zero"], "none"),
                    micro_batch=point["micro_batch"], seq_len=point["seq_len"], precision="fp32",
                    checkpointing=False, top_k=point["top_k"],
                    max_live=zero.get("stage3_max_live_parameters", 1_000_000_000))
    est = estimate(resolve_shape(MODELS[point["teacher"]]), resolve_shape(MODELS[point["student"]]), layout,
                   features="lm-logits", device="cpu", allocator="mmap", lm_ce=point["lm_ce"])
    return {**est.to_dict(), "cache_build_peak_bytes": int(est.phases.get("top-k cache build", 0))}


PAIRS = {"70B=>7B": ("llama3-70b", "llama2-7b"), "8B=>1B": ("llama3-8b", "llama3.2-1b")}


def plans(seq_len: int = 2048) -> dict:
    """``autoskd plan`` for each pair on 8 x 80 GB: best layout with a live teacher and with a
    top-k cache, and how many layouts of each fit."""
    from autoskd.planner import plan_layouts

    out = {}
    for pair, (teacher, student) in PAIRS.items():
        entry = {"teacher": teacher, "student": student, "gpus": 8, "gpu_memory_gib": 80, "seq_len": seq_len,
                 "precision": "bf16"}
        for mode, top_k in (("live", 0), ("topk64", 64)):
            plan = plan_layouts(teacher, student, gpus=8, gpu_memory="80GB", seq_lens=(seq_len,),
                                precisions=("bf16",), micro_batches=(1, 2, 4), features="lm-logits",
                                top_ks=(top_k,))
            best = plan.best
            # MP1: the student ZeRO data-parallel over all 8 (autoskd's --tensor-parallel splits the teacher only)
            zero_only = next((c for c in plan.fitting if c.estimate.layout.mp == 1), None)
            entry[mode] = {"fits": best is not None, "layout": best.estimate.layout.label() if best else None,
                           "peak_gib": round(best.estimate.peak_gib, 2) if best else None,
                           "peak_phase": best.estimate.phase if best else None,
                           "best_mp1_layout": zero_only.estimate.layout.label() if zero_only else None,
                           "best_mp1_peak_gib": round(zero_only.estimate.peak_gib, 2) if zero_only else None,
                           "fitting_layouts": len(plan.fitting), "rejected_layouts": len(plan.rejected),
                           "smallest_rejected": plan.rejected[0].reason if plan.rejected else None}
        entry["fits"] = entry["live"]["fits"] or entry["topk64"]["fits"]
        entry["layout"] = entry["live"]["layout"] or entry["topk64"]["layout"]
        out[pair] = entry
    return out


# ---------------------------------------------------------------------------------------- main
def measure(names: list[str], world: int = 2) -> list[dict]:
    """Every point on ``world`` CPU ranks under torchrun; one ``{point: record}`` per rank."""
    from autoskd.engine.deepspeed_backend import _free_port

    tmp = Path(tempfile.mkdtemp(prefix="lm-planner-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu",
           "CUDA_VISIBLE_DEVICES": ""}
    if MALLOC == "mmap":
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    measured_file = tmp / "measured.json"
    cmd = [sys.executable, "-W", "ignore", "-m", "torch.distributed.run", "--nproc_per_node", str(world),
           "--master_port", str(_free_port()), __file__, "--worker", "--points", ";".join(names),
           "--worker-out", str(measured_file)]
    print(f"launching {world} processes for {len(names)} points", flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit("the measurement run failed")
    return json.loads(measured_file.read_text())


MALLOC = "mmap"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    p.add_argument("--points", help="';'-separated point names (default: all)")
    p.add_argument("--malloc", choices=["mmap", "default"], default="mmap",
                   help="glibc setting of the workers (module docstring)")
    p.add_argument("--out", help="result JSON (default benchmarks/results/lm_planner.json)")
    p.add_argument("--replan", metavar="JSON", help="reuse the measurements of an earlier result JSON; predict and "
                                                     "plan again (after a planner change)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    global MALLOC
    MALLOC = args.malloc
    names = args.points.split(";") if args.points else (QUICK if args.quick else [q["name"] for q in POINTS])
    points = {q["name"]: q for q in POINTS}
    unknown = [n for n in names if n not in points]
    if unknown:
        raise SystemExit(f"unknown point(s) {unknown}; choose from {list(points)}")
    start = time.perf_counter()
    if args.replan:  # the measurements of an earlier run, the planner's predictions anew
        saved = json.loads(Path(args.replan).read_text())
        per_rank = saved["measured_per_rank"] if isinstance(saved, dict) else saved  # result JSON or raw records
        names = [n for n in names if n in per_rank[0]]
    else:
        per_rank = measure(names)
    world = len(per_rank)
    rows = []
    for name in names:
        point = points[name]
        ranks = [r[name] for r in per_rank]
        measured = statistics.mean(r["peak_bytes"] for r in ranks)
        pred = predict(point, world)
        rel = abs(pred["peak_bytes"] - measured) / measured
        rows.append({"point": name, **{k: point[k] for k in ("zero", "micro_batch", "seq_len", "top_k", "zero_init",
                                                           "lm_ce")},
                     "teacher": MODELS[point["teacher"]], "student": MODELS[point["student"]],
                     "measured_peak_mib_per_rank": [round(r["peak_bytes"] / 2**20, 1) for r in ranks],
                     "measured_peak_mib": round(measured / 2**20, 1),
                     "measured_run_peak_mib": round(statistics.mean(r["run_peak_bytes"] for r in ranks) / 2**20, 1),
                     "predicted_peak_mib": round(pred["peak_bytes"] / 2**20, 1), "rel_error": round(rel, 4),
                     "predicted_phase": pred["peak_phase"], "seconds": max(r["seconds"] for r in ranks),
                     "teacher_loaded": any(r["teacher_loaded"] for r in ranks),
                     **({"measured_cache_build_mib": round(statistics.mean(r["cache_build_peak_bytes"]
                                                                           for r in ranks) / 2**20, 1),
                         "predicted_cache_build_mib": round(pred["cache_build_peak_bytes"] / 2**20, 1)}
                        if point["top_k"] else {}),
                     "prediction": pred})
        print(f"[{name}] measured {measured / 2**20:8.1f} MiB/rank  planner {pred['peak_bytes'] / 2**20:8.1f} MiB  "
              f"rel.err {rel:.3f}  ({pred['peak_phase']})", flush=True)
    by_name = {r["point"]: r for r in rows}
    zero3_vs_zero0 = {}
    for cfg in ("A", "B", "C"):
        z0, z3 = by_name.get(f"{cfg} zero0"), by_name.get(f"{cfg} zero3")
        if z0 and z3:
            zero3_vs_zero0[cfg] = {
                "zero0_measured_mib": z0["measured_peak_mib"], "zero3_measured_mib": z3["measured_peak_mib"],
                "zero0_predicted_mib": z0["predicted_peak_mib"], "zero3_predicted_mib": z3["predicted_peak_mib"],
                "measured_ratio": round(z3["measured_peak_mib"] / z0["measured_peak_mib"], 3),
                "predicted_ratio": round(z3["predicted_peak_mib"] / z0["predicted_peak_mib"], 3)}
            whole = by_name.get(f"{cfg} zero3-built-whole")
            if whole:
                zero3_vs_zero0[cfg]["zero3_built_whole_measured_mib"] = whole["measured_peak_mib"]
    from benchmarks._common import write_result

    result = {"processes": world, "device": "cpu", "precision": "fp32", "method": "kd (forward KL over the vocabulary)",
              "malloc": args.malloc, "measure": "peak RSS (VmHWM) minus pre-model RSS, mean over ranks",
              "target": "rel_error_median <= 0.15",
              "rel_error_median": round(statistics.median(r["rel_error"] for r in rows), 4),
              "rel_error_max": round(max(r["rel_error"] for r in rows), 4),
              "points": rows, "zero3_vs_zero0": zero3_vs_zero0, "plans": plans(), "measured_per_rank": per_rank,
              "wall_seconds": round(time.perf_counter() - start, 1)}
    result["target_met"] = result["rel_error_median"] <= 0.15
    result["points_seconds"] = round(sum(max(r[n]["seconds"] for r in per_rank) for n in names), 1)
    if args.replan:
        result["replanned_from_earlier_measurements"] = True  # wall_seconds is the re-planning only
    if args.out:
        path = Path(args.out)
        path.write_text(json.dumps(result, indent=2) + "\n")
    else:
        path = write_result("lm_planner", result)
    print(f"rel_error_median = {result['rel_error_median']} (target <= 0.15); wrote {path}")
    for pair, entry in result["plans"].items():
        print(f"{pair}: fits={entry['fits']} live: {entry['live']['layout']}  top-k: {entry['topk64']['layout']}")


if __name__ == "__main__":
    main()
