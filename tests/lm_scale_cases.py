"""Decoder-LM cases for tests/dist_worker.py (2 processes, gloo): a Llama teacher beside a Llama
student under ZeRO-3 (+ offload, + a top-k cache built under the partitioned teacher, models
built partitioned) and tensor parallelism; :func:`run_lm` is also the one-process reference.
``lm_cli_zero3`` / ``lm_cli_tp`` run the product path: ``autoskd distill`` on an ``lm:`` task with
``--deepspeed`` / ``--tensor-parallel 2`` (:func:`run_lm_cli`; its plain one-process run is the reference).

Tiny random-init Llamas (grouped KV heads, gated MLP, RMSNorm): the teacher's embeddings are
untied (so tensor parallelism splits its vocabulary too) and initialised wide
(``initializer_range`` 0.5) so its next-token distribution is far from uniform and the KD loss
carries a real signal; the student's are tied.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from autoskd.engine.teachers import SingleTeacher
from autoskd.engine.trainer import Distiller, Stage
from autoskd.lm.data import LMRows, make_lm_loader
from autoskd.lm.recipes import decoder_method, lm_temperatures
from autoskd.lm.teachers import LMTeacher
from autoskd.lm.topk_cache import TopKCache

VOCAB, LENGTH, ROWS = 96, 12, 16
TOP_K = 8
ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}  # every tensor partitioned
ZERO3_OFFLOAD = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                       "offload_param": {"device": "cpu"}},
                 "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}}}
ZERO2 = {"zero_optimization": {"stage": 2}}


def llama_config(layers: int, hidden: int, *, tied: bool, init: float = 0.02, vocab: int = VOCAB) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=tied, initializer_range=init, eos_token_id=0, bos_token_id=0)


def teacher_model() -> LlamaForCausalLM:
    torch.manual_seed(1)
    return LlamaForCausalLM(llama_config(3, 48, tied=False, init=0.5)).eval()


def student_model() -> LlamaForCausalLM:
    torch.manual_seed(2)
    return LlamaForCausalLM(llama_config(1, 32, tied=True))


def rows() -> LMRows:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (ROWS, LENGTH + 1), generator=g)
    return LMRows(ids[:, :-1].contiguous(), torch.ones(ROWS, LENGTH, dtype=torch.long), ids[:, 1:].contiguous())


def run_lm(deepspeed=None, tensor_parallel=None, top_k: int = 0, cache_dir: Path | None = None, teacher=None,
           student=None, fingerprint: str | None = "tiny-llama-teacher") -> dict:
    """KD (forward KL on the vocabulary + half the next-token CE) for one epoch of 2 batches;
    the losses are the global batch's (dist_worker.RecordLosses)."""
    from dist_worker import RecordLosses as Record

    teacher = teacher if teacher is not None else teacher_model()
    student = student if student is not None else student_model()
    method = decoder_method("kd", alpha=0.5)
    cache = TopKCache(cache_dir) if cache_dir is not None else None
    lm_teacher = LMTeacher("t", teacher, fingerprint, top_k=top_k, temperatures=lm_temperatures(method),
                           cache=cache)
    record = Record()
    distiller = Distiller(student, method, SingleTeacher(lm_teacher), seed=0, progress=False, deepspeed=deepspeed,
                          tensor_parallel=tensor_parallel, callbacks=[record], restore_best=False, checkpoint=False,
                          device="cpu")
    loader = make_lm_loader(rows(), 8, shuffle=True)
    distiller.fit([Stage("task", loader, epochs=1, lr=3e-3, warmup_ratio=0.0,
                         data_id="tiny-rows" if top_k else None)])
    return {"losses": record.losses, "weights": {k: v.detach().clone() for k, v in student.state_dict().items()},
            "top_k_tables": sorted(lm_teacher.tables), "fingerprint": lm_teacher.fingerprint}


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def zero_init_models(config: dict):
    """Teacher and student built under ``deepspeed.zero.Init`` (each rank only ever holds its
    partitions), given the reference models' weights through a rank-0 gather."""
    import deepspeed

    want_t, want_s = teacher_model().state_dict(), student_model().state_dict()
    with deepspeed.zero.Init(config_dict_or_path={**config, "train_micro_batch_size_per_gpu": 4}):
        teacher = LlamaForCausalLM(llama_config(3, 48, tied=False, init=0.5)).eval()
        student = LlamaForCausalLM(llama_config(1, 32, tied=True))
    for model, state in ((teacher, want_t), (student, want_s)):
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
            if _rank() == 0:
                model.load_state_dict(state)
    return teacher, student


