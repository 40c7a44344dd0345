"""Where `make demo`'s time goes: team build, search phases and one trial, each measured.

Runs the demo's own job (`autoskd search --preset quick` on the ladder team and rotten_tomatoes)
in-process with the local executor, one thread, from an empty cache, timing the real functions
(wrapped, not copied): each teacher's fine-tuning, every phase of ``run_search``, and, inside a
trial, task loading, the cached team build, tokenising, training, evaluation and saving. After
``--arms`` trials it stops (every arm trains the same number of steps) and extrapolates to the
demo's arm count. It also times a cached team build with lazily loaded teachers against loading
every teacher (the engine before this change), interleaved, and a fresh worker's imports.

CPU seconds at one thread are what an idle core would take in wall time; this machine is shared,
so wall seconds are reported too but are inflated by other processes.

    python benchmarks/demo_pieces.py [--arms 2]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch

import autoskd.pipeline as pipeline
import autoskd.search.run as search_run
import autoskd.search.trials as trials
from _common import write_result
from autoskd.search.run import SearchConfig
from autoskd.team import TeacherTeam

TEAM = str(REPO / "teams" / "minilm-ladder.yaml")


class Timer:
    """Wall and CPU seconds per label; ``patch`` wraps ``owner.name`` for the run."""

    def __init__(self):
        self.records: list[dict] = []
        self._patches: list[tuple] = []

    def wrap(self, label, fn):
        def timed(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                name = label(*args, **kwargs) if callable(label) else label
                self.records.append({"piece": name, "wall_s": time.perf_counter() - wall,
                                     "cpu_s": time.process_time() - cpu})
        return timed

    def patch(self, owner, name: str, label) -> None:
        original = getattr(owner, name, None)
        if original is not None:  # a phase that does not exist (any more) is simply not timed
            self._patches.append((owner, name, original))
            setattr(owner, name, self.wrap(label, original))

    def undo(self) -> None:
        for owner, name, original in reversed(self._patches):
            setattr(owner, name, original)
        self._patches.clear()

    def total(self, prefix: str) -> dict:
        rows = [r for r in self.records if r["piece"].startswith(prefix)]
        return {"wall_s": sum(r["wall_s"] for r in rows), "cpu_s": sum(r["cpu_s"] for r in rows), "calls": len(rows)}


class Enough(Exception):
    """Raised after the requested number of trials: the rest of the arms cost the same."""


def run_demo_pieces(out: Path, n_arms: int, timer: Timer) -> dict:
    seen = {}

    def some_arms(spec, arms, **kwargs):
        seen["arms"] = [a.name for a in arms]
        timer.undo()  # from here on, time the pieces of a trial
        timer.patch(trials, "run_arm", lambda spec, arm: f"trial/total {arm.name}")
        timer.patch(trials.TrialSpec, "load_task", "trial/load_task")
        timer.patch(trials.TrialSpec, "build_team", "trial/team_build (cached)")
        timer.patch(pipeline, "make_loaders", "trial/tokenise")
        timer.patch(pipeline.Distiller, "fit", "trial/train (incl. dev eval per epoch)")
        timer.patch(pipeline, "evaluate", "trial/evaluate dev+test")
        timer.patch(pipeline, "save_run", "trial/save student+plot")
        for arm in arms[:n_arms]:
            trials.run_arm(spec, arm)
        raise Enough

    timer.patch(TeacherTeam, "_finetune", lambda self, name, *a, **k: f"team_build/finetune {name}")
    timer.patch(TeacherTeam, "build", "team_build/total")
    for phase in ("student_alone", "bilevel_search"):
        timer.patch(search_run, phase, f"search/{phase}")
    search_run.run_arms = some_arms
    config = SearchConfig.from_preset("quick", executor="local")
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        search_run.run_search(TEAM, {"name_or_path": "rotten_tomatoes"}, config, out / "run",
                              cache_dir=out / "cache", progress=False)
    except Enough:
        pass
    finally:
        search_run.run_arms = trials.run_arms
        timer.undo()
    return {"arms": seen.get("arms", []), "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


def cached_team_build(out: Path, rounds: int = 3) -> dict:
    """Cached ladder build, lazily held teachers vs every teacher loaded (as before)."""
    from autoskd.data.tasks import load_task

    task = load_task("rotten_tomatoes").subsample(500, 400, seed=0)
    times = {"lazy": [], "all_loaded": []}
    for r in range(rounds):
        for mode in (("lazy", "all_loaded") if r % 2 == 0 else ("all_loaded", "lazy")):
            start = time.process_time()
            team = TeacherTeam.from_yaml(TEAM).build(task, cache_dir=out / "cache" / "teachers", progress=False)
            if mode == "all_loaded":
                _ = [team.teachers[n] for n in team.teachers]
            times[mode].append(time.process_time() - start)
    params = sum(p.numel() for n in team.teachers for p in team.teachers[n].parameters())
    return {"cpu_s": {k: statistics.median(v) for k, v in times.items()}, "all_cpu_s": times,
            "teacher_parameters_not_loaded": params, "teacher_mb_not_loaded": round(params * 4 / 2 ** 20, 1)}


def worker_imports() -> dict:
    """A fresh trial process's imports (what each Ray worker pays before its first step)."""
    code = "import autoskd.search.trials, autoskd.pipeline, autoskd.team, ray.tune"
    out = {}
    for label, stmt in {"autoskd": code.rsplit(",", 1)[0], "autoskd+ray": code}.items():
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", stmt], check=True, cwd=REPO, capture_output=True)
        out[label] = time.perf_counter() - start
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", type=int, default=2, help="trials to run before extrapolating (default 2)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    timer = Timer()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        demo = run_demo_pieces(out, max(1, args.arms), timer)
        cached = cached_team_build(out)
    imports = worker_imports()

    pieces: dict[str, dict] = {}
    for r in timer.records:
        p = pieces.setdefault(r["piece"], {"wall_s": 0.0, "cpu_s": 0.0, "calls": 0})
        p["wall_s"] += r["wall_s"]
        p["cpu_s"] += r["cpu_s"]
        p["calls"] += 1
    trial_rows = [r for r in timer.records if r["piece"].startswith("trial/total")]
    # the first trial also computes every teacher's logits on the training set (then cached)
    per_trial_cpu = min(r["cpu_s"] for r in trial_rows)
    first_trial_extra_cpu = trial_rows[0]["cpu_s"] - per_trial_cpu
    n_arms = len(demo["arms"])
    team_cpu = pieces.get("team_build/total", {}).get("cpu_s", 0.0)
    search_cpu = sum(v["cpu_s"] for k, v in pieces.items() if k.startswith("search/"))
    driver_cpu = demo["cpu_s"] - sum(r["cpu_s"] for r in trial_rows)
    estimate = {
        "team_build_cpu_s": team_cpu,
        "search_phases_cpu_s": search_cpu,
        "driver_other_cpu_s": driver_cpu - team_cpu - search_cpu,
        "trial_cpu_s": per_trial_cpu, "first_trial_extra_cpu_s (teacher logits)": first_trial_extra_cpu,
        "arms": n_arms,
        "arms_cpu_s_2_at_once": per_trial_cpu * -(-n_arms // 2),
        "worker_start_s": imports["autoskd+ray"],
    }
    estimate["demo_s_idle_2_cores"] = (driver_cpu + estimate["arms_cpu_s_2_at_once"] + first_trial_extra_cpu
                                       + -(-n_arms // 2) * imports["autoskd+ray"])
    result = {"estimate": estimate, "pieces": pieces, "demo_run": demo, "cached_team_build": cached,
              "worker_imports_wall_s": imports,
              "setup": {"preset": "quick", "team": "minilm-ladder", "task": "rotten_tomatoes", "threads": 1,
                        "executor": "local (in-process; the demo uses Ray, 2 trials at once)",
                        "trials_run": len(trial_rows),
                        "estimate": "driver CPU (team build + search phases, one thread) + ceil(arms/2) trials "
                                    "(2 at once on 2 idle cores) + a worker start per wave; CPU seconds at one "
                                    "thread stand for an idle core's wall seconds"}}
    path = write_result("demo_pieces", result)
    for name, p in pieces.items():
        print(f"{name:45s} {p['calls']:3d}x  cpu {p['cpu_s']:7.1f}s  wall {p['wall_s']:7.1f}s")
    print(f"cached team build cpu: lazy {cached['cpu_s']['lazy']:.2f}s vs all loaded {cached['cpu_s']['all_loaded']:.2f}s")
    print(f"worker imports: {imports}")
    print(f"estimate (idle 2 cores): {estimate['demo_s_idle_2_cores'] / 60:.1f} min for {n_arms} arms; wrote {path}")


if __name__ == "__main__":
    main()
