"""Teacher-student tensor parallelism (GKD's teacher-student parallel strategy, Megatron-style).

A 2-D device mesh ``(dp, tp)`` over the ranks: inside a ``tp`` group every BERT layer of the
teacher (and optionally of the student) is split with ``torch.distributed.tensor.parallel``:
Q/K/V and the MLP's first linear column-wise (each rank holds ``heads / tp`` heads and
``intermediate / tp`` units), the attention output and the MLP's second linear row-wise (one
all-reduce each). Embeddings, LayerNorms, pooler and classifier stay replicated, so hidden
states and logits come out whole on every rank. A rank holds 1/tp of the layer weights of each
model -- the "matching parameters of teacher and student" on one device, as in GKD's Figure 2.

Llama-family decoders (Llama, Mistral, Qwen2/3, Gemma, SmolLM: ``self_attn.{q,k,v,o}_proj``,
``mlp.{gate,up,down}_proj``) split the same way: Q, K, V, gate and up column-wise, O and down
row-wise. With grouped-query attention each rank holds ``heads / tp`` query heads and
``kv_heads / tp`` key/value heads -- the heads that read them -- so both must divide by ``tp``;
the model's attention code infers the local head counts from the shard widths. RMSNorms and
rotary embeddings are replicated. An output layer that is not tied to the word embeddings
(Llama-3 8B/70B) is split over the vocabulary too, the embedding row-wise and the output layer
column-wise with its logits gathered, so every rank still gets the whole ``[B, T, V]`` logits;
a tied pair stays replicated (one matrix cannot carry two shardings). A decoder's attention
features are recorded inside the attention function on local heads, so a tensor-parallel
decoder teacher serves hidden states and logits, and refuses attention features in one line.

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
#: Megatron's split of one layer, by the HF module names of each family.
LAYER_PLANS = {
    "bert": {"attention.self.query": "col", "attention.self.key": "col", "attention.self.value": "col",
             "attention.output.dense": "row", "intermediate.dense": "col", "output.dense": "row"},
    "llama": {"self_attn.q_proj": "col", "self_attn.k_proj": "col", "self_attn.v_proj": "col",
              "self_attn.o_proj": "row", "mlp.gate_proj": "col", "mlp.up_proj": "col", "mlp.down_proj": "row"},
}
#: Features a tensor-parallel decoder cannot serve whole (recorded on local heads).
_DECODER_HEAD_FEATURES = ("attention_scores", "attention_probs", "query", "key", "value")


def _layer_plan(layer: nn.Module) -> dict[str, str]:
    """Which linears of a BERT-style or Llama-style layer are column- or row-wise."""
    names = dict(layer.named_modules())
    for plan in LAYER_PLANS.values():
        if all(n in names for n in plan):
            return plan
    raise AutoSKDError(f"tensor parallelism knows BERT-style and Llama-style layers (q/k/v/o_proj with "
                       f"gate/up/down_proj); {type(layer).__name__} has neither; shard only Llama/BERT teachers")


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
        kv_heads = getattr(getattr(model, "config", None), "num_key_value_heads", None) or geom.num_heads
        if kv_heads % self.tp_size:
            raise AutoSKDError(f"{kv_heads} key/value heads cannot be split over {self.tp_size} ranks; "
                               f"use --tensor-parallel dividing {kv_heads}")
        for i in range(geom.num_layers):
            layer = module_at(model, adapter.path("layer", i))
            plan = _layer_plan(layer)
            before = {n: (set(layer.get_submodule(n)._forward_pre_hooks), set(layer.get_submodule(n)._forward_hooks))
                      for n in plan}
            parallelize_module(layer, self.tp_mesh, {n: ColwiseParallel() if kind == "col" else RowwiseParallel()
                                                     for n, kind in plan.items()})
            self._remember_hooks(layer, before)
            for kind in COLWISE:
                path = getattr(adapter, kind, None)
                if path is not None:  # the raw projection's output, gathered over the heads
                    module_at(model, path.format(i=i)).autoskd_gather = self.gather_last_dim
        if adapter.causal:
            self._shard_vocabulary(model)
        return model

    def _remember_hooks(self, root: nn.Module, before: dict) -> None:
        """Record the hooks TP added to ``root``'s submodules since ``before``, to remove them later."""
        for name, (pre, post) in before.items():
            sub = root.get_submodule(name)
            self._tp_hooks.append((sub, [k for k in sub._forward_pre_hooks if k not in pre],
                                   [k for k in sub._forward_hooks if k not in post]))

    def _shard_vocabulary(self, model: nn.Module) -> None:
        """An untied decoder's embedding (rows) and output layer (columns, logits gathered) over
        the vocabulary: the two largest matrices of a Llama-3 model. Tied ones stay replicated."""
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        if head is None or embed is None or head.weight is embed.weight:
            return
        if embed.weight.shape[0] % self.tp_size or head.weight.shape[0] % self.tp_size:
            return  # an odd vocabulary size: keep them whole
        names = {id(m): n for n, m in model.named_modules()}
        plan = {names[id(embed)]: RowwiseParallel(input_layouts=Replicate()),
                names[id(head)]: ColwiseParallel(output_layouts=Replicate())}
        before = {n: (set(model.get_submodule(n)._forward_pre_hooks), set(model.get_submodule(n)._forward_hooks))
                  for n in plan}
        parallelize_module(model, self.tp_mesh, plan)
        self._remember_hooks(model, before)

    @staticmethod
    def check_decoder_features(names: Iterable[str]) -> None:
        """A decoder's head-level features come from local heads under TP: refuse them."""
        bad = [n for n in names if str(n).split(":")[0] in _DECODER_HEAD_FEATURES]
        if bad:
            raise AutoSKDError(f"a tensor-parallel decoder teacher serves hidden states and logits, not {bad[0]!r} "
                               "(its attention is recorded on this rank's heads only); drop --tensor-parallel "
                               "or use a method without attention terms")

    def gather_last_dim(self, local: torch.Tensor) -> torch.Tensor:
        """The whole feature from this rank's column shard (gradients flow back to the shard)."""
        from torch.distributed.tensor import DTensor, Shard

        return DTensor.from_local(local, self.tp_mesh, [Shard(local.dim() - 1)], run_check=False).full_tensor()

    def shard_teachers(self, policy, batch_sharded: bool = False) -> None:
        """Shard each teacher; with ``batch_sharded`` (student data-parallel over every rank) each
        ``tp`` group runs its teacher on the group's gathered batch slices."""
        for teacher in policy.teachers.values():
            teacher.fingerprint  # noqa: B018 - from the whole weights
            causal = ArchitectureAdapter.for_model(teacher.model).causal
            self.shard(teacher.model)
            features, wrapped = teacher.features, False
            if causal:
                features, wrapped = self._checked_features(features), True
            if batch_sharded and self.tp_size > 1:
                features, wrapped = self._group_features(features), True
            if wrapped:
                teacher.features = features

    def _checked_features(self, features):
        def checked(batch: dict, names: Iterable[str]) -> dict[str, torch.Tensor]:
            names = list(names)
            self.check_decoder_features(names)
            return features(batch, names)
        return checked

    def _group_features(self, features):
        def grouped(batch: dict, names: Iterable[str]) -> dict[str, torch.Tensor]:
            names = list(names)
            full = {k: self._gather_batch(v) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in batch.items()}
            feats = features(full, names)
            out = {k: v.tensor_split(self.tp_size)[self.tp_rank] for k, v in feats.items() if torch.is_tensor(v)}
            cached = [k for k in feats if k not in out]
            if cached:  # rows of a cache (an LM teacher's top-k): a lookup, no forward, so this rank's own
                out.update(features(batch, cached))
            return out
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
