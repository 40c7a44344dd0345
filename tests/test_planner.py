"""Memory planner: meta-device parameter counts (GKD table 8), memory terms, layout search,
DeepSpeed config emission, the ``autoskd plan`` command and the check against GKD tables 3/5."""

from __future__ import annotations

import json
import statistics

import pytest
from transformers import BertModel

from autoskd.cli import main
from autoskd.errors import AutoSKDError
from autoskd.planner import (TABLE8, GiB, Hardware, Layout, deepspeed_config, estimate, parse_memory,
                             plan_layouts, predict_memory, resolve_shape, table8_shape)
from autoskd.planner.gkd_tables import ROWS, SEQ_LEN
from helpers import tiny_config


def _table8_formula(layers, hidden, vocab, positions):
    return layers * (12 * hidden ** 2 + 13 * hidden) + (vocab + 2 * positions) * hidden + 4 * hidden


@pytest.mark.parametrize("size", list(TABLE8))
def test_table8_counts_from_meta_module(size):
    layers, hidden, heads, vocab, positions, printed = TABLE8[size]
    shape = table8_shape(size)
    assert shape.params == printed == _table8_formula(layers, hidden, vocab, positions)
    assert (shape.layers, shape.hidden, shape.heads) == (layers, hidden, heads)


def test_meta_build_allocates_nothing():
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    shape = table8_shape("110B")  # 219 GB in fp16 if it were real
    assert shape.params == 109620044032
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB: < 200 MB


def test_hf_config_counts_match_a_real_model(tmp_path):
    config = tiny_config(layers=4)
    config.save_pretrained(tmp_path)
    real = sum(p.numel() for p in BertModel(config).parameters())
    for source in (str(tmp_path), str(tmp_path / "config.json"), config):
        shape = resolve_shape(source)
        assert shape.params == real and shape.layers == 4 and shape.hidden == 32
    cut = resolve_shape(str(tmp_path), layers=2)
    assert cut.layers == 2
    assert cut.params == sum(p.numel() for p in BertModel(tiny_config(layers=2)).parameters())


def test_explicit_spec_and_bad_descriptions():
    shape = resolve_shape("layers=24,hidden=1024,vocab=30592,heads=16")
    assert shape.params == _table8_formula(24, 1024, 30592, 512) == TABLE8["340M"][-1]
    for bad, word in (("100X", "unknown model size"), ("layers=2,hidden=64", "lacks vocab"),
                      ("layers=2,hidden=abc,vocab=3", "bad model spec"), ("", "empty")):
        with pytest.raises(AutoSKDError, match=word):
            resolve_shape(bad)


def test_parse_memory():
    assert parse_memory("40GB") == 40 * GiB == parse_memory("40 GiB") == parse_memory(40)
    assert parse_memory("512MB") == 512 * 1024 ** 2
    for bad in ("40XB", "-3GB", "lots", "0GB"):
        with pytest.raises(AutoSKDError):
            parse_memory(bad)


# ------------------------------------------------------------------------------------- memory terms
T, S = table8_shape("10B"), table8_shape("2B")


def _est(**kw):
    return estimate(T, S, Layout(**{"mp": 1, "dp": 8, **kw}), features="tinybert")


def test_terms_follow_mixed_precision_adam_and_zero():
    n = S.params
    base = _est(zero=0).components
    assert base["student_weights"] == 2 * n and base["gradients"] == 2 * n
    assert base["optimizer_states"] == 12 * n            # fp32 master + m + v
    assert base["teacher_weights"] == 2 * T.params
    z1 = _est(zero=1).components
    assert z1["optimizer_states"] == pytest.approx(12 * n / 8, rel=1e-9) and z1["gradients"] == 2 * n
    z2 = _est(zero=2).components
    assert z2["gradients"] < z1["gradients"]
    z3 = _est(zero=3).components
    assert z3["student_weights"] < z2["student_weights"] and z3["teacher_weights"] < z2["teacher_weights"]
    off = _est(zero=1, offload="optimizer")
    assert off.components["optimizer_states"] == 0 and off.host_bytes >= 12 * n / 8
    fp32 = estimate(T, S, Layout(dp=1, precision="fp32"))
    assert fp32.components["optimizer_states"] == 8 * n and fp32.components["student_weights"] == 4 * n


