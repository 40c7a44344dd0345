"""Search report: table ordering, best arm, theta history and plots."""

from __future__ import annotations

import json

from autoskd.search.report import (best_arm, plot_arms, plot_theta_history, results_table,
                                   write_theta_history)


def rec(name, group, dev, test=None, **kw):
    return {"name": name, "group": group, "dev_acc": dev, "test_acc": test if test is not None else dev - 0.01,
            "seconds": 12.5, "student_trainings": 1, "status": "finished", **kw}


RECORDS = [
    rec("candidate-00", "autoskd", 0.80),
    rec("candidate-01", "autoskd", 0.84),
    rec("candidate-02", "autoskd", 0.84),
    rec("single-t-small", "single", 0.78, teacher="t-small"),
    rec("single-t-big", "single", 0.82, teacher="t-big"),
    rec("avgkd", "average", 0.81),
    rec("uniform", "uniform", 0.805, status="loaded"),
    *[rec(f"random-{i:03d}", "random", 0.76 + 0.01 * i) for i in range(6)],
    {"name": "candidate-03", "group": "autoskd", "dev_acc": None, "test_acc": None, "seconds": None,
     "student_trainings": 0, "status": "failed", "error": "RuntimeError: CUDA out of memory"},
]


def test_best_arm_ties_and_groups():
    assert best_arm(RECORDS)["name"] == "candidate-01"  # tie with candidate-02 -> lower name
    assert best_arm(RECORDS, "random")["name"] == "random-005"
    assert best_arm(RECORDS, None)["name"] == "candidate-01"
    assert best_arm(RECORDS, "single")["name"] == "single-t-big"
    assert best_arm([RECORDS[-1]]) is None and best_arm([]) is None


def test_results_table_order_and_failures():
    table = results_table(RECORDS)
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["arm", "group"]
    names = [line.split()[0] for line in lines[2:-1]]
    assert names[:4] == ["candidate-01", "candidate-02", "single-t-big", "avgkd"]
    assert names[-1] == "candidate-03"  # failed arms last
    assert "best AutoSKD" in lines[2] and "best" not in lines[3]
    assert "FAILED: RuntimeError: CUDA out of memory" in lines[-2]
    assert "0.8400" in lines[2] and "loaded" in table
    assert lines[-1].startswith("13 finished, 1 failed; 13 student trainings")
    assert "arm" in results_table([])


def test_theta_history_json_and_plot(tmp_path):
    history = [{"step": s, "phase": 1 if s < 30 else 2,
                "theta": [0.5 - s / 200, 0.3, 0.2 + s / 200] if s < 30 else [0.0, 0.4, 0.6]} for s in range(0, 60, 5)]
    path = write_theta_history(tmp_path / "search" / "theta.json", history)
    assert json.loads(path.read_text())[0] == {"step": 0, "phase": 1, "theta": [0.5, 0.3, 0.2]}
    png = plot_theta_history(history, ["t0", "t1", "t2"], tmp_path / "theta.png")
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png2 = plot_theta_history(history, ["t0", "t1", "t2"], tmp_path / "theta2.png", selection_step=25)
    assert png2.stat().st_size > 1000


def test_plot_arms(tmp_path):
    png = plot_arms(RECORDS, tmp_path / "arms.png")
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    empty = plot_arms([RECORDS[-1]], tmp_path / "empty.png")  # only a failure: still a figure
    assert empty.stat().st_size > 1000
