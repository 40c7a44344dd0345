"""The learned-vs-random figures of benchmarks/search_vs_random.py: best-of-k is the mean over
every k-subset (independent of draw order), and a search whose candidates beat the random pool
on every seed is reported as a paired win; a missing --team is a one-line error."""

import json
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


def test_an_lm_ablation_pairs_its_candidates_with_another_runs_baselines(tmp_path):
    """``lm_search_vs_random.py --baselines-from``: an ablation that trains only candidates (and
    one baseline, as a check) is paired seed by seed with the main run's baselines; an arm both
    runs trained keeps this run's value and records the other's, so disagreement is visible."""
    lsvr = load_benchmark("lm_search_vs_random")

    def arm(name, group, test, dev=None):
        return {"name": name, "group": group, "test_ppl": test, "val_ppl": test, "dev_ppl": dev or test}

    per_seed = {}
    for s in range(3):
        main = tmp_path / "main" / f"s{s}"
        main.mkdir(parents=True)
        main.joinpath("result.json").write_text(json.dumps({"arms": [
            arm("cand-0", "autoskd", 900.0), arm("single-a", "single", 500.0 + s), arm("single-b", "single", 800.0),
            arm("uniform", "uniform", 700.0 + s), arm("avgkd", "average", 650.0)]}))
        mine = {"arms": [arm("cand-0", "autoskd", 520.0 + 2 * s), arm("uniform", "uniform", 701.0 + s)],
                "searches": [{"theta": [0.9, 0.1], "seconds": 10.0}], "teachers": ["a", "b"]}
        per_seed[s] = lsvr.with_baselines_from(mine, main / "result.json")
    names = [a["name"] for a in per_seed[0]["arms"]]
    assert names == ["cand-0", "uniform", "single-a", "single-b", "avgkd"]  # the main run's candidate is not taken
    assert per_seed[1]["arms"][1]["test_ppl"] == 702.0 and per_seed[1]["arms"][1]["other_test_ppl"] == 701.0
    out = lsvr.summarise(per_seed, {s: {"search_seconds": 10.0} for s in per_seed})
    assert out["arms"]["autoskd"]["test_ppl"] == [520.0, 522.0, 524.0]
    assert out["paired"]["best_single"]["test_ppl_diff_mean"] == pytest.approx(21.0)  # 520+2s - (500+s)
    assert out["paired"]["uniform"]["verdict"] == "autoskd better"
    assert [a["other_test_ppl"] for a in out["baselines_agree"]] == [700.0, 701.0, 702.0]
    with pytest.raises(SystemExit, match="run that benchmark first"):
        lsvr.with_baselines_from(mine, tmp_path / "nowhere" / "result.json")
