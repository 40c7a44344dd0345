"""benchmarks/search_theta.py: per teacher, the final weight over seeds, on how many seeds it is the
largest or above 1/n_active, and the θ trajectories plotted; a missing team is a one-line error."""

import pytest

from helpers import load_benchmark


@pytest.fixture(scope="module")
def st():
    return load_benchmark("search_theta")


def _search(final, dropped, seconds):
    history = [{"step": 0, "phase": 1, "theta": [1 / 3] * 3}, {"step": 4, "phase": 2, "theta": final}]
    return {"teachers": ["a", "b", "c"], "final_theta": final, "dropped": dropped, "selection_step": 2,
            "candidates": [{"theta": final}], "history": history, "search_seconds": seconds}


def test_summary_counts_largest_and_above_uniform(st, tmp_path):
    searches = {10: _search([0.6, 0.4, 0.0], ["c"], 100.0), 11: _search([0.2, 0.3, 0.5], [], 120.0)}
    out = st.summarise(searches)
    assert out["seeds"] == [10, 11] and out["search_seconds_mean"] == 110.0
    a, b, c = (out["teachers"][n] for n in "abc")
    assert a["final_theta"]["mean"] == pytest.approx(0.4) and a["argmax_seeds"] == 1
    # seed 10 has 2 active teachers (1/n = 0.5): only a is above; seed 11 (1/3): c only
    assert (a["above_uniform_seeds"], b["above_uniform_seeds"], c["above_uniform_seeds"]) == (1, 0, 1)
    assert c["dropped_seeds"] == 1 and c["argmax_seeds"] == 1
    assert out["per_seed"]["10"]["argmax"] == "a" and out["per_seed"]["11"]["above_uniform"] == ["c"]
    png = st.plot(searches, tmp_path / "theta.png")
    assert png.stat().st_size > 0


def test_missing_team_is_a_one_line_error(st, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        st.main(["--team", str(tmp_path / "nope.yaml")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no such team YAML" in err
