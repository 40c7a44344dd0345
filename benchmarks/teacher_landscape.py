"""How good can any teacher distribution be? The ceiling of every distribution search on a benchmark.

A ``search_vs_random.py`` run has trained, per seed, dozens of teacher distributions θ (AutoSKD's
candidates, the uniform and random arms, and each single teacher as a one-hot θ), all under the
same training. This script asks what those students say about the accuracy landscape over the
simplex, and tests its answer by training new distributions:

1. **Fit.** Dev (and test) accuracy against θ with a linear mixture model, ``acc = Σ_j β_j θ_j``
   plus one offset per seed (the seeds pair the arms: same initialisation and data order). β_j
   is the fitted accuracy at teacher j's vertex; with a linear model the best θ is the best
   vertex. Intervals: bootstrap over seeds.
2. **Probe.** ``--probe`` trains given distributions on every seed with exactly the spec of that
   seed's run (a candidate arm: same task split, team, preset, policy), and compares each with
   the best single teacher (by mean dev) paired over seeds. ``--check`` first re-trains one
   finished arm of the first seed and requires the same accuracies (the spec reproduces the run).

If no probe beats the best single teacher, no distribution search can beat it either beyond the
noise: a measured ceiling, not a property of one search algorithm.

    python benchmarks/teacher_landscape.py --runs benchmarks/runs/search_vs_random_first/medium \\
        --probe 0.5,0,0.5,0,0 --probe 0.5,0.5,0,0,0 --probe 0.5,0,0,0,0.5 --check uniform --workers 2

Writes ``benchmarks/results/<name>.json`` and ``.png``; trained probes go to
``benchmarks/runs/<name>/seed<k>/trials/`` (``--out``) and are reused when run again.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from _common import write_result
from _search_runs import ROOT

from autoskd.search.stats import mean_ci, paired_ci, verdict

POLICY_KINDS = ("candidate", "uniform", "random", "single")


# ------------------------------------------------------------------------------------ data
def seed_dirs(run: Path) -> dict[int, Path]:
    """``seed<k>`` folders of a search_vs_random run that hold a ``results.json``."""
    if not run.is_dir():
        raise SystemExit(f"--runs {run}: no such folder; point it at a search_vs_random run (benchmarks/runs/<name>/<preset>)")
    found = {int(p.name[4:]): p for p in sorted(run.glob("seed*"))
             if p.name[4:].isdigit() and (p / "results.json").exists()}
    if not found:
        raise SystemExit(f"--runs {run}: no seed*/results.json inside; run benchmarks/search_vs_random.py first")
    return found


def team_names(seed_dir: Path) -> list[str]:
    """The teachers, in θ's order, from the seed's search record (``search.json``, or
    ``search-lr*.json`` for a θ-learning-rate grid)."""
    records = sorted(seed_dir.glob("search*.json"))
    if not records:
        raise SystemExit(f"{seed_dir}: no search*.json; the run's search did not finish, rerun search_vs_random.py for it")
    return json.loads(records[0].read_text())["teachers"]


def policy_rows(results: list[dict], teachers: list[str], seed: int, source: str) -> list[dict]:
    """One row per trained arm whose policy is a distribution over the team: θ, dev, test."""
    rows = []
    for r in results:
        if r.get("kind") not in POLICY_KINDS or r.get("dev_acc") is None or r.get("test_acc") is None:
            continue
        theta = r.get("theta") or [1.0 if t == r.get("teacher") else 0.0 for t in teachers]
        rows.append({"seed": seed, "name": r["name"], "kind": r["kind"], "source": source,
                     "theta": [float(x) for x in theta], "dev": float(r["dev_acc"]), "test": float(r["test_acc"])})
    return rows


# ------------------------------------------------------------------------------------- fit
def fit_vertices(theta: np.ndarray, y: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """β of ``y = θ·β + offset[seed]``: least squares, the last seed's offset fixed at 0 (the θ
    columns sum to 1 and already span a constant). Returns one accuracy per teacher vertex."""
    labels = np.unique(seeds)
    dummies = np.column_stack([(seeds == s).astype(float) for s in labels[:-1]]) if len(labels) > 1 \
        else np.zeros((len(y), 0))
    design = np.column_stack([theta, dummies])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    offsets = np.concatenate([coef[theta.shape[1]:], [0.0]])
    return coef[: theta.shape[1]] + offsets.mean()  # at the average seed


def landscape(rows: list[dict], teachers: list[str], n_boot: int = 1000, rng_seed: int = 0) -> dict:
    """Per split: each teacher's fitted vertex accuracy with a seed-bootstrap 95% interval, the
    best vertex, and how often each teacher is the best over bootstrap samples."""
    theta = np.array([r["theta"] for r in rows])
    seeds = np.array([r["seed"] for r in rows])
    labels = np.unique(seeds)
    rng = np.random.default_rng(rng_seed)
    out = {}
    for split in ("dev", "test"):
        y = np.array([r[split] for r in rows])
        beta = fit_vertices(theta, y, seeds)
        boot = []
        for _ in range(n_boot):
            pick = rng.choice(labels, len(labels), replace=True)
            idx = np.concatenate([np.flatnonzero(seeds == s) for s in pick])
            relabel = np.concatenate([np.full(int((seeds == s).sum()), k) for k, s in enumerate(pick)])
            boot.append(fit_vertices(theta[idx], y[idx], relabel))
        boot = np.array(boot)
        lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
        best = int(np.argmax(beta))
        out[split] = {"vertex": {t: {"mean": float(b), "lo": float(a), "hi": float(c)}
                                 for t, b, a, c in zip(teachers, beta, lo, hi)},
                      "best_vertex": teachers[best],
                      "best_vertex_share": {t: float(np.mean(np.argmax(boot, axis=1) == i)) for i, t in enumerate(teachers)}}
    return out


# ----------------------------------------------------------------------------------- probes
def parse_probe(text: str, n: int) -> list[float]:
    try:
        theta = [float(x) for x in text.split(",")]
    except ValueError:
        raise SystemExit(f"--probe {text!r}: write {n} weights separated by commas, e.g. 0.5,0,0.5,0,0") from None
    if len(theta) != n or any(x < 0 for x in theta) or not sum(theta) > 0:
        raise SystemExit(f"--probe {text!r}: need {n} non-negative weights (one per teacher) with a positive sum")
    total = sum(theta)
    return [x / total for x in theta]


def probe_name(theta: list[float], teachers: list[str]) -> str:
    parts = [f"{t.split('-')[-1]}x{round(100 * w)}" for t, w in zip(teachers, theta) if w > 0]
    return "probe-" + "-".join(parts)


def _train(seed_dir: str, root: str, arm: dict, threads: int) -> tuple[str, dict]:
    """One arm, trained with the spec of ``seed_dir``'s run, under ``root`` (a spawned process)."""
    import torch

    torch.set_num_threads(threads)
    from autoskd.search.arms import Arm
    from autoskd.search.run import SearchConfig, arm_spec
    from autoskd.search.trials import run_arms

    cfg = json.loads((Path(seed_dir) / "config.json").read_text())
    config = SearchConfig.from_dict({k: v for k, v in cfg.items() if k not in ("team", "task", "cache_dir")})
    spec = arm_spec(config, cfg["task"], cfg["team"], cfg["cache_dir"], root)
    record = run_arms(spec, [Arm.from_dict(arm)], executor="local", progress=False)[0]
    return root, record


