"""DeepSpeed as a mode of the one training loop (ZeRO 0-3, CPU offload, accumulation, bf16/fp16).

The config is DeepSpeed's own JSON (``--deepspeed ds.json`` or a ``deepspeed:`` block in a YAML);
``"auto"`` (or a missing key) is filled from the stage: micro-batch = the loader's batch / world
size, ``gradient_clipping`` = the stage's ``max_grad_norm``, optimizer ``lr``/``weight_decay``.
Without an ``optimizer`` section the engine gets autoskd's torch AdamW (decay groups as in BERT),
which ZeRO-Offload accepts (``zero_force_ds_cpu_optimizer`` is set to false for it).

What trains under DeepSpeed is one module holding the student *and* the auxiliary model
(projections). Its ``forward`` runs the trainer's loss closure, so under ZeRO-3 the engine's
hooks gather every parameter the student forward, the extraction hooks and the projections read
and release them after; an MLM head's decoder, tied to the word embeddings, gathers them as a
DeepSpeed external parameter, so word predictions (``mlm_logits``) work under ZeRO-3 too. The frozen teachers are sharded too under ZeRO-3 (an optimizer-less
ZeRO-3 engine, as for inference), unless ``shard_teacher=False``. After each stage the modules
are left unsharded (plain parameters with the trained values), so evaluation and
``save_pretrained`` work as in one process.

Each rank trains on its slice of every global batch (the loader's batch), so N processes see
the same data as one process with the same ``--batch-size``: losses and weights agree with a
one-process run (tests/test_deepspeed.py). Launch with ``deepspeed`` or ``torchrun``; one process
without a launcher works too (world size 1). Without CUDA, ``DS_ACCELERATOR=cpu`` and gloo.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from transformers import get_linear_schedule_with_warmup

from ..errors import AutoSKDError
from .backends import TorchBackend, adamw, param_groups, scheduler_steps, write_atomic
from .functional_forward import mean_over_ranks, whole_parameters


def load_deepspeed_config(source: Any) -> dict:
    """A DeepSpeed config from a dict, a JSON file or a YAML file (``deepspeed:`` block or whole file)."""
    if isinstance(source, dict):
        return copy.deepcopy(source)
    path = Path(str(source))
    if not path.exists():
        raise AutoSKDError(f"DeepSpeed config {path} does not exist; pass a JSON file such as configs/zero2.json")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
            data = data.get("deepspeed", data) if isinstance(data, dict) else data
        else:
            data = json.loads(text)
    except Exception as err:  # noqa: BLE001 - any parse error is the user's file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise AutoSKDError(f"cannot read DeepSpeed config {path}: {first}; fix the syntax") from None
    if not isinstance(data, dict):
        raise AutoSKDError(f"DeepSpeed config {path} must be a JSON object (DeepSpeed's config format)")
    return data


def zero_stage(config: dict) -> int:
    return int((config.get("zero_optimization") or {}).get("stage", 0) or 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Join the launcher's process group (gloo on CPU, nccl on CUDA), or make a one-process one."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if dist.is_available() and dist.is_initialized():
        return
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               verbose=False)


def device_for_rank() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def resolve_config(config: dict, *, micro_batch: int, world: int, lr: float, weight_decay: float,
                   max_grad_norm: float, device: torch.device) -> dict:
    """Fill ``"auto"``/missing batch, clipping, optimizer and precision entries for one stage."""
    cfg = copy.deepcopy(config)

    def auto(key):
        return cfg.get(key, "auto") == "auto"

    gas = 1 if auto("gradient_accumulation_steps") else int(cfg["gradient_accumulation_steps"])
    if auto("train_micro_batch_size_per_gpu"):
        cfg["train_micro_batch_size_per_gpu"] = micro_batch
    elif int(cfg["train_micro_batch_size_per_gpu"]) != micro_batch:
        raise AutoSKDError(f"DeepSpeed train_micro_batch_size_per_gpu={cfg['train_micro_batch_size_per_gpu']} but "
                           f"--batch-size / processes = {micro_batch}; set it to \"auto\"")
    cfg["gradient_accumulation_steps"] = gas
    cfg["train_batch_size"] = micro_batch * gas * world
    if auto("gradient_clipping"):
        cfg["gradient_clipping"] = float(max_grad_norm or 0.0)
    opt = cfg.get("optimizer")
    if opt is not None:
        params = opt.setdefault("params", {})
        if params.get("lr", "auto") == "auto":
            params["lr"] = lr
        if params.get("weight_decay", "auto") == "auto":
            params["weight_decay"] = weight_decay
    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    if opt is None and (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None):
        cfg.setdefault("zero_force_ds_cpu_optimizer", False)  # autoskd's torch AdamW on the CPU copy
    for half in ("fp16", "bf16"):
        section = cfg.get(half)
        if isinstance(section, dict) and section.get("enabled") == "auto":
            section["enabled"] = half == "bf16" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    if (cfg.get("fp16") or {}).get("enabled") and device.type != "cuda":
        raise AutoSKDError("DeepSpeed fp16 needs a CUDA device; on CPU use \"bf16\": {\"enabled\": true} or fp32")
    if cfg.get("scheduler") == "auto":
        del cfg["scheduler"]  # autoskd's linear warm-up schedule
    return cfg


class _Trained(nn.Module):
    """The student and the auxiliary model as one DeepSpeed module; forward runs the loss closure."""

    def __init__(self, student: nn.Module, auxiliary: nn.Module):
        super().__init__()
        self.student = student
        self.auxiliary = auxiliary

    def forward(self, fn: Callable[[], Any]) -> Any:
        return fn()


class _ThroughEngine(nn.Module):
    """Calls the student inside the engine's forward (ZeRO-3 evaluation mid-training)."""

    def __init__(self, engine, student: nn.Module):
        super().__init__()
        self.engine = engine
        self._student = [student]

    def forward(self, **inputs):
        return self.engine(lambda: self._student[0](**inputs))


