"""Per-device memory of one distillation layout: the terms, what each one is, and the peak.

Every term is bytes on ONE device (one GPU, or one CPU rank when ``device="cpu"``) and comes
from first principles, not from fitting GKD's tables (next-token distillation of decoder LMs,
``features="lm-logits"``, follows a step through its phases instead: :mod:`.lm_memory`):

``teacher_weights``  frozen teacher in the training precision, split by model parallelism (MP);
                     ZeRO-3 also shards it over data parallelism (DP); offloaded params -> host.
``student_weights``  student parameters (2 bytes fp16/bf16, 4 fp32) / MP; ZeRO-3: / DP too.
``gradients``        student gradients in the training precision. ZeRO 0/1 keep them whole until
                     the step; ZeRO-2/3 keep only their DP partition, plus the not-yet-reduced
                     gradients of one reduce bucket.
``optimizer_states`` Adam: mixed precision keeps an fp32 master copy + m + v = 12 bytes/param
                     (fp32 training: m + v = 8; DeepSpeed's ZeRO keeps its own fp32 partition, so
                     12 again). ZeRO >= 1 divides by DP; ``offload`` moves them to host memory.
``comm_buffers``     DeepSpeed buffers: ZeRO 1/2 contiguous-gradient (IPG) reduce bucket,
                     ``reduce_bucket_size`` elements (5e8 by default, allocated whole on a GPU);
                     ZeRO-3 adds the parameter prefetch bucket; ZeRO-0 with DP > 1 flattens one
                     all-reduce bucket at the end of the backward pass.
``activations``      student activations kept for backward, per transformer layer (Korthikanti et
                     al. 2022, "Reducing activation recomputation", tensor parallel t = MP, no
                     sequence parallelism): s*b*h*(10 + 24/t + 5*a*s/(h*t)) bytes in 16-bit. With
                     full activation checkpointing only each layer's input (2*s*b*h) is kept, plus
                     one layer's full activations while it is recomputed. Backward adds the
                     gradient of the layer's largest activation and the one it produces,
                     2*max(a*s^2, ffn*s)*b bytes-per-element / t.
``teacher_activations`` the teacher runs without grad: one layer's working set (freed before
                     the student's backward, so it only counts when larger than the student's
                     activations), plus the features the distillation loss reads and keeps (per
                     ``features``: hidden states and/or attention maps of the mapped layers, or LM
                     logits).
``step_transient``   extra memory during ``optimizer.step``: DeepSpeed's fp16 optimizer (ZeRO 0)
                     casts every fp16 gradient to fp32 and flattens them (4 + 4 bytes/param);
                     ZeRO 1/2 flatten their gradient partition and cast it to fp32 (2 + 4 bytes per
                     partitioned param); ZeRO-3 casts its partition (4); torch's foreach Adam on a
                     GPU makes one fp32 temporary per parameter (4).

On a GPU the peak ("max allocated") is ``persistent + max(forward/backward phase, optimizer-step phase)``
where persistent = teacher + student weights + optimizer states + buffers, the forward/backward
phase holds gradients + activations (+ the ZeRO-0 all-reduce bucket) and the step phase holds
gradients + the step transient. Activations are freed before the step; Adam states persist from
the first step on. On a CPU the peak resident memory is the sum of the phases (persistent + teacher working set +
forward/backward + step transient): glibc's malloc keeps the blocks each phase frees in its
heap, so later phases do not reuse them. Not in the prediction: the process's own runtime (the
Python interpreter, torch's libraries, lazily loaded kernels: tens to hundreds of MB of RSS).

Whether it fits: the caching allocator reserves more than it hands out (freed blocks of mixed
sizes, 2 MiB rounding), so a layout fits a GPU when
``peak * (1 + fragmentation) + context <= memory`` with ``fragmentation`` = 0.10 and the CUDA
context 0.3 GiB by default (``Hardware``). On a CPU there is no caching allocator, no context and
no separate host memory: offloaded terms count too (see :func:`host_bytes`).
"""

from __future__ import annotations

import dataclasses

from ..errors import AutoSKDError
from .shapes import ModelShape

GiB = 1024 ** 3

PRECISIONS = {"fp16": 2, "bf16": 2, "fp32": 4}
OFFLOADS = ("none", "optimizer", "optimizer+params")
FEATURES = ("classifier", "hidden", "tinybert", "lm-logits")
COMPONENTS = ("teacher_weights", "student_weights", "gradients", "optimizer_states", "comm_buffers",
              "activations", "teacher_activations", "step_transient", "logits")
