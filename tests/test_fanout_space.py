"""Search spaces, their mapping onto Ray Tune's and Optuna's types, and the early-stopping pieces
(no Ray cluster, no training: fast)."""

from __future__ import annotations

import textwrap

import pytest

from autoskd.cli import main
from autoskd.errors import AutoSKDError
from autoskd.fanout.space import SPACES_DIR, SearchSpace, load_space
from autoskd.fanout.study import make_sampler
from autoskd.fanout.trial import distill_values
from autoskd.methods import METHODS
from autoskd.pipeline import DistillConfig
from autoskd.search.early_stop import EpochReporter, compute_report, evaluated_epochs, make_scheduler


def test_shipped_spaces_load():
    files = sorted(SPACES_DIR.glob("*.yaml"))
    assert len(files) >= 3
    spaces = {p.stem: load_space(p) for p in files}
    methods = spaces["methods"]
    assert list(methods.params["method"].values) == [n for n in METHODS.names() if n != "finetune"]
    theta = spaces["theta-lr"]
    assert theta.kind == "autoskd"
    # AutoSKDBERT: theta learning rates 3e-4 .. 1e-3 in steps of 1e-4
    assert theta.grid() == {"theta.lr": pytest.approx([3e-4, 4e-4, 5e-4, 6e-4, 7e-4, 8e-4, 9e-4, 1e-3])}
    assert set(spaces["kd-hparams"].to_optuna()) == set(spaces["kd-hparams"].params)
    assert load_space("methods").name == "methods"  # bare name -> bundled file


def test_a_method_registered_later_is_accepted(tmp_path):
    from autoskd.methods.kd import KD

    @METHODS.register("kd_later_test")
    class Later(KD):
        pass

    try:
        space = SearchSpace.from_dict({"params": {"method": {"grid": ["kd_later_test", "kd+kd_later_test"]}}})
        assert space.params["method"].values == ("kd_later_test", "kd+kd_later_test")
        assert "kd_later_test" in SearchSpace.from_dict({"params": {"method": {"choice": "all"}}}).params["method"].values
    finally:
        METHODS._items.pop("kd_later_test")


@pytest.mark.parametrize("data, key", [
    ({"params": {"method": {"grid": ["kd", "nope"]}}}, "params.method"),
    ({"params": {"method": {"grid": ["kd+nope"]}}}, "params.method"),
    ({"fixed": {"method": "nope"}, "params": {"lr": {"uniform": [0.1, 0.2]}}}, "fixed.method"),
    ({"params": {"lr": {"uniform": [0.2, 0.1]}}}, "params.lr"),
    ({"params": {"lr": {"loguniform": [0, 0.1]}}}, "params.lr"),
    ({"params": {"lr": {"gaussian": [0, 1]}}}, "params.lr"),
    ({"params": {"lr": [1, 2]}}, "params.lr"),
    ({"params": {"lr": {"uniform": ["a", 1]}}}, "params.lr"),
    ({"params": {"epochs": {"int": [1.5, 3]}}}, "params.epochs"),
    ({"params": {"batch_size": {"choice": []}}}, "params.batch_size"),
    ({"params": {"learning_rate": {"uniform": [0.1, 0.2]}}}, "params.learning_rate"),
    ({"params": {"theta.lr": {"uniform": [0.1, 0.2]}}}, "params.theta.lr"),  # theta.* only for kind autoskd
    ({"kind": "autoskd", "params": {"theta.nope": {"uniform": [0.1, 0.2]}}}, "params.theta.nope"),
    ({"kind": "sweep", "params": {"lr": {"uniform": [0.1, 0.2]}}}, "kind"),
    ({"params": {}}, "params"),
    ({"parms": {"lr": {"uniform": [0.1, 0.2]}}}, "parms"),
    ({"fixed": {"lr": 0.1}, "params": {"lr": {"uniform": [0.1, 0.2]}}}, "lr"),
])
def test_malformed_space_names_the_key(data, key):
    with pytest.raises(AutoSKDError) as err:
        SearchSpace.from_dict(data)
    message = str(err.value)
    assert f"'{key}'" in message and "\n" not in message, message