def train_all(jobs: list[tuple[Path, Path, dict]], workers: int, threads: int) -> list[dict]:
    """Train every (seed_dir, root, arm) job; finished arms are loaded, not retrained."""
    from tqdm.auto import tqdm

    records = []
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = [pool.submit(_train, str(s), str(r), arm, threads) for s, r, arm in jobs]
        for fut in tqdm(as_completed(futures), total=len(futures), desc="probe arms", unit="arm"):
            root, record = fut.result()
            if record.get("status") == "failed":
                print(f"{root} {record['name']} failed: {record.get('error')}", flush=True)
            records.append({**record, "root": root})
    return records


def collect_rows(runs: list[Path], seeds: list[int], teachers: list[str]) -> list[dict]:
    """Every θ-policy student of the runs on ``seeds``. Runs after the first share its baselines
    (hard links), so only their candidates are new."""
    rows = []
    for k, run in enumerate(runs):
        for s, d in seed_dirs(run).items():
            if s in seeds:
                recs = json.loads((d / "results.json").read_text())
                rows += policy_rows([r for r in recs if k == 0 or r.get("kind") == "candidate"], teachers, s, str(run))
    return rows


def run_probes(probes: list[list[float]], teachers: list[str], seed_paths: dict[int, Path], seeds: list[int],
               out_root: Path, check_arm: dict | None, workers: int, threads: int) -> tuple[dict, dict | None, float]:
    """Train each probe on each seed (and the check arm on the first seed, compared with its
    run's record). Returns ``{probe: {seed: record}}``, the check, and the arms' training seconds
    (as trained, also when reloaded)."""
    jobs = [(seed_paths[s], out_root / f"seed{s}", {"name": probe_name(t, teachers), "kind": "candidate", "theta": t})
            for t in probes for s in seeds]
    check_root = str(out_root / "check")
    if check_arm is not None:
        arm = {k: check_arm.get(k) for k in ("name", "kind", "theta", "teacher", "group")}
        jobs.insert(0, (seed_paths[seeds[0]], Path(check_root), arm))
    trained = train_all(jobs, workers, threads) if jobs else []
    failed = [r for r in trained if r.get("status") == "failed"]
    if failed:
        raise SystemExit(f"{len(failed)} probe arm(s) failed (see their error.txt); finished ones are kept, rerun to resume")
    check = None
    if check_arm is not None:
        got = next(r for r in trained if r["root"] == check_root)
        run, again = [check_arm["dev_acc"], check_arm["test_acc"]], [got["dev_acc"], got["test_acc"]]
        check = {"arm": check_arm["name"], "seed": seeds[0], "run": run, "retrained": again,
                 "equal": all(abs(a - b) < 1e-9 for a, b in zip(run, again))}
        print(f"check: {check['arm']} seed {seeds[0]} run {run} retrained {again}", flush=True)
        if not check["equal"]:
            raise SystemExit(f"--check {check['arm']}: the retrained arm differs from the run's; probes would not be comparable")
    by_probe: dict[str, dict[int, dict]] = {}
    for r in trained:
        if r["root"] != check_root:
            by_probe.setdefault(r["name"], {})[int(Path(r["root"]).name[4:])] = r
    return by_probe, check, round(sum(r.get("seconds") or 0 for r in trained), 1)


