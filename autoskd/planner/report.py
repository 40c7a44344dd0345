"""Human-readable output of a :class:`~autoskd.planner.search.Plan`: a table and a plot."""

from __future__ import annotations

from pathlib import Path

from .memory import COMPONENTS, GiB
from .search import Plan

_SHORT = {"teacher_weights": "teacher", "student_weights": "weights", "gradients": "grads",
          "optimizer_states": "optim", "comm_buffers": "buffers", "activations": "activ",
          "teacher_activations": "t-activ", "step_transient": "step", "logits": "logits"}


def _gib(v: float) -> str:
    return f"{v / GiB:.2f}"


def format_plan(plan: Plan, top: int | None = None) -> str:
    """All fitting layouts (fastest first) and all others with the reason; ``top`` limits each."""
    hw = plan.hardware
    top = top or max(len(plan.fitting), len(plan.rejected), 1)
    lines = [f"teacher {plan.teacher.name}: {plan.teacher.params:,} params "
             f"({plan.teacher.layers} layers, hidden {plan.teacher.hidden}); "
             f"student {plan.student.name}: {plan.student.params:,} params "
             f"({plan.student.layers} layers, hidden {plan.student.hidden})",
             f"{plan.gpus} x {hw.memory_bytes / GiB:.0f} GiB ({hw.device}); a layout fits when "
             f"peak x {1 + hw.fragmentation:.2f} + {hw.context_bytes / GiB:.1f} GiB context <= memory "
             f"(peak <= {hw.usable_peak() / GiB:.2f} GiB). GiB per device:"]
    head = ["#", "layout", "peak"] + [_SHORT[c] for c in COMPONENTS] + ["host", "ms/sample"]
    rows = []
    for i, cand in enumerate(plan.fitting[:top], 1):
        est = cand.estimate
        rows.append([str(i), est.layout.label(), _gib(est.peak_bytes)]
                    + [_gib(est.components[c]) for c in COMPONENTS]
                    + [_gib(est.host_bytes), f"{cand.seconds_per_sample * 1000:.1f}"])
    if rows:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
        lines.append(f"\nLayouts that fit, fastest first ({len(plan.fitting)}"
                     + (f", top {top} shown" if len(plan.fitting) > top else "") + "):")
        lines.append("  ".join(h.ljust(w) for h, w in zip(head, widths)))
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    else:
        lines.append("\nNo layout fits.")
    if plan.rejected:
        lines.append(f"\nLayouts that do not fit ({len(plan.rejected)}, smallest peak first):")
        for cand in plan.rejected[:top]:
            lines.append(f"  {cand.estimate.layout.label()}: {cand.reason}")
        if len(plan.rejected) > top:
            lines.append(f"  ... and {len(plan.rejected) - top} more (--json lists all)")
    if plan.best:
        lines.append(f"\nbest: {plan.best.estimate.layout.label()} "
                     f"(peak {plan.best.estimate.peak_gib:.2f} GiB per device at {plan.best.estimate.phase}, "
                     f"~{plan.best.seconds_per_sample * 1000:.0f} ms/sample by the cost model)")
        top_k = plan.best.estimate.layout.top_k
        if top_k:
            lines.append(f"top-k cache: {top_k} ids (int32) + log-probabilities (fp16) = {6 * top_k} bytes per "
                         f"training token on disk ({6 * top_k / 1e3:.2f} GB per million tokens), filled by one "
                         f"teacher pass in this layout first")
    return "\n".join(lines)


def plot_plan(plan: Plan, path: str | Path, top: int = 24) -> Path:
    """Stacked bars: memory per component for the fastest fitting layouts and the nearest misses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cands = plan.fitting[: top * 2 // 3] + plan.rejected[: top - min(len(plan.fitting), top * 2 // 3)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(12, 0.32 * max(len(cands), 4) + 1.8))
    labels = [("" if c.fits else "x ") + c.estimate.layout.label() for c in cands]
    left = [0.0] * len(cands)
    colors = plt.get_cmap("tab10").colors
    for k, comp in enumerate(COMPONENTS):
        vals = [c.estimate.components[comp] / GiB for c in cands]
        ax.barh(range(len(cands)), vals, left=left, color=colors[k % 10], label=comp)
        left = [a + b for a, b in zip(left, vals)]
    ax.scatter([c.estimate.peak_bytes / GiB for c in cands], range(len(cands)), marker="|", s=200, color="k",
               zorder=3, label="predicted peak")
    ax.axvline(plan.hardware.usable_peak() / GiB, color="k", ls="--", lw=1, label="largest peak that fits")
    ax.set_yticks(range(len(cands)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("GiB per device (bars: every component; the peak | is lower on a GPU: activations and "
                  "the optimizer-step temporaries are not live together)", fontsize=7)
    ax.set_title(f"{plan.teacher.name} => {plan.student.name} on {plan.gpus} x "
                 f"{plan.hardware.memory_bytes / GiB:.0f} GiB: fitting layouts (fastest first), then 'x' = does not fit",
                 fontsize=8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
