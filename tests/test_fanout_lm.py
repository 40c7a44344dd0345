"""``autoskd tune`` over an LM search space on a decoder-LM team: loss x temperature x lr x student
depth, ranked by dev perplexity (lower is better) in the Optuna study and by ASHA.

Tiny random-init Llamas and a BPE tokenizer trained offline (tests/lm_helpers.py), saved as
folders a team file names; the teacher is trained on the corpus by the team file itself
(``train:``), once, in the tune's driver. One local Ray for the one end-to-end tune (an experiment
file run with ``autoskd run``); the LM trial itself, the reporter, the study's metric record and
the input checks run in-process.
"""

from __future__ import annotations

import json
import math
import os
import threading
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml
from transformers import AutoModelForCausalLM

from autoskd.cli import main
from autoskd.errors import AutoSKDError
from autoskd.fanout.lm_trial import MetricReporter, lm_team, run_lm_trial, spread_layers
from autoskd.fanout.space import SearchSpace, load_space
from autoskd.fanout.study import DIRECTION_ATTR, METRIC_ATTR, open_storage, open_study
from autoskd.lm.data import ensure_pad_token
from autoskd.lm.evaluate import perplexity_metric
from autoskd.ray_runtime import REPO_ROOT, ensure_ray_env
from autoskd.search.trials import TrialSpec
from lm_helpers import bpe_tokenizer, documents, tiny_llama

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def lm_root(tmp_path_factory):
    """``docs.txt`` (one document a line), a 4-layer student source whose team member keeps layers
    [0, 2, 3] (random init), and a teacher the team trains on the corpus before it teaches."""
    root = tmp_path_factory.mktemp("lmtune")
    tok = ensure_pad_token(bpe_tokenizer())
    (root / "docs.txt").write_text("\n".join(documents(160)) + "\n")
    tiny_llama(len(tok), layers=4, hidden=32, seed=1).save_pretrained(root / "student")
    tok.save_pretrained(root / "student")
    tiny_llama(len(tok), layers=2, hidden=48, seed=3).save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    team = {"name": "tiny-lm", "kind": "lm", "max_length": 16,
            "student": {"source": str(root / "student"), "layers": [0, 2, 3], "init": "random"},
            "teachers": [{"name": "fitted", "source": str(root / "teacher"),
                          "train": {"method": "finetune", "steps": 40, "lr": 3.0e-3, "batch_size": 8}}]}
    (root / "team.yaml").write_text(yaml.safe_dump(team, sort_keys=False))
    return root


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("autoskd: error:") and "\n" not in err, err
    return err


# ---------------------------------------------------------------------------------------------- the space
def test_bundled_lm_space_tunes_loss_temperature_lr_and_depth():
    space = load_space("lm")
    assert space.kind == "lm" and space.fixed["method"] == "kd"
    assert space.params["method_options.loss"].values == ("forward_kl", "reverse_kl", "jsd", "tvd")
    assert space.params["method_options.temperature"].kind == "choice"  # one teacher cache per temperature
    assert space.params["lr"].kind == "loguniform" and space.params["student.depth"].kind == "int"
    # the smollm2 student keeps 6 layers: the space's deepest student is the team's own
    assert space.params["student.depth"].high == 6
    smollm2 = yaml.safe_load((REPO_ROOT / "teams" / "smollm2.yaml").read_text())
    assert len(smollm2["student"]["layers"]) == 6


@pytest.mark.parametrize("params,match", [
    ({"method_options.loss": {"choice": ["forward_kl", "l3"]}}, "params.method_options.loss': method 'kd': loss 'l3'"),
    ({"method": {"choice": ["kd", "pkd"]}}, "'params.method': method 'pkd' cannot distil a decoder LM"),
    ({"method_options.temperature": {"uniform": [0, 4]}}, "temperature must be > 0"),
    ({"student.depth": {"uniform": [1, 3]}}, "must be whole numbers of layers"),
    ({"pretrain_epochs": {"int": [1, 2]}}, "'params.pretrain_epochs' is unknown for kind 'lm'"),
    ({"student.depth": {"int": [1, 2]}, "student.layers": {"choice": [1, 2]}}, "keep one"),
])
def test_a_bad_lm_space_is_one_line_naming_the_key(params, match):
    with pytest.raises(AutoSKDError, match=match) as err:
        SearchSpace.from_dict({"name": "bad", "kind": "lm", "params": params})
    assert "\n" not in str(err.value)


