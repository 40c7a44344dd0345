"""Distillation runs for tests/test_deepspeed.py: in-process (the one-process reference) or
under ``torchrun --nproc_per_node 2`` (DeepSpeed ZeRO / tensor parallelism over gloo).

``python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py OUT CASE...`` runs
each case and (rank 0) saves ``OUT/CASE.pt`` = {"losses": [...], "weights": {...}}.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autoskd.engine.callbacks import Callback  # noqa: E402
from autoskd.engine.trainer import Distiller, Stage  # noqa: E402
import autoskd.methods  # noqa: E402,F401  (registers the built-in methods the runs name)

VOCAB = 100
ZERO = {
    "zero0": {"zero_optimization": {"stage": 0}},
    "zero1": {"zero_optimization": {"stage": 1}},
    "zero2": {"zero_optimization": {"stage": 2}},
    "zero3": {"zero_optimization": {"stage": 3}},
    "zero2_offload": {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
    "zero3_offload": {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                            "offload_param": {"device": "cpu"}}},
    "zero2_ds_adam": {"zero_optimization": {"stage": 2},
                      "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto",
                                                                "torch_adam": True}}},
    "zero1_accum": {"zero_optimization": {"stage": 1}, "gradient_accumulation_steps": 2},
    # every parameter partitioned (none kept whole as "small"): any read outside a gather fails
    "zero3_all": {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}},
}


def bert(layers: int, hidden: int, heads: int = 4, seed: int = 0) -> BertForSequenceClassification:
    config = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=2 * hidden, max_position_embeddings=32, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


def examples(n: int = 16, length: int = 12, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(5, VOCAB, (length,), generator=g)
        mask = torch.ones(length, dtype=torch.long)  # no padding: per-rank means then average exactly
        rows.append({"input_ids": ids * mask, "attention_mask": mask, "labels": torch.tensor(i % 2), "idx": torch.tensor(i)})
    return rows


def loader(batch_size: int = 8) -> DataLoader:
    return DataLoader(examples(), batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))


class RecordLosses(Callback):
    """The global batch's loss per step: the mean of the ranks' losses on equal slices."""

    def __init__(self):
        self.losses: list[float] = []

    def on_step_end(self, trainer, ctx, batch, losses):
        loss = losses["loss"].detach().float().clone()
        world = getattr(trainer.backend, "world_size", 1)
        if world > 1:
            torch.distributed.all_reduce(loss)
            loss /= world
        self.losses.append(float(loss))


class Interrupt(Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_step_begin(self, trainer, ctx, batch):
        if ctx.epoch == self.epoch and ctx.stage == "prediction":
            raise KeyboardInterrupt


def run(deepspeed=None, tensor_parallel=None, out_dir=None, callbacks=(), resume=False, epochs=1.0,
        method="tinybert", batch_size: int = 8) -> dict:
    teacher, student = bert(4, 48, seed=1), bert(2, 32, seed=2)
    if method == "glmd":  # word-prediction distillation: the teacher needs BERT's MLM head
        from autoskd.engine.mlm import attach_mlm_head  # noqa: PLC0415

        torch.manual_seed(3)
        attach_mlm_head(teacher)
    record = RecordLosses()
    distiller = Distiller(student, method, teacher, seed=0, progress=False, deepspeed=deepspeed,
                          tensor_parallel=tensor_parallel, out_dir=out_dir, callbacks=[record, *callbacks],
                          restore_best=False, device="cpu")
    train = loader(batch_size)
    stages = [Stage(name, train, epochs=epochs, lr=1e-3, warmup_ratio=0.0) for name in distiller.method.spec.stages]
    distiller.fit(stages, resume=resume)
    return {"losses": record.losses, "weights": {k: v.detach().clone() for k, v in student.state_dict().items()}}


def main(out: str, cases: list[str]) -> None:
    torch.set_num_threads(1)
    out_dir = Path(out)
    rank = int(os.environ.get("RANK", "0"))
    for case in cases:
        if case in ZERO:
            result = run(deepspeed=ZERO[case])
        elif case == "zero3_glmd":  # mlm_logits of student and teacher through the ZeRO-3 hooks
            result = run(deepspeed=ZERO["zero3_all"], method="glmd")
        elif case == "zero3_resume":
            ckpt = out_dir / "resume-run"
            try:
                run(deepspeed=ZERO["zero3"], out_dir=ckpt, callbacks=[Interrupt(0)])
                raise AssertionError("the interrupted run was not interrupted")
            except KeyboardInterrupt:
                pass
            result = run(deepspeed=ZERO["zero3"], out_dir=ckpt, resume=True)
        elif case.startswith("search_"):  # AutoSKD's θ step on every rank (tests/theta_cases.py)
            from theta_cases import run_search  # noqa: PLC0415

            layout = case.removeprefix("search_")
            result = run_search(deepspeed=ZERO[layout.removesuffix("_center")], center=layout.endswith("_center"))
        elif case.startswith("lm_"):  # decoder LMs (tests/lm_scale_cases.py)
            from lm_scale_cases import run_lm_case  # noqa: PLC0415

            result = run_lm_case(case, out_dir)
        elif case.startswith("tp"):
            from tp_cases import run_tp_case  # noqa: PLC0415

            result = run_tp_case(case, run, out_dir)
        else:
            raise SystemExit(f"unknown case {case}")
        if rank == 0:
            torch.save(result, out_dir / f"{case}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