def _shard_params(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if hasattr(p, "ds_id")]


def unshard(module: nn.Module, device: torch.device | str | None = None) -> None:
    """Replace ZeRO-3 partitioned parameters of ``module`` by plain ones holding the full values,
    on ``device`` (default: where the partitions are).

    One tensor is gathered at a time, so the extra memory is the whole model once plus one
    gathered tensor -- not the whole model gathered at once next to its copy (2.5x a teacher's
    size per rank at the end of a run, measured). A teacher unsharded to the host leaves no
    device memory behind: a ZeRO-3 teacher of 70B parameters would not fit one GPU whole."""
    params = _shard_params(module)
    if not params:
        return
    import deepspeed

    new: dict[int, nn.Parameter] = {}
    for p in params:
        if id(p) in new:
            continue
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            data = p.data.detach().to(device or p.data.device, copy=True)
        new[id(p)] = nn.Parameter(data, requires_grad=p.requires_grad)
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and id(p) in new:
                mod._parameters[name] = new[id(p)]


def register_tied_decoders(model: nn.Module) -> list[tuple[nn.Module, nn.Parameter]]:
    """Under ZeRO-3, make each MLM head of ``model`` gather the word embedding it is tied to.

    BERT's MLM head (:class:`autoskd.engine.mlm.MLMHead`) multiplies by the word embeddings'
    weight, a parameter of another module; ZeRO-3 gathers a parameter only for its own module's
    forward and backward, so the head would read an empty partition. DeepSpeed's external
    parameters are the documented fix: the head then gathers (and releases) it too. Returns the
    pairs, for :func:`unregister_tied_decoders`."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    from .mlm import MLMHead

    pairs = [(head, head.decoder_weight) for head in model.modules()
             if isinstance(head, MLMHead) and hasattr(head.decoder_weight, "ds_id")]
    for head, weight in pairs:
        register_external_parameter(head, weight)
    return pairs


def unregister_tied_decoders(pairs: list[tuple[nn.Module, nn.Parameter]]) -> None:
    """Before the parameters are unsharded (replaced): forget the old external parameters."""
    from deepspeed.runtime.zero.partition_parameters import unregister_external_parameter

    for head, weight in pairs:
        unregister_external_parameter(head, weight)


def forget_backward_hooks(module: nn.Module) -> None:
    """Drop the backward-hook functions a destroyed ZeRO-3 engine left on ``module``'s submodules.

    DeepSpeed keeps them in each submodule's ``__dict__`` (bound to that engine's parameter
    coordinator) and ``destroy()`` leaves them; the next stage's engine would reuse them, so its
    backward gathers and releases through the old coordinator and trips its bookkeeping (an
    assertion once no outer module of the old engine is active, e.g. a loss on word predictions
    only). Dropped, the next engine installs its own."""
    for sub in module.modules():
        for key in ("pre_bwd_fn", "post_bwd_fn", "applied_pre_backward_ref_cnt", "ds_grads_remaining"):
            sub.__dict__.pop(key, None)


def whole_fingerprint(model: nn.Module) -> str:
    """:func:`~autoskd.engine.teacher_cache.model_fingerprint` of a model whose parameters are
    ZeRO-3 partitions (built under ``deepspeed.zero.Init``): each tensor is gathered in turn, so
    the digest is the whole model's -- the same cache keys as an unpartitioned run -- while at
    most one tensor is whole at a time. Hashing the partitions themselves would give every
    partitioned model of one architecture the same key."""
    import hashlib

    import deepspeed

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
        with deepspeed.zero.GatheredParameters([tensor] if hasattr(tensor, "ds_id") else [], modifier_rank=None):
            whole = tensor.detach().cpu().contiguous()
            digest.update(name.encode())
            digest.update(str(tuple(whole.shape)).encode())
            digest.update(whole.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class AgreedCache:
    """An LM teacher's top-k cache whose hits every rank agrees on.

    A teacher sharded by ZeRO-3 or tensor parallelism runs in lockstep on all ranks: each
    forward is a chain of collectives. If one rank found a table on disk and skipped the
    teacher pass while another computed it (a file written by another job between the two
    looks, a per-node cache folder, a shared file system that lags), the computing rank would
    wait forever in its first gather. Here a table is served only when every rank loaded it;
    otherwise every rank computes it, together."""

    def __init__(self, cache):
        self.cache = cache

    def load(self, *args, **kwargs):
        table = type(self.cache).load(self.cache, *args, **kwargs)
        everyone = torch.tensor([0 if table is None else 1])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(everyone, op=dist.ReduceOp.MIN)
        return table if int(everyone) else None

    def get_or_compute(self, *args, **kwargs):
        """The cache's own ``get_or_compute`` with its look-up replaced by the agreed one."""
        self.cache.__dict__["load"] = self.load
        try:
            return type(self.cache).get_or_compute(self.cache, *args, **kwargs)
        finally:
            self.cache.__dict__.pop("load", None)

    def __getattr__(self, name):
        return getattr(self.cache, name)