def test_spread_depth_keeps_first_and_last_of_the_team_students_layers(lm_root):
    smollm2 = [0, 6, 12, 18, 24, 29]
    assert [spread_layers(smollm2, k) for k in (1, 2, 3, 6)] == [[0], [0, 29], [0, 18, 29], smollm2]
    assert all(len(set(spread_layers(list(range(30)), k))) == k for k in range(1, 31))  # always distinct
    team = lm_team(str(lm_root / "team.yaml"), {"depth": 2})
    assert team.student_spec.layers == [0, 3] and team.student_spec.init == "random"
    with pytest.raises(AutoSKDError, match="between 1 and the team student's 3 layers"):
        lm_team(str(lm_root / "team.yaml"), {"depth": 4})


# ---------------------------------------------------------------------------------------------- one trial
def test_metric_reporter_reports_best_perplexity_each_epoch_but_the_runs_last():
    reports = []
    rep = MetricReporter(perplexity_metric(), last_stage="task", report=reports.append)
    ctx = SimpleNamespace(stage="pretrain", total_steps=4)
    rep.on_stage_start(None, ctx)
    for step, ppl in ((2, 90.0), (4, 95.0)):  # a first stage (GLMD's pretrain): both epochs reported
        rep.on_epoch_end(None, ctx, {"dev_ppl": ppl, "step": step})
    ctx = SimpleNamespace(stage="task", total_steps=6)
    rep.on_stage_start(None, ctx)  # the engine restores the last stage's best: the best restarts
    for step, ppl in ((3, 120.0), (6, 80.0)):  # the last epoch is the trial's own final report
        rep.on_epoch_end(None, ctx, {"dev_ppl": ppl, "step": step})
    assert reports == [{"dev_ppl": 90.0, "epoch_dev_ppl": 90.0, "epochs": 1},
                       {"dev_ppl": 90.0, "epoch_dev_ppl": 95.0, "epochs": 2},  # lower is better: 90 stays
                       {"dev_ppl": 120.0, "epoch_dev_ppl": 120.0, "epochs": 3}]


def test_an_lm_trial_distils_the_point_and_reports_dev_perplexity_per_epoch(lm_root, tmp_path):
    spec = TrialSpec(team_path=str(lm_root / "team.yaml"), task={"name_or_path": f"lm:{lm_root / 'docs.txt'}"},
                     root=str(tmp_path), cache_dir=str(lm_root / "cache"), base_config={"batch_size": 16})
    values = {"method": "kd", "epochs": 2, "samples": 0, "method_options.loss": "tvd",
              "method_options.temperature": 2.0, "lr": 3e-3, "student.depth": 2}
    reports = []
    record = run_lm_trial(spec, values, tmp_path / "trial", report=reports.append, latency=True)
    history = record["history"]
    assert len(history) == 2 and record["epochs"] == 2
    assert reports == [{"dev_ppl": history[0], "epoch_dev_ppl": history[0], "epochs": 1}]  # epoch 2: the final report
    assert record["dev_ppl"] == min(history)  # the restored best epoch, never above what it reported
    assert 1 < record["test_ppl"] < 320 and record["val_ppl"] > 1 and record["student_layers"] == 2
    assert record["latency_ms"] > 0 and record["student_params_m"] > 0  # --objective2 latency / size
    config = json.loads((tmp_path / "trial" / "config.json").read_text())
    assert config["method_options"] == {"loss": "tvd", "temperature": 2.0} and config["lr"] == 3e-3
    assert config["team"]["student"]["layers"] == [0, 3]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "trial" / "student").config.num_hidden_layers == 2