def test_model_parallel_and_checkpointing_shrink_memory():
    assert _est(zero=0, mp=2, dp=4).peak_bytes < _est(zero=0).peak_bytes / 1.8
    def act(**kw):  # "hidden" features: no hooked attention maps kept alive across checkpoints
        return estimate(T, S, Layout(mp=1, dp=8, zero=1, **kw), features="hidden").components["activations"]

    assert act(checkpointing=True) < act(checkpointing=False) / 10
    assert act(checkpointing=False, seq_len=1024) > 2 * act(checkpointing=False)  # attention grows with s^2
    # TinyBERT's loss keeps the student's attention maps, so checkpointing saves less
    tiny = _est(zero=1, checkpointing=True).components["activations"]
    assert act(checkpointing=True) < tiny < act(checkpointing=False)


def test_invalid_layouts_are_one_line_errors():
    for kw, word in (({"zero": 4}, "ZeRO stage"), ({"offload": "optimizer"}, "needs ZeRO"),
                     ({"zero": 2, "offload": "optimizer+params"}, "ZeRO stage 3"),
                     ({"precision": "fp8"}, "precision"), ({"mp": 0}, "positive")):
        with pytest.raises(AutoSKDError, match=word):
            Layout(**kw)


def test_predict_memory_for_a_cpu_minilm_pair(tmp_path):
    config = tiny_config(layers=6, hidden=64)
    config.save_pretrained(tmp_path)
    one = predict_memory(str(tmp_path), str(tmp_path), student_layers=2, zero=0, dp=1, micro_batch=8,
                         seq_len=64, precision="fp32", device="cpu")
    z2 = predict_memory(str(tmp_path), str(tmp_path), student_layers=2, zero=2, dp=2, micro_batch=8,
                        seq_len=64, precision="fp32", device="cpu")
    z2o = predict_memory(str(tmp_path), str(tmp_path), student_layers=2, zero=2, dp=2, micro_batch=8,
                         seq_len=64, precision="fp32", device="cpu", offload="optimizer")
    n = resolve_shape(str(tmp_path), layers=2).params
    assert one.components["student_weights"] == 4 * n and one.components["optimizer_states"] == 8 * n
    assert z2.components["optimizer_states"] == 12 * n // 2  # DeepSpeed's fp32 partition + m + v
    assert z2o.peak_bytes >= z2o.host_bytes > 0  # on a CPU the offloaded state is still in the process
    assert predict_memory(str(tmp_path), str(tmp_path), student_layers=2, baseline_bytes=1000).peak_bytes == \
        predict_memory(str(tmp_path), str(tmp_path), student_layers=2).peak_bytes + 1000


# ------------------------------------------------------------------------------------- GKD tables
def test_gkd_tables_3_and_5_within_15_percent_and_oom_rows():
    hw = Hardware(memory_bytes=40 * GiB)
    errors, oom_fits = [], []
    for _table, t, s, mp, dp, zero, offload, measured in ROWS:
        lo = Layout(mp=mp, dp=dp, zero=zero, offload="optimizer" if offload else "none", seq_len=SEQ_LEN,
                    checkpointing=True)
        est = estimate(table8_shape(t), table8_shape(s), lo, features="tinybert")
        if measured is None:
            oom_fits.append(hw.fits(est.peak_bytes))
        else:
            errors.append(abs(est.peak_gib - measured) / measured)
            assert hw.fits(est.peak_bytes), (t, s, mp, zero, offload)
    assert len(oom_fits) == 3 and not any(oom_fits)
    assert len(errors) == 53 and statistics.median(errors) <= 0.15


# ------------------------------------------------------------------------------------- search + CLI
def test_plan_100b_on_8x40gb_fits_and_ranks():
    plan = plan_layouts("100B", "20B", gpus=8, gpu_memory="40GB")
    assert plan.fitting and plan.best.fits
    times = [c.seconds_per_sample for c in plan.fitting]
    assert times == sorted(times)
    hw = plan.hardware
    assert all(hw.fits(c.estimate.peak_bytes) for c in plan.fitting)
    assert all(c.reason for c in plan.rejected)
    gkd = [c for c in plan.fitting if c.estimate.layout == Layout(mp=8, dp=1, zero=1, offload="optimizer")]
    assert gkd, "GKD's own 100B layout (MP8, ZeRO-1 + offload, checkpointing) must fit"
    none_fit = plan_layouts("100B", "20B", gpus=8, gpu_memory="40GB", zero_stages=(0,))
    assert not none_fit.fitting and "needs" in none_fit.rejected[0].reason


