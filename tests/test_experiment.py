"""One experiment = one file: ``autoskd run experiment.yaml``, and every command as a way of
writing one.

What is checked: the whole file is validated before anything loads (unknown keys get the
nearest known one, bad values one line each, all in one ``autoskd: error:`` line); ``--set``
and a command's flags edit the same tree; ``--dry-run`` loads no model and no data; every run
writes its resolved ``experiment.yaml``, and running that file again reproduces the numbers
(tiny random BERTs, as in ``test_cli.py``); the fingerprint ignores where a run writes.
"""

from __future__ import annotations

import json
import logging
import textwrap
from pathlib import Path

import pytest
import yaml

from autoskd.errors import AutoSKDError
from autoskd.experiment import (apply_sets, dump_experiment, experiment_fingerprint, load_experiment,
                                resolve_experiment)
from autoskd.experiment.overrides import parse_set
from test_cli import assert_one_error, rows, run, team_yaml


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "toy.csv"
    rows(60).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def team(tmp_path_factory, tiny_dir) -> Path:
    return team_yaml(tmp_path_factory.mktemp("team"), str(tiny_dir), str(tiny_dir))


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def dry_run(capsys, *argv) -> dict:
    """The resolved experiment a ``--dry-run`` prints (its YAML part)."""
    code, out, err = run(capsys, *argv, "--dry-run")
    assert code == 0, err
    assert "# would run:" in out and "nothing was loaded or trained" in out
    return yaml.safe_load(out)


# ---------------------------------------------------------------------------------------------- schema
def test_unknown_keys_get_a_did_you_mean(capsys, tmp_path, team):
    file = write(tmp_path / "x.yaml", f"""
        kind: distill
        team: {team}
        seeed: 1
        distill: {{method: kd, lrr: 1.0e-3}}
    """)
    line = assert_one_error(capsys, ["run", file, "--dry-run"], "x.yaml", "2 problems",
                            "seeed: unknown key; did you mean 'seed'?", "distill.lrr: unknown key; did you mean 'lr'?")
    assert " | " in line
    search = write(tmp_path / "s.yaml", f"""
        kind: search
        team: {team}
        search: {{preset: quick, theta: {{lrr: 0.01}}, eval_epoch: 1}}
    """)
    assert_one_error(capsys, ["run", search, "--dry-run"], "search.theta.lrr: unknown key; did you mean 'lr'?",
                     "search.eval_epoch: unknown key; did you mean 'eval_epochs'?")
    assert_one_error(capsys, ["run", search, "--dry-run", "--set", "kind=serach"], "did you mean 'search'?")


def test_wrong_types_and_ranges_are_one_line_each(capsys, tmp_path, team):
    file = write(tmp_path / "x.yaml", f"""
        team: {team}
        task: {{name: x.csv, max_train: 0}}
        progress: yes please
        distill: {{batch_size: 0, lr: fast, policy: avg, epochs: -1}}
    """)
    line = assert_one_error(capsys, ["run", file, "--dry-run"], "6 problems",
                            "task.max_train must be a whole number >= 1, got 0", "progress must be true or false",
                            "distill.batch_size must be a whole number >= 1", "distill.lr must be a number > 0, got 'fast'",
                            "distill.policy must be one of single, average, got 'avg' (did you mean 'average'?)",
                            "distill.epochs must be a number > 0, got -1")
    assert line.count(" | ") == 5


def test_keys_of_another_kind_or_task_are_named(capsys, tmp_path, team):
    file = write(tmp_path / "x.yaml", f"""
        team: {team}
        distill: {{top_k: 8}}
        search: {{preset: quick}}
        scale: {{tensor_parallel: 0}}
    """)
    assert_one_error(capsys, ["run", file, "--dry-run"], "distill.top_k applies to language-model tasks",
                     "section 'search' does not apply to kind 'distill'", "scale.tensor_parallel must be a whole number")


def test_file_errors_are_one_line(capsys, tmp_path):
    assert_one_error(capsys, ["run", tmp_path / "none.yaml"], "none.yaml", "not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: [distill\n")
    assert_one_error(capsys, ["run", bad], "not valid YAML")
    bad.write_text("- kind: distill\n")
    assert_one_error(capsys, ["run", bad], "must be a mapping")


