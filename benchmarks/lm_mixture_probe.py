"""Would a student trained on a given teacher mixture beat the arms of an LM search benchmark?

The LM sibling of ``teacher_landscape.py --probe``: for every seed of a finished
``lm_search_vs_random.py`` run (``--run``, e.g. ``lm_search_genres``), train each ``--probe``
distribution as a ``mixture`` arm (every step the θ-weighted mixture of the teachers' next-token
distributions) with exactly that seed's spec (team, split, data order, steps, top-k caches), and
pair its test perplexity with the run's arms seed by seed. ``--check`` first trains the uniform
mixture on the first seed, which must reproduce that seed's ``avgkd`` arm (AvgKD *is* the uniform
mixture): the proof that the probe's spec is the run's.

``--probe fit`` is θ* of ``results/lm_genre_teachers.json`` (``mixture_fit``): the mixture weights
that best predict the val text. ``--with NAME`` adds the AutoSKD arm of another run on the same
seeds (e.g. ``lm_search_genres_mixture``) to the comparison.

    python benchmarks/lm_mixture_probe.py --run lm_search_genres --probe fit --check \\
        --with lm_search_genres_mixture          # ~10 min here; results/lm_mixture_probe.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import RESULTS_DIR, write_result  # noqa: E402
from autoskd.search.stats import mean_ci, paired_ci, verdict  # noqa: E402
from lm_search_vs_random import seed_arms  # noqa: E402  (the run's arms under the names it reports)


def seed_spec(seed_dir: Path, cache_dir: str):
    """The TrialSpec every arm of this seed's run trained with (as ``run_lm_search`` makes it)."""
    from autoskd.search.lm_search import LM_SCORE_RUNNER, LMSearchConfig
    from autoskd.search.trials import TrialSpec

    saved = json.loads((seed_dir / "config.json").read_text())
    fields = {f.name for f in dataclasses.fields(LMSearchConfig)}
    config = LMSearchConfig(**{k: v for k, v in saved.items() if k in fields})
    team = saved["identity"]["team"]
    return TrialSpec(team_path=team, task=saved["task"], root="", cache_dir=cache_dir,
                     base_config=config.base_distill(config.eval_epochs).to_dict(), runner=LM_SCORE_RUNNER)


def probe_name(theta: list[float]) -> str:
    return "mix-" + "-".join(f"{t:.2f}".replace(".", "p") for t in theta)