def _run(capsys, *argv):
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_has_table8_params_and_emits_deepspeed(capsys, tmp_path):
    ds = tmp_path / "out" / "ds.json"
    code, out, err = _run(capsys, "plan", "--teacher", "100B", "--student", "20B", "--gpus", 8,
                          "--gpu-memory", "40GB", "--json", "--emit-deepspeed", ds, "--plot", tmp_path / "p.png")
    assert code == 0, err
    data = json.loads(out)
    assert data["teacher_params"] == 99465734144 and data["student_params"] == 20175676160
    assert isinstance(data["teacher_params"], int) and data["fitting"] and data["rejected"]
    assert (tmp_path / "p.png").stat().st_size > 10_000
    best = Layout(**data["best"]["layout"])
    config = json.loads(ds.read_text())
    assert config == deepspeed_config(best)
    assert f"--num_gpus {best.gpus}" in data["launch_command"] and f"--deepspeed {ds}" in data["launch_command"]
    assert config["zero_optimization"]["stage"] == best.zero
    assert config["train_batch_size"] == best.micro_batch * best.dp * config["gradient_accumulation_steps"]


@pytest.mark.parametrize("layout", [Layout(mp=2, dp=4, zero=3, offload="optimizer"),
                                    Layout(dp=8, zero=3, offload="optimizer+params"),
                                    Layout(mp=8, dp=1, zero=1, offload="optimizer"),
                                    Layout(dp=2, zero=2, precision="bf16", checkpointing=False),
                                    Layout(dp=2, zero=0, precision="fp32")])
def test_emitted_config_is_valid_for_deepspeed(layout, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = deepspeed_config(layout)
    # DeepSpeedConfig checks the batch identity against the world size; without a process group
    # it assumes 1 rank, so check the per-rank form here and the DP product above.
    assert cfg["train_batch_size"] == layout.micro_batch * layout.dp
    parsed = DeepSpeedConfig({**cfg, "train_batch_size": layout.micro_batch})  # pydantic: unknown keys fail
    assert parsed.zero_optimization_stage == layout.zero
    assert (parsed.zero_config.offload_optimizer is not None) == (layout.offload != "none")
    assert (parsed.zero_config.offload_param is not None) == (layout.offload == "optimizer+params")
    assert parsed.bfloat16_config.enabled == (layout.precision == "bf16")


def test_cli_text_output_lists_fitting_and_reasons(capsys, tmp_path):
    code, out, err = _run(capsys, "plan", "--teacher", "10B", "--student", "2B", "--gpus", 8, "--zero", "0,1",
                          "--checkpointing", "on", "--out", tmp_path)
    assert code == 0, err
    assert "Layouts that fit, fastest first" in out and "do not fit" in out and "needs" in out
    assert "MP1xDP8 b1 s512 fp16 ckpt: needs" in out  # table 5's OOM row
    assert (tmp_path / "plan.json").is_file() and (tmp_path / "plan.png").is_file()


@pytest.mark.parametrize("argv, words", [
    (["--teacher", "100X", "--student", "20B"], ["unknown model size"]),
    (["--teacher", "100B", "--student", "20B", "--gpu-memory", "forty"], ["bad memory size"]),
    (["--teacher", "100B", "--student", "20B", "--gpus", "0"], ["--gpus"]),
    (["--teacher", "100B", "--student", "20B", "--zero", "5"], ["--zero"]),
    (["--teacher", "100B", "--student", "20B", "--mp", "3", "--gpus", "8"], ["--mp"]),
    (["--teacher", "100B", "--student", "20B", "--gpus", "1", "--offload", "none", "--emit-deepspeed", "x.json"],
     ["no layout fits"]),
    (["--teacher", "100B", "--student", "20B", "--offload", "disk"], ["--offload"]),
    (["--teacher", "./no/such/dir", "--student", "20B"], ["not found"]),
    (["--student", "20B"], ["--teacher"]),
    (["--teacher", "100B", "--student", "20B", "--top", "0"], ["--top"]),
])
def test_cli_bad_input_is_one_line_exit_2(capsys, argv, words):
    code, out, err = _run(capsys, "plan", *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("autoskd: error: "), err
    for w in words:
        assert w in lines[0]