def compare(probes: dict[str, dict[int, dict]], reference: dict[int, dict], ref_name: str) -> dict:
    """Per probe: mean dev/test with interval, and the paired difference to ``reference``."""
    out = {}
    for name, by_seed in probes.items():
        seeds = sorted(s for s in by_seed if s in reference)
        entry = {"theta": next(iter(by_seed.values()))["theta"], "seeds": seeds}
        for split in ("dev", "test"):
            mine = [by_seed[s][f"{split}_acc"] for s in seeds]
            ref = [reference[s][f"{split}_acc"] for s in seeds]
            entry[split] = mean_ci(mine)
            diff = paired_ci(mine, ref)
            entry[f"{split}_diff_vs_{ref_name}"] = diff
            entry[f"{split}_verdict"] = verdict(diff)
        entry["beats_reference"] = entry["dev_verdict"] == "win" and entry["test_verdict"] == "win"
        out[name] = entry
    return out


def anchored_set(results: dict[int, list[dict]], probes: dict[str, dict[int, dict]], reference: dict[int, dict],
                 seeds: list[int]) -> dict:
    """The probes plus the reference single teacher as one candidate set: per seed the best of
    them by dev, against the reference, AvgKD, and the best by dev of as many random arms (the
    first drawn, as ``search_vs_random`` budgets them). What a search would score if it already
    knew which teacher is best on average, which a search on one seed does not know."""
    size = len(probes) + 1
    picked, rand, avg = {}, {}, {}
    for s in seeds:
        pool = [reference[s]] + [by_seed[s] for by_seed in probes.values() if s in by_seed]
        picked[s] = max(pool, key=lambda r: r["dev_acc"])
        randoms = sorted((r for r in results[s] if r.get("kind") == "random" and r.get("dev_acc") is not None),
                         key=lambda r: r["name"])[:size]
        if randoms:
            rand[s] = max(randoms, key=lambda r: r["dev_acc"])
        avg[s] = next((r for r in results[s] if r.get("kind") == "average"), None)
    out = {"size": size, "trainings": size}
    for split in ("dev", "test"):
        mine = [picked[s][f"{split}_acc"] for s in seeds]
        out[split] = mean_ci(mine)
        for label, other in (("reference", reference), ("avgkd", avg), ("random_best", rand)):
            both = [s for s in seeds if other.get(s) is not None]
            if both:
                diff = paired_ci([picked[s][f"{split}_acc"] for s in both], [other[s][f"{split}_acc"] for s in both])
                out[f"{split}_diff_vs_{label}"] = {**diff, "verdict": verdict(diff)}
    return out