def test_a_stage_plan_as_method_is_a_stages_experiment(capsys, tmp_path, team):
    plan = write(tmp_path / "plan.yaml", """
        stages:
          - {method: kd, epochs: 1}
          - {method: kd, epochs: 2, lr: 1.0e-3}
    """)
    resolved = dry_run(capsys, "distill", "--team", team, "--method", plan, "--batch-size", "8")
    assert resolved["kind"] == "stages" and "distill" not in resolved
    assert resolved["stages"]["batch_size"] == 8 and [s["epochs"] for s in resolved["stages"]["plan"]] == [1, 2]
    assert_one_error(capsys, ["distill", "--team", team, "--method", plan, "--epochs", "2", "--dry-run"],
                     "distill.epochs does not apply to a stage plan")
    assert_one_error(capsys, ["distill", "--team", team, "--method", plan, "--option", "alpha=1", "--dry-run"],
                     "--option", "stage plan")


# ---------------------------------------------------------------------------------------------- --set and flags
@pytest.mark.parametrize("pair, parts, value", [
    ("distill.lr=3e-4", ["distill", "lr"], 3e-4),
    ("task.max_train=100", ["task", "max_train"], 100),
    ("distill.teachers=[a, b]", ["distill", "teachers"], ["a", "b"]),
    ("progress=false", ["progress"], False),
    ("distill.teacher=null", ["distill", "teacher"], None),
    ("task.name=lm:docs.txt", ["task", "name"], "lm:docs.txt"),
    ("distill.options={temperature: 2}", ["distill", "options"], {"temperature": 2}),
])
def test_set_values_are_read_as_yaml(pair, parts, value):
    assert parse_set(pair) == (parts, value)


@pytest.mark.parametrize("pair", ["distill.lr", "=3", "distill..lr=1"])
def test_bad_set_is_refused(pair):
    with pytest.raises(AutoSKDError, match="key=value"):
        parse_set(pair)


def test_set_reaches_dotted_keys_of_a_search_space():
    tree = {"tune": {"space": {"params": {"method_options.temperature": {"uniform": [1, 8]}}}}}
    out = apply_sets(tree, ["tune.space.params.method_options.temperature.uniform=[2, 4]", "seed=3"])
    assert out["tune"]["space"]["params"] == {"method_options.temperature": {"uniform": [2, 4]}} and out["seed"] == 3
    assert tree["tune"]["space"]["params"]["method_options.temperature"] == {"uniform": [1, 8]}  # a copy


def test_flags_then_set(capsys, team):
    resolved = dry_run(capsys, "distill", "--team", team, "--lr", "1e-3", "--epochs", "2", "--option", "temperature=3",
                       "--set", "distill.lr=3e-4", "--set", "task.max_train=100", "--set", "distill.options.alpha=0.5")
    d = resolved["distill"]
    assert (d["lr"], d["epochs"], d["options"]) == (3e-4, 2.0, {"temperature": 3, "alpha": 0.5})
    assert resolved["task"]["max_train"] == 100


@pytest.mark.parametrize("argv", [["distill"], ["search"], ["tune", "--space", "search_spaces/kd-hparams.yaml"],
                                  ["chain"]])
def test_set_works_on_every_command(capsys, team, argv):
    resolved = dry_run(capsys, *argv, "--team", team, "--set", "seed=7")
    assert resolved["seed"] == 7 and resolved["kind"] == argv[0]


def test_run_file_with_overrides(capsys, tmp_path, team):
    file = write(tmp_path / "x.yaml", f"""
        kind: search
        team: {team}
        task: toy.csv
        out: runs/a
        search: {{preset: quick, theta: {{lr: 0.02}}}}
    """)
    resolved = dry_run(capsys, "run", file, "--out", tmp_path / "b", "--no-progress", "--set", "task.max_eval=50")
    assert resolved["out"] == str(tmp_path / "b") and resolved["progress"] is False
    assert resolved["task"] == {**resolved["task"], "name": "toy.csv", "max_train": 500, "max_eval": 50}  # quick's 500
    theta = resolved["search"]["theta"]
    assert theta["lr"] == 0.02 and theta["num_candidates"] == 4  # the preset's other theta keys are kept


