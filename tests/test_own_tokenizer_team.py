"""Teams with a teacher that uses its own tokenizer: the team YAML names it (``tokenizer: own``),
logit-level methods (``kd``, AutoSKD's search) run end to end with the teacher tokenising each
row's text itself, and feature-level methods refuse it in one line before any training.

The teacher is a tiny random BERT with a 14-word WordPiece vocabulary of its own, the student a
tiny random BERT with the real MiniLM tokenizer (30522 tokens); nothing downloads.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertTokenizer

from autoskd.cli import main
from autoskd.errors import AutoSKDError

WORDS = ["good", "bad", "movie", "plot", "cast", "story", "script", "scene", "and"]


@pytest.fixture(scope="module")
def own_vocab_dir(tmp_path_factory) -> Path:
    """A tiny BERT classifier saved with its own 14-token tokenizer."""
    path = tmp_path_factory.mktemp("own-vocab")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(7)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory) -> Path:
    n = 48
    df = pd.DataFrame({"text": [f"{'good' if i % 2 else 'bad'} {WORDS[2 + i % 6]} and {WORDS[2 + (i // 6) % 6]}"
                                for i in range(n)], "label": ["pos" if i % 2 else "neg" for i in range(n)]})
    path = tmp_path_factory.mktemp("data") / "toy.csv"
    df.to_csv(path, index=False)
    return path


def team_file(folder: Path, student: Path, own: Path, tokenizer_line: str = "tokenizer: own",
              extra_teacher: str = "") -> Path:
    path = folder / "team.yaml"
    path.write_text(textwrap.dedent(f"""
        name: mixed
        student: {{source: "{student}", layers: 1, init: random}}
        finetune: {{epochs: 2, lr: 3.0e-3, batch_size: 16}}
        teachers:
          - {{name: own, source: "{own}", {tokenizer_line}}}
        {extra_teacher}
        max_length: 16
    """))
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("work")  # one teacher cache for the whole file


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def distill_args(workdir, team, data_csv, method, out):
    return ["distill", "--team", team, "--task", data_csv, "--method", method, "--epochs", "1", "--batch-size", "16",
            "--lr", "3e-3", "--cache-dir", workdir / "cache", "--out", workdir / out, "--no-progress"]


def test_team_names_the_teachers_own_tokenizer(tiny_dir, own_vocab_dir, data_csv, workdir, tmp_path):
    from autoskd.data.tasks import load_task
    from autoskd.team import TeacherTeam, TeamSpec

    task = load_task(str(data_csv))
    # without the key the mismatch is a one-line error that names the fix
    plain = team_file(tmp_path, tiny_dir, own_vocab_dir, tokenizer_line="layers: 2")
    with pytest.raises(AutoSKDError, match=r"teacher 'own' uses a different tokenizer \(vocab 14 vs 30522\).*"
                                           "tokenizer: own"):
        TeacherTeam.from_yaml(plain).validate(task)
    with pytest.raises(AutoSKDError, match="the student uses the team's tokenizer"):
        TeamSpec.from_dict({"student": {"source": str(tiny_dir), "tokenizer": "own"}, "teachers": [str(tiny_dir)]})
    team = TeacherTeam.from_yaml(team_file(workdir, tiny_dir, own_vocab_dir))
    team.build(task, cache_dir=workdir / "cache" / "teachers", progress=False)
    assert list(team.own_tokenizers) == ["own"] and len(team.own_tokenizers["own"]) == 14
    assert len(team.tokenizer) == 30522
    # fine-tuned and scored on its own tokenisation, cached with its own tokenizer
    assert team.status["own"] == "built"
    own_tok = team.own_tokenizers["own"]
    dev = own_tok(list(task.split("dev")["text"]), padding=True, return_tensors="pt")
    with torch.no_grad():
        predicted = team.teachers["own"](**dev).logits.argmax(-1)
    labels = torch.tensor(task.split("dev")["label"])
    assert team.dev_accuracy["own"] == pytest.approx(float((predicted == labels).float().mean()))
    assert len(AutoTokenizer.from_pretrained(team.cache_dirs["own"])) == 14
    # the same tokenizer given by path is the same teacher (same cache entry)
    again = TeacherTeam.from_yaml(team_file(tmp_path, tiny_dir, own_vocab_dir, f'tokenizer: "{own_vocab_dir}"'))
    assert again.cache_key("own", task) != team.cache_key("own", task)  # the spec differs ...
    assert again.teacher_tokenizer("own").get_vocab() == team.teacher_tokenizer("own").get_vocab()  # ... not the vocab


def test_distill_kd_with_own_tokenizer_teacher(capsys, tiny_dir, own_vocab_dir, data_csv, workdir):
    from autoskd.data.tasks import load_task
    from autoskd.engine.own_tokenizer import OwnTokenizerTeacher
    from autoskd.pipeline import DistillConfig, build_policy, make_loaders
    from autoskd.team import TeacherTeam

    team_path = team_file(workdir, tiny_dir, own_vocab_dir)
    code, out, err = run(capsys, *distill_args(workdir, team_path, data_csv, "kd", "kd"))
    assert code == 0, err
    result = json.loads((workdir / "kd" / "result.json").read_text())
    assert result["steps"] > 0 and 0 <= result["test_acc"] <= 1
    # the teacher speaks from its own tokenisation of each row's text, matched by idx
    task = load_task(str(data_csv))
    team = TeacherTeam.from_yaml(team_path).build(task, cache_dir=workdir / "cache" / "teachers", progress=False)
    policy = build_policy(team, DistillConfig(method="kd"))
    teacher = policy.teachers["own"]
    assert isinstance(teacher, OwnTokenizerTeacher)
    loaders = make_loaders(task, team.tokenizer, 16, 8, seed=0)
    teacher.prepare(loaders.train, None, None)
    batch = next(iter(loaders.train))
    texts = [task.split("train_full")["text"][i] for i in batch["idx"].tolist()]
    own_tok = team.own_tokenizers["own"]
    expected = teacher.model(**own_tok(texts, padding=True, truncation=True, max_length=16,
                                       return_tensors="pt")).logits
    assert torch.allclose(teacher.features(batch, ["logits"])["logits"], expected, atol=1e-5)


def test_feature_method_refuses_own_tokenizer_teacher_in_one_line(capsys, tiny_dir, own_vocab_dir, data_csv,
                                                                   workdir):
    team_path = team_file(workdir, tiny_dir, own_vocab_dir)
    for method in ("tinybert", "kd+pkd"):
        code, out, err = run(capsys, *distill_args(workdir, team_path, data_csv, method, f"refused-{method}"))
        assert code == 2
        assert err.count("\n") == 1 and err.startswith("autoskd: error: ")
        assert "uses its own tokenizer" in err and "do not line up" in err and "logit-level method" in err
        assert not (workdir / f"refused-{method}" / "metrics.jsonl").exists()  # refused before training


def test_search_with_own_tokenizer_teacher(tiny_dir, own_vocab_dir, data_csv, workdir, tmp_path):
    from autoskd.search.run import SearchConfig, run_search
    from autoskd.search.theta_step import ThetaConfig

    shared = f'  - {{name: shared, source: "{tiny_dir}", layers: 1}}'
    team_path = team_file(tmp_path, tiny_dir, own_vocab_dir, extra_teacher=shared)
    config = SearchConfig(search_epochs=1, eval_epochs=1, lr=3e-3, batch_size=16, m=0, executor="local",
                          n_random=0, baselines="single", theta=ThetaConfig(num_candidates=1, order="first"))
    summary = run_search(team_path, {"name_or_path": str(data_csv)}, config, tmp_path / "run",
                         cache_dir=workdir / "cache", progress=False)
    records = json.loads((tmp_path / "run" / "results.json").read_text())
    assert all(r["status"] == "finished" for r in records), records
    assert {r.get("teacher") for r in records if r["group"] == "single"} == {"own", "shared"}
    assert len(summary["best_candidate"]["theta"]) == 2
