"""Functional forwards of the trained student between training steps, under every backend.

AutoSKD's θ step (:mod:`autoskd.search.theta_step`) runs the student through
``torch.func.functional_call`` with tensors of its own for the weights (the virtual SGD step
``w − ξ ∇_w L_train``), between two of the trainer's steps. Under DeepSpeed three things stand in
the way, and this module removes them:

* **ZeRO-3 partitions**: each rank holds 1/N of every parameter. :func:`whole_parameters` gathers
  them for the θ step (a collective: every rank takes the step) and releases them after.
* **ZeRO-3's hooks**: every submodule has forward hooks that gather and release *its own*
  parameters; ``functional_call`` swaps those for plain tensors the hooks do not know, so the
  hooks are set aside for the duration and put back, in order, afterwards
  (:func:`hooks_suspended`).
* **Data parallelism**: each rank holds its own slice of the train batch. The virtual step's
  gradient and the θ-gradient are averaged over the ranks (:func:`mean_over_ranks`), so the
  virtual step is the whole batch's, θ stays identical on every rank, and N processes compute
  what one process computes on the whole batch (tests/test_deepspeed.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

#: the per-module hook tables ``nn.Module.__call__`` consults
_HOOK_TABLES = ("_forward_pre_hooks", "_forward_hooks", "_forward_pre_hooks_with_kwargs",
                "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_hooks",
                "_backward_pre_hooks")


@contextmanager
def hooks_suspended(module: nn.Module) -> Iterator[None]:
    """Every forward/backward hook of ``module`` and its submodules off inside the block, then
    restored exactly (same handles, same order)."""
    saved = []
    for sub in module.modules():
        for key in _HOOK_TABLES:
            table = getattr(sub, key, None)
            if table:
                saved.append((table, list(table.items())))
                table.clear()
    try:
        yield
    finally:
        for table, items in saved:
            table.clear()
            table.update(items)


@contextmanager
def whole_parameters(module: nn.Module) -> Iterator[None]:
    """``module``'s ZeRO-3 partitioned parameters gathered whole (and its hooks suspended) inside
    the block; a no-op for a module without partitions (ZeRO 0-2, one process)."""
    partitioned = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None), hooks_suspended(module):
        yield


def mean_over_ranks(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The element-wise mean of each tensor over the default process group (one all-reduce of
    the tensors flattened together); the tensors themselves when there is no group."""
    tensors = list(tensors)
    if not tensors or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return tensors
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    out, start = [], 0
    for t in tensors:
        out.append(flat[start:start + t.numel()].view(t.shape).to(t.dtype))
        start += t.numel()
    return out
