"""How the one training loop updates its trainable modules: plain PyTorch or DeepSpeed.

:class:`~autoskd.engine.trainer.Distiller` owns the loop (teacher choice, features, losses,
logging, evaluation, callbacks). What differs between a one-process run and a ZeRO run is
only *how* the losses are computed and applied, and *how* the state is checkpointed; a
backend does exactly that:

* ``start_stage`` -> (optimizer, scheduler) for a stage's trainable parameters;
* ``batches`` -> this rank's share of each global batch (all of it in one process);
* ``compute`` -> run the loss closure (under DeepSpeed: inside the engine's forward, so
  ZeRO-3 gathers and releases the student's and auxiliary model's parameters);
* ``update`` -> backward, clipping and the optimizer step;
* ``save`` / ``restore`` -> checkpoints; ``full_state`` / ``load_full_state`` -> whole
  student weights (gathered under ZeRO-3) for restore-best;
* ``end_stage`` -> leave plain modules behind (ZeRO-3 unshards them).

:class:`TorchBackend` is the default; :class:`autoskd.engine.deepspeed_backend.DeepSpeedBackend`
is used when a DeepSpeed config is given.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import get_linear_schedule_with_warmup


def adamw(params: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and LayerNorm weights (BERT's recipe)."""
    return torch.optim.AdamW(param_groups(params, weight_decay), lr=lr)


def param_groups(params: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
    decay = [p for n, p in params if not n.endswith(no_decay)]
    rest = [p for n, p in params if n.endswith(no_decay)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class TorchBackend:
    """One process, torch AdamW, ``clip_grad_norm_``, everything in ``checkpoint.pt``."""

    is_main = True
    rank = 0
    world_size = 1
    shards_teacher = False

    def setup(self, distiller) -> None:
        """Called once the Distiller has its student, auxiliary model and teachers."""

    def start_stage(self, distiller, stage, total_steps: int, params: list[tuple[str, nn.Parameter]]):
        optimizer = adamw(params, stage.lr, stage.weight_decay)
        scheduler = get_linear_schedule_with_warmup(optimizer, int(stage.warmup_ratio * total_steps), total_steps)
        self._params = [p for _, p in params]
        return optimizer, scheduler

    def batches(self, loader: DataLoader):
        return loader

    def compute(self, fn: Callable[[], Any]) -> Any:
        return fn()

    def update(self, loss: torch.Tensor, optimizer, max_grad_norm: float) -> None:
        optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:  # a step can have no trainable path (Theseus replacing no layer)
            loss.backward()
            if max_grad_norm and max_grad_norm > 0:
                nn.utils.clip_grad_norm_(self._params, max_grad_norm)
        optimizer.step()  # without gradients AdamW leaves every parameter as it is

    def step_scheduler(self, scheduler) -> None:
        scheduler.step()

    def prepare_teachers(self, policy, loader, data_id, cache, device, progress) -> None:
        policy.prepare(loader, data_id, cache, device, progress)

    def eval_model(self, student: nn.Module) -> nn.Module:
        return student

    def full_state(self, module: nn.Module) -> dict:
        return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}

    def load_full_state(self, module: nn.Module, state: dict) -> None:
        module.load_state_dict(state)

    # ------------------------------------------------------------------ checkpoints
    def load_meta(self, path: Path, device) -> dict | None:
        if not path.exists():
            return None
        return torch.load(path, map_location=device, weights_only=False)

    def restore_modules(self, distiller, state: dict) -> None:
        """At resume time, before any stage starts: the trained modules' weights."""
        distiller.student.load_state_dict(state["student"])
        distiller.auxiliary.load_state_dict(state["auxiliary"])

    def restore_stage(self, state: dict, optimizer, scheduler) -> None:
        """At the start of the resumed stage: optimizer and scheduler."""
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])

    def save(self, path: Path, meta: dict, distiller, optimizer, scheduler) -> None:
        state = {**meta, "student": distiller.student.state_dict(), "auxiliary": distiller.auxiliary.state_dict(),
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        write_atomic(path, state)

    def end_stage(self, distiller) -> None:
        """After a stage: nothing to release in one process."""

    def barrier(self) -> None:
        """Nothing to wait for in one process."""


def write_atomic(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def scheduler_steps(total_steps: int, accumulation: int) -> int:
    """Optimizer steps of a stage of ``total_steps`` micro-batches."""
    return max(1, math.ceil(total_steps / max(1, accumulation)))


def make_backend(deepspeed: Any = None, tensor_parallel: Any = None):
    """The backend for a ``deepspeed`` config (path, dict or None) and an optional TP mesh."""
    if deepspeed is None:
        return TorchBackend()
    from .deepspeed_backend import DeepSpeedBackend

    return DeepSpeedBackend(deepspeed, tensor_parallel=tensor_parallel)
