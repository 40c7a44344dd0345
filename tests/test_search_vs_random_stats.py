"""The learned-vs-random figures of benchmarks/search_vs_random.py: best-of-k is the mean over
every k-subset (independent of draw order), and a search whose candidates beat the random pool
on every seed is reported as a paired win; a missing --team is a one-line error."""

import sys

import pytest

from helpers import load_benchmark


@pytest.fixture(scope="module")
def svr():
    return load_benchmark("search_vs_random")


def test_best_of_k_is_the_mean_over_subsets(svr):
    pool = [(0.1, 1.0), (0.2, 2.0), (0.3, 3.0)]
    # 2-subsets: {.1,.2}->.2, {.1,.3}->.3, {.2,.3}->.3 (picked by dev; test follows the pick)
    assert svr.best_of(pool, 2) == pytest.approx((0.8 / 3, 8.0 / 3))
    assert svr.best_of(pool, 1) == pytest.approx((0.2, 2.0))
    assert svr.best_of(pool, 5) == pytest.approx((0.3, 3.0))  # k above the pool: the pool's best


def test_learned_vs_random_paired_over_seeds(svr):
    dists = [{"candidates": [(0.70 + s / 100, 0.71 + s / 100), (0.72 + s / 100, 0.70 + s / 100)],
              "random": [(0.60 + s / 100, 0.60), (0.65 + s / 100, 0.62), (0.50, 0.50)]} for s in range(4)]
    out = svr.learned_vs_random(dists)
    assert out["k"] == [2, 2, 2, 2]
    assert out["mean"]["dev"]["verdict"] == "win" and out["best_of_k"]["dev"]["verdict"] == "win"
    # seed 0: candidates' dev-best is (0.72, 0.70); random best-of-2 dev = mean(.65, .65, .60)
    assert out["best_of_k"]["dev"]["learned"] == pytest.approx(0.72 + 0.015)
    assert svr.learned_vs_random([{"candidates": [(0.7, 0.7)], "random": []}]) == {}


def test_set_override_nests_and_parses_json(svr):
    overrides = {"theta": {"num_candidates": 2}}
    svr.set_override(overrides, "theta.scaling=n")
    svr.set_override(overrides, "theta.lr=0.03")
    svr.set_override(overrides, "eval_epochs=2")
    assert overrides == {"theta": {"num_candidates": 2, "scaling": "n", "lr": 0.03}, "eval_epochs": 2}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        svr.set_override(overrides, "theta.scaling")


def test_missing_team_yaml_is_a_one_line_error(svr, monkeypatch, capsys, tmp_path):
    missing = tmp_path / "no-team.yaml"
    monkeypatch.setattr(sys, "argv", ["search_vs_random.py", "--team", str(missing)])
    with pytest.raises(SystemExit) as exit_info:
        svr.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no such team YAML" in err and str(missing) in err