def train_probes(spec, root: Path, probes: list[list[float]]) -> dict[str, dict]:
    from autoskd.search.arms import Arm
    from autoskd.search.trials import run_arms

    spec = dataclasses.replace(spec, root=str(root))
    arms = [Arm(probe_name(t), "mixture", theta=t) for t in probes]
    records = run_arms(spec, arms, executor="local", progress=True)
    failed = [r for r in records if r.get("test_ppl") is None]
    if failed:
        raise SystemExit(f"probe arms failed: {[(r['name'], r.get('error')) for r in failed]}")
    return {r["name"]: r for r in records}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="lm_search_genres", help="the lm_search_vs_random.py run (results/<run>/s<seed>)")
    p.add_argument("--probe", action="append", required=True,
                   help="weights a,b,c (one per teacher, normalised) or 'fit' (θ* of lm_genre_teachers.json)")
    p.add_argument("--with", dest="with_run", default=None, help="another run whose AutoSKD arm joins the comparison")
    p.add_argument("--check", action="store_true", help="first reproduce the first seed's avgkd arm")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--name", default="lm_mixture_probe")
    p.add_argument("--cache-dir", default=str(ROOT / ".cache" / "autoskd"))
    args = p.parse_args(argv)

    run_dir = RESULTS_DIR / args.run
    seeds = args.seeds or sorted(int(d.name[1:]) for d in run_dir.glob("s*") if (d / "result.json").exists())
    if not seeds:
        raise SystemExit(f"--run {args.run}: no finished seed under {run_dir}")
    teachers = json.loads((run_dir / f"s{seeds[0]}" / "result.json").read_text())["teachers"]
    probes = []
    for text in args.probe:
        if text == "fit":
            fit = json.loads((RESULTS_DIR / "lm_genre_teachers.json").read_text())["mixture_fit"]
            if fit["teachers"] != teachers:
                raise SystemExit(f"θ* is over {fit['teachers']}, the run's team is {teachers}")
            w = fit["theta"]
        else:
            w = [float(x) for x in text.split(",")]
        if len(w) != len(teachers) or min(w) < 0 or sum(w) <= 0:
            raise SystemExit(f"--probe {text}: give {len(teachers)} non-negative weights ({', '.join(teachers)})")
        probes.append([x / sum(w) for x in w])
    out_root = ROOT / "benchmarks" / "runs" / args.name
    check = None
    if args.check:
        s0 = seeds[0]
        n = len(teachers)
        got = train_probes(seed_spec(run_dir / f"s{s0}", args.cache_dir), out_root / f"s{s0}", [[1.0 / n] * n])
        want = seed_arms(json.loads((run_dir / f"s{s0}" / "result.json").read_text()))["avgkd"]["test_ppl"]
        have = next(iter(got.values()))["test_ppl"]
        check = {"seed": s0, "uniform_mixture_test_ppl": have, "avgkd_test_ppl": want,
                 "reproduced": abs(have - want) <= 1e-3 * want}
        print(f"check: uniform mixture {have:.2f} vs the run's avgkd {want:.2f}", flush=True)
        if not check["reproduced"]:
            raise SystemExit("the probe's spec does not reproduce the run's avgkd arm; not comparing")
    rows: dict[str, dict[int, float]] = {}
    for seed in seeds:
        summary = json.loads((run_dir / f"s{seed}" / "result.json").read_text())
        arms = seed_arms(summary)
        if args.with_run:
            other = json.loads((RESULTS_DIR / args.with_run / f"s{seed}" / "result.json").read_text())
            arms[f"autoskd ({args.with_run})"] = seed_arms(other)["autoskd"]
        for name, a in arms.items():
            rows.setdefault(name, {})[seed] = a["test_ppl"]
        got = train_probes(seed_spec(run_dir / f"s{seed}", args.cache_dir), out_root / f"s{seed}", probes)
        for name, r in got.items():
            rows.setdefault(name, {})[seed] = r["test_ppl"]
            print(f"seed {seed}: {name} test ppl {r['test_ppl']:.1f}", flush=True)
    table = {}
    for name, vals in rows.items():
        if len(vals) == len(seeds):
            ci = mean_ci([vals[s] for s in seeds])
            table[name] = {"test_ppl": [vals[s] for s in seeds], "test_ppl_mean": ci["mean"],
                           "test_ppl_ci": [ci["lo"], ci["hi"]]}
    paired = {}
    for probe in (probe_name(t) for t in probes):
        paired[probe] = {}
        for name in table:
            if name == probe:
                continue
            d = paired_ci([rows[probe][s] for s in seeds], [rows[name][s] for s in seeds])
            paired[probe][name] = {"test_ppl_diff_mean": d["mean"], "test_ppl_diff_ci": [d["lo"], d["hi"]],
                                   "verdict": {"win": "probe worse", "loss": "probe better", "tie": "tie"}[verdict(d)]}
    result = {"run": args.run, "with": args.with_run, "seeds": seeds, "teachers": teachers,
              "probes": {probe_name(t): t for t in probes}, "check": check, "arms": table, "paired": paired}
    path = write_result(args.name, result)
    for probe, diffs in paired.items():
        for name, d in diffs.items():
            print(f"{probe} − {name}: {d['test_ppl_diff_mean']:+.1f} "
                  f"[{d['test_ppl_diff_ci'][0]:+.1f}, {d['test_ppl_diff_ci'][1]:+.1f}] ({d['verdict']})")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
