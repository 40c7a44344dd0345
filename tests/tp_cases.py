"""Tensor-parallel cases for tests/dist_worker.py (run under torchrun with 2 processes)."""

from __future__ import annotations

import torch

from autoskd.engine.hooks import FeatureExtractor
from autoskd.engine.tensor_parallel import TensorParallel

FEATURES = ["hidden:2", "attention_scores:1", "value:3"]


def teacher_outputs(run_bert, examples) -> dict:
    """The teacher's logits and hooked features, unsharded and then split over 2 ranks."""
    teacher = run_bert(4, 48, seed=1).eval()
    batch = {k: torch.stack([row[k] for row in examples[:8]]) for k in examples[0]}
    with torch.no_grad():
        ref = FeatureExtractor(teacher, FEATURES)(batch)
        TensorParallel(2).shard(teacher)
        local_q = teacher.bert.encoder.layer[0].attention.self.query(torch.zeros(1, 2, 48)).shape[-1]
        tp = FeatureExtractor(teacher, FEATURES)(batch)
    return {"ref": {k: v.clone() for k, v in ref.items()}, "tp": {k: v.clone() for k, v in tp.items()},
            "local_query_width": local_q}


def run_tp_case(case: str, run, out_dir=None) -> dict:
    import dist_worker as w

    if case.startswith("tp_llama"):
        return run_llama_tp_case(case, out_dir)
    if case == "tp_teacher":
        return teacher_outputs(w.bert, w.examples())
    if case == "tp_student":  # teacher and student both split over tp=2 (plain torch optimizer on DTensors)
        return run(tensor_parallel=TensorParallel(2, shard_student=True))
    if case == "tp_zero2":  # teacher split over tp=2, student ZeRO-2 data-parallel over both ranks
        return run(deepspeed=w.ZERO["zero2"], tensor_parallel=TensorParallel(2))
    raise SystemExit(f"unknown case {case}")


def llama_teacher_outputs() -> dict:
    """A Llama teacher (GQA: 4 query / 2 KV heads, gated MLP, untied vocabulary) unsharded and
    split over 2 ranks: hidden states and logits, the local widths, a tied model's embedding,
    and the one-line refusal of attention features."""
    from torch.distributed.tensor import DTensor

    from autoskd.engine.teachers import SingleTeacher
    from autoskd.errors import AutoSKDError
    from autoskd.lm.teachers import LMTeacher
    from lm_scale_cases import llama_config, rows, teacher_model
    from transformers import LlamaForCausalLM

    names = ["hidden:0", "hidden:-1", "lm_logits"]
    data = rows()
    batch = {"input_ids": data.input_ids[:8], "attention_mask": data.attention_mask[:8]}
    teacher = teacher_model()
    with torch.no_grad():
        ref = FeatureExtractor(teacher, names)(batch)
        tp = TensorParallel(2)
        policy = SingleTeacher(LMTeacher("t", teacher, "fp", top_k=0))
        tp.shard_teachers(policy)
        attn = teacher.model.layers[0].self_attn
        x = torch.zeros(1, 2, 48)
        widths = {"q": attn.q_proj(x).shape[-1], "k": attn.k_proj(x).shape[-1],
                  "gate": teacher.model.layers[0].mlp.gate_proj(x).shape[-1],
                  "lm_head_rows": teacher.lm_head.weight.to_local().shape[0],
                  "embed_rows": teacher.model.embed_tokens.weight.to_local().shape[0]}
        got = policy.features("t", batch, names)
        try:
            policy.features("t", batch, ["attention_probs:1"])
            refusal = None
        except AutoSKDError as err:
            refusal = str(err)
        torch.manual_seed(5)
        tied = LlamaForCausalLM(llama_config(2, 32, tied=True))
        tp.shard(tied)
    return {"ref": {k: v.clone() for k, v in ref.items() if k != "logits"},
            "tp": {k: v.clone() for k, v in got.items() if k != "logits"}, "widths": widths, "refusal": refusal,
            "tied_embedding_sharded": isinstance(tied.model.embed_tokens.weight, DTensor),
            "tied_still_tied": tied.lm_head.weight is tied.model.embed_tokens.weight}


def run_llama_tp_case(case: str, out_dir) -> dict:
    from lm_scale_cases import TOP_K, ZERO2, run_lm

    if case == "tp_llama_teacher":
        return llama_teacher_outputs()
    if case == "tp_llama":  # the teacher split over tp=2; both ranks train the same student on the same data
        return run_lm(tensor_parallel=TensorParallel(2))
    if case == "tp_llama_zero2":  # the teacher split over tp=2, the student ZeRO-2 data-parallel over both ranks
        return run_lm(deepspeed=ZERO2, tensor_parallel=TensorParallel(2))
    if case == "tp_llama_zero2_topk":  # ... with its top-k cache filled by the split teacher
        return run_lm(deepspeed=ZERO2, tensor_parallel=TensorParallel(2), top_k=TOP_K,
                      cache_dir=out_dir / "topk-tp")
    raise SystemExit(f"unknown case {case}")