def test_malformed_space_file_is_one_cli_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent("""
        params:
          method_options.temperature: {uniform: [8, 1]}
    """))
    code = main(["tune", "--space", str(bad), "--task", "nowhere.csv", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("autoskd: error: ")
    assert "params.method_options.temperature" in err[0]
    code = main(["tune", "--space", str(tmp_path / "missing.yaml")])
    assert code == 2 and "not found" in capsys.readouterr().err


def test_domains_map_onto_tune_and_optuna():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from ray.tune.search.optuna import OptunaSearch
    from ray.tune.search.sample import Categorical, Float, Integer

    space = SearchSpace.from_dict({"params": {
        "lr": {"loguniform": [1e-5, 1e-3]}, "method_options.temperature": {"uniform": [1, 8]},
        "epochs": {"int": [1, 4]}, "batch_size": {"choice": [16, 32]}, "method": {"grid": ["kd", "minilm"]}}})
    opt = space.to_optuna()
    assert opt["lr"] == FloatDistribution(1e-5, 1e-3, log=True)
    assert opt["method_options.temperature"] == FloatDistribution(1.0, 8.0)
    assert opt["epochs"] == IntDistribution(1, 4)
    assert opt["batch_size"] == CategoricalDistribution([16, 32])
    assert opt["method"] == CategoricalDistribution(["kd", "minilm"])
    tune_space = space.to_tune()
    assert tune_space["method"] == {"grid_search": ["kd", "minilm"]}
    assert isinstance(tune_space["lr"], Float) and isinstance(tune_space["epochs"], Integer)
    assert isinstance(tune_space["batch_size"], Categorical)
    # Ray's own Tune -> Optuna conversion of our Tune types gives our Optuna types
    converted = OptunaSearch.convert_search_space({k: v for k, v in tune_space.items() if k != "method"})
    assert converted == {k: v for k, v in opt.items() if k != "method"}


def test_grid_and_samplers():
    space = SearchSpace.from_dict({"params": {"epochs": {"int": [1, 3]}, "method": {"grid": ["kd", "minilm"]}}})
    assert space.grid() == {"epochs": [1, 2, 3], "method": ["kd", "minilm"]} and space.grid_size() == 6
    cont = SearchSpace.from_dict({"params": {"lr": {"uniform": [0.1, 0.2]}}})
    with pytest.raises(AutoSKDError, match="params.lr"):
        make_sampler("grid", cont)
    import optuna

    for name, cls in (("random", optuna.samplers.RandomSampler), ("tpe", optuna.samplers.TPESampler),
                      ("cmaes", optuna.samplers.CmaEsSampler), ("nsga2", optuna.samplers.NSGAIISampler)):
        assert type(make_sampler(name, space)).__mro__[:3].count(cls) == 1  # nsga2: a picklable subclass
    assert type(make_sampler("grid", space)).__name__ == "ResumableGridSampler"
    with pytest.raises(AutoSKDError, match="cmaes"):
        make_sampler("cmaes", space, multi_objective=True)
    with pytest.raises(AutoSKDError, match="unknown sampler"):
        make_sampler("bohb", space)


@pytest.mark.parametrize("seed", range(4))
def test_grid_resume_runs_each_missing_point_once(seed):
    """A resumed grid re-runs the points that failed or were left running before, and a point
    that fails in this run is not drawn again (it would use up the run's samples and leave
    never-run points out: seen in the ASHA benchmark, where a method that fails at once was drawn
    five times and three points never ran)."""
    import optuna
    from optuna.trial import TrialState

    from autoskd.fanout.study import fail_stale_trials

    space = SearchSpace.from_dict({"params": {"method": {"grid": ["kd", "minilm", "pkd"]}, "lr": {"grid": [1, 2]}}})
    dists = space.to_optuna()
    study = optuna.create_study(sampler=make_sampler("grid", space, seed=seed))
    first = [study.ask(dists) for _ in range(3)]  # a first run: one completes, one fails, one is killed
    study.tell(first[0], 0.7)
    study.tell(first[1], state=TrialState.FAIL)
    point = lambda t: (t.params["method"], t.params["lr"])  # noqa: E731
    done = {point(first[0])}

    assert fail_stale_trials(study) == 1  # the killed driver's running trial
    sampler = make_sampler("grid", space, seed=seed)  # the resumed driver: a fresh sampler
    study = optuna.load_study(study_name=study.study_name, storage=study._storage, sampler=sampler)
    assert sampler.points_done(study) == 1
    sampler.start_run(study)
    asked = []
    for _ in range(space.grid_size() - 1):
        t = study.ask(dists)
        asked.append(point(t))
        study.tell(t, state=TrialState.FAIL)  # every point of this run fails at once
    assert len(set(asked)) == len(asked) == 5
    assert set(asked) | done == {(m, lr) for m in ("kd", "minilm", "pkd") for lr in (1, 2)}


def test_distill_values_route_keys():
    config, student = distill_values({"seed": 3, "method_options": {"alpha": 0.5}},
                                     {"method": "kd", "lr": 1e-3, "method_options.temperature": 4.0,
                                      "student.layers": 2})
    assert config == DistillConfig(method="kd", lr=1e-3, seed=3, method_options={"alpha": 0.5, "temperature": 4.0})
    assert student == {"layers": 2}


def test_epoch_reporter_reports_best_so_far_except_last():
    reports = []
    rep = EpochReporter(expected=3, report=reports.append)
    for acc, loss in ((0.6, 0.7), (0.5, 0.9), (0.7, 0.6)):
        rep.on_epoch_end(None, None, {"dev_acc": acc, "dev_loss": loss})
    rep.on_epoch_end(None, None, {"kind": "epoch"})  # an unevaluated epoch (pre-training stage) is ignored
    score = 0.6 - 0.7e-6  # the best epoch's accuracy, its loss as a tie-break
    assert reports == [{"dev_acc": 0.6, "dev_score": score, "epoch_dev_acc": 0.6, "epochs": 1},
                       {"dev_acc": 0.6, "dev_score": score, "epoch_dev_acc": 0.5, "epochs": 2}]
    assert rep.best == 0.7 and rep.count == 3


def test_dev_score_breaks_accuracy_ties_by_loss_and_never_reorders_accuracies():
    """Trials stuck at one accuracy (the majority class) are ranked by dev loss, so ASHA can stop
    some of them; a better accuracy always outranks a worse one, whatever the losses."""
    from autoskd.search.early_stop import dev_score

    tied_good, tied_bad = dev_score([{"dev_acc": 0.65, "dev_loss": 0.61}]), dev_score([{"dev_acc": 0.65, "dev_loss": 0.69}])
    assert tied_good > tied_bad
    assert dev_score([{"dev_acc": 0.655, "dev_loss": 50.0}]) > dev_score([{"dev_acc": 0.65, "dev_loss": 0.0}])
    # the first epoch reaching the best accuracy is the one the engine restores: its loss counts
    assert dev_score([{"dev_acc": 0.7, "dev_loss": 0.5}, {"dev_acc": 0.7, "dev_loss": 0.1}]) == 0.7 - 0.5e-6
    assert dev_score([{"kind": "epoch"}]) is None


def test_evaluated_epochs_and_schedulers():
    assert evaluated_epochs(DistillConfig(method="kd", epochs=3)) == 3
    assert evaluated_epochs(DistillConfig(method="kd", epochs=2.5)) == 3
    assert evaluated_epochs(DistillConfig(method="tinybert", epochs=2, pretrain_epochs=1)) == 4  # two stages
    assert make_scheduler("none", 4) is None
    asha = make_scheduler("asha", 4, grace_period=1, reduction_factor=2)
    assert type(asha).__name__ == "AsyncHyperBandScheduler"
    with pytest.raises(AutoSKDError, match="unknown scheduler"):
        make_scheduler("pbt", 4)


def test_compute_report_counts_saved_epochs():
    records = [{"dev_acc": 0.8, "status": "finished"},
               {"dev_acc": 0.5, "status": "stopped", "stopped_early": True, "epochs_run": 1, "epochs_planned": 4},
               {"dev_acc": None, "status": "failed"}]
    assert compute_report(records, 4) == {"stopped_early": 1, "student_epochs": 5, "student_epochs_planned": 8,
                                          "saved_fraction": 0.375}


def test_grid_sampler_reruns_failed_points_and_never_stops_the_study():
    import optuna

    space = SearchSpace.from_dict({"params": {"lr": {"grid": [1, 2, 3]}}})
    sampler = make_sampler("grid", space, seed=0)
    study = optuna.create_study(sampler=sampler, direction="maximize")
    dist = space.to_optuna()
    first = study.ask(dist)
    study.tell(first, state=optuna.trial.TrialState.FAIL)
    sampler.start_run(study)  # a later run (resume): the earlier run's failed point is due again
    seen = []
    for _ in range(3):
        t = study.ask(dist)
        seen.append(t.params["lr"])
        study.tell(t, 0.5)  # Optuna's GridSampler would call study.stop() here at the end: RuntimeError
    assert sorted(seen) == [1, 2, 3]  # the failed point came round again
