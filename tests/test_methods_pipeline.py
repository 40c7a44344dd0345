"""Methods through the pipeline and the CLI on tiny models: GLMD's compressed student saves
and reloads with plain transformers and a smaller vocabulary; multi-teacher methods get every
teacher; combinations by config; teacher-assistant chains; feature-distance analysis."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from autoskd.analysis import DistanceRecorder, correlate, write_report
from autoskd.chain import run_chain
from autoskd.data.tasks import load_task
from autoskd.engine.multi_teacher import AllTeachers
from autoskd.errors import AutoSKDError
from autoskd.methods import describe_methods
from autoskd.methods.glmd_vocab import kept_size
from autoskd.pipeline import DistillConfig, build_policy, distill, make_loaders
from autoskd.team import TeacherTeam
from helpers import tiny_bert
from autoskd.cli import main
from test_cli import assert_one_error, run, team_yaml


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    words = ["great", "awful", "fine", "dull", "moving", "boring"]
    lines = ["text,label"] + [f"a {words[i % 6]} film about {words[(i // 6) % 6]} people number {i},{i % 2}"
                              for i in range(96)]
    path.write_text("\n".join(lines))
    return load_task(str(path))


@pytest.fixture(scope="module")
def team(tok, task, tmp_path_factory, tiny_dir):
    teachers = {"deep": tiny_bert(tok, 4, seed=1), "mid": tiny_bert(tok, 2, seed=2)}
    team = TeacherTeam(student=str(tiny_dir), teachers=teachers, tokenizer=tok, max_length=16)
    team.student_spec.layers = 2
    return team.build(task, cache_dir=tmp_path_factory.mktemp("teachers"), progress=False)


def small(**kw):
    return DistillConfig(**{"epochs": 1, "batch_size": 16, "lr": 1e-3, "teacher": "deep", "mlm_adapt_steps": 2, **kw})


def test_glmd_compressed_student_reloads_with_plain_transformers(team, task, tmp_path):
    out = distill(team, task, small(method="glmd", method_options={"vocab_alpha": 0.01}), out_dir=tmp_path / "run",
                  cache_dir=tmp_path / "cache", progress=False)
    k = kept_size(0.01, len(team.tokenizer))
    assert k == 384 and out.student.config.vocab_size == k
    folder = tmp_path / "run" / "student"
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert len(tok) == k and model.bert.embeddings.word_embeddings.num_embeddings == k
    specials = tok.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    assert sorted(specials) == [0, 1, 2, 3, 4]  # special tokens are kept first
    assert model.config.pad_token_id == tok.pad_token_id
    batch = tok(["a great film about people"], return_tensors="pt")
    assert int(batch["input_ids"].max()) < k
    model.eval()
    out.student.eval()
    assert torch.allclose(model(**batch).logits, out.student(**batch).logits, atol=1e-5)
    stages = {r["stage"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())}
    assert stages >= {"task_mlm", "task"}
    assert all(getattr(m, "_autoskd_mlm_adapted", False) for m in team.teachers.values() if hasattr(m, "mlm_head"))


def test_vocabulary_map_keeps_specials_and_maps_to_nearest(tok):
    from autoskd.methods.glmd_vocab import nearest_map, select_vocabulary

    counts = torch.zeros(10, dtype=torch.long)
    counts[[5, 6, 7]] = torch.tensor([9, 8, 1])
    kept = select_vocabulary(counts, [0, 1], alpha=1.0)[:4]
    assert kept.tolist() == [0, 1, 5, 6]
    emb = torch.eye(10)
    emb[7] = emb[6] * 2 + 0.1 * emb[5]        # token 7 is closest (inner product) to kept token 6
    table = nearest_map(emb, kept)
    assert table[kept].tolist() == [0, 1, 2, 3] and int(table[7]) == 3


def test_multi_teacher_method_reads_every_teacher(team, task, tmp_path):
    policy = build_policy(team, small(method="tmkd"))
    assert isinstance(policy, AllTeachers) and set(policy.teachers) == {"deep", "mid"}
    assert set(build_policy(team, small(method="dgkd", teachers=["mid"])).teachers) == {"mid"}
    out = distill(team, task, small(method="mt_bert"), cache_dir=tmp_path / "cache", progress=False)
    assert 0 <= out.dev_acc <= 1


def test_combination_through_the_pipeline(team, task, tmp_path):
    out = distill(team, task, small(method="kd+pkd"), out_dir=tmp_path / "run", cache_dir=tmp_path / "c",
                  progress=False)
    assert 0 <= out.dev_acc <= 1
    record = next(r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
                  if r["kind"] == "train")
    assert {"kd/soft_kl", "pkd/soft_kl", "hard_ce"} <= set(record)


@pytest.mark.parametrize("method", ["takd", "dgkd"])
def test_chain_trains_assistants_then_student_and_resumes(team, task, tmp_path, method):
    out = run_chain(team, task, small(method=method), [3], out_dir=tmp_path / "chain", cache_dir=tmp_path / "c",
                    progress=False)
    assert [h.name for h in out.hops] == ["assistant-L3", "student"]
    assert out.hops[1].teachers == (["deep", "assistant-L3"] if method == "dgkd" else ["assistant-L3"])
    assert len(out.student.bert.encoder.layer) == 2
    again = run_chain(team, task, small(method=method), [3], out_dir=tmp_path / "chain", cache_dir=tmp_path / "c",
                      progress=False)
    assert all(h.resumed for h in again.hops) and again.hops[-1].dev_acc == out.hops[-1].dev_acc
    with pytest.raises(AutoSKDError, match="runs 'takd' or 'dgkd'"):
        run_chain(team, task, small(method="kd"), [3], out_dir=tmp_path / "x")


def test_feature_distance_analysis(team, task, tmp_path):
    loaders = make_loaders(task, team.tokenizer, 16, 16, 0)
    recorder = DistanceRecorder(team.teachers["deep"], list(loaders.dev)[:1], every=1)
    distill(team, task, small(method="kd", epochs=2), cache_dir=tmp_path / "c", progress=False, callbacks=[recorder],
            loaders=loaders)
    assert len(recorder.records) >= 8 and recorder.pairs == [(0, 1), (1, 3)]
    keys = set(recorder.records[0])
    assert {"hidden:s0-t1/raw/mse", "attention_scores:s1-t3/rel/kl15", "value:s1-t3/raw/kl1", "logits/raw/kl20",
            "loss", "dev_acc"} <= keys
    corr = write_report(recorder, tmp_path / "analysis", "test")
    assert (tmp_path / "analysis" / "analysis.png").is_file()
    row = corr["hidden:s0-t1/raw/mse"]
    assert set(row) == {"spearman_loss", "pearson_loss", "spearman_dev", "pearson_dev"}
    assert row["spearman_loss"] is None or -1 <= row["spearman_loss"] <= 1


def test_correlation_by_hand():
    records = [{"loss": l, "dev_acc": a, "x/raw/mse": d} for l, a, d in [(4, .5, 3), (3, .6, 2.5), (2, .7, 1), (1, .9, .2)]]
    c = correlate(records)["x/raw/mse"]
    assert c["spearman_loss"] == pytest.approx(1.0) and c["spearman_dev"] == pytest.approx(-1.0)
    assert 0.9 < c["pearson_loss"] <= 1.0


def test_cli_method_errors_are_one_line(capsys, tmp_path, tiny_dir):
    team = team_yaml(tmp_path, str(tiny_dir), str(tiny_dir))
    assert_one_error(capsys, ["distill", "--team", team, "--method", "kd+bogus"], "unknown method 'bogus'")
    assert_one_error(capsys, ["distill", "--team", team, "--method", "kd+tmkd"], "cannot be combined")
    assert_one_error(capsys, ["distill", "--team", team, "--method", str(tmp_path / "none.yaml")], "not found")
    assert_one_error(capsys, ["chain", "--team", team, "--assistants", "x"], "--assistants")
    with pytest.raises(SystemExit) as info:  # argparse's own check: the same one-line format
        main(["chain", "--team", str(team), "--method", "kd"])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and err[0].startswith("autoskd: error:") and "invalid choice" in err[0]
    assert_one_error(capsys, ["analyse", "--team", team, "--method", "nope"], "unknown method 'nope'")
    code, out, _ = run(capsys, "methods")
    assert code == 0 and len(out.strip().splitlines()) == len(describe_methods())  # one line per method
