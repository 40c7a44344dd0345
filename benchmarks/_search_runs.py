"""Shared by the search benchmarks: run many ``run_search`` jobs, resumably, in worker processes.

A job is ``(out_dir, config overrides)``; every job's output folder holds its finished parts
(``run_search`` resumes from them), so a killed benchmark restarts where it stopped. The team
is built once in the parent before the workers start, so no two workers fine-tune the same
teacher. On a GPU machine the workers share the GPU; on a CPU each gets ``threads`` threads.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

TEAM = ROOT.parent / "teams" / "minilm-ladder.yaml"
TASK = {"name_or_path": "rotten_tomatoes", "seed": 0}  # one data split for every seed: seeds vary training


def build_team(preset: str, cache_dir: Path, overrides: dict | None = None, team: Path = TEAM) -> dict:
    """Fine-tune (or load) the team once, as the search will; returns the teachers' dev accuracy."""
    from autoskd.search.run import SearchConfig, load_search_task
    from autoskd.team import TeacherTeam

    config = SearchConfig.from_preset(preset, **(overrides or {}))
    _, team_task = load_search_task(dict(TASK), config)
    built = TeacherTeam.from_yaml(team).build(team_task, cache_dir=cache_dir / "teachers", seed=TASK["seed"],
                                              progress=True)
    return dict(built.dev_accuracy)


def _job(preset: str, overrides: dict, out_dir: str, cache_dir: str, threads: int, team: str) -> tuple[str, float]:
    import torch

    torch.set_num_threads(threads)
    from autoskd.search.run import SearchConfig, run_search

    start = time.perf_counter()
    config = SearchConfig.from_preset(preset, **json.loads(json.dumps(overrides)))
    run_search(team, dict(TASK), config, out_dir, cache_dir=cache_dir, progress=False)
    return out_dir, time.perf_counter() - start


def run_jobs(preset: str, jobs: list[tuple[Path, dict]], cache_dir: Path, workers: int = 1,
             threads: int | None = None, team: Path = TEAM, done: str = "summary.json") -> dict[str, float]:
    """Run every job whose ``done`` file (``search.json`` for θ-only runs) is missing; returns
    ``{out_dir: seconds}`` of those run."""
    threads = threads or max(1, (os.cpu_count() or 1) // max(1, workers))
    todo = [(out, ov) for out, ov in jobs if not (Path(out) / done).exists()]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} runs already finished; {len(todo)} to run "
          f"({workers} at a time, {threads} threads each)", flush=True)
    seconds: dict[str, float] = {}
    if not todo:
        return seconds
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc="search runs", unit="run")
    # spawn: the parent has torch (and maybe CUDA) initialised, which fork would break
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_job, preset, ov, str(out), str(cache_dir), threads, str(team)): out for out, ov in todo}
        for fut in as_completed(futures):
            try:
                out, secs = fut.result()
                seconds[out] = secs
                bar.set_postfix_str(f"{Path(out).name} {secs:.0f}s")
            except Exception as err:  # noqa: BLE001 - report, keep the other runs going
                print(f"run {futures[fut]} failed: {type(err).__name__}: {err}", flush=True)
            bar.update(1)
    bar.close()
    return seconds


def load_run(out_dir: Path) -> dict:
    """A finished run's records by arm name, its searches and its test predictions."""
    records = {r["name"]: r for r in json.loads((out_dir / "results.json").read_text()) if r.get("dev_acc") is not None}
    searches = [json.loads(p.read_text()) for p in sorted(out_dir.glob("search*.json"))]
    for name, r in records.items():
        pred = out_dir / "trials" / name / "predictions.json"
        r["test_predictions"] = json.loads(pred.read_text())["test"] if pred.exists() else None
    return {"records": records, "searches": searches}


def set_override(overrides: dict, item: str) -> None:
    """``a.b=value`` into ``overrides["a"]["b"]`` (value parsed as JSON, else kept as text)."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise SystemExit(f"--set {item!r}: write KEY=VALUE, e.g. --set theta.scaling=n")
    try:
        value = json.loads(text)
    except ValueError:
        value = text
    *path, last = key.split(".")
    node = overrides
    for part in path:
        node = node.setdefault(part, {})
    node[last] = value