def best_single_per_seed(singles: dict[str, dict[int, dict]], seeds: list[int]) -> dict[str, int]:
    """On how many seeds each teacher's single-teacher student is the best by dev: how well one
    whole training per teacher identifies the teacher that is best on average."""
    counts = {t: 0 for t in singles}
    for s in seeds:
        counts[max(singles, key=lambda t: singles[t][s]["dev_acc"])] += 1
    return counts


# ------------------------------------------------------------------------------------- plot
def plot(result: dict, out_png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teachers = result["teachers"]
    probes = result["probes"]
    fig, axes = plt.subplots(1, 2 if probes else 1, figsize=(12 if probes else 6, 4.2), squeeze=False)
    ax = axes[0][0]
    x = np.arange(len(teachers))
    for k, (split, colour) in enumerate((("dev", "tab:blue"), ("test", "tab:orange"))):
        v = result["landscape"][split]["vertex"]
        mean = np.array([v[t]["mean"] for t in teachers])
        err = np.array([[v[t]["mean"] - v[t]["lo"] for t in teachers], [v[t]["hi"] - v[t]["mean"] for t in teachers]])
        ax.errorbar(x + (k - 0.5) * 0.2, mean, yerr=err, fmt="o", color=colour, capsize=3, label=split)
    ax.set_xticks(x, teachers, rotation=20)
    ax.set_ylabel("fitted accuracy at the teacher's vertex")
    ax.set_title(f"linear mixture fit, {result['n_rows']} students, {len(result['seeds'])} seeds\n(95% seed bootstrap)")
    ax.legend()
    if probes:
        ax = axes[0][1]
        ref = result["reference"]
        names = list(probes)
        for k, (split, colour) in enumerate((("dev", "tab:blue"), ("test", "tab:orange"))):
            d = [probes[n][f"{split}_diff_vs_{ref}"] for n in names]
            y = np.arange(len(names)) + (k - 0.5) * 0.2
            ax.errorbar([e["mean"] for e in d], y, xerr=[e["half_width"] for e in d], fmt="o", color=colour,
                        capsize=3, label=split)
        ax.axvline(0, color="grey", lw=1)
        ax.set_yticks(np.arange(len(names)), names)
        ax.set_xlabel(f"paired accuracy difference vs {ref} (95% CI over seeds)")
        ax.set_title("probe distributions vs the best single teacher")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


# ------------------------------------------------------------------------------------- main
def print_summary(result: dict) -> None:
    """The figures a reader needs, one line each."""
    for split in ("dev", "test"):
        v = result["landscape"][split]
        print(f"{split}: best vertex {v['best_vertex']} (bootstrap share {v['best_vertex_share'][v['best_vertex']]:.2f}); "
              + ", ".join(f"{t} {e['mean']:.4f} [{e['lo']:.4f}, {e['hi']:.4f}]" for t, e in v["vertex"].items()))
    for name, p in result["probes"].items():
        print(f"{name}: dev {p['dev']['mean']:.4f} test {p['test']['mean']:.4f}; vs {result['reference']} "
              f"dev {p['dev_diff_vs_' + result['reference']]['mean']:+.4f} ({p['dev_verdict']}) "
              f"test {p['test_diff_vs_' + result['reference']]['mean']:+.4f} ({p['test_verdict']})")
    print("best single teacher by dev, per seed: " + ", ".join(f"{t} {n}" for t, n in result["best_single_by_dev_per_seed"].items()))
    a = result["anchored_set"]
    if a:
        print(f"anchored set ({result['reference']} + probes, {a['size']} trainings): dev {a['dev']['mean']:.4f} test {a['test']['mean']:.4f}; "
              + "; ".join(f"vs {k} dev {a['dev_diff_vs_' + k]['mean']:+.4f} ({a['dev_diff_vs_' + k]['verdict']}) "
                          f"test {a['test_diff_vs_' + k]['mean']:+.4f} ({a['test_diff_vs_' + k]['verdict']})"
                          for k in ("reference", "avgkd", "random_best") if "dev_diff_vs_" + k in a))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, nargs="+", required=True,
                    help="search_vs_random run folders (…/<preset>); the first one's seeds and specs are used for probes")
    ap.add_argument("--probe", action="append", default=[], help="a distribution to train on every seed: w1,w2,...")
    ap.add_argument("--check", default=None, help="re-train this finished arm of the first seed and require equal accuracy")
    ap.add_argument("--seeds", type=int, nargs="*", default=None, help="seeds to use (default: every seed of the first run)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--name", default="teacher_landscape")
    ap.add_argument("--out", type=Path, default=None, help="where probe arms train (default benchmarks/runs/<name>)")
    args = ap.parse_args(argv)

    start = time.perf_counter()
    main_seeds = seed_dirs(args.runs[0])
    seeds = sorted(main_seeds) if args.seeds is None else args.seeds
    missing = [s for s in seeds if s not in main_seeds]
    if missing:
        raise SystemExit(f"--seeds {missing}: not in {args.runs[0]} (it has {sorted(main_seeds)})")
    teachers = team_names(main_seeds[seeds[0]])
    results = {s: json.loads((main_seeds[s] / "results.json").read_text()) for s in seeds}

    rows = collect_rows(args.runs, seeds, teachers)
    out_root = args.out or ROOT / "runs" / args.name
    probes = [parse_probe(p, len(teachers)) for p in args.probe]
    check_arm = None
    if args.check:
        first = {r["name"]: r for r in results[seeds[0]]}
        if args.check not in first:
            raise SystemExit(f"--check {args.check!r}: no such arm in seed {seeds[0]} (arms: {', '.join(first)})")
        check_arm = first[args.check]
    by_probe, check, train_seconds = run_probes(probes, teachers, main_seeds, seeds, out_root, check_arm,
                                                args.workers, args.threads)
    for name, by_seed in by_probe.items():
        rows += [{"seed": s, "name": name, "kind": "probe", "source": "probe", "theta": r["theta"],
                  "dev": r["dev_acc"], "test": r["test_acc"]} for s, r in by_seed.items()]

    singles = {t: {s: next(r for r in results[s] if r.get("kind") == "single" and r.get("teacher") == t) for s in seeds}
               for t in teachers}
    best_single = max(teachers, key=lambda t: np.mean([singles[t][s]["dev_acc"] for s in seeds]))
    result = {
        "benchmark": args.name, "runs": [str(r) for r in args.runs], "seeds": seeds, "teachers": teachers,
        "n_rows": len(rows), "rows_by_kind": {k: sum(r["kind"] == k for r in rows) for k in {r["kind"] for r in rows}},
        "landscape": landscape(rows, teachers, n_boot=args.bootstrap),
        "reference": f"single-{best_single}",
        "reference_means": {split: mean_ci([singles[best_single][s][f"{split}_acc"] for s in seeds]) for split in ("dev", "test")},
        "probes": compare(by_probe, singles[best_single], f"single-{best_single}"),
        "best_single_by_dev_per_seed": best_single_per_seed(singles, seeds),
        "anchored_set": anchored_set(results, by_probe, singles[best_single], seeds) if by_probe else None,
        "check": check, "seconds": round(time.perf_counter() - start, 1),
        "probe_train_seconds": train_seconds,
    }
    result["any_probe_beats_reference"] = any(p["beats_reference"] for p in result["probes"].values())
    path = write_result(args.name, result)
    png = plot(result, path.with_suffix(".png"))
    print_summary(result)
    print(f"wrote {path} and {png}")
    return result


if __name__ == "__main__":
    main()
