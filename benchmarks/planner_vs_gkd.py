"""The planner's max-allocated prediction against every row of GKD's tables 3 and 5.

Setting of the paper: 8 x A100-40GB, micro-batch 1, fp16, TinyBERT pre-training distillation
(features = hidden states + attention maps), activation checkpointing on (GKD's commands pass
``--checkpoint-activations``), sequence length 512 (GLM's default ``--seq-length``; the paper does
not state it). Nothing is fitted to the rows: the memory terms are the first-principles ones of
``autoskd.planner.memory`` and the fit rule (x1.10 allocator reserve + 0.3 GiB CUDA context on
40 GiB) is the planner's default.

Writes benchmarks/results/planner_vs_gkd.json (``median_rel_error``, ``oom_rows_predicted``,
per-row details) and planner_vs_gkd.png.

    PYTHONPATH=. python benchmarks/planner_vs_gkd.py
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS_DIR, write_result  # noqa: E402
from autoskd.planner import GiB, Hardware, Layout, estimate, table8_shape  # noqa: E402
from autoskd.planner.gkd_tables import ROWS, SEQ_LEN  # noqa: E402


def compare() -> dict:
    hw = Hardware(memory_bytes=40 * GiB)
    shapes: dict = {}
    rows = []
    for table, t, s, mp, dp, zero, offload, measured in ROWS:
        teacher = shapes.setdefault(t, table8_shape(t))
        student = shapes.setdefault(s, table8_shape(s))
        layout = Layout(mp=mp, dp=dp, zero=zero, offload="optimizer" if offload else "none", micro_batch=1,
                        seq_len=SEQ_LEN, precision="fp16", checkpointing=True)
        est = estimate(teacher, student, layout, features="tinybert", device="cuda")
        fits = hw.fits(est.peak_bytes)
        row = {"table": table, "teacher": t, "student": s, "mp": mp, "dp": dp, "zero": zero,
               "offload": offload, "measured_gib": measured, "predicted_gib": round(est.peak_gib, 3),
               "predicted_fits": fits, "peak_phase": est.phase,
               "components_gib": {k: round(v / GiB, 3) for k, v in est.components.items()}}
        if measured is not None:
            row["rel_error"] = round((est.peak_gib - measured) / measured, 4)
        rows.append(row)
    errors = [abs(r["rel_error"]) for r in rows if "rel_error" in r]
    oom_rows = [r for r in rows if r["measured_gib"] is None]
    ran_rows = [r for r in rows if r["measured_gib"] is not None]
    return {
        "assumptions": {"seq_len": SEQ_LEN, "micro_batch": 1, "precision": "fp16", "checkpointing": True,
                        "features": "tinybert", "gpu_memory_gib": 40, "fragmentation": hw.fragmentation,
                        "context_gib": hw.context_bytes / GiB},
        "median_rel_error": round(statistics.median(errors), 4),
        "mean_rel_error": round(statistics.fmean(errors), 4),
        "max_rel_error": round(max(errors), 4),
        "rows_within_15pct": sum(e <= 0.15 for e in errors), "rows_compared": len(errors),
        "oom_rows_predicted": all(not r["predicted_fits"] for r in oom_rows),
        "oom_rows": [{k: r[k] for k in ("table", "teacher", "student", "mp", "dp", "zero", "offload",
                                         "predicted_gib", "predicted_fits")} for r in oom_rows],
        "ran_rows_predicted_to_fit": sum(r["predicted_fits"] for r in ran_rows),
        "ran_rows": len(ran_rows),
        "rows": rows,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["measured_gib"] is not None]
    fig, ax = plt.subplots(figsize=(6, 5.5))
    for table, marker in (("3", "o"), ("5", "s")):
        for off, color in ((False, "tab:blue"), (True, "tab:orange")):
            sel = [r for r in rows if r["table"] == table and r["offload"] == off]
            ax.scatter([r["measured_gib"] for r in sel], [r["predicted_gib"] for r in sel], marker=marker,
                       color=color, s=22, label=f"table {table}, {'offload' if off else 'no offload'}")
    oom = [r for r in result["rows"] if r["measured_gib"] is None]
    ax.scatter([41] * len(oom), [min(r["predicted_gib"], 44) for r in oom], marker="x", color="red",
               label="GKD: GPU memory overflow (x=41, y capped at 44)")
    lim = [0, 45]
    ax.plot(lim, lim, "k-", lw=0.8)
    ax.fill_between(lim, [0.85 * v for v in lim], [1.15 * v for v in lim], color="gray", alpha=0.15, label="±15%")
    ax.axhline(Hardware(memory_bytes=40 * GiB).usable_peak() / GiB, color="red", ls=":", lw=1,
               label="largest predicted peak that fits 40 GiB")
    ax.set_xlim(lim)
    ax.set_ylim(lim)
    ax.set_xlabel("GKD measured max allocated (GiB)")
    ax.set_ylabel("planner predicted peak (GiB)")
    ax.set_title(f"Planner vs GKD tables 3 & 5 (median |rel. error| {result['median_rel_error']:.3f})", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    result = compare()
    path = write_result("planner_vs_gkd", result)
    plot(result, RESULTS_DIR / "planner_vs_gkd.png")
    for r in result["rows"]:
        err = f"{r['rel_error']:+.3f}" if "rel_error" in r else "  OOM "
        print(f"table {r['table']} {r['teacher']:>5}>{r['student']:<5} MP{r['mp']} DP{r['dp']} Z{r['zero']}"
              f"{'+O' if r['offload'] else '  '}  measured {str(r['measured_gib']):>6}  predicted "
              f"{r['predicted_gib']:6.2f}  {err}  {'fits' if r['predicted_fits'] else 'OOM'}")
    print(f"median |rel error| {result['median_rel_error']} (target <= 0.15), within 15%: "
          f"{result['rows_within_15pct']}/{result['rows_compared']}; OOM rows predicted: "
          f"{result['oom_rows_predicted']}; ran rows predicted to fit: "
          f"{result['ran_rows_predicted_to_fit']}/{result['ran_rows']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
