"""Per-device memory of next-token distillation between causal LMs (``features="lm-logits"``).

What sets the peak of an LM distillation step is rarely the weights of the student: it is the
``[B, T, V]`` logits. At Llama-3's 128,256-token vocabulary one 2,048-token row of fp32
logits is 1 GiB, and a step holds the teacher's and the student's logits, the loss's fp32
intermediates and the gradient of the student's logits at once. This module follows one step
through its phases and counts, per device (bytes; ``N = micro_batch * seq_len`` tokens,
``e`` bytes per element of the training precision, ``V`` the vocabulary):

``teacher forward``  the teacher runs without grad: its gathered ZeRO-3 parameters (up to
    ``stage3_max_live_parameters`` in flight, see :func:`_resident`), one layer's working set, the KV cache the
    Hugging Face model builds (``2 * kv_dim`` per token and layer) and its output logits
    ``N * V_T * e``, kept for the loss.
``loss``  the student's activations (a decoder layer keeps ``6h + 3*q_dim + 2*kv_dim + 4*ffn``
    elements per token: two RMSNorms' fp32 inputs and outputs, the rotated Q and K, V, the
    attention output twice, and the gate, up, SiLU and product of the gated MLP; flash/SDPA
    attention keeps no ``T x T`` map), its logits ``N * V_S * e``, the teacher's logits, and
    the token loss. The loss works through ``chunk = min(1024, N)`` positions at a time under
    checkpointing (:mod:`autoskd.engine.token_losses`): 5 fp32 ``[chunk, V]`` temporaries in
    the forward, then in the backward the fp32 gradient of the logits ``[N, V]`` plus 4
    ``[chunk, V]`` recomputed ones (measured: ``benchmarks/lm_planner.py``). With the student's
    own next-token cross-entropy (``lm_ce``), its saved fp32 log-softmax ``[N, V_S]`` too.
``end of backward``  every gradient (whole for ZeRO 0/1), DeepSpeed's flattened all-reduce
    bucket (ZeRO-0 with DP > 1).
``optimizer step``  gradients + Adam's temporaries (see :mod:`autoskd.planner.memory`).

With a top-k teacher cache (``layout.top_k = k``) training never runs the teacher: the batch
reads ``k`` ids (int64) and log-probabilities (fp32) per token, ``12 k`` bytes, and the loss's
log-sum-exp over the student's logits needs one fp32 ``[N, V]`` temporary forward and three
backward. The teacher runs once beforehand to fill the cache (the ``top-k cache build`` phase:
teacher weights, its logits and two fp32 ``[N, V]`` temporaries of the log-softmax at the
cache's temperature); the peak is the larger of the two. The cache itself is ``6 k`` bytes
per token on disk (int32 ids + fp16 log-probabilities), read into host memory per process.

Model parallelism splits weights as in :mod:`autoskd.planner.memory`, but not the logits:
autoskd's tensor-parallel teacher hands every rank whole logits.

Persistent state (weights, Adam, DeepSpeed buffers) follows :mod:`autoskd.planner.memory`,
with what ZeRO-3 does to decoders: tensors of at most 1e5 elements stay whole on every rank
(:mod:`autoskd.planner.tensors`) and the vocabulary matrix is the largest module it gathers.
How phases combine depends on the allocator (``ALLOCATORS`` in :mod:`.memory`).
"""

from __future__ import annotations

from .memory import COMPONENTS, PRECISIONS, Estimate, Layout, _layer_activation_bytes
from .shapes import ModelShape
from .tensors import PERSISTENCE_THRESHOLD, largest_tensor, persistent_params

#: The token losses' ``chunk_tokens`` default (autoskd.engine.token_losses).
CHUNK_TOKENS = 1024
#: fp32 ``[chunk, V]`` temporaries alive in a dense loss chunk's forward / recomputed backward.
LOSS_FWD_CHUNKS, LOSS_BWD_CHUNKS = 5, 4
#: fp32 ``[N, V]`` temporaries of the top-k loss's log-sum-exp, forward / backward.
TOPK_FWD, TOPK_BWD = 1, 3