class ShardedBatches:
    """This rank's contiguous slice of each of ``loader``'s (global) batches."""

    def __init__(self, loader: DataLoader, rank: int, world: int):
        self.loader, self.rank, self.world = loader, rank, world
        self.sampler = loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield {k: (v.tensor_split(self.world)[self.rank] if torch.is_tensor(v) and v.dim() > 0 else v)
                   for k, v in batch.items()}


class DeepSpeedBackend(TorchBackend):
    """ZeRO training of student + auxiliary model; frozen teachers sharded under ZeRO-3."""

    def __init__(self, config: Any, *, shard_teacher: bool | None = None, tensor_parallel: Any = None):
        self.config = load_deepspeed_config(config)
        init_distributed()
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.device = device_for_rank()
        self.stage = zero_stage(self.config)
        self.shards_teacher = (self.stage == 3) if shard_teacher is None else shard_teacher
        self.tensor_parallel = tensor_parallel
        if tensor_parallel is not None and tensor_parallel.shard_student:
            raise AutoSKDError("a tensor-parallel student trains without DeepSpeed (ZeRO takes no DTensors); "
                               "drop --deepspeed or shard only the teacher")
        self.engine = None
        self.teacher_engines: list = []
        self._tied: list = []  # the student's MLM heads' external parameters in this stage
        self._teacher_tied: list = []  # the sharded teachers' ones
        self._pending: dict | None = None

    def signature(self) -> dict:
        """A DeepSpeed checkpoint resumes only with the same config and number of processes."""
        return {"deepspeed": json.dumps(self.config, sort_keys=True), "processes": self.world_size}

    # ------------------------------------------------------------------ setup
    def setup(self, distiller) -> None:
        """Shard the frozen teachers under ZeRO-3 (fingerprints are taken first, from full weights)."""
        policy = distiller.policy
        if policy is None:
            return
        half = next((dt for key, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16))
                     if (self.config.get(key) or {}).get("enabled") is True), None)
        if not self.shards_teacher or self.tensor_parallel is not None:
            if half is not None:  # the frozen teacher runs in the training precision
                for teacher in policy.teachers.values():
                    teacher.fingerprint  # noqa: B018 - from the full-precision weights
                    teacher.model.to(half)
            return
        import deepspeed

        # the frozen teachers' inference engines follow the run's ZeRO-3 settings: parameter offload
        # and the stage3_* knobs (what stays whole, how much is gathered at once -- with DeepSpeed's
        # default stage3_max_live_parameters of 1e9 a smaller teacher is gathered whole in each forward)
        user = self.config.get("zero_optimization") or {}
        zero = {"stage": 3, **{k: v for k, v in user.items() if k.startswith("stage3_") and v != "auto"}}
        if user.get("offload_param"):
            zero["offload_param"] = user["offload_param"]
        cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero}
        for half in ("bf16", "fp16"):
            if (self.config.get(half) or {}).get("enabled") is True:
                cfg[half] = {"enabled": True}
        for teacher in policy.teachers.values():
            if teacher._fingerprint is None and _shard_params(teacher.model):  # built under zero.Init
                teacher._fingerprint = whole_fingerprint(teacher.model)
            teacher.fingerprint  # noqa: B018 - computed now, while the weights are whole
            engine, *_ = deepspeed.initialize(model=teacher.model, config=cfg)
            engine.eval()
            self._teacher_tied += register_tied_decoders(teacher.model)  # a word-predicting teacher's head
            self.teacher_engines.append(engine)

    def start_stage(self, distiller, stage, total_steps: int, params):
        import deepspeed

        batch = stage.train.batch_size or 1
        if batch % self.world_size:
            raise AutoSKDError(f"--batch-size {batch} must be divisible by the {self.world_size} processes")
        cfg = resolve_config(self.config, micro_batch=batch // self.world_size, world=self.world_size, lr=stage.lr,
                             weight_decay=stage.weight_decay, max_grad_norm=stage.max_grad_norm, device=self.device)
        steps = scheduler_steps(total_steps, cfg["gradient_accumulation_steps"])
        warmup = int(stage.warmup_ratio * steps)
        optimizer = None
        if cfg.get("optimizer") is None:
            optimizer = adamw(params, stage.lr, stage.weight_decay)  # the single-process AdamW (fused)
        scheduler = None if cfg.get("scheduler") else (lambda opt: get_linear_schedule_with_warmup(opt, warmup, steps))
        module = _Trained(distiller.student, distiller.auxiliary)
        self.engine, optimizer, _, scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, model_parameters=param_groups(params, stage.weight_decay),
            lr_scheduler=scheduler, config=cfg)
        self._tied = register_tied_decoders(module) if self.stage == 3 else []
        self.resolved = cfg
        return optimizer, scheduler

    def batches(self, loader: DataLoader):
        return ShardedBatches(loader, self.rank, self.world_size) if self.world_size > 1 else loader

    def compute(self, fn):
        return self.engine(fn)

    def update(self, loss: torch.Tensor, optimizer, max_grad_norm: float) -> None:
        if loss.requires_grad:
            self.engine.backward(loss)
            self.engine.step()

    def step_scheduler(self, scheduler) -> None:
        """The engine steps the scheduler at each accumulation boundary."""

    def prepare_teachers(self, policy, loader, data_id, cache, device, progress) -> None:
        if self.shards_teacher or self.tensor_parallel is not None:
            # sharded teachers compute in lockstep on every rank: no rank may skip via the cache,
            # and an LM teacher's own top-k cache serves a table only when every rank has it
            agreed = [(t, t.topk_cache) for t in policy.teachers.values() if getattr(t, "topk_cache", None) is not None]
            for teacher, own in agreed:
                teacher.topk_cache = AgreedCache(own)
            try:
                policy.prepare(loader, data_id, None, device, progress and self.is_main)
            finally:
                for teacher, own in agreed:
                    teacher.topk_cache = own
            return
        if self.is_main:  # the first rank fills the cache, the others read it
            policy.prepare(loader, data_id, cache, device, progress)
        self.barrier()
        if not self.is_main:
            policy.prepare(loader, data_id, cache, device, False)

    def eval_model(self, student: nn.Module) -> nn.Module:
        return _ThroughEngine(self.engine, student) if self.stage == 3 and self.engine is not None else student

    def functional_forward(self, module: nn.Module):
        return whole_parameters(module)

    def mean_over_data_ranks(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return mean_over_ranks(tensors)  # the tensors themselves on one rank

    def full_state(self, module: nn.Module) -> dict:
        params = _shard_params(module)
        if not params:
            return super().full_state(module)
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return super().full_state(module)

    def load_full_state(self, module: nn.Module, state: dict) -> None:
        params = _shard_params(module)
        if not params:
            return module.load_state_dict(state)
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            module.load_state_dict(state)

    # ------------------------------------------------------------------ checkpoints
    def restore_stage(self, state: dict, optimizer, scheduler) -> None:
        path, tag = state["deepspeed_dir"], state["deepspeed_tag"]
        loaded, _ = self.engine.load_checkpoint(path, tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        if loaded is None:
            raise AutoSKDError(f"DeepSpeed checkpoint {path}/{tag} is missing or incomplete; delete the run folder")

    def save(self, path: Path, meta: dict, distiller, optimizer, scheduler) -> None:
        ds_dir = path.parent / "deepspeed"
        tag = f"stage{meta['stage_index']}-epoch{meta['epoch']}"
        self.engine.save_checkpoint(str(ds_dir), tag=tag)
        # whole weights too (gathered under ZeRO-3): a run resumed in a later stage starts from them
        weights = {"student": self.full_state(distiller.student), "auxiliary": self.full_state(distiller.auxiliary)}
        self.barrier()
        if self.is_main:
            write_atomic(path, {**meta, **weights, "deepspeed_dir": str(ds_dir), "deepspeed_tag": tag})
            for old in ds_dir.iterdir():  # keep only the checkpoint that checkpoint.pt points at
                if old.is_dir() and old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)
        self.barrier()

    def end_stage(self, distiller) -> None:
        """Leave plain modules: ZeRO-3 partitions are gathered back into whole parameters."""
        if self.engine is not None:
            unregister_tied_decoders(self._tied)
            self._tied = []
            if self.stage == 3:
                unshard(distiller.student)
                unshard(distiller.auxiliary)
            self.engine.destroy()
            self.engine = None
            forget_backward_hooks(distiller.student)
            forget_backward_hooks(distiller.auxiliary)

    def finish(self, distiller) -> None:
        """After the run: unshard the teachers too (the team may be used again in this process)."""
        unregister_tied_decoders(self._teacher_tied)
        self._teacher_tied = []
        for engine in self.teacher_engines:
            unshard(engine.module, device="cpu")  # Distiller moves a reused teacher back to its device
            engine.destroy()
            forget_backward_hooks(engine.module)
        self.teacher_engines = []
        super().finish(distiller)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()
