"""Teacher-student tensor parallelism (GKD's teacher-student parallel strategy, Megatron-style).

A 2-D device mesh ``(dp, tp)`` over the ranks: inside a ``tp`` group every BERT layer of the
teacher (and optionally of the student) is split with ``torch.distributed.tensor.parallel``:
Q/K/V and the MLP's first linear column-wise (each rank holds ``heads / tp`` heads and
``intermediate / tp`` units), the attention output and the MLP's second linear row-wise (one
all-reduce each). Embeddings, LayerNorms, pooler and classifier stay replicated, so hidden
states and logits come out whole on every rank. A rank holds 1/tp of the layer weights of each
model -- the "matching parameters of teacher and student" on one device, as in GKD's Figure 2.

Extraction hooks still see whole features: the column-wise Q/K/V modules carry an
``autoskd_gather`` function (a DTensor ``full_tensor``, autograd-aware) that the
:class:`~autoskd.engine.hooks.FeatureExtractor` applies to what it records.

Composition with ZeRO: with a DeepSpeed backend the student trains data-parallel over all
ranks (ZeRO partitions its states), while the teacher is tensor-parallel: each ``tp`` group
gathers its ranks' batch slices, runs the sharded teacher once on them and hands each rank the
features of its own slice. A tensor-parallel *student* trains with the plain torch backend
(DTensor parameters; DeepSpeed's ZeRO does not take DTensors).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from ..errors import AutoSKDError
from ..models.adapters import ArchitectureAdapter, module_at

COLWISE = ("query", "key", "value")


def _layer_plan(layer: nn.Module) -> dict[str, str]:
    """Which linears of a BERT-style layer are column- or row-wise (by their HF names)."""
    names = dict(layer.named_modules())
    wanted = {"attention.self.query": "col", "attention.self.key": "col", "attention.self.value": "col",
              "attention.output.dense": "row", "intermediate.dense": "col", "output.dense": "row"}
    missing = [n for n in wanted if n not in names]
    if missing:
        raise AutoSKDError(f"tensor parallelism knows BERT-style layers; {type(layer).__name__} lacks "
                           f"{', '.join(missing)}")
    return wanted


class TensorParallel:
    """A ``(dp, tp)`` mesh and the sharding of teachers (and optionally the student) over ``tp``."""

    def __init__(self, tp_size: int, *, shard_student: bool = False):
        from torch.distributed.device_mesh import init_device_mesh

        from .deepspeed_backend import init_distributed

        init_distributed()
        world = dist.get_world_size()
        if tp_size < 1 or world % tp_size:
            raise AutoSKDError(f"--tensor-parallel {tp_size} must divide the number of processes ({world})")
        self.tp_size, self.dp_size = tp_size, world // tp_size
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.mesh = init_device_mesh(device, (self.dp_size, tp_size), mesh_dim_names=("dp", "tp"))
        self.tp_mesh = self.mesh["tp"]
        self.tp_group = self.tp_mesh.get_group()
        self.tp_rank = self.tp_mesh.get_local_rank()
        self.rank, self.world_size = dist.get_rank(), world
        self.shard_student = shard_student
        self._tp_hooks: list[tuple[nn.Module, list, list]] = []

    # ------------------------------------------------------------------ sharding
    def shard(self, model: nn.Module) -> nn.Module:
        """Split every encoder layer of ``model`` over the ``tp`` mesh dimension (in place)."""
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        adapter = ArchitectureAdapter.for_model(model)
        geom = adapter.geometry
        if geom.num_heads % self.tp_size:
            raise AutoSKDError(f"{geom.num_heads} attention heads cannot be split over {self.tp_size} ranks")
        for i in range(geom.num_layers):
            layer = module_at(model, adapter.path("layer", i))
            plan = _layer_plan(layer)
            before = {n: (set(layer.get_submodule(n)._forward_pre_hooks), set(layer.get_submodule(n)._forward_hooks))
                      for n in plan}
            parallelize_module(layer, self.tp_mesh, {n: ColwiseParallel() if kind == "col" else RowwiseParallel()
                                                     for n, kind in plan.items()})
            for name, (pre, post) in before.items():  # remember the hooks TP added, to remove them later
                sub = layer.get_submodule(name)
                self._tp_hooks.append((sub, [k for k in sub._forward_pre_hooks if k not in pre],
                                       [k for k in sub._forward_hooks if k not in post]))
            for name in COLWISE:
                layer.get_submodule(f"attention.self.{name}").autoskd_gather = self.gather_last_dim
        return model

    def gather_last_dim(self, local: torch.Tensor) -> torch.Tensor:
        """The whole feature from this rank's column shard (gradients flow back to the shard)."""
        from torch.distributed.tensor import DTensor, Shard

        return DTensor.from_local(local, self.tp_mesh, [Shard(local.dim() - 1)], run_check=False).full_tensor()

    def shard_teachers(self, policy, batch_sharded: bool = False) -> None:
        """Shard each teacher; with ``batch_sharded`` (student data-parallel over every rank) each
        ``tp`` group runs its teacher on the group's gathered batch slices."""
        for teacher in policy.teachers.values():
            teacher.fingerprint  # noqa: B018 - from the whole weights
            self.shard(teacher.model)
            if batch_sharded and self.tp_size > 1:
                teacher.features = self._group_features(teacher.features)

    def _group_features(self, features):
        def grouped(batch: dict, names: Iterable[str]) -> dict[str, torch.Tensor]:
            full = {k: self._gather_batch(v) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in batch.items()}
            feats = features(full, names)
            return {k: v.tensor_split(self.tp_size)[self.tp_rank] for k, v in feats.items()}
        return grouped

    def _gather_batch(self, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.tp_size)]
        dist.all_gather(parts, t.contiguous(), group=self.tp_group)
        return torch.cat(parts, 0)

    # ------------------------------------------------------------------ back to plain modules
    def unshard(self, model: nn.Module) -> None:
        """Whole plain parameters and no TP hooks again (for evaluation elsewhere and saving)."""
        from torch.distributed.tensor import DTensor

        mods = {id(m) for m in model.modules()}
        for sub, pre, post in self._tp_hooks:
            if id(sub) not in mods:
                continue
            for key in pre:
                sub._forward_pre_hooks.pop(key, None)
            for key in post:
                sub._forward_hooks.pop(key, None)
            sub.__dict__.pop("autoskd_gather", None)
            for name, p in list(sub._parameters.items()):
                if isinstance(p, DTensor):
                    sub._parameters[name] = nn.Parameter(p.full_tensor().detach().clone(), requires_grad=p.requires_grad)
        self._tp_hooks = [h for h in self._tp_hooks if id(h[0]) not in mods]

    def finish(self, distiller) -> None:
        """After a run: plain student and teachers (TP hooks removed, whole weights)."""
        if self.shard_student:
            self.unshard(distiller.student)
        if distiller.policy is not None:
            for teacher in distiller.policy.teachers.values():
                self.unshard(teacher.model)
                teacher.__dict__.pop("features", None)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict with DTensors made whole."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in model.state_dict().items()}