def decoder_layer_elements(shape: ModelShape) -> float:
    """Elements per token one decoder layer keeps for backward (module docstring)."""
    h = shape.hidden
    norms = 6 * h if shape.norm == "rmsnorm" else 4 * h
    mlp = 4 * shape.ffn if shape.gated else 2 * shape.ffn
    return norms + 3 * shape.q_dim + 2 * shape.kv_dim + mlp


def teacher_working_elements(shape: ModelShape) -> float:
    """Elements per token alive inside one no-grad teacher layer (hidden, norm, Q/K/V, MLP)."""
    mlp = 3 * shape.ffn if shape.gated else 2 * shape.ffn
    return 4 * shape.hidden + 2 * shape.q_dim + 2 * shape.kv_dim + mlp


def _resident(shape: ModelShape, lo: Layout, e: int, on_cpu: bool) -> tuple[float, float]:
    """(bytes of ``shape``'s weights kept on this rank, bytes ZeRO-3 gathers at most at once).

    Once DeepSpeed has traced a step, each module's fetch also prefetches what comes next, and
    what is in flight is bounded by ``stage3_max_live_parameters`` (1e9 by default), not by the
    prefetch bucket: a model of fewer non-persistent parameters is gathered whole during each
    forward (measured), and the module being fetched comes on top of the bound. Over gloo (CPU) a
    gather goes through per-rank buffers and a copy into the flat one: twice the gathered bytes."""
    local = shape.params / lo.mp
    if lo.zero != 3:
        return local * e, 0.0
    whole = min(local, persistent_params(shape, PERSISTENCE_THRESHOLD) / lo.mp)
    largest = largest_tensor(shape) / lo.mp
    window = max(largest, min(lo.max_live + largest, local - whole)) if lo.prefetch_bucket else largest
    return (whole + (local - whole) / lo.dp) * e, window * e * (2 if on_cpu else 1)


