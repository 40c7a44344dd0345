"""Enumerate layouts, estimate each, keep what fits, rank by a simple cost model.

The cost model only has to order layouts, so it is deliberately simple (seconds per sample):

* compute: FLOPs per token = 2*T (teacher forward) + 6*S (student forward+backward) + 2*S more
  when checkpointing recomputes the forward; spread over all GPUs at ``efficiency`` of peak;
* model parallelism: Megatron's two all-reduces of s*b*h activations per layer and pass
  (teacher: forward only; student: forward and backward), ring cost 2(t-1)/t * bytes / bandwidth;
* data parallelism: one all-reduce (ZeRO 0-2; reduce-scatter + all-gather has the same volume)
  of the student's gradients per step, 1.5x for ZeRO-3 (parameters gathered again in backward);
* offload: gradients down and parameters up over PCIe (16-bit, this rank's partition), the CPU
  Adam step over the partition, and for parameter offload the weights streamed up per pass.

Faster layouts first; layouts that do not fit carry the reason (which component dominates).
"""

from __future__ import annotations

import dataclasses
import itertools

from ..errors import AutoSKDError
from .memory import GiB, Estimate, Hardware, Layout, estimate
from .shapes import ModelShape


@dataclasses.dataclass(frozen=True)
class Candidate:
    estimate: Estimate
    fits: bool
    seconds_per_sample: float
    reason: str  #: why it does not fit ("" when it fits)

    def to_dict(self) -> dict:
        return {**self.estimate.to_dict(), "fits": self.fits,
                "ms_per_sample": round(self.seconds_per_sample * 1000, 3), "reason": self.reason}


@dataclasses.dataclass(frozen=True)
class Plan:
    teacher: ModelShape
    student: ModelShape
    hardware: Hardware
    gpus: int
    fitting: list          #: Candidate, fastest first
    rejected: list         #: Candidate that do not fit (or are invalid for the shapes), smallest peak first

    @property
    def best(self) -> Candidate | None:
        return self.fitting[0] if self.fitting else None

    def to_dict(self) -> dict:
        return {"teacher": self.teacher.name, "student": self.student.name,
                "teacher_params": int(self.teacher.params), "student_params": int(self.student.params),
                "teacher_shape": self.teacher.to_dict(), "student_shape": self.student.to_dict(),
                "gpus": self.gpus, "device": self.hardware.device,
                "memory_per_device_bytes": self.hardware.memory_bytes,
                "usable_peak_bytes": int(self.hardware.usable_peak()),
                "best": self.best.to_dict() if self.best else None,
                "fitting": [c.to_dict() for c in self.fitting],
                "rejected": [c.to_dict() for c in self.rejected]}


def seconds_per_sample(teacher: ModelShape, student: ModelShape, lo: Layout, hw: Hardware) -> float:
    """The cost model of the module docstring."""
    tokens = lo.micro_batch * lo.seq_len
    e = 2 if lo.precision in ("fp16", "bf16") else 4
    flops = tokens * (2 * teacher.params + (8 if lo.checkpointing else 6) * student.params)
    step = flops / lo.mp / (hw.flops * hw.efficiency)  # one DP replica: mp GPUs share the work
    if lo.mp > 1:
        ring = 2 * (lo.mp - 1) / lo.mp
        act = tokens * e
        passes = 2 * teacher.layers * teacher.hidden + (4 + (2 if lo.checkpointing else 0)) * student.layers * student.hidden
        step += ring * act * passes / hw.mp_bandwidth
    s_local = student.params / lo.mp
    if lo.dp > 1:
        step += 2 * (lo.dp - 1) / lo.dp * s_local * e * (1.5 if lo.zero == 3 else 1.0) / hw.dp_bandwidth
    if lo.offload != "none":
        part = s_local / lo.dp
        step += 2 * part * e / hw.host_bandwidth + part / hw.cpu_adam_rate
        if lo.offload == "optimizer+params":
            step += 2 * (teacher.params + 2 * student.params) / lo.mp / lo.dp * e / hw.host_bandwidth
    return step / (lo.micro_batch * lo.dp)


def _why_not(est: Estimate, hw: Hardware) -> str:
    comps = sorted(est.components.items(), key=lambda kv: -kv[1])
    top = ", ".join(f"{k} {v / GiB:.1f}" for k, v in comps[:3])
    need = est.peak_bytes * (1 + hw.fragmentation) + hw.context_bytes
    return (f"needs {need / GiB:.1f} GiB > {hw.memory_bytes / GiB:.1f} GiB "
            f"(peak {est.peak_gib:.1f} at {est.phase}; largest: {top} GiB)")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan(teacher: ModelShape, student: ModelShape, *, gpus: int, hardware: Hardware,
         micro_batches=(1,), seq_lens=(512,), precisions=("fp16",), zero_stages=(0, 1, 2, 3),
         offloads=("none", "optimizer", "optimizer+params"), checkpointing=(True, False),
         mp_degrees=None, features: str = "tinybert", top_ks=(0,)) -> Plan:
    """Every valid layout on ``gpus`` devices: those that fit (fastest first) and those that do not.

    ``top_ks``: for LM pairs (``features="lm-logits"``), 0 = a live teacher and k > 0 = the
    teacher served from a top-k cache filled by one teacher-only pass beforehand."""
    if any(k for k in top_ks) and features != "lm-logits":
        raise AutoSKDError("a top-k teacher cache serves next-token distributions; use features='lm-logits'")
    if not isinstance(gpus, int) or gpus < 1:
        raise AutoSKDError(f"--gpus must be a positive integer (got {gpus!r})")
    mps = mp_degrees or _divisors(gpus)
    fitting, rejected = [], []
    for mp, zero, off, b, s, prec, ckpt, k in itertools.product(mps, zero_stages, offloads, micro_batches,
                                                                seq_lens, precisions, checkpointing, top_ks):
        if gpus % mp or (off != "none" and zero == 0) or (off == "optimizer+params" and zero != 3):
            continue
        lo = Layout(mp=mp, dp=gpus // mp, zero=zero, offload=off, micro_batch=b, seq_len=s,
                    precision=prec, checkpointing=ckpt, top_k=k)
        est = estimate(teacher, student, lo, features=features, device=hardware.device)
        reason = ""
        for shape in (teacher, student):  # Megatron splits heads and the vocabulary over MP ranks
            if shape.heads % mp:
                reason = f"{shape.name} has {shape.heads} heads, not divisible by MP {mp}"
            elif shape.n_kv_heads % mp:
                reason = f"{shape.name} has {shape.n_kv_heads} key/value heads, not divisible by MP {mp}"
        host_total = est.host_bytes * lo.gpus
        if not reason and hardware.host_memory_bytes is not None and host_total > hardware.host_memory_bytes:
            reason = (f"offload needs {host_total / GiB:.0f} GiB of host memory > "
                      f"{hardware.host_memory_bytes / GiB:.0f} GiB")
        fits = not reason and hardware.fits(est.peak_bytes)
        if not fits and not reason:
            reason = _why_not(est, hardware)
        cand = Candidate(est, fits, seconds_per_sample(teacher, student, lo, hardware), reason)
        (fitting if fits else rejected).append(cand)
    fitting.sort(key=lambda c: (c.seconds_per_sample, c.estimate.peak_bytes))
    rejected.sort(key=lambda c: c.estimate.peak_bytes)
    return Plan(teacher, student, hardware, gpus, fitting, rejected)