# ---------------------------------------------------------------------------------------------- dry run
def test_dry_run_loads_no_model_and_no_data(capsys, tmp_path, monkeypatch, team, data_csv):
    """Every kind (and the LM form) resolves with every loader refused; what it prints is the
    complete experiment, which resolves to itself."""
    import autoskd.data.tasks
    import autoskd.lm.data
    import autoskd.lm.models
    import autoskd.models.loading
    from autoskd.team import TeacherTeam

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run loaded something")

    for module, name in [(TeacherTeam, "build"), (autoskd.data.tasks, "load_task"), (autoskd.lm.data, "load_corpus"),
                         (autoskd.models.loading, "load_classifier"), (autoskd.lm.models, "load_causal_lm")]:
        monkeypatch.setattr(module, name, refuse)
    plan = write(tmp_path / "plan.yaml", "stages:\n  - {method: kd}\n")
    out = tmp_path / "out"
    common = ["--team", team, "--task", data_csv, "--out", out]
    for argv in (["distill", *common], ["distill", *common, "--method", plan], ["search", *common],
                 ["tune", *common, "--space", "search_spaces/kd-hparams.yaml"], ["chain", *common],
                 ["distill", "--task", "lm:rotten_tomatoes", "--out", out]):
        printed = dry_run(capsys, *argv)
        assert resolve_experiment(printed) == printed  # the resolved file resolves to itself
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- language models
def test_lm_experiment_file_resolves(capsys, tmp_path):
    file = write(tmp_path / "lm.yaml", """
        team:
          name: tiny-lm
          kind: lm
          max_length: 32
          student: {source: smollm2-135m, layers: 2}
          teachers:
            - {name: full, source: smollm2-135m}
        task: {name: "lm:docs.txt", max_train: 24}
        distill: {method: kd, options: {loss: reverse_kl}, max_steps: 2, top_k: 16, precision: bf16}
    """)
    resolved = dry_run(capsys, "run", file)
    d = resolved["distill"]
    assert (d["options"], d["max_steps"], d["top_k"], d["precision"], d["layout"]) == \
        ({"loss": "reverse_kl"}, 2, 16, "bf16", "packed")
    assert "policy" not in d and resolved["team"]["kind"] == "lm"
    assert resolved["scale"] == {"deepspeed": None, "tensor_parallel": 1}  # LM distill scales too (test_lm_scale)
    assert set(resolved["task"]) >= {"prompt_column", "completion_column"}
    # the command line's LM form, with the bundled LM team as the default
    resolved = dry_run(capsys, "distill", "--task", "lm:rotten_tomatoes", "--option", "loss=reverse_kl",
                       "--max-steps", "2", "--top-k", "8")
    assert resolved["team"]["name"] == "smollm2" and resolved["distill"]["top_k"] == 8


@pytest.mark.parametrize("edit, words", [
    (["--set", "distill.policy=average"], ("distill.policy does not apply to a language-model task",)),
    (["--set", "team=teams/minilm-ladder.yaml"], ("minilm-ladder' is a classification team",)),
    (["--set", "task.name=lm:"], ("needs a corpus after the colon",)),
    (["--method", "pkd"], ("cannot distil a decoder LM",)),
    (["--teacher", "nope"], ("distill.teacher 'nope' is not in team smollm2",)),
    (["--precision", "bf16", "--set", "scale.deepspeed={zero_optimization: {stage: 3}}"],
     ("precision applies to one-process runs", "DeepSpeed config")),
])
def test_lm_mistakes_are_one_line(capsys, edit, words):
    assert_one_error(capsys, ["distill", "--task", "lm:rotten_tomatoes", "--dry-run", *edit], *words)


def test_scale_serves_lm_distill_but_not_an_lm_search_yet(capsys):
    resolved = dry_run(capsys, "distill", "--task", "lm:rotten_tomatoes", "--set",
                       "scale.deepspeed={zero_optimization: {stage: 3}}")
    assert resolved["scale"]["deepspeed"] == {"zero_optimization": {"stage": 3}}
    assert_one_error(capsys, ["search", "--task", "lm:rotten_tomatoes", "--dry-run", "--set",
                              "scale.deepspeed={zero_optimization: {stage: 3}}"], "scale does not apply here")


def test_classification_task_refuses_an_lm_team(capsys):
    assert_one_error(capsys, ["distill", "--team", "teams/smollm2.yaml", "--dry-run"],
                     "'smollm2' is a language-model team")


