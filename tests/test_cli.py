"""The ``autoskd`` command line: bad input gets ONE clear line (``autoskd: error: ...``) and exit
code 2, and loses nothing finished; an interrupted distillation resumes.

Everything runs in-process (``autoskd.cli.main``) on tiny local BERTs saved with
``save_pretrained`` next to the real MiniLM tokenizer, so nothing downloads.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig

from autoskd.cli import main
from autoskd.engine.callbacks import Callback
from autoskd.errors import AutoSKDError
from helpers import InterruptAt


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core box they slow us ~10x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(layers: int = 4, vocab: int = 30522, num_labels: int = 2) -> BertConfig:
    return BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, num_labels=num_labels)




def rows(n: int = 60) -> pd.DataFrame:
    fillers = ["movie", "plot", "cast", "story", "script", "scene"]
    return pd.DataFrame({"text": [f"{'good' if i % 2 else 'bad'} {fillers[i % 6]} and {fillers[(i // 6) % 6]}"
                                  for i in range(n)],
                         "label": ["pos" if i % 2 else "neg" for i in range(n)]})


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "toy.csv"
    rows().to_csv(path, index=False)
    return path


def team_yaml(tmp_path: Path, student: str, teacher: str, teacher_layers: int | None = 2,
              student_layers: int | None = 1, name: str = "team.yaml") -> Path:
    def layers(k):
        return f", layers: {k}" if k is not None else ""

    path = tmp_path / name
    path.write_text(textwrap.dedent(f"""
        name: tiny
        student: {{source: "{student}"{layers(student_layers)}}}
        finetune: {{epochs: 1, lr: 1.0e-3, batch_size: 16}}
        teachers:
          - {{name: t, source: "{teacher}"{layers(teacher_layers)}}}
        max_length: 16
    """))
    return path


@pytest.fixture
def team(tmp_path, tiny_dir) -> Path:
    return team_yaml(tmp_path, str(tiny_dir), str(tiny_dir))


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error(capsys, argv, *words) -> str:
    """``main(argv)`` exits 2 with exactly one stderr line ``autoskd: error: ...`` naming ``words``."""
    code, out, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("autoskd: error: "), line
    for word in words:
        assert word in line, (word, line)
    return line


def distill_args(tmp_path, team, task, *extra):
    return ["distill", "--team", team, "--task", task, "--out", tmp_path / "run", "--cache-dir", tmp_path / "cache",
            "--no-progress", "--epochs", "1", "--batch-size", "16", *extra]


# ---------------------------------------------------------------------------------------------- info commands
def test_methods_lists_all(capsys):
    code, out, err = run(capsys, "methods")
    assert code == 0 and err == ""
    names = [line.split()[0] for line in out.strip().splitlines()]
    assert {"kd", "tinybert", "minilm", "theseus", "finetune"} <= set(names)
    code, out, _ = run(capsys, "methods", "--json")
    assert code == 0 and {r["name"] for r in json.loads(out)} >= {"kd", "tinybert", "minilm", "theseus", "finetune"}


@pytest.mark.parametrize("argv", [["--help"], ["search", "--help"], ["distill", "--help"], ["team", "build", "--help"]])
def test_help_exits_zero(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    assert "usage: autoskd" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- a good run
def test_distill_succeeds_on_tiny_team(capsys, tmp_path, team, data_csv):
    code, out, err = run(capsys, *distill_args(tmp_path, team, data_csv))
    assert code == 0, err
    assert "student (kd)" in out and "teacher t" in out
    run_dir = tmp_path / "run"
    assert (run_dir / "student" / "config.json").is_file() and (run_dir / "result.json").is_file()
    assert not (run_dir / "checkpoint.pt").exists()
    assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "training.png").is_file()


# ---------------------------------------------------------------------------------------------- data errors
def test_missing_text_column(capsys, tmp_path, team):
    csv = tmp_path / "reviews.csv"
    rows().rename(columns={"text": "review"}).to_csv(csv, index=False)
    assert_one_error(capsys, distill_args(tmp_path, team, csv), "no text column", "review", "--text-column")
    assert_one_error(capsys, distill_args(tmp_path, team, csv, "--text-column", "body"),
                     "column 'body' not found", "review", "--text-column")


def test_missing_label_column(capsys, tmp_path, team, data_csv):
    assert_one_error(capsys, distill_args(tmp_path, team, data_csv, "--label-column", "sentiment"),
                     "column 'sentiment' not found", "--label-column")
    csv = tmp_path / "nolabel.csv"
    rows()[["text"]].to_csv(csv, index=False)
    assert_one_error(capsys, distill_args(tmp_path, team, csv), "column 'label' not found", "--label-column")


def test_fewer_than_two_labels(capsys, tmp_path, team):
    csv = tmp_path / "one.csv"
    rows().assign(label="pos").to_csv(csv, index=False)
    assert_one_error(capsys, distill_args(tmp_path, team, csv), "only 1 distinct", "at least 2")


@pytest.mark.parametrize("content, words", [("", ("could not read", "CSV")),
                                            ("text,label\n", ("no usable rows",))])
def test_empty_data_file(capsys, tmp_path, team, content, words):
    csv = tmp_path / "empty.csv"
    csv.write_text(content)
    assert_one_error(capsys, distill_args(tmp_path, team, csv), *words)


def test_missing_data_file(capsys, tmp_path, team):
    assert_one_error(capsys, distill_args(tmp_path, team, tmp_path / "nope.csv"), "data file not found", "nope.csv")


# ---------------------------------------------------------------------------------------------- team errors
def test_missing_team_file(capsys, tmp_path, data_csv):
    assert_one_error(capsys, distill_args(tmp_path, tmp_path / "nope.yaml", data_csv), "team file", "nope.yaml",
                     "not found")
    assert_one_error(capsys, ["team", "build", tmp_path / "nope.yaml", "--task", data_csv, "--no-progress",
                              "--cache-dir", tmp_path / "cache"], "team file", "not found")


def test_unknown_model_source(capsys, tmp_path, tiny_dir, data_csv):
    missing = tmp_path / "no-such-model"
    yaml = team_yaml(tmp_path, str(tiny_dir), str(missing))
    assert_one_error(capsys, distill_args(tmp_path, yaml, data_csv), "model folder", "no-such-model", "not found")


def test_teacher_with_other_tokenizer(capsys, tmp_path, tiny_dir, other_vocab_dir, data_csv):
    yaml = team_yaml(tmp_path, str(tiny_dir), str(other_vocab_dir), teacher_layers=None)
    assert_one_error(capsys, distill_args(tmp_path, yaml, data_csv), "teacher 't'", "different tokenizer",
                     "share one tokenizer")


def test_layers_the_model_does_not_have(capsys, tmp_path, tiny_dir, data_csv):
    yaml = team_yaml(tmp_path, str(tiny_dir), str(tiny_dir), teacher_layers=9)
    assert_one_error(capsys, distill_args(tmp_path, yaml, data_csv), "teacher 't'", "4 layers", "layers: 9")
    yaml = team_yaml(tmp_path, str(tiny_dir), str(tiny_dir), student_layers=7)
    assert_one_error(capsys, distill_args(tmp_path, yaml, data_csv), "student", "layers: 7")


def test_teacher_with_other_label_count_python_api(tmp_path, tiny_dir, data_csv):
    from autoskd.data.tasks import load_task
    from autoskd.team import ModelSpec, TeacherTeam

    task = load_task(str(data_csv))
    three = AutoModelForSequenceClassification.from_config(tiny_config(layers=1, num_labels=3))
    team = TeacherTeam(student=ModelSpec(str(tiny_dir), layers=1), teachers={"three": three}, max_length=16)
    with pytest.raises(AutoSKDError, match=r"teacher 'three' predicts 3 labels but task '.*toy.csv' has 2") as info:
        team.build(task, cache_dir=tmp_path / "cache", progress=False)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------- option errors
def test_unknown_method_fails_before_any_teacher_is_built(capsys, tmp_path, team, data_csv):
    assert_one_error(capsys, distill_args(tmp_path, team, data_csv, "--method", "distilbertish"),
                     "unknown method 'distilbertish'", "kd", "tinybert", "minilm", "theseus", "finetune")
    # A typo costs nothing: it is caught before the (slow) teacher fine-tuning starts.
    assert not (tmp_path / "cache" / "teachers").exists()
    code, out, err = run(capsys, "team", "build", team, "--task", data_csv, "--no-progress",
                         "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    assert json.loads(out)["team"] == "tiny"
    assert not any(p.name.endswith(".partial") for p in (tmp_path / "cache" / "teachers").iterdir())


def test_bad_option_syntax(capsys, tmp_path, team, data_csv):
    assert_one_error(capsys, distill_args(tmp_path, team, data_csv, "--option", "temperature"),
                     "--option 'temperature'", "key=value")


def test_unknown_option_name(capsys, tmp_path, team, data_csv):
    # (kd has a ``beta`` option since the LM methods: JSD's mixing weight)
    assert_one_error(capsys, distill_args(tmp_path, team, data_csv, "--option", "gamma=2"),
                     "method 'kd' has no option gamma", "alpha")


@pytest.mark.parametrize("argv, words", [
    (["search", "--preset", "bogus"], ("bogus", "quick", "paper")),
    (["distill", "--epochs", "abc"], ("--epochs", "abc")),
])
def test_argparse_errors_are_one_line(capsys, argv, words):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autoskd: error: ")
    assert all(w in lines[0] for w in words)


def test_unknown_preset_is_rejected(capsys):
    """Whatever the format (see above), an unknown preset exits 2 and names the choices."""
    with pytest.raises(SystemExit) as info:
        main(["search", "--preset", "bogus"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "bogus" in err and "quick" in err and "paper" in err
    from autoskd.search.presets import get_preset

    with pytest.raises(AutoSKDError, match="unknown preset .bogus.; choose one of: quick, medium, lm-quick, paper"):
        get_preset("bogus")


def test_keyboard_interrupt_exits_130(capsys, monkeypatch):
    import autoskd.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_methods", interrupted)
    code, _, err = run(capsys, "methods")
    assert code == 130
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "interrupted" in lines[0] and "resume" in lines[0]


# ---------------------------------------------------------------------------------------------- resume
class Steps(Callback):
    def __init__(self):
        self.epochs: list[int] = []

    def on_step_begin(self, trainer, ctx, batch):
        self.epochs.append(ctx.epoch)


def test_interrupted_distill_resumes(tmp_path, tiny_dir, data_csv):
    from autoskd.data.tasks import load_task
    from autoskd.pipeline import DistillConfig, distill
    from autoskd.team import FinetuneSettings, ModelSpec, TeacherTeam

    task = load_task(str(data_csv))
    fast = FinetuneSettings(epochs=1, lr=1e-3, batch_size=16)
    team = TeacherTeam(student=ModelSpec(str(tiny_dir), layers=1),
                       teachers={"t": ModelSpec(str(tiny_dir), layers=2, finetune=fast)}, max_length=16)
    team.build(task, cache_dir=tmp_path / "teachers", progress=False)
    config = DistillConfig(method="kd", epochs=3, batch_size=16, lr=1e-3)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        distill(team, task, config, out_dir=out, cache_dir=tmp_path / "cache", progress=False,
                callbacks=[InterruptAt(epoch=1)])
    assert (out / "checkpoint.pt").is_file()
    assert not (out / "result.json").exists() and not (out / "student").exists()
    assert torch.load(out / "checkpoint.pt", weights_only=False)["epoch"] == 1

    steps = Steps()
    outcome = distill(team, task, config, out_dir=out, cache_dir=tmp_path / "cache", progress=False,
                      callbacks=[steps])
    assert set(steps.epochs) == {1, 2}  # epoch 0 was not redone
    assert not (out / "checkpoint.pt").exists()
    result = json.loads((out / "result.json").read_text())
    assert [h["epoch"] for h in result["history"] if h["kind"] == "epoch"] == [0, 1, 2]
    assert result["dev_acc"] == outcome.dev_acc
    assert (out / "student" / "config.json").is_file() and (out / "config.json").is_file()
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "epoch"]
    assert epochs == [0, 1, 2]


def test_resume_with_other_method_is_one_line_error(capsys, tmp_path, team, data_csv):
    from autoskd.data.tasks import load_task
    from autoskd.pipeline import DistillConfig, distill
    from autoskd.team import TeacherTeam

    task = load_task(str(data_csv))
    built = TeacherTeam.from_yaml(team).build(task, cache_dir=tmp_path / "cache" / "teachers", progress=False)
    with pytest.raises(KeyboardInterrupt):
        distill(built, task, DistillConfig(method="tinybert", epochs=2, batch_size=16), out_dir=tmp_path / "run",
                cache_dir=tmp_path / "cache", progress=False, callbacks=[InterruptAt(epoch=1)])
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    assert_one_error(capsys, distill_args(tmp_path, team, data_csv, "--method", "kd"), "checkpoint")
    assert (tmp_path / "run" / "checkpoint.pt").is_file()  # the interrupted run is not lost
