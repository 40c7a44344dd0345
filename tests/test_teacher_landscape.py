"""benchmarks/teacher_landscape.py: the mixture fit, the probes' comparison, and a real run on tiny searches."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from helpers import load_benchmark


@pytest.fixture(scope="module")
def tl():
    return load_benchmark("teacher_landscape")


def _simplex(rng, n_rows, n):
    return rng.dirichlet(np.ones(n), size=n_rows)


def test_fit_recovers_each_vertex_through_seed_offsets(tl):
    rng = np.random.default_rng(0)
    beta = np.array([0.74, 0.71, 0.72, 0.70])
    offsets = np.array([0.02, -0.01, 0.03, -0.04])  # mean 0: the fit reports the average seed
    seeds = np.repeat(np.arange(4), 12)
    theta = _simplex(rng, len(seeds), 4)
    y = theta @ beta + offsets[seeds]
    np.testing.assert_allclose(tl.fit_vertices(theta, y, seeds), beta, atol=1e-10)
    # ignoring the seeds would be biased when the seeds saw different distributions
    tilted = theta.copy()
    tilted[seeds == 2] = np.eye(4)[1]
    y2 = tilted @ beta + offsets[seeds]
    np.testing.assert_allclose(tl.fit_vertices(tilted, y2, seeds), beta, atol=1e-10)


def test_landscape_names_the_best_vertex_with_bootstrap_intervals(tl):
    rng = np.random.default_rng(1)
    teachers = ["a", "b", "c"]
    beta = np.array([0.70, 0.76, 0.72])
    rows = []
    for s in range(8):
        for th in _simplex(rng, 15, 3):
            acc = float(th @ beta + 0.01 * rng.standard_normal() + 0.02 * (s % 3))
            rows.append({"seed": s, "theta": th.tolist(), "dev": acc, "test": acc - 0.01})
    out = tl.landscape(rows, teachers, n_boot=200)
    for split in ("dev", "test"):
        assert out[split]["best_vertex"] == "b"
        assert out[split]["best_vertex_share"]["b"] > 0.95
        v = out[split]["vertex"]["b"]
        assert v["lo"] < v["mean"] < v["hi"]
    assert out["test"]["vertex"]["a"]["mean"] == pytest.approx(out["dev"]["vertex"]["a"]["mean"] - 0.01)


def test_policy_rows_turn_single_teachers_into_one_hot_and_skip_other_policies(tl):
    results = [
        {"name": "single-b", "kind": "single", "teacher": "b", "dev_acc": 0.7, "test_acc": 0.71},
        {"name": "avgkd", "kind": "average", "teacher": None, "dev_acc": 0.7, "test_acc": 0.7},
        {"name": "cand", "kind": "candidate", "theta": [0.2, 0.8], "dev_acc": 0.72, "test_acc": 0.73},
        {"name": "broken", "kind": "random", "theta": [0.5, 0.5], "dev_acc": None, "test_acc": None},
    ]
    rows = tl.policy_rows(results, ["a", "b"], seed=3, source="x")
    assert [r["name"] for r in rows] == ["single-b", "cand"]
    assert rows[0]["theta"] == [0.0, 1.0] and rows[0]["seed"] == 3
    assert rows[1]["theta"] == [0.2, 0.8] and rows[1]["test"] == 0.73


def test_probe_parsing_normalises_and_refuses_bad_input(tl):
    assert tl.parse_probe("1,0,1", 3) == [0.5, 0.0, 0.5]
    for bad in ("1,1", "0.5,-0.5,1", "0,0,0", "a,b,c"):
        with pytest.raises(SystemExit, match="--probe"):
            tl.parse_probe(bad, 3)
    assert tl.probe_name([0.5, 0.0, 0.5], ["minilm-L1", "minilm-L2", "minilm-L3"]) == "probe-L1x50-L3x50"


def test_compare_pairs_probes_with_the_reference_by_seed(tl):
    ref = {s: {"dev_acc": 0.70 + 0.01 * s, "test_acc": 0.71 + 0.01 * s} for s in range(5)}
    better = {s: {"theta": [1, 0], "dev_acc": r["dev_acc"] + 0.02 + 0.001 * s, "test_acc": r["test_acc"] + 0.01 + 0.001 * s}
              for s, r in ref.items()}
    noisy = {s: {"theta": [0, 1], "dev_acc": r["dev_acc"] + (0.02 if s % 2 else -0.02), "test_acc": r["test_acc"]}
             for s, r in ref.items()}
    out = tl.compare({"better": better, "noisy": noisy}, ref, "single-x")
    assert out["better"]["dev_diff_vs_single-x"]["mean"] == pytest.approx(0.022)
    assert out["better"]["beats_reference"] and out["better"]["dev_verdict"] == "win"
    assert out["noisy"]["dev_verdict"] == "tie" and not out["noisy"]["beats_reference"]
    assert out["noisy"]["seeds"] == [0, 1, 2, 3, 4]


def test_anchored_set_takes_the_best_by_dev_and_budgets_random_arms_by_its_size(tl):
    seeds = [0, 1, 2]
    ref = {s: {"dev_acc": 0.70, "test_acc": 0.70} for s in seeds}
    probes = {"p": {s: {"dev_acc": 0.72 if s else 0.69, "test_acc": 0.75} for s in seeds}}
    results = {s: [{"name": "avgkd", "kind": "average", "dev_acc": 0.71, "test_acc": 0.71},
                   {"name": "random-000", "kind": "random", "dev_acc": 0.60, "test_acc": 0.60},
                   {"name": "random-001", "kind": "random", "dev_acc": 0.65, "test_acc": 0.66},
                   {"name": "random-002", "kind": "random", "dev_acc": 0.99, "test_acc": 0.99}]  # beyond the budget of 2
               for s in seeds}
    out = tl.anchored_set(results, probes, ref, seeds)
    assert out["size"] == 2
    # seed 0 picks the reference (dev 0.70 > 0.69), seeds 1-2 the probe
    assert out["test"]["mean"] == pytest.approx((0.70 + 0.75 + 0.75) / 3)
    assert out["dev_diff_vs_random_best"]["mean"] == pytest.approx((0.70 + 0.72 + 0.72) / 3 - 0.65)
    assert out["test_diff_vs_avgkd"]["mean"] == pytest.approx((0.70 + 0.75 + 0.75) / 3 - 0.71)
    singles = {"a": ref, "b": {0: {"dev_acc": 0.8}, 1: {"dev_acc": 0.6}, 2: {"dev_acc": 0.9}}}
    assert tl.best_single_per_seed(singles, seeds) == {"a": 1, "b": 2}


def test_team_names_come_from_any_search_record(tl, tmp_path):
    (tmp_path / "search-lr1e-3.json").write_text(json.dumps({"teachers": ["a", "b"]}))
    assert tl.team_names(tmp_path) == ["a", "b"]  # a theta-lr grid writes no search.json
    with pytest.raises(SystemExit, match="no search"):
        tl.team_names(tmp_path / "nothing")


def test_missing_run_folder_is_a_one_line_error(tl, tmp_path):
    with pytest.raises(SystemExit, match="no such folder"):
        tl.main(["--runs", str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="run benchmarks/search_vs_random.py first"):
        tl.main(["--runs", str(tmp_path / "empty")])


def test_probes_train_with_each_seeds_spec_and_the_check_reproduces_an_arm(tl, tiny_search_runs, tmp_path, monkeypatch):
    """Two tiny real searches (seeds 0 and 1) as a search_vs_random run: a probe trains on both
    seeds, the check re-trains seed 0's uniform arm to the same accuracy, and a rerun reuses
    every finished arm."""
    import _common

    monkeypatch.setattr(_common, "RESULTS_DIR", tmp_path / "results")
    args = ["--runs", str(tiny_search_runs), "--probe", "0.5,0.5", "--check", "uniform", "--out", str(tmp_path / "probes"),
            "--name", "tl_test", "--bootstrap", "50"]
    result = tl.main(args)
    assert result["check"]["equal"] and result["check"]["arm"] == "uniform"
    probe = result["probes"]["probe-T1x50-T2x50"]
    assert probe["seeds"] == [0, 1] and probe["theta"] == [0.5, 0.5]
    assert result["reference"] in ("single-T1", "single-T2")
    assert result["rows_by_kind"]["probe"] == 2 and result["rows_by_kind"]["single"] == 4
    assert sum(result["best_single_by_dev_per_seed"].values()) == 2
    assert result["anchored_set"]["size"] == 2 and result["probe_train_seconds"] > 0
    saved = json.loads((tmp_path / "results" / "tl_test.json").read_text())
    assert saved["probes"].keys() == result["probes"].keys()
    assert (tmp_path / "results" / "tl_test.png").stat().st_size > 0
    arm_json = tmp_path / "probes" / "seed1" / "trials" / "probe-T1x50-T2x50" / "arm.json"
    stamp = arm_json.stat().st_mtime_ns
    again = tl.main(args)
    assert arm_json.stat().st_mtime_ns == stamp  # loaded, not retrained
    assert again["probes"]["probe-T1x50-T2x50"]["dev"] == probe["dev"]


@pytest.fixture()
def tiny_search_runs(tiny_team_yaml, sentiment_csv, tmp_path):
    """``<run>/seed0`` and ``<run>/seed1``: tiny searches with every baseline, as search_vs_random lays them out."""
    from autoskd.search.run import SearchConfig, run_search
    from autoskd.search.theta_step import ThetaConfig

    run = tmp_path / "run"
    for seed in (0, 1):
        config = SearchConfig(search_epochs=1, eval_epochs=1, lr=3e-3, batch_size=16, m=0, executor="local",
                              n_random=1, seed=seed, theta=ThetaConfig(num_candidates=1, order="first"))
        run_search(tiny_team_yaml, {"name_or_path": str(sentiment_csv)}, config, run / f"seed{seed}",
                   cache_dir=tmp_path / "cache", progress=False)
    return run

if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
