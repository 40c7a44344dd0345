"""The planner on Llama-family decoders: published parameter counts, grouped KV heads, gated MLP,
tied embeddings, the [B, T, V] logits terms, the top-k teacher cache, ZeRO-3's whole small
tensors, and the 70B => 7B / 8B => 1B plans on 8 x 80 GB (CLI and Python)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel, LlamaConfig, LlamaForCausalLM

from autoskd.cli import main
from autoskd.errors import AutoSKDError
from autoskd.planner import Layout, estimate, plan_layouts, predict_memory, resolve_shape
from autoskd.planner.lm_memory import CHUNK_TOKENS, decoder_layer_elements
from autoskd.planner.tensors import largest_tensor, persistent_params, tensor_sizes

#: exact parameter counts of the published models (their model cards / safetensors index)
PUBLISHED = {"llama3-70b": 70_553_706_496, "llama3-8b": 8_030_261_248, "llama3.2-1b": 1_235_814_400,
             "llama3.2-3b": 3_212_749_824, "llama2-7b": 6_738_415_616, "llama2-13b": 13_015_864_320,
             "llama2-70b": 68_976_648_192}
TINY_T = "layers=4,hidden=512,heads=8,kv_heads=2,ffn=1408,vocab=32000,tied=0"
TINY_S = "layers=2,hidden=256,heads=4,kv_heads=2,ffn=704,vocab=32000,tied=1"


# ---------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("name", list(PUBLISHED))
def test_named_llama_shapes_have_the_published_counts(name):
    shape = resolve_shape(name)
    assert shape.params == PUBLISHED[name] == sum(tensor_sizes(shape))
    assert shape.decoder and shape.gated and shape.norm == "rmsnorm"


def test_named_shapes_carry_gqa_and_tying():
    big, small, old = resolve_shape("llama3-70b"), resolve_shape("llama3.2-1b"), resolve_shape("llama2-7b")
    assert (big.heads, big.n_kv_heads, big.kv_dim, big.tied) == (64, 8, 1024, False)
    assert (small.tied, small.head_width) == (True, 64) and old.n_kv_heads == old.heads == 32
    assert resolve_shape("Meta-Llama-3-8B").params == PUBLISHED["llama3-8b"]  # aliases
    cut = resolve_shape("llama3-8b", layers=4)
    assert cut.layers == 4 and cut.params < PUBLISHED["llama3-8b"] / 4
    with pytest.raises(AutoSKDError, match="cannot keep 99 layers"):
        resolve_shape("llama3.2-1b", layers=99)


@pytest.mark.parametrize("tied", [True, False])
def test_hf_llama_config_counts_the_lm_head_and_detects_decoder_details(tmp_path, tied):
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    real = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    config.save_pretrained(tmp_path)
    for source in (config, str(tmp_path)):
        shape = resolve_shape(source)
        assert shape.params == real == sum(tensor_sizes(shape))
        assert (shape.kv_heads, shape.gated, shape.tied, shape.norm, shape.decoder) == (2, True, tied, "rmsnorm", True)
    body = sum(p.numel() for p in AutoModel.from_config(config).parameters())
    assert real - body == (0 if tied else 300 * 64)  # an untied output layer is V x h more


def test_decoder_specs_and_bad_ones():
    shape = resolve_shape(TINY_T)
    with torch.device("meta"):
        real = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408,
                                            num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                                            tie_word_embeddings=False))
    assert shape.params == sum(p.numel() for p in real.parameters()) and not shape.tied
    plain = resolve_shape("layers=4,hidden=512,heads=8,kv_heads=2,ffn=1408,vocab=32000,gated=0")
    assert shape.params - plain.params == 4 * 512 * 1408  # one hidden x ffn matrix per layer
    for bad, word in (("layers=2,hidden=64,vocab=100,heads=4,kv_heads=3", "kv_heads must divide"),
                      ("layers=2,hidden=64,vocab=100,tied=2", "bad model spec")):
        with pytest.raises(AutoSKDError, match=word) as err:
            resolve_shape(bad)
        assert "\n" not in str(err.value)


def test_zero3_keeps_small_tensors_whole():
    shape = resolve_shape(TINY_T)
    # norms (512) and the grouped K/V projections (512 x 128 = 65,536 <= 1e5) are not partitioned
    assert persistent_params(shape) == 4 * (2 * 512 + 2 * 512 * 128) + 512
    assert largest_tensor(shape) == 32000 * 512  # the vocabulary matrix, not a layer
    z3 = estimate(shape, resolve_shape(TINY_S), Layout(dp=2, zero=3, precision="fp32", checkpointing=False),
                  features="lm-logits", device="cpu", allocator="mmap")
    whole = persistent_params(shape)
    assert z3.components["teacher_weights"] == int(4 * (whole + (shape.params - whole) / 2))


# ---------------------------------------------------------------------------------------- LM terms
def _lm(teacher=TINY_T, student=TINY_S, **kw):
    kw = {"dp": 2, "zero": 0, "micro_batch": 4, "seq_len": 128, "precision": "fp32", "checkpointing": False,
          "device": "cpu", "features": "lm-logits", "allocator": "mmap", **kw}
    return predict_memory(teacher, student, **kw)


def test_logits_terms_scale_with_tokens_and_vocabulary():
    one, two = _lm(), _lm(micro_batch=8)
    n, v = 4 * 128, 32000
    # teacher + student logits, and the dense loss's 5 fp32 [chunk, V] forward temporaries
    assert one.components["logits"] == n * v * 4 * 2 + 5 * n * v * 4
    assert two.components["logits"] > 1.9 * one.components["logits"]
    long = _lm(micro_batch=32)  # 4,096 tokens: the loss is chunked, its temporaries stop growing
    chunked = 32 * 128 * v * 4 * 2 + max(5 * CHUNK_TOKENS * v * 4, 32 * 128 * v * 4 + 4 * CHUNK_TOKENS * v * 4)
    assert long.components["logits"] == chunked
    assert _lm(lm_ce=True).components["logits"] > one.components["logits"]  # the CE's saved log-softmax
    assert one.phase == "loss" and one.peak_bytes > one.components["logits"]


def test_gqa_and_the_gated_mlp_in_the_activations():
    mha = resolve_shape("layers=2,hidden=256,heads=4,kv_heads=4,ffn=704,vocab=32000,tied=1")
    gqa = resolve_shape(TINY_S)
    assert decoder_layer_elements(mha) - decoder_layer_elements(gqa) == 2 * (256 - 128)
    plain = resolve_shape("layers=2,hidden=256,heads=4,kv_heads=2,ffn=704,vocab=32000,tied=1,gated=0")
    assert decoder_layer_elements(gqa) - decoder_layer_elements(plain) == 2 * 704


def test_a_top_k_cache_replaces_the_live_teacher():
    live, cached = _lm(), _lm(top_k=64)
    assert cached.components["teacher_weights"] == 0 and live.components["teacher_weights"] > 0
    n = 4 * 128
    assert cached.components["logits"] < live.components["logits"]  # 12k bytes/token, not V x 4
    assert cached.phases["top-k cache bytes per 1M tokens"] == 1_000_000 * 64 * 6
    build = cached.phases["top-k cache build"]
    assert build >= n * 32000 * (4 + 8)  # the teacher's logits + two fp32 log-softmax temporaries
    assert cached.peak_bytes < live.peak_bytes
    assert "topk64" in cached.layout.label()
    with pytest.raises(AutoSKDError, match="lm-logits"):
        predict_memory(TINY_T, TINY_S, top_k=64, features="tinybert")
    with pytest.raises(AutoSKDError, match="top_k"):
        Layout(top_k=-1)


def test_zero3_shards_the_teacher_and_gathers_up_to_max_live():
    teacher = resolve_shape(TINY_T)
    z0, z3 = _lm(), _lm(zero=3)
    assert z3.components["teacher_weights"] < 0.6 * z0.components["teacher_weights"]
    # DeepSpeed's default stage3_max_live_parameters (1e9) lets this teacher be gathered whole in
    # each forward, and a gather over gloo passes through a second buffer (measured)
    nonpersistent = teacher.params - persistent_params(teacher)
    assert z3.phases["teacher forward"] >= 2 * 4 * nonpersistent
    bounded = estimate(teacher, resolve_shape(TINY_S), Layout(dp=2, zero=3, precision="fp32", micro_batch=4,
                                                              seq_len=128, checkpointing=False,
                                                              max_live=2_000_000), features="lm-logits",
                       device="cpu", allocator="mmap")
    window = 2_000_000 + largest_tensor(teacher)
    assert bounded.phases["teacher forward"] == pytest.approx(z3.phases["teacher forward"] - 2 * 4 * (nonpersistent - window))
    gpu = _lm(zero=3, device="cuda", allocator=None)  # NCCL gathers into one buffer
    assert gpu.phases["teacher forward"] == pytest.approx(z3.phases["teacher forward"] - 4 * nonpersistent)
    offload = _lm(zero=3, offload="optimizer+params", device="cuda", allocator=None)
    assert offload.components["optimizer_states"] == 0 and offload.host_bytes > 0
    assert offload.components["teacher_weights"] < z3.components["teacher_weights"] / 10


def test_heap_allocator_adds_the_phases():
    mmap, heap = _lm(), _lm(allocator="heap")
    assert heap.peak_bytes > mmap.peak_bytes and "+" in heap.phase
    with pytest.raises(AutoSKDError, match="allocator"):
        _lm(allocator="jemalloc")


# ---------------------------------------------------------------------------------------- plans
@pytest.mark.parametrize("teacher,student", [("llama3-70b", "llama2-7b"), ("llama3-8b", "llama3.2-1b")])
def test_70b_and_8b_plans_on_8x80gb(teacher, student):
    result = plan_layouts(teacher, student, gpus=8, gpu_memory="80GB", features="lm-logits", seq_lens=(2048,),
                          precisions=("bf16",), top_ks=(0, 64))
    assert result.best is not None and result.best.fits
    assert all(result.hardware.fits(c.estimate.peak_bytes) for c in result.fitting)
    labels = {c.estimate.layout.top_k for c in result.fitting}
    assert labels == {0, 64}  # a live teacher and a cached one both fit somewhere
    if teacher == "llama3-70b":  # 141 GB of bf16 weights: every fitting layout splits the teacher
        # (the top-k cache is filled by a pass of the teacher in the same layout)
        assert all(c.estimate.layout.mp > 1 or c.estimate.layout.zero == 3 for c in result.fitting)
        alone = plan_layouts(teacher, student, gpus=1, gpu_memory="80GB", features="lm-logits", seq_lens=(2048,),
                             precisions=("bf16",), offloads=("none",))
        assert not alone.fitting and "teacher_weights" in alone.rejected[0].reason


def _run(capsys, *argv):
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_plans_70b_to_7b_with_and_without_a_cache(capsys):
    code, out, err = _run(capsys, "plan", "--teacher", "llama3-70b", "--student", "llama2-7b", "--gpus", 8,
                          "--gpu-memory", "80GB", "--seq-len", 2048, "--precision", "bf16", "--top-k", "0,64",
                          "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["teacher_params"] == PUBLISHED["llama3-70b"] and data["student_params"] == PUBLISHED["llama2-7b"]
    assert data["teacher_shape"]["kv_heads"] == 8 and data["best"]["fits"]
    assert {c["layout"]["top_k"] for c in data["fitting"]} == {0, 64}
    assert data["best"]["components_bytes"]["logits"] > 0  # lm-logits by default for two decoders
    code, out, err = _run(capsys, "plan", "--teacher", "llama3-8b", "--student", "llama3.2-1b", "--gpus", 8,
                          "--gpu-memory", "80", "--seq-len", 2048, "--top", 3)
    assert code == 0 and "best: MP" in out and "logits" in out


@pytest.mark.parametrize("argv, word", [
    (["--teacher", "llama3-70b", "--student", "llama2-7b", "--top-k", "-1"], "--top-k"),
    (["--teacher", "100B", "--student", "20B", "--top-k", "64"], "--top-k"),
    (["--teacher", "llama3-70b", "--student", "llama2-7b", "--teacher-layers", "81"], "cannot keep 81"),
])
def test_cli_bad_lm_input_is_one_line(capsys, argv, word):
    code, out, err = _run(capsys, "plan", *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and word in lines[0], err


def test_gkd_glm_shapes_are_unchanged_by_the_decoder_fields():
    shape = resolve_shape("10B")
    assert not shape.decoder and shape.n_kv_heads == shape.heads and sum(tensor_sizes(shape)) == shape.params
    est = estimate(shape, resolve_shape("2B"), Layout(dp=8, zero=1), features="tinybert")
    assert est.components["logits"] == 0 and est.peak_gib < 40
