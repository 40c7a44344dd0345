"""Memory planner: which distillation layout (MP x DP x ZeRO x offload x batch x precision) fits
before a GPU is rented, and how much memory each part takes per device.

Models are described by a table-8 size name (``"100B"``), a named Llama-family decoder
(``"llama3-70b"``, ``"llama3-8b"``, ``"llama3.2-1b"``, ``"llama2-7b"``, ...), a Hugging Face
config (alias, folder, ``config.json`` path or hub id) or ``"layers=L,hidden=H,vocab=V"`` (with
``kv_heads``/``gated``/``tied`` a Llama-shaped decoder); parameters are counted on
the ``meta`` device, so nothing is allocated. The memory terms and the cost model are explained
in :mod:`autoskd.planner.memory` and :mod:`autoskd.planner.search`.

Usage::

    from autoskd.planner import predict_memory, plan_layouts, deepspeed_config

    # One layout, e.g. what one CPU rank of a 2-process ZeRO-2 run holds (MiniLM-L6 teacher,
    # its first 2 layers as the student, fp32, micro-batch 8, 128 tokens):
    est = predict_memory("minilm-l6", "minilm-l6", student_layers=2, zero=2, dp=2,
                         micro_batch=8, seq_len=128, precision="fp32", device="cpu",
                         features="classifier")
    est.peak_bytes            # predicted peak bytes per rank (model + training state)
    est.components            # {"student_weights": ..., "gradients": ..., "optimizer_states": ...}

    # Every layout on 8 x 40 GB GPUs, fastest fitting first:
    plan = plan_layouts("100B", "20B", gpus=8, gpu_memory="40GB")

    # Llama-3 70B into Llama-2 7B on 8 x 80 GB, next-token KD, live teacher or a top-64 cache:
    plan = plan_layouts("llama3-70b", "llama2-7b", gpus=8, gpu_memory="80GB", features="lm-logits",
                        seq_lens=(2048,), precisions=("bf16",), top_ks=(0, 64))
    plan.best.estimate.layout           # Layout(mp=8, dp=1, zero=..., offload=...)
    deepspeed_config(plan.best.estimate.layout)   # DeepSpeed's own config dict

On a CPU the prediction is the training state of the models (weights, gradients, Adam states,
activations, DeepSpeed buffers); the Python/torch runtime of the process itself (a few hundred
MB of RSS) is not in it: measure that baseline before building the models and subtract it, or
pass it as ``baseline_bytes``.
"""

from __future__ import annotations

import re

from ..errors import AutoSKDError
from .deepspeed_config import deepspeed_config, launch_command, write_deepspeed_config
from .decoders import LLAMA
from .memory import ALLOCATORS, COMPONENTS, FEATURES, GiB, Estimate, Hardware, Layout, cpu_hardware, estimate
from .search import Candidate, Plan, plan, seconds_per_sample
from .shapes import TABLE8, ModelShape, resolve_shape, table8_shape

__all__ = ["ALLOCATORS", "COMPONENTS", "FEATURES", "LLAMA", "TABLE8", "Candidate", "Estimate", "GiB", "Hardware", "Layout",
           "ModelShape", "Plan", "deepspeed_config", "estimate", "launch_command", "parse_memory",
           "plan", "plan_layouts", "predict_memory", "resolve_shape", "seconds_per_sample",
           "table8_shape", "write_deepspeed_config"]

_UNITS = {"": GiB, "g": GiB, "gb": GiB, "gib": GiB, "m": 1024 ** 2, "mb": 1024 ** 2, "mib": 1024 ** 2,
          "t": 1024 ** 4, "tb": 1024 ** 4, "tib": 1024 ** 4}


def parse_memory(text) -> int:
    """``"40GB"`` -> bytes. GPU sizes are binary: an "A100 40GB" has 40 GiB (40960 MiB), so GB
    and GiB both mean 2**30 here; MB/MiB 2**20, TB/TiB 2**40; a bare number is GiB."""
    if isinstance(text, (int, float)) and not isinstance(text, bool) and text > 0:
        return int(text * GiB)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise AutoSKDError(f"bad memory size '{text}'; write e.g. 40GB, 80GiB or 512MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def predict_memory(teacher, student, *, zero: int = 0, offload: str = "none", dp: int = 1, mp: int = 1,
                   micro_batch: int = 1, seq_len: int = 128, precision: str = "fp32",
                   checkpointing: bool = False, device: str = "cpu", features: str = "classifier",
                   teacher_layers: int | None = None, student_layers: int | None = None,
                   baseline_bytes: int = 0, top_k: int = 0, allocator: str | None = None,
                   lm_ce: bool = False) -> Estimate:
    """Predicted memory per rank for one layout (see the module docstring for an example).

    ``teacher``/``student``: a size name, HF config source, ``ModelShape`` or ``layers=..`` spec;
    ``*_layers`` keep the first k layers (e.g. a 2-layer student cut from a 6-layer model).
    ``baseline_bytes`` is added to the peak (the process's own runtime memory, if you want it in).
    LM pairs (``features="lm-logits"``): ``top_k`` > 0 serves the teacher from a top-k cache,
    ``lm_ce`` adds the student's own next-token loss, ``allocator`` says how freed memory
    behaves (:data:`~autoskd.planner.memory.ALLOCATORS`).
    """
    t = resolve_shape(teacher, layers=teacher_layers)
    s = resolve_shape(student, layers=student_layers)
    layout = Layout(mp=mp, dp=dp, zero=zero, offload=offload, micro_batch=micro_batch, seq_len=seq_len,
                    precision=precision, checkpointing=checkpointing, top_k=top_k)
    est = estimate(t, s, layout, features=features, device=device, allocator=allocator, lm_ce=lm_ce)
    if baseline_bytes:
        est = Estimate(est.layout, est.components, est.peak_bytes + int(baseline_bytes), est.host_bytes, est.phase,
                       est.phases)
    return est


def plan_layouts(teacher, student, *, gpus: int, gpu_memory="40GB", device: str = "cuda",
                 teacher_layers: int | None = None, student_layers: int | None = None, **kwargs) -> Plan:
    """All layouts on ``gpus`` devices of ``gpu_memory`` each; ``kwargs`` go to :func:`plan`
    (``micro_batches``, ``seq_lens``, ``precisions``, ``zero_stages``, ``offloads``,
    ``checkpointing``, ``mp_degrees``, ``features``, ``top_ks``)."""
    memory = parse_memory(gpu_memory)
    hw = Hardware(memory_bytes=memory) if device == "cuda" else cpu_hardware(memory)
    if device not in ("cuda", "cpu"):
        raise AutoSKDError(f"device must be 'cuda' or 'cpu' (got {device!r})")
    t = resolve_shape(teacher, layers=teacher_layers)
    s = resolve_shape(student, layers=student_layers)
    return plan(t, s, gpus=gpus, hardware=hw, **kwargs)
