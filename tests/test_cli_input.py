"""Bad numbers, paths and encodings on every command: one line, exit 2, nothing lost (issue 6).

Every check here happens before any data is read or model trained, so the file runs in seconds.
"""

from __future__ import annotations

import argparse
import os

import pytest

from autoskd.cli import build_parser, main
from autoskd.cli_types import fraction, int_at_least, output_dir, positive_float
from autoskd.data.tasks import load_task
from test_cli import assert_one_error, rows, run, team_yaml


@pytest.fixture
def team(tmp_path, tiny_dir):
    return team_yaml(tmp_path, str(tiny_dir), str(tiny_dir))


def argparse_error(capsys, argv) -> str:
    """``main(argv)`` stops while parsing: exit 2, one ``autoskd: error:`` line; returns it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autoskd: error: "), lines
    return lines[0]


DISTILL = ["distill", "--no-progress"]
SEARCH = ["search", "--no-progress"]
BUILD = ["team", "build", "teams/minilm-ladder.yaml", "--no-progress"]


@pytest.mark.parametrize("argv, flag, rule", [
    (DISTILL + ["--batch-size", "0"], "--batch-size", ">= 1"),
    (DISTILL + ["--batch-size", "-3"], "--batch-size", ">= 1"),
    (DISTILL + ["--batch-size", "1.5"], "--batch-size", "whole number"),
    (DISTILL + ["--lr", "-1"], "--lr", "> 0"),
    (DISTILL + ["--lr", "0"], "--lr", "> 0"),
    (DISTILL + ["--lr", "nan"], "--lr", "finite"),
    (DISTILL + ["--epochs", "0"], "--epochs", "> 0"),
    (DISTILL + ["--pretrain-epochs", "-1"], "--pretrain-epochs", ">= 0"),
    (DISTILL + ["--max-length", "1"], "--max-length", ">= 2"),
    (DISTILL + ["--seed", "-1"], "--seed", ">= 0"),
    (DISTILL + ["--max-train", "0"], "--max-train", ">= 1"),
    (DISTILL + ["--max-eval", "0"], "--max-eval", ">= 1"),
    (DISTILL + ["--encoding", "klingon"], "--encoding", "latin-1"),
    (SEARCH + ["--theta-lr", "0"], "--theta-lr", "> 0"),
    (SEARCH + ["--m", "-1"], "--m", ">= 0"),
    (SEARCH + ["--candidates", "0"], "--candidates", ">= 1"),
    (SEARCH + ["--search-epochs", "0"], "--search-epochs", "> 0"),
    (SEARCH + ["--eval-epochs", "-2"], "--eval-epochs", "> 0"),
    (SEARCH + ["--random", "-1"], "--random", ">= 0"),
    (SEARCH + ["--cpus-per-trial", "0"], "--cpus-per-trial", "> 0"),
    (SEARCH + ["--gpus-per-trial", "-1"], "--gpus-per-trial", ">= 0"),
    (SEARCH + ["--max-concurrent", "0"], "--max-concurrent", ">= 1"),
    (SEARCH + ["--baselines", "single,bogus"], "--baselines", "unknown baseline 'bogus'"),
    (SEARCH + ["--seed", "x"], "--seed", "whole number"),
    (BUILD + ["--max-train", "0"], "--max-train", ">= 1"),
    (BUILD + ["--seed", "-5"], "--seed", ">= 0"),
])
def test_bad_numbers_stop_at_parsing(capsys, argv, flag, rule):
    line = argparse_error(capsys, argv)
    assert f"argument {flag}:" in line and rule in line


@pytest.mark.parametrize("command", [["distill", "--out"], ["search", "--out"], ["distill", "--cache-dir"],
                                     ["search", "--cache-dir"], ["team", "build", "t.yaml", "--cache-dir"]])
def test_output_path_that_is_a_file_is_refused_and_kept(capsys, tmp_path, command):
    existing = tmp_path / "results.txt"
    existing.write_text("finished work")
    line = argparse_error(capsys, command + [existing])
    assert "existing file" in line and "folder" in line
    line = argparse_error(capsys, command + [existing / "sub"])  # a file on the way
    assert "is a file" in line
    assert existing.read_text() == "finished work"


def test_demo_refuses_a_file_in_its_output_place(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "demo").write_text("mine")
    assert "--out" in argparse_error(capsys, ["demo"])
    assert (tmp_path / "runs" / "demo").read_text() == "mine"


def test_unwritable_output_folder(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(locked))  # tests may run as root
    with pytest.raises(argparse.ArgumentTypeError, match="permission denied"):
        output_dir(str(locked / "run"))
    assert output_dir(str(tmp_path / "new" / "run")) == str(tmp_path / "new" / "run")


def test_finished_distill_is_not_overwritten(capsys, tmp_path, team):
    out = tmp_path / "run"
    out.mkdir()
    (out / "result.json").write_text('{"dev_acc": 0.9}')
    line = assert_one_error(capsys, ["distill", "--team", team, "--out", out, "--cache-dir", tmp_path / "c",
                                     "--no-progress"], "already holds a finished run", "new --out")
    assert str(out) in line and (out / "result.json").read_text() == '{"dev_acc": 0.9}'


def test_unknown_teacher_fails_before_any_teacher_is_built(capsys, tmp_path, team):
    assert_one_error(capsys, ["distill", "--team", team, "--teacher", "tt", "--cache-dir", tmp_path / "cache",
                              "--out", tmp_path / "run", "--no-progress"], "distill.teacher 'tt'", "choose one of: t")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- encodings
def latin1_csv(path):
    frame = rows(40)
    frame.loc[0, "text"] = "un film très réussi"
    frame.to_csv(path, index=False, encoding="latin-1")
    return path


def test_non_utf8_csv_is_refused_with_the_encoding_flag(capsys, tmp_path, team):
    csv = latin1_csv(tmp_path / "reviews.csv")
    assert_one_error(capsys, ["team", "build", team, "--task", csv, "--cache-dir", tmp_path / "cache", "--no-progress"],
                     "reviews.csv", "not valid utf-8", "0xe8", "--encoding")
    assert not (tmp_path / "cache").exists()


def test_encoding_flag_reads_the_file(capsys, tmp_path, team):
    csv = latin1_csv(tmp_path / "reviews.csv")
    code, out, err = run(capsys, "team", "build", team, "--task", csv, "--encoding", "latin-1",
                         "--cache-dir", tmp_path / "cache", "--no-progress")
    assert code == 0, err
    assert '"t"' in out  # the teacher's dev accuracy


def test_search_passes_the_encoding_to_its_trials(capsys, tmp_path, monkeypatch):
    import autoskd.search.run as search_run

    seen = {}
    monkeypatch.setattr(search_run, "run_search", lambda team, task_args, *a, **k: seen.update(task_args) or {})
    assert main(["search", "--task", "x.csv", "--encoding", "cp1252", "--out", str(tmp_path / "s")]) == 0
    assert seen["encoding"] == "cp1252"


@pytest.mark.parametrize("flags, center", [([], False), (["--theta-center"], True)])
def test_search_theta_center_flag_reaches_the_config(tmp_path, monkeypatch, flags, center):
    import autoskd.search.run as search_run

    seen = {}
    monkeypatch.setattr(search_run, "run_search", lambda team, task_args, config, *a, **k: seen.update(c=config) or {})
    assert main(["search", "--task", "x.csv", "--out", str(tmp_path / "s"), *flags]) == 0
    assert seen["c"].theta.center is center


def test_a_classifier_search_refuses_mixture_candidates_in_one_line(tmp_path, monkeypatch, capsys):
    import autoskd.search.run as search_run

    monkeypatch.setattr(search_run, "run_search", lambda *a, **k: pytest.fail("the search started"))
    assert main(["search", "--task", "x.csv", "--out", str(tmp_path / "s"), "--candidate-policy", "mixture"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "candidate_policy" in err[0] and "language-model" in err[0]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_load_task_decodes_with_the_given_encoding(tmp_path, suffix):
    frame = rows(40)
    frame.loc[3, "text"] = "naïve café"
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_bytes(frame.to_json(orient="records", lines=True, force_ascii=False).encode("cp1252"))
    else:
        frame.to_csv(path, index=False, sep="\t" if suffix == ".tsv" else ",", encoding="cp1252")
    task = load_task(str(path), encoding="cp1252")
    texts = [t for s in ("train", "val", "dev", "test") for t in task.split(s)["text"]]
    assert "naïve café" in texts
    with pytest.raises(Exception, match="--encoding"):
        load_task(str(path))
    with pytest.raises(Exception, match="--encoding applies to data files"):
        load_task("rotten_tomatoes", encoding="latin-1")


def test_validators_directly():
    assert int_at_least(2)("2") == 2 and positive_float("1e-4") == 1e-4 and fraction("0.25") == 0.25
    for fn, text in ((int_at_least(2), "1"), (positive_float, "inf"), (fraction, "1.5"), (fraction, "-0.1")):
        with pytest.raises(argparse.ArgumentTypeError):
            fn(text)


def test_search_strategy_choices_are_the_optimisers(tmp_path, monkeypatch):
    """--strategy expected reaches the config (with the task objective and centring, which it allows;
    and --theta-only), and the CLI's choices are exactly the θ optimiser's strategies."""
    import autoskd.search.run as search_run
    from autoskd.search.distribution import STRATEGIES

    seen = {}
    monkeypatch.setattr(search_run, "run_search", lambda team, task_args, config, *a, **k: seen.update(c=config) or {})
    assert main(["search", "--task", "x.csv", "--out", str(tmp_path / "s"), "--strategy", "expected",
                 "--val-objective", "task", "--order", "second", "--theta-center", "--theta-only"]) == 0
    assert seen["c"].theta_only is True
    theta = seen["c"].theta
    assert (theta.strategy, theta.val_objective, theta.center) == ("expected", "task", True)
    choices = next(a.choices for a in build_parser()._subparsers._group_actions[0].choices["search"]._actions
                   if a.dest == "strategy")
    assert tuple(choices) == STRATEGIES
    from autoskd.search.lm_search import CANDIDATE_POLICIES
    from autoskd.search.theta_step import VAL_OBJECTIVES

    actions = {a.dest: a for a in build_parser()._subparsers._group_actions[0].choices["search"]._actions}
    assert tuple(actions["val_objective"].choices) == VAL_OBJECTIVES
    assert tuple(actions["candidate_policy"].choices) == CANDIDATE_POLICIES