def run_lm_case(case: str, out_dir: Path) -> dict:
    from autoskd.engine.teacher_cache import model_fingerprint

    if case == "lm_zero3":
        return run_lm(deepspeed=ZERO3)
    if case == "lm_zero3_offload":
        return run_lm(deepspeed=ZERO3_OFFLOAD)
    if case == "lm_zero3_topk":  # the cache is built by the partitioned teacher, in lockstep on both ranks
        cache = out_dir / "topk-shared"
        result = run_lm(deepspeed=ZERO3, top_k=TOP_K, cache_dir=cache)
        result["cache_files"] = len(list(cache.glob("*.safetensors")))
        return result
    if case == "lm_zero3_topk_one_rank_cached":
        # rank 0's own cache folder already holds the table, rank 1's does not: both must compute
        # it together (a rank that served it from disk would leave the other in a gather forever)
        cache = out_dir / f"topk-rank{_rank()}"
        if _rank() == 0:
            shutil.copytree(out_dir / "topk-shared", cache)
        return run_lm(deepspeed=ZERO3, top_k=TOP_K, cache_dir=cache)
    if case == "lm_zero3_init":
        teacher, student = zero_init_models(ZERO3)
        result = run_lm(deepspeed=ZERO3, teacher=teacher, student=student, fingerprint=None)
        result["whole_fingerprint"] = model_fingerprint(teacher_model())
        return result
    if case in ("lm_cli_zero3", "lm_cli_tp"):
        from autoskd.engine.deepspeed_backend import init_distributed

        init_distributed()  # the barrier below may be this launch's first collective
        root = out_dir / "cli-inputs"
        if _rank() == 0 and not root.exists():
            write_cli_inputs(root)
        torch.distributed.barrier()
        scale = ["--deepspeed", str(root / "zero3.json")] if case == "lm_cli_zero3" else ["--tensor-parallel", "2"]
        return run_lm_cli(root, out_dir / case, scale)
    raise SystemExit(f"unknown case {case}")


def write_cli_inputs(root: Path) -> None:
    """What a user brings, as files: a team YAML (a sharp 3-layer Llama teacher, a 1-layer Llama
    student, a byte-level BPE tokenizer), a text corpus and a ZeRO-3 config."""
    import json

    from lm_helpers import bpe_tokenizer, documents

    tok = bpe_tokenizer()
    torch.manual_seed(1)
    teacher = LlamaForCausalLM(llama_config(3, 48, tied=False, init=0.5, vocab=len(tok))).eval()
    torch.manual_seed(2)
    student = LlamaForCausalLM(llama_config(1, 32, tied=True, vocab=len(tok)))
    for name, model in (("teacher", teacher), ("student", student)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    (root / "team.yaml").write_text(f"kind: lm\nmax_length: 16\nstudent: {{source: {root / 'student'}}}\n"
                                    f"teachers:\n  - {{name: t, source: {root / 'teacher'}}}\n")
    (root / "docs.txt").write_text("\n".join(documents(160, seed=5)))
    (root / "zero3.json").write_text(json.dumps(ZERO3))


def run_lm_cli(root: Path, out: Path, scale: list[str] = ()) -> dict:
    """``autoskd distill --task lm:docs.txt --team team.yaml`` (kd, top-64 cache built by the
    teacher, 3 global batches of 8 blocks: every batch full, so 2 ranks' halves average to the
    global batch's loss) with the ``scale`` flags (``--deepspeed zero3.json``, ``--tensor-parallel
    2``): its scores and saved student."""
    import json

    from safetensors.torch import load_file

    from autoskd.cli import main

    argv = ["distill", "--task", f"lm:{root / 'docs.txt'}", "--team", str(root / "team.yaml"), "--method", "kd",
            "--option", "alpha=0.5", "--epochs", "1", "--max-steps", "3", "--batch-size", "8", "--lr", "3e-3",
            "--top-k", "64", "--out", str(out), "--cache-dir", str(out.parent / f"{out.name}-cache"),
            "--no-progress", *scale]
    code = main(argv)
    assert code == 0, f"autoskd distill exited {code}"
    weights, start = load_file(out / "student" / "model.safetensors"), load_file(root / "student" / "model.safetensors")
    return {"scores": json.loads((out / "result.json").read_text()), "weights": weights, "start": start,
            "moved": max(float((weights[k] - start[k]).abs().max()) for k in start),
            "files": sorted(p.name for p in out.iterdir())}