def test_lm_run_hands_its_settings_to_distill_lm(capsys, tmp_path, monkeypatch):
    """The LM path end to end without a model: the corpus loader and ``distill_lm`` are stand-ins."""
    import autoskd.lm.data
    import autoskd.lm.pipeline
    from autoskd.lm.data import LMCorpus

    seen = {}
    corpus = LMCorpus("docs", {s: ["a b c"] * 4 for s in ("train", "val", "dev", "test")})
    monkeypatch.setattr(autoskd.lm.data, "load_corpus", lambda source, **kw: seen.update(source=source) or corpus)

    class Outcome:
        scores = {"val_ppl": 3.0, "test_ppl": 4.0}
        samples = [{"prompt": "a", "continuation": "b"}]

    def fake_distill_lm(team, corpus, config, **kw):
        seen.update(team=team, config=config, **kw)
        return Outcome()

    monkeypatch.setattr(autoskd.lm.pipeline, "distill_lm", fake_distill_lm)
    out = tmp_path / "lm"
    code, printed, err = run(capsys, "distill", "--task", "lm:docs.txt", "--option", "loss=reverse_kl", "--max-steps",
                             "2", "--batch-size", "2", "--max-length", "32", "--out", out, "--no-progress")
    assert code == 0, err
    assert "test perplexity 4.00" in printed and seen["source"] == "docs.txt" and seen["out_dir"] == str(out)
    c = seen["config"]
    assert (c.method, c.method_options, c.max_steps, c.batch_size, c.max_length) == \
        ("kd", {"loss": "reverse_kl"}, 2, 2, 32)
    assert list(seen["team"].teacher_specs) == ["smollm2-135m"]
    written = load_experiment(out / "experiment.yaml")
    assert written["task"]["name"] == "lm:docs.txt" and written["team"]["kind"] == "lm"


# ---------------------------------------------------------------------------------------------- every command writes experiment.yaml
def test_search_and_tune_write_their_experiment_and_team(capsys, tmp_path, monkeypatch, team):
    import autoskd.fanout.tune
    import autoskd.search.run

    seen = {}
    monkeypatch.setattr(autoskd.search.run, "run_search",
                        lambda team_path, task_args, config, out, **kw: seen.update(search=(team_path, task_args, config)))
    monkeypatch.setattr(autoskd.fanout.tune, "run_tune",
                        lambda space, team_path, task, settings, out, **kw: seen.update(tune=(space, task, settings)))
    code, _, err = run(capsys, "search", "--team", team, "--task", "x.csv", "--theta-center", "--m", "0",
                       "--out", tmp_path / "s")
    assert code == 0, err
    team_path, task_args, config = seen["search"]
    assert Path(team_path) == tmp_path / "s" / "team.yaml" and yaml.safe_load(Path(team_path).read_text())["name"] == "tiny"
    assert task_args["name_or_path"] == "x.csv" and config.theta.center is True and config.m == 0
    assert (config.max_train, config.preset) == (500, "quick")
    written = load_experiment(tmp_path / "s" / "experiment.yaml")
    assert written["kind"] == "search" and written["search"]["theta"]["center"] is True

    code, _, err = run(capsys, "tune", "--team", team, "--task", "x.csv", "--space", "search_spaces/kd-hparams.yaml",
                       "--sampler", "nsga2", "--trials", "3", "--batch-size", "16", "--out", tmp_path / "t")
    assert code == 0, err
    space, task, settings = seen["tune"]
    assert space.name == "kd-hparams" and (settings.trials, settings.objective2) == (3, "size")
    assert settings.base == {"seed": 0, "batch_size": 16} and task == {"name_or_path": "x.csv", "seed": 0}
    written = load_experiment(tmp_path / "t" / "experiment.yaml")
    assert written["tune"]["space"]["name"] == "kd-hparams" and (tmp_path / "t" / "team.yaml").is_file()


def test_chain_writes_its_experiment(capsys, tmp_path, monkeypatch, team):
    import autoskd.chain
    import autoskd.experiment.runner as runner
    from autoskd.chain import ChainOutcome, Hop

    class Team:
        dev_accuracy = {"t": 0.5}

    monkeypatch.setattr(runner, "load_task", lambda resolved: "task")
    monkeypatch.setattr(runner, "build_team", lambda resolved, task: Team())
    seen = {}

    def fake_chain(team, task, config, assistants, **kw):
        seen.update(config=config, assistants=assistants)
        return ChainOutcome(hops=[Hop("student", 1, ["t"], 0.5, 0.5, 1.0)])

    monkeypatch.setattr(autoskd.chain, "run_chain", fake_chain)
    code, out, err = run(capsys, "chain", "--team", team, "--assistants", "3,2", "--method", "dgkd", "--out",
                         tmp_path / "c", "--no-progress")
    assert code == 0, err
    assert seen["assistants"] == [3, 2] and seen["config"].method == "dgkd" and seen["config"].epochs == 1.0
    assert load_experiment(tmp_path / "c" / "experiment.yaml")["chain"]["assistants"] == [3, 2]