def estimate_lm(teacher: ModelShape, student: ModelShape, lo: Layout, *, device: str = "cuda",
                allocator: str = "caching", lm_ce: bool = False) -> Estimate:
    """Memory per device of next-token distillation of ``teacher`` into ``student``."""
    e = PRECISIONS[lo.precision]
    mixed = e == 2
    n = lo.micro_batch * lo.seq_len
    chunk = min(CHUNK_TOKENS, n)
    vs, vt = student.vocab, teacher.vocab
    s_local = student.params / lo.mp
    s_part = s_local / lo.dp
    c = dict.fromkeys(COMPONENTS, 0.0)
    host = 0.0
    on_cpu = device == "cpu"

    # ------------------------------------------------------------------ persistent state
    t_res, t_gather = _resident(teacher, lo, e, on_cpu)
    s_res, s_gather = _resident(student, lo, e, on_cpu)
    if lo.offload == "optimizer+params":  # ZeRO-3 partitions on the host; only the small tensors stay
        host += t_res + s_res
        t_res = min(t_res, persistent_params(teacher) / lo.mp * e)
        s_res = min(s_res, persistent_params(student) / lo.mp * e)
        host -= t_res + s_res
    if lo.top_k:
        t_res_train, t_gather_train = 0.0, 0.0  # training reads the cache; the teacher is not loaded
    else:
        t_res_train, t_gather_train = t_res, t_gather
    c["teacher_weights"] = t_res_train
    c["student_weights"] = s_res
    opt = (12 if (mixed or lo.zero >= 1) else 8) * (s_part if lo.zero >= 1 else s_local)
    grad_part = 4 * s_part if lo.zero >= 2 else 0.0  # ZeRO 2/3: the fp32 gradient partition
    if lo.offload != "none":
        host += opt + grad_part
        opt, grad_part = 0.0, 0.0
    c["optimizer_states"] = opt
    bucket = min(s_local, lo.reduce_bucket) if on_cpu else lo.reduce_bucket  # CPU pages count when written
    c["comm_buffers"] = bucket * e if lo.zero >= 1 else 0.0
    persistent = t_res_train + s_res + opt + c["comm_buffers"] + grad_part + (host if on_cpu else 0.0)

    # ------------------------------------------------------------------ one step's phases
    whole_grads = s_local * e if lo.zero <= 1 else 0.0
    c["gradients"] = whole_grads + grad_part
    if student.decoder:
        layer = decoder_layer_elements(student) * n * e / lo.mp
    else:  # a GLM/BERT-shaped LM: Korthikanti et al.'s layer
        layer = _layer_activation_bytes(student, lo)
    if lo.checkpointing:  # each layer's input kept, one layer recomputed at a time
        acts = student.layers * n * student.hidden * e + layer
    else:
        acts = student.layers * layer
    norm_out = 3 * n * student.hidden * 4  # the final RMSNorm's fp32 input/output, the LM head's input
    backward = 2 * max(student.ffn, student.q_dim) * n * e / lo.mp  # one layer's gradients in flight
    c["activations"] = acts + norm_out + backward
    t_work = n * e * (teacher_working_elements(teacher) / lo.mp + 2 * teacher.layers * teacher.kv_dim / lo.mp)
    c["teacher_activations"] = 0.0 if lo.top_k else t_work
    student_logits = n * vs * e
    if lo.top_k:
        teacher_logits = n * lo.top_k * 12.0                    # int64 ids + fp32 log-probabilities
        loss_fwd = TOPK_FWD * n * vs * 4
        loss_bwd = n * vs * e + TOPK_BWD * n * vs * 4
    else:
        teacher_logits = n * vt * e
        casts = 2 * chunk * vs * 4 if mixed else 0.0            # fp32 copies of 16-bit chunks
        loss_fwd = LOSS_FWD_CHUNKS * chunk * vs * 4 + casts
        loss_bwd = n * vs * e + LOSS_BWD_CHUNKS * chunk * vs * 4 + casts
    ce = n * vs * 4 if lm_ce else 0.0
    loss_transient = max(loss_fwd, ce + loss_bwd)
    c["logits"] = teacher_logits + student_logits + loss_transient
    allreduce = min(s_local, lo.reduce_bucket) * e if (lo.zero == 0 and lo.dp > 1) else 0.0
    lm_head_grad = student.vocab * student.hidden / lo.mp * e  # the vocabulary matrix's gradient in flight
    phases = {
        "teacher forward": 0.0 if lo.top_k else t_gather + t_work + teacher_logits,
        "loss": s_gather + teacher_logits + acts + norm_out + student_logits + loss_transient,
        "end of backward": s_gather + whole_grads + backward + lm_head_grad * (lo.zero >= 2) + allreduce,
        "optimizer step": whole_grads + _step_transient(student, lo, e, on_cpu),
    }
    c["step_transient"] = phases["optimizer step"] - whole_grads
    if allocator == "heap":  # freed blocks stay in the heap: the phases add up
        peak = persistent + sum(phases.values())
        phase = " + ".join(phases)
    else:
        phase = max(phases, key=phases.get)
        peak = persistent + phases[phase]
    if lo.top_k:  # the cache is filled by a teacher-only pass before training
        build = t_gather + n * e * teacher_working_elements(teacher) / lo.mp \
            + n * vt * (e + 8 + (4 if mixed else 0))
        build_peak = t_res + build + (host if on_cpu else 0.0)
        phases["top-k cache build"] = build_peak  # a pass of its own: its whole peak, not above training
        if build_peak > peak:
            peak, phase = build_peak, "top-k cache build"
        phases["top-k cache bytes per 1M tokens"] = 1_000_000 * lo.top_k * 6
    return Estimate(lo, {k: int(v) for k, v in c.items()}, int(peak), int(host), phase, phases)


def _step_transient(student: ModelShape, lo: Layout, e: int, on_cpu: bool) -> float:
    """Adam's temporaries (as :func:`autoskd.planner.memory.estimate`)."""
    s_local = student.params / lo.mp
    s_part = s_local / lo.dp
    if lo.offload != "none":
        return 0.0
    if lo.zero == 0:
        largest = largest_tensor(student) / lo.mp
        return 8 * s_local if e == 2 else 4 * (s_local if not on_cpu else 2 * largest)
    if lo.zero in (1, 2):
        return (2 + 4) * s_part if e == 2 else 4 * s_part
    return 4 * s_part