@pytest.fixture(scope="module")
def mixed_lm_root(lm_root, tmp_path_factory):
    """A team that mixes tokenizers on ``lm_root``'s corpus: teacher ``same`` shares the student's
    tokenizer, teacher ``other`` reads the text with its own (tests/test_cross_tokenizer.py's
    tokenizer B: another byte-level BPE and vocabulary, a BOS at every document start)."""
    from test_cross_tokenizer import byte_bpe_b

    root = tmp_path_factory.mktemp("lmtune-mixed")
    other = byte_bpe_b()
    tiny_llama(len(other), layers=2, hidden=32, seed=5).save_pretrained(root / "other")
    other.save_pretrained(root / "other")
    team = {"name": "tiny-mixed", "kind": "lm", "max_length": 16,
            "student": {"source": str(lm_root / "student"), "layers": [0, 2, 3], "init": "random"},
            "teachers": [{"name": "same", "source": str(lm_root / "teacher")},
                         {"name": "other", "source": str(root / "other"), "tokenizer": "own"}]}
    (root / "team.yaml").write_text(yaml.safe_dump(team, sort_keys=False))
    return root


@pytest.mark.parametrize("point", [{"teacher": "other"}, {"policy": "sampled"}], ids=["own-teacher", "both"])
def test_an_lm_trial_on_a_team_that_mixes_tokenizers_reports_finite_dev_perplexity(lm_root, mixed_lm_root, point,
                                                                                    tmp_path):
    """A ``kd`` point on the mixed team, taught by the own-tokenizer teacher alone or by both
    (sampled): the trial distils through uld_hybrid at aligned positions and reports a finite dev
    perplexity each epoch, from a top-k cache keyed on the teacher's own tokenisation."""
    from safetensors import safe_open

    from autoskd.lm.data import tokenizer_fingerprint
    from autoskd.lm.models import load_lm_tokenizer

    cache = tmp_path / "cache"
    spec = TrialSpec(team_path=str(mixed_lm_root / "team.yaml"), task={"name_or_path": f"lm:{lm_root / 'docs.txt'}"},
                     root=str(tmp_path), cache_dir=str(cache), base_config={"batch_size": 16})
    values = {"method": "kd", "epochs": 2, "samples": 0, "method_options.loss": "forward_kl",
              "method_options.temperature": 1.0, "lr": 3e-3, "student.depth": 1, **point}
    reports = []
    record = run_lm_trial(spec, values, tmp_path / "trial", report=reports.append)
    history = record["history"]
    assert len(history) == 2 and all(math.isfinite(h) and h > 1 for h in history)
    assert reports == [{"dev_ppl": history[0], "epoch_dev_ppl": history[0], "epochs": 1}]
    assert math.isfinite(record["dev_ppl"]) and record["dev_ppl"] == min(history) and record["steps"] > 0
    assert math.isfinite(record["test_ppl"]) and record["student_layers"] == 1
    keys = []
    for path in (cache / "lm_topk").glob("topk-*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            keys.append(json.loads(f.metadata()["key"])["data"])
    own = tokenizer_fingerprint(ensure_pad_token(load_lm_tokenizer(str(mixed_lm_root / "other"))))
    assert any(f"|xtok-v1|teacher-tok-{own}|" in k for k in keys)  # the own teacher taught from its own tokens
    assert (len(keys) == 2) == ("policy" in point)  # both: the shared teacher's table beside it
    config = json.loads((tmp_path / "trial" / "config.json").read_text())
    assert {config.get(k) for k in point} == set(point.values())


# ---------------------------------------------------------------------------------------------- the study
def test_study_records_metric_and_direction_and_refuses_the_other_metric(lm_root, tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    lm_space, cls_space = load_space("lm"), load_space("kd-hparams")
    study = open_study(open_storage(url), "lm-study", ["minimize"], lm_space, ["dev_ppl"], metric="perplexity")
    assert study.user_attrs[METRIC_ATTR] == "perplexity" and study.user_attrs[DIRECTION_ATTR] == "minimize"
    assert study.metric_names == ["dev_ppl"] and study.direction == optuna.study.StudyDirection.MINIMIZE
    open_study(open_storage(url), "lm-study", ["minimize"], lm_space, ["dev_ppl"], metric="perplexity")  # resumes
    open_study(open_storage(url), "kd", ["maximize"], cls_space, ["dev_acc"], metric="accuracy")
    # a maximise (accuracy) study resumed by an LM tune: one line, before anything loads or trains
    space = tmp_path / "lm-small.yaml"  # the bundled space at the tiny team's depth
    space.write_text(yaml.safe_dump({**lm_space.to_dict(), "params": {**lm_space.to_dict()["params"],
                                                                      "student.depth": {"int": [1, 3]}}}))
    code = main(["tune", "--space", str(space), "--team", str(lm_root / "team.yaml"),
                 "--task", f"lm:{lm_root / 'docs.txt'}", "--storage", url, "--study", "kd",
                 "--out", str(tmp_path / "out"), "--no-progress"])
    err = _one_line_error(capsys)
    assert code == 2
    assert "study 'kd' in the storage maximises dev_acc (accuracy), but this tune minimises dev_ppl (perplexity)" in err
    assert "use another --study name" in err
    assert not (tmp_path / "out" / "trials").exists()


def test_a_depth_deeper_than_the_team_student_stops_before_anything_runs(lm_root, tmp_path, capsys):
    space = tmp_path / "deep.yaml"
    space.write_text(yaml.safe_dump({"name": "deep", "kind": "lm", "params": {"student.depth": {"int": [2, 4]}}}))
    code = main(["tune", "--space", str(space), "--team", str(lm_root / "team.yaml"),
                 "--task", f"lm:{lm_root / 'docs.txt'}", "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 2 and "'student.depth' reaches 4 layers, but the team's student keeps 3 ([0, 2, 3])" \
        in _one_line_error(capsys)
    assert not (tmp_path / "o" / "optuna.db").exists()


@pytest.mark.parametrize("space,task,match", [
    ("kd-hparams", "lm:DOCS", "an lm:<corpus> task needs a 'kind: lm' space, e.g. search_spaces/lm.yaml"),
    ("lm", "rotten_tomatoes", "is kind 'lm' (decoder LMs); give it a task lm:<corpus>"),
])
def test_space_and_task_kinds_must_match_in_one_line(lm_root, tmp_path, capsys, space, task, match):
    team = ["--team", str(lm_root / "team.yaml")] if task.startswith("lm:") else []
    code = main(["tune", "--space", space, *team, "--task", task.replace("DOCS", str(lm_root / "docs.txt")),
                 "--out", str(tmp_path / "o"), "--dry-run"])
    assert code == 2 and match in _one_line_error(capsys)


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def ray_local():
    """One local Ray (2 CPUs, 127.0.0.1); run_tune uses an initialised Ray as it is."""
    ensure_ray_env()
    import ray

    env = {"PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(TESTS)]), "TOKENIZERS_PARALLELISM": "false",
           "RAY_CHDIR_TO_TRIAL_DIR": "0", "OMP_NUM_THREADS": "1"}
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", object_store_memory=256 * 1024 ** 2,
             log_to_driver=False, logging_level="warning", runtime_env={"env_vars": env})
    yield
    ray.shutdown()


def _get_json(url: str):
    return json.loads(urllib.request.urlopen(url, timeout=30).read())


def test_lm_tune_from_an_experiment_file_asha_ranks_by_perplexity(ray_local, lm_root, tmp_path, capsys):
    """A grid of 3 learning rates under ASHA, one trial at a time; grid seed 1 runs the lr that
    learns first, so the two that barely move the student are behind it on dev perplexity at the
    first rung and get stopped. The experiment file is what ``autoskd tune`` flags write."""
    out = tmp_path / "tune"
    experiment = {"kind": "tune", "seed": 1, "out": str(out), "cache_dir": str(lm_root / "cache"), "progress": False,
                  "team": str(lm_root / "team.yaml"), "task": {"name": f"lm:{lm_root / 'docs.txt'}"},
                  "tune": {"space": {"name": "lm-lrs", "kind": "lm",
                                     "fixed": {"method": "kd", "epochs": 2, "samples": 0, "student.depth": 2,
                                               "method_options.loss": "reverse_kl",
                                               "method_options.temperature": 2.0},
                                     "params": {"lr": {"grid": [3.0e-3, 1.0e-6, 2.0e-6]}}},
                           "sampler": "grid", "scheduler": "asha", "max_concurrent": 1, "batch_size": 16}}
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(experiment, sort_keys=False))
    assert main(["run", str(path)]) == 0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "perplexity" and summary["direction"] == "minimize"
    assert summary["finished"] == 3 and summary["best"]["params"] == {"lr": 3e-3}
    assert summary["stopped_early"] >= 1, summary  # ASHA stopped a trial behind on perplexity
    assert summary["student_epochs"] < 3 * 2
    best_ppl = summary["best"]["values"]["dev_ppl"]
    assert best_ppl > 1 and summary["best"]["test_ppl"] > 1 and summary["best"]["student_layers"] == 2
    study = optuna.load_study(study_name="lm-lrs", storage=f"sqlite:///{out / 'optuna.db'}")
    assert study.direction == optuna.study.StudyDirection.MINIMIZE and study.metric_names == ["dev_ppl"]
    assert study.user_attrs[METRIC_ATTR] == "perplexity" and study.user_attrs[DIRECTION_ATTR] == "minimize"
    trials = study.get_trials()
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    best = min(trials, key=lambda t: t.value)
    assert best.value == best_ppl and sorted(best.intermediate_values) == [1]  # epoch 1 reported by the callback
    assert best.user_attrs["test_ppl"] > 1 and not best.user_attrs["stopped_early"]
    stopped = [t for t in trials if t.user_attrs["stopped_early"]]
    assert stopped and all(t.value > best.value and t.user_attrs["epochs"] == 1 for t in stopped)
    table = (out / "results.txt").read_text().splitlines()
    assert table[0].split()[:5] == ["trial", "state", "dev_ppl", "test_ppl", "epochs"]
    assert table[2].split()[0] == str(best.number) and "best" in table[2]  # lowest perplexity first
    record = json.loads((out / "trials" / best.user_attrs["trial"] / "trial.json").read_text())
    assert record["values"]["method_options.loss"] == "reverse_kl" and len(record["history"]) == 2
    assert AutoModelForCausalLM.from_pretrained(out / "best_student").config.num_hidden_layers == 2
    for name in ("history.png", "epochs.png", "best_config.json"):
        assert (out / name).stat().st_size > 0, name

    # the dashboard serves the study as it is: its metric name and direction
    from autoskd.fanout.dashboard import make_dashboard_server

    server = make_dashboard_server(f"sqlite:///{out / 'optuna.db'}", port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_port}/api/studies"
        (summary_row,) = _get_json(base)["study_summaries"]
        detail = _get_json(f"{base}/{summary_row['study_id']}")
        assert summary_row["study_name"] == "lm-lrs" and summary_row["directions"] == ["minimize"]
        assert detail["objective_names"] == ["dev_ppl"] and detail["directions"] == ["minimize"]
        assert {"key": METRIC_ATTR, "value": "perplexity"} in detail["user_attrs"] and len(detail["trials"]) == 3
    finally:
        server.shutdown()
        server.server_close()

    # a rerun resumes the finished study: nothing trains again
    capsys.readouterr()
    assert main(["run", str(path)]) == 0
    assert "3 finished trial(s) kept; 0 to run" in capsys.readouterr().out