#: How freed memory behaves: "caching" (a GPU's caching allocator: the peak is the largest phase),
#: "heap" (glibc's default on a CPU: freed mid-sized blocks stay in the heap, phases add up),
#: "mmap" (a CPU process run with a fixed ``MALLOC_MMAP_THRESHOLD_``: every large block is mapped
#: and returned on free, so peak RSS is the peak of live tensors, as on a GPU).
ALLOCATORS = ("caching", "heap", "mmap")


@dataclasses.dataclass(frozen=True)
class Layout:
    """One way to run the distillation: parallel degrees, ZeRO, offload, batch, precision."""

    mp: int = 1                 #: model (tensor) parallel degree, teacher and student alike
    dp: int = 1                 #: data parallel degree (ZeRO partitions over it)
    zero: int = 0               #: ZeRO stage 0..3
    offload: str = "none"       #: none | optimizer | optimizer+params (ZeRO-3 only)
    micro_batch: int = 1
    seq_len: int = 512
    precision: str = "fp16"     #: fp16 | bf16 | fp32
    checkpointing: bool = True  #: full activation checkpointing of the student's layers
    top_k: int = 0              #: LM teacher served from a top-k cache of k tokens/position; 0 = live
    reduce_bucket: int = 500_000_000    #: DeepSpeed reduce_bucket_size / allreduce_bucket_size
    prefetch_bucket: int = 50_000_000   #: DeepSpeed stage3_prefetch_bucket_size
    max_live: int = 1_000_000_000       #: DeepSpeed stage3_max_live_parameters

    def __post_init__(self):
        for name in ("mp", "dp", "micro_batch", "seq_len", "reduce_bucket", "prefetch_bucket", "max_live"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise AutoSKDError(f"layout {name} must be a positive integer (got {value!r})")
        if self.zero not in (0, 1, 2, 3):
            raise AutoSKDError(f"ZeRO stage must be 0, 1, 2 or 3 (got {self.zero!r})")
        if self.offload not in OFFLOADS:
            raise AutoSKDError(f"offload must be one of {', '.join(OFFLOADS)} (got {self.offload!r})")
        if self.offload != "none" and self.zero == 0:
            raise AutoSKDError("offload needs ZeRO stage 1, 2 or 3; set zero>=1 or offload='none'")
        if self.offload == "optimizer+params" and self.zero != 3:
            raise AutoSKDError("parameter offload needs ZeRO stage 3; use offload='optimizer' with stages 1-2")
        if self.precision not in PRECISIONS:
            raise AutoSKDError(f"precision must be one of {', '.join(PRECISIONS)} (got {self.precision!r})")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise AutoSKDError(f"layout top_k must be an integer >= 0, 0 for a live teacher (got {self.top_k!r})")

    @property
    def gpus(self) -> int:
        return self.mp * self.dp

    def label(self) -> str:
        zero = f" Z{self.zero}" if self.zero else ""
        off = {"none": "", "optimizer": "+O", "optimizer+params": "+OP"}[self.offload]
        ckpt = " ckpt" if self.checkpointing else ""
        topk = f" topk{self.top_k}" if self.top_k else ""
        return f"MP{self.mp}xDP{self.dp}{zero}{off} b{self.micro_batch} s{self.seq_len} {self.precision}{ckpt}{topk}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Bytes per device by component, the peak, and the host (CPU) memory per rank."""

    layout: Layout
    components: dict          #: name -> bytes on the device (see the module docstring)
    peak_bytes: int           #: predicted max allocated on the device
    host_bytes: int           #: offloaded optimizer states / parameters held in CPU memory per rank
    phase: str                #: which phase sets the peak: "forward/backward" or "optimizer step"
    #: LM estimates: bytes above the persistent state in each phase of a step; with a top-k
    #: cache also the cache-building pass's own peak and the cache's size on disk per 1M tokens.
    phases: dict = dataclasses.field(default_factory=dict)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GiB

    def to_dict(self) -> dict:
        out = {"layout": self.layout.to_dict(), "label": self.layout.label(),
               "components_bytes": dict(self.components), "peak_bytes": self.peak_bytes,
               "peak_gib": round(self.peak_gib, 3), "host_bytes": self.host_bytes, "peak_phase": self.phase}
        if self.phases:
            out["phases_bytes"] = {k: int(v) for k, v in self.phases.items()}
        return out


def _layer_activation_bytes(shape: ModelShape, layout: Layout) -> float:
    """Korthikanti et al. (2022) per-layer activations, 16-bit: s*b*h*(10 + 24/t + 5*a*s/(h*t))."""
    s, b, h, a, t = layout.seq_len, layout.micro_batch, shape.hidden, shape.heads, layout.mp
    ffn_ratio = shape.ffn / (4 * h)  # the 24/t term assumes a 4h MLP (16/t of it is the MLP)
    per = s * b * h * (10 + (8 + 16 * ffn_ratio) / t + 5 * a * s / (h * t))
    return per * PRECISIONS[layout.precision] / 2


def estimate(teacher: ModelShape, student: ModelShape, layout: Layout, *, features: str = "tinybert",
             device: str = "cuda", allocator: str | None = None, lm_ce: bool = False) -> Estimate:
    """Memory per device of distilling ``teacher`` into ``student`` with ``layout``.

    ``features="lm-logits"`` (next-token distillation of causal LMs) is estimated by
    :func:`autoskd.planner.lm_memory.estimate_lm`, which also takes ``allocator`` (see
    :data:`ALLOCATORS`; default "caching" on cuda, "heap" on cpu) and ``lm_ce`` (the student's own
    next-token cross-entropy is in the loss too, e.g. kd with alpha < 1)."""
    if features not in FEATURES:
        raise AutoSKDError(f"features must be one of {', '.join(FEATURES)} (got {features!r})")
    if device not in ("cuda", "cpu"):
        raise AutoSKDError(f"device must be 'cuda' or 'cpu' (got {device!r})")
    if allocator is not None and allocator not in ALLOCATORS:
        raise AutoSKDError(f"allocator must be one of {', '.join(ALLOCATORS)} (got {allocator!r})")
    if features == "lm-logits":
        from .lm_memory import estimate_lm

        return estimate_lm(teacher, student, layout, device=device,
                           allocator=allocator or ("caching" if device == "cuda" else "heap"), lm_ce=lm_ce)
    if layout.top_k:
        raise AutoSKDError("a top-k teacher cache holds next-token distributions; use features='lm-logits' "
                           "or top_k=0")
    lo, e = layout, PRECISIONS[layout.precision]
    mixed = e == 2
    s_local = student.params / lo.mp            # student parameters on this MP rank
    s_part = s_local / lo.dp                    # ... and its ZeRO partition
    host = 0.0
    c = dict.fromkeys(COMPONENTS, 0.0)

    # weights
    teacher_local = teacher.params * e / lo.mp
    if lo.zero == 3:
        teacher_local /= lo.dp
    if lo.offload == "optimizer+params":
        host += teacher_local + s_part * e
        c["teacher_weights"] = 0.0
        c["student_weights"] = 0.0
    else:
        c["teacher_weights"] = teacher_local
        c["student_weights"] = s_part * e if lo.zero == 3 else s_local * e
    if lo.zero == 3:  # ZeRO-3 gathers the layers it runs: about one layer of each model at a time
        c["student_weights"] += min(s_local, 12 * student.hidden ** 2 / lo.mp) * e
        c["teacher_weights"] += min(teacher.params / lo.mp, 12 * teacher.hidden ** 2 / lo.mp) * e

    # gradients: whole for ZeRO 0/1; partition + one unreduced bucket for ZeRO 2/3
    if lo.zero <= 1:
        c["gradients"] = s_local * e
    else:
        part = 0.0 if lo.offload != "none" else s_part * e  # offload keeps the fp32 partition on host
        c["gradients"] = part + min(s_local, lo.reduce_bucket) * e

    # optimizer states (Adam)
    opt_per_param = 12 if (mixed or lo.zero >= 1) else 8
    opt = opt_per_param * (s_part if lo.zero >= 1 else s_local)
    if lo.offload != "none":
        host += opt + (4 * s_part)  # + the fp32 gradient partition DeepSpeed keeps on the host
    else:
        c["optimizer_states"] = opt

    # DeepSpeed buffers
    cap = (lambda n: n) if device == "cuda" else (lambda n: min(n, s_local))  # CPU pages only when written
    if lo.zero in (1, 2):
        c["comm_buffers"] = cap(lo.reduce_bucket) * e
    elif lo.zero == 3:
        c["comm_buffers"] = (cap(lo.reduce_bucket) + cap(lo.prefetch_bucket)) * e
    allreduce_bucket = min(s_local, lo.reduce_bucket) * e if (lo.zero == 0 and lo.dp > 1) else 0.0

    # activations
    per_layer = _layer_activation_bytes(student, lo)
    s_, b = lo.seq_len, lo.micro_batch
    # backward also holds the gradient of the layer's largest activation and the one it produces
    backward = 2 * max(student.heads * s_ * s_, student.ffn * s_) * b * e / lo.mp
    if lo.checkpointing:
        c["activations"] = student.layers * s_ * b * student.hidden * e + per_layer + backward
    else:
        c["activations"] = student.layers * per_layer + backward
    # teacher: one layer's working set (no grad) + the features the loss reads
    t_layer = s_ * b * teacher.hidden * 8 / lo.mp * e + 2 * teacher.heads * s_ * s_ * b / lo.mp * e
    mapped = min(student.layers, teacher.layers)
    feats = 0.0
    if features in ("hidden", "tinybert"):
        feats += mapped * s_ * b * teacher.hidden * e
    if features == "tinybert":
        feats += mapped * teacher.heads * s_ * s_ * b / lo.mp * e
        if lo.checkpointing:  # the student's hooked attention maps stay alive for the loss
            c["activations"] += student.layers * student.heads * s_ * s_ * b / lo.mp * e
    c["teacher_activations"] = t_layer + feats

    # optimizer step transient
    if lo.offload == "none":
        if lo.zero == 0:
            largest = max(student.vocab, student.ffn, 3 * student.hidden) * student.hidden / lo.mp
            # fp32 torch Adam: foreach on a GPU (one temporary per parameter), one parameter at a
            # time on a CPU (the largest tensor's temporary, usually the word embeddings)
            c["step_transient"] = 8 * s_local if mixed else 4 * (s_local if device == "cuda" else largest)
        elif lo.zero in (1, 2):
            c["step_transient"] = (2 + 4) * s_part if mixed else 4 * s_part
        else:
            c["step_transient"] = 4 * s_part

    persistent = sum(c[k] for k in ("teacher_weights", "student_weights", "optimizer_states", "comm_buffers"))
    # the teacher's one-layer working set is gone before the student's backward starts
    fwd_bwd = c["gradients"] + feats + max(t_layer, c["activations"]) + allreduce_bucket
    step = c["gradients"] + c["step_transient"]
    if device == "cpu":
        # One address space: what is "offloaded" still lives in this process. And glibc's malloc
        # keeps the many mid-sized blocks freed by one phase in its heap (RSS does not drop), so
        # the teacher's working set, the student's activations and the step's temporaries add up
        # instead of reusing each other's memory.
        peak = persistent + host + c["gradients"] + feats + t_layer + c["activations"] + allreduce_bucket \
            + c["step_transient"]
        phase = "forward/backward + optimizer step"
    else:
        peak = persistent + max(fwd_bwd, step)
        phase = "forward/backward" if fwd_bwd >= step else "optimizer step"
    return Estimate(lo, {k: int(v) for k, v in c.items()}, int(peak), int(host), phase)


@dataclasses.dataclass(frozen=True)
class Hardware:
    """A device type: memory, what the allocator needs beyond the peak, and speeds for the cost model."""

    memory_bytes: int
    device: str = "cuda"
    fragmentation: float = 0.10      #: caching-allocator reserve above the peak (0 on CPU)
    context_bytes: int = int(0.3 * GiB)  #: CUDA context, cuBLAS workspace (0 on CPU)
    flops: float = 312e12            #: dense 16-bit peak (A100)
    efficiency: float = 0.35         #: achieved share of peak in transformer training
    mp_bandwidth: float = 150e9      #: bytes/s of an all-reduce inside the MP group (NVLink)
    dp_bandwidth: float = 100e9      #: bytes/s of gradient all-reduce / reduce-scatter
    host_bandwidth: float = 12e9     #: bytes/s GPU <-> CPU (PCIe) for offload
    cpu_adam_rate: float = 1.0e9     #: parameters/s the CPU Adam updates (DeepSpeedCPUAdam)
    host_memory_bytes: int | None = None  #: CPU memory of the node for offload (None: not checked)

    def fits(self, peak_bytes: float) -> bool:
        return peak_bytes * (1 + self.fragmentation) + self.context_bytes <= self.memory_bytes

    def usable_peak(self) -> float:
        """The largest predicted peak that fits."""
        return (self.memory_bytes - self.context_bytes) / (1 + self.fragmentation)


def cpu_hardware(memory_bytes: int) -> Hardware:
    return Hardware(memory_bytes=memory_bytes, device="cpu", fragmentation=0.0, context_bytes=0,
                    flops=1e11, efficiency=0.5, mp_bandwidth=5e9, dp_bandwidth=5e9, host_bandwidth=1e12)
