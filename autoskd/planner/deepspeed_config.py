"""A layout -> the DeepSpeed config JSON and the launch command that would run it.

The config uses DeepSpeed's own keys (``zero_optimization``, ``offload_optimizer``,
``offload_param``, ``fp16``/``bf16``, ``activation_checkpointing``); ``autoskd distill
--deepspeed CONFIG.json`` reads it. Model parallelism is not a DeepSpeed key: it goes on the
command line as ``--tensor-parallel N`` (autoskd distill's flag).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from ..defaults import DEFAULT_LR
from .memory import Layout


def deepspeed_config(layout: Layout, *, gradient_accumulation: int = 1, lr: float = DEFAULT_LR,
                     gradient_clipping: float = 1.0) -> dict:
    """DeepSpeed config dict for ``layout`` (ZeRO stage, offload, precision, batch sizes)."""
    lo = layout
    cfg: dict = {
        "train_micro_batch_size_per_gpu": lo.micro_batch,
        "gradient_accumulation_steps": gradient_accumulation,
        "train_batch_size": lo.micro_batch * gradient_accumulation * lo.dp,
        "gradient_clipping": gradient_clipping,
        "steps_per_print": 100,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.999], "eps": 1e-8,
                                                  "weight_decay": 0.01}},
    }
    if lo.precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "loss_scale_window": 1000,
                       "initial_scale_power": 16, "hysteresis": 2, "min_loss_scale": 1}
    elif lo.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    zero: dict = {"stage": lo.zero}
    if lo.zero >= 1:
        zero.update({"contiguous_gradients": True, "overlap_comm": True,
                     "reduce_bucket_size": lo.reduce_bucket})
    if lo.zero in (1, 2):
        zero.update({"allgather_bucket_size": lo.reduce_bucket, "reduce_scatter": True})
    if lo.zero == 3:
        zero.update({"stage3_prefetch_bucket_size": lo.prefetch_bucket,
                     "stage3_param_persistence_threshold": 100000,
                     "stage3_max_live_parameters": lo.max_live})
    if lo.offload in ("optimizer", "optimizer+params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if lo.offload == "optimizer+params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    cfg["zero_optimization"] = zero
    if lo.checkpointing:
        cfg["activation_checkpointing"] = {"partition_activations": lo.mp > 1,
                                           "contiguous_memory_optimization": False,
                                           "cpu_checkpointing": False}
    return cfg


def launch_command(layout: Layout, config_path: str | Path, *, team: str = "TEAM.yaml",
                   extra: list[str] | None = None) -> str:
    """The ``deepspeed`` launcher line (one node, ``layout.gpus`` GPUs) running ``autoskd distill``
    under this config; ``--tensor-parallel`` carries the MP degree, which DeepSpeed has no key for."""
    args = ["deepspeed", "--num_gpus", str(layout.gpus), "--module", "autoskd.cli", "distill",
            "--deepspeed", str(config_path), "--tensor-parallel", str(layout.mp), "--team", team,
            # autoskd's DeepSpeed backend splits --batch-size over all processes (micro-batch each)
            "--batch-size", str(layout.micro_batch * layout.gpus), "--max-length", str(layout.seq_len)]
    return " ".join(shlex.quote(a) for a in args + list(extra or []))


def write_deepspeed_config(layout: Layout, path: str | Path, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(deepspeed_config(layout, **kwargs), indent=2) + "\n")
    return path