def test_stage_plan_writes_its_experiment(capsys, tmp_path, team, data_csv):
    plan = write(tmp_path / "plan.yaml", "stages:\n  - {method: kd, epochs: 1, lr: 1.0e-3}\n")
    code, out, err = run(capsys, "distill", "--team", team, "--task", data_csv, "--method", plan, "--batch-size", "16",
                         "--out", tmp_path / "run", "--cache-dir", tmp_path / "cache", "--no-progress")
    assert code == 0, err
    written = load_experiment(tmp_path / "run" / "experiment.yaml")
    assert written["kind"] == "stages" and written["stages"]["plan"] == [{"method": "kd", "epochs": 1, "lr": 1e-3}]
    assert (tmp_path / "run" / "stages.json").is_file()


# ---------------------------------------------------------------------------------------------- reproduce a run
@pytest.fixture(scope="module")
def first_run(tmp_path_factory, team, data_csv):
    """A tiny distillation from the command line; the cache is shared with its rerun."""
    from autoskd.cli import main

    root = tmp_path_factory.mktemp("reproduce")
    argv = ["distill", "--team", team, "--task", data_csv, "--out", root / "x", "--cache-dir", root / "cache",
            "--no-progress", "--epochs", "1", "--batch-size", "16", "--seed", "3", "--option", "temperature=2"]
    assert main([str(a) for a in argv]) == 0
    return root


def _numbers(run_dir: Path) -> dict:
    result = json.loads((run_dir / "result.json").read_text())
    losses = [{k: v for k, v in h.items() if "loss" in k or k in ("dev_acc", "step")} for h in result["history"]]
    return {"dev": result["dev_acc"], "test": result["test_acc"], "losses": losses,
            "predictions": json.loads((run_dir / "predictions.json").read_text())}


def test_distill_writes_its_resolved_experiment(first_run):
    written = load_experiment(first_run / "x" / "experiment.yaml")
    assert written["kind"] == "distill" and written["seed"] == 3 and written["out"] == str(first_run / "x")
    assert written["distill"]["options"] == {"temperature": 2} and written["distill"]["epochs"] == 1.0
    assert written["team"]["name"] == "tiny" and isinstance(written["team"]["teachers"], list)  # inline
    header = (first_run / "x" / "experiment.yaml").read_text().splitlines()[0]
    assert experiment_fingerprint(resolve_experiment(written))[:16] in header


def test_rerun_of_the_written_file_reproduces_the_numbers(capsys, first_run):
    code, out, err = run(capsys, "run", first_run / "x" / "experiment.yaml", "--out", first_run / "y")
    assert code == 0, err
    assert "student (kd)" in out
    first, again = _numbers(first_run / "x"), _numbers(first_run / "y")
    assert any(k.endswith("loss") for h in first["losses"] for k in h)  # the comparison below compares losses
    assert again == first
    x = load_experiment(first_run / "x" / "experiment.yaml")
    y = load_experiment(first_run / "y" / "experiment.yaml")
    assert {**y, "out": x["out"]} == x


# ---------------------------------------------------------------------------------------------- fingerprint
def test_fingerprint_is_stable_and_ignores_where_a_run_writes(team):
    resolved = resolve_experiment({"team": str(team), "task": "toy.csv", "distill": {"lr": "1e-3"}})
    fp = experiment_fingerprint(resolved)
    again = resolve_experiment(yaml.safe_load(dump_experiment(resolved)))  # the written file, read back
    assert again == resolved and experiment_fingerprint(again) == fp
    reordered = dict(reversed(list(resolved.items())))
    assert experiment_fingerprint(reordered) == fp
    moved = {**resolved, "out": "elsewhere", "cache_dir": "/tmp/other-cache", "progress": False}
    assert experiment_fingerprint(moved) == fp
    other = resolve_experiment({"team": str(team), "task": "toy.csv", "distill": {"lr": 2e-3}})
    assert experiment_fingerprint(other) != fp and len(fp) == 64


# ---------------------------------------------------------------------------------------------- small things
def test_teacher_finetuning_bar_says_finetune_once(capsys, tmp_path, team, data_csv):
    code, _, err = run(capsys, "team", "build", team, "--task", data_csv, "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    assert "finetune" in err and "finetune:finetune" not in err


def test_local_ray_start_is_quiet_about_token_auth():
    from autoskd.ray_runtime import ensure_ray_env

    ensure_ray_env()
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    assert logger.getEffectiveLevel() >= logging.ERROR
