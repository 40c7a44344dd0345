"""Does AutoSKD's learned teacher distribution beat each single teacher, AvgKD, uniform and random
distributions on a team of language models?

Main team ``teams/smollm2-specialists.yaml`` on ``lm:rotten_tomatoes_all`` (review snippets and
plot synopses): four teachers built from SmolLM2-135M-Instruct that differ in size, quality and
specialty (the shipped model, a review specialist, a plot-synopsis specialist, an 8-layer cut
healed by KD) and a 6-layer student cut from the same checkpoint. The search runs with the
product's ``lm-quick`` defaults (:func:`lm_theta_defaults`, :data:`DEFAULT_CANDIDATE_POLICY`).
Default seeds 10-14: disjoint from the seeds those defaults were chosen on (the genre team's 0-4).
The first team, ``teams/smollm2-ladder.yaml`` (one teacher best everywhere), is kept as its own
result, ``lm_search_ladder`` (commands in benchmarks/README.md).

One document split for every seed (so all seeds share the teachers' top-k caches; the seed draws
the data order, the θ draws and the random distributions). Each seed runs the whole LM search
(:func:`autoskd.search.lm_search.run_lm_search`): one θ search, its K candidates retrained, and
every baseline, all at equal student steps, into ``results/<name>/s<seed>/``; a rerun skips
finished arms, so the benchmark resumes after a kill.

AutoSKD's arm is the candidate with the best dev perplexity (what the product keeps); ``random``
is the best-by-dev of the random distributions (the same selection given to random search);
``best_single`` is, per seed, the single teacher with the best dev perplexity. Differences are
paired by seed (same split, same data order). The ceiling (``teacher_landscape.py``'s question)
is read off the same runs: does any distribution (candidates, uniform, random, AvgKD) beat the
best single teacher on test?

    python benchmarks/lm_search_vs_random.py --teacher-ppl          # 5 seeds, every arm (~1 h here)
    python benchmarks/lm_search_vs_random.py --seeds 0 --steps 6   # a smoke run
    python benchmarks/lm_search_vs_random.py --team teams/smollm2-ladder.yaml \
        --corpus lm:rotten_tomatoes --seeds 0 1 2 3 4 --no-theta-center --strategy expected \
        --val-objective task --candidate-policy sampled --name lm_search_ladder   # the first search
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import RESULTS_DIR, write_result  # noqa: E402
from autoskd.search.lm_search import (DEFAULT_CANDIDATE_POLICY, LMSearchConfig, lm_theta_defaults,  # noqa: E402
                                      run_lm_search)
from autoskd.search.stats import mean_ci, paired_ci, verdict  # noqa: E402


def seed_arms(summary: dict) -> dict[str, dict]:
    """One row per compared arm of one seed's search (the selections the module doc names)."""
    arms = summary["arms"]
    by = {a["name"]: a for a in arms}
    out = {}
    cands = [a for a in arms if a["group"] == "autoskd"]
    if cands:
        out["autoskd"] = min(cands, key=lambda a: a["dev_ppl"])
    singles = [a for a in arms if a["group"] == "single"]
    for a in singles:
        out[a["name"]] = a
    if singles:
        out["best_single"] = min(singles, key=lambda a: a["dev_ppl"])
    for name in ("avgkd", "uniform"):
        if name in by:
            out[name] = by[name]
    randoms = [a for a in arms if a["group"] == "random"]
    if randoms:
        out["random"] = min(randoms, key=lambda a: a["dev_ppl"])
        out["random_mean"] = {"test_ppl": sum(a["test_ppl"] for a in randoms) / len(randoms),
                              "val_ppl": sum(a["val_ppl"] for a in randoms) / len(randoms),
                              "dev_ppl": sum(a["dev_ppl"] for a in randoms) / len(randoms)}
    return out


def with_baselines_from(summary: dict, other: Path) -> dict:
    """``summary`` with the baseline arms of another run of the same seed added (an ablation trains
    only its candidates): this run's own arms win a name clash, and an arm both trained records
    the other run's test perplexity (``other_test_ppl``) so the reader sees whether the runs agree."""
    if not other.exists():
        raise SystemExit(f"--baselines-from: {other} is missing; run that benchmark first")
    theirs = {a["name"]: a for a in json.loads(other.read_text())["arms"] if a["group"] != "autoskd"}
    mine = []
    for a in summary["arms"]:
        if a["name"] in theirs:
            a = {**a, "other_test_ppl": theirs.pop(a["name"])["test_ppl"]}
        mine.append(a)
    return {**summary, "arms": mine + list(theirs.values()), "baselines_from": str(other.parent.parent.name)}


def summarise(per_seed: dict[int, dict], costs: dict[int, dict]) -> dict:
    seeds = sorted(per_seed)
    rows = {s: seed_arms(per_seed[s]) for s in seeds}
    names = sorted({n for r in rows.values() for n in r})
    arms = {}
    for name in names:
        vals = [rows[s][name] for s in seeds if name in rows[s]]
        test, val = mean_ci([v["test_ppl"] for v in vals]), mean_ci([v["val_ppl"] for v in vals])
        arms[name] = {"n": len(vals), "test_ppl_mean": test["mean"], "test_ppl_ci": [test["lo"], test["hi"]],
                      "val_ppl_mean": val["mean"], "val_ppl_ci": [val["lo"], val["hi"]],
                      "test_ppl": [v["test_ppl"] for v in vals],
                      "picked": [v.get("name") for v in vals] if name in ("autoskd", "best_single", "random") else None}
    paired = {}
    for name in names:
        both = [s for s in seeds if name in rows[s] and "autoskd" in rows[s]]
        if name == "autoskd" or len(both) < 2:
            continue
        d = paired_ci([rows[s]["autoskd"]["test_ppl"] for s in both], [rows[s][name]["test_ppl"] for s in both])
        paired[name] = {"test_ppl_diff_mean": d["mean"], "test_ppl_diff_ci": [d["lo"], d["hi"]], "seeds": both,
                        # lower perplexity is better: an interval below 0 means AutoSKD is better
                        "verdict": {"win": "autoskd worse", "loss": "autoskd better", "tie": "tie"}[verdict(d)]}
    baselines = [n for n in names if n not in ("autoskd", "random_mean")]
    target = None
    if "autoskd" in arms and baselines:
        at_or_below = all(arms["autoskd"]["test_ppl_mean"] <= arms[b]["test_ppl_mean"] for b in baselines)
        below = all(paired.get(b, {}).get("test_ppl_diff_ci", [0, 0])[1] < 0 for b in ("best_single", "avgkd"))
        target = {"autoskd_at_or_below_every_baseline_mean": at_or_below,
                  "paired_vs_best_single_and_avgkd_below_zero": below, "met": bool(at_or_below and below)}
    # the ceiling: per seed, does any distribution beat the best single teacher (by dev) on test?
    ceiling = []
    for s in seeds:
        r, arms_s = rows[s], per_seed[s]["arms"]
        if "best_single" not in r:
            continue
        others = [a for a in arms_s if a["group"] != "single"]
        best_other = min(others, key=lambda a: a["test_ppl"]) if others else None
        ceiling.append({"seed": s, "best_single": r["best_single"]["name"],
                        "best_single_test_ppl": r["best_single"]["test_ppl"],
                        "best_distribution": best_other["name"] if best_other else None,
                        "best_distribution_test_ppl": best_other["test_ppl"] if best_other else None,
                        "oracle_gap": (best_other["test_ppl"] - r["best_single"]["test_ppl"]) if best_other else None})
    gaps = [c["oracle_gap"] for c in ceiling if c["oracle_gap"] is not None]
    # compute: student trainings each arm costs (the search run in units of one arm's training time)
    arm_seconds = [a["seconds"] for s in seeds for a in per_seed[s]["arms"] if a.get("seconds")]
    mean_arm = sum(arm_seconds) / len(arm_seconds) if arm_seconds else None
    search_units = [costs[s]["search_seconds"] / mean_arm for s in seeds if mean_arm and s in costs]
    k = len([a for a in per_seed[seeds[0]]["arms"] if a["group"] == "autoskd"]) if seeds else 0
    n_random = len([a for a in per_seed[seeds[0]]["arms"] if a["group"] == "random"]) if seeds else 0
    agree = [{"seed": s, "arm": a["name"], "test_ppl": a["test_ppl"], "other_test_ppl": a["other_test_ppl"]}
             for s in seeds for a in per_seed[s]["arms"] if "other_test_ppl" in a]
    return {"seeds": seeds, "arms": arms, "paired": paired, "target": target,
            **({"baselines_agree": agree} if agree else {}),
            "ceiling": {"per_seed": ceiling, "oracle_gap_mean": (sum(gaps) / len(gaps)) if gaps else None,
                        "oracle_gap_ci": ([mean_ci(gaps)["lo"], mean_ci(gaps)["hi"]] if len(gaps) > 1 else None)},
            "compute_student_trainings": {"autoskd": (sum(search_units) / len(search_units) + k) if search_units else None,
                                          "search_run": (sum(search_units) / len(search_units)) if search_units else None,
                                          "random": n_random, "single": 1, "avgkd": 1, "uniform": 1},
            "theta_final": {s: per_seed[s]["searches"][0]["theta"] for s in seeds},
            "teachers": per_seed[seeds[0]]["teachers"] if seeds else []}


def ran_theta_config(seed_dir: Path) -> dict | None:
    """The θ settings a seed's search ran with (its config.json), so a ``--summary-only`` rerun
    reports what ran rather than what this invocation's flags say."""
    path = seed_dir / "config.json"
    return json.loads(path.read_text()).get("theta") if path.exists() else None


def teacher_perplexities(args, root: Path) -> dict:
    """Each teacher's own val/test perplexity on the benchmark's split (once; ``teachers.json``)."""
    path = root / "teachers.json"
    if path.exists():
        return json.loads(path.read_text())
    from autoskd.lm.evaluate import evaluate_lm
    from autoskd.lm.pipeline import LMDistillConfig, lm_loaders
    from autoskd.lm.team import LMTeam
    from autoskd.search.lm_search import corpus_of

    corpus = corpus_of({"name_or_path": args.corpus, "split_seed": args.split_seed, "max_train": args.max_train,
                        "max_eval": args.max_eval}, 0)
    team = LMTeam.from_yaml(args.team).build(seed=0, corpus=corpus, cache_dir=args.cache_dir, progress=False)
    loaders = lm_loaders(corpus, team.tokenizer, LMDistillConfig(batch_size=args.batch_size), team.max_length)
    out = {name: {"val_ppl": evaluate_lm(model, loaders.val, "cpu")["perplexity"],
                  "test_ppl": evaluate_lm(model, loaders.test, "cpu")["perplexity"]}
           for name, model in team.teachers.items()}
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in result["arms"] if n != "random_mean"]
    names.sort(key=lambda n: result["arms"][n]["test_ppl_mean"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    means = [result["arms"][n]["test_ppl_mean"] for n in names]
    err = [[m - result["arms"][n]["test_ppl_ci"][0] for n, m in zip(names, means)],
           [result["arms"][n]["test_ppl_ci"][1] - m for n, m in zip(names, means)]]
    colors = ["#3b6ea8" if n == "autoskd" else "#888888" for n in names]
    left.barh(names, means, xerr=err, color=colors, capsize=3)
    left.invert_yaxis()
    left.set_xlabel("test perplexity (mean, 95% CI; lower is better)")
    left.set_title(f"{Path(result['team']).stem}, {len(result['seeds'])} seeds")
    lo = min(result["arms"][n]["test_ppl_ci"][0] for n in names)
    hi = max(result["arms"][n]["test_ppl_ci"][1] for n in names)
    if hi > 3 * lo:  # a weak teacher far off the rest would flatten every other bar: log axis
        left.set_xscale("log")
        left.set_xlim(left=lo * 0.9)
        left.set_xlabel("test perplexity (mean, 95% CI; log scale; lower is better)")
    else:
        left.set_xlim(left=max(0, lo * 0.95))
    diffs = list(result["paired"])
    mids = [result["paired"][d]["test_ppl_diff_mean"] for d in diffs]
    derr = [[m - result["paired"][d]["test_ppl_diff_ci"][0] for d, m in zip(diffs, mids)],
            [result["paired"][d]["test_ppl_diff_ci"][1] - m for d, m in zip(diffs, mids)]]
    right.errorbar(mids, diffs, xerr=derr, fmt="o", color="#3b6ea8", capsize=3)
    right.axvline(0, color="black", lw=0.8)
    right.set_xlabel("AutoSKD − baseline, test perplexity (paired, 95% CI)")
    near = [abs(v) for d in diffs for v in result["paired"][d]["test_ppl_diff_ci"]]
    if near and max(near) > 10 * sorted(near)[len(near) // 2]:  # one far-off arm: linear near 0, log beyond
        linthresh = sorted(near)[len(near) // 2] * 2
        right.set_xscale("symlog", linthresh=linthresh)
        right.set_xlabel(f"AutoSKD − baseline, test perplexity (paired, 95% CI; log beyond ±{linthresh:.0f})")
    right.invert_yaxis()
    right.set_title("paired differences (left of 0: AutoSKD better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    product = lm_theta_defaults()  # the benchmark measures what `autoskd search` does by default
    p.add_argument("--seeds", type=int, nargs="+", default=[10, 11, 12, 13, 14],
                   help="default: seeds no setting was chosen on")
    p.add_argument("--team", default=str(ROOT / "teams" / "smollm2-specialists.yaml"))
    p.add_argument("--corpus", default="lm:rotten_tomatoes_all")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--team-seed", type=int, default=0, help="seed of the team's corpus-trained members (all seeds)")
    p.add_argument("--steps", type=int, default=40, help="student steps of every arm and of the search")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--theta-lr", type=float, default=None)
    p.add_argument("--theta-every", type=int, default=product.every)
    p.add_argument("--candidates", type=int, default=product.num_candidates)
    p.add_argument("--theta-center", action=argparse.BooleanOptionalAction, default=product.center,
                   help="centre the θ-gradient (ThetaConfig.center; lm-quick's default; off in the ladder's first run)")
    p.add_argument("--strategy", default=product.strategy, choices=["expected", "cr"],
                   help="θ strategy (cr: the search's student trains on the θ-mixture, see lm_theta)")
    p.add_argument("--val-objective", default=product.val_objective, choices=["task", "teacher_mixture"],
                   help="θ's val objective (teacher_mixture: the val text's likelihood under the teachers' θ-mixture)")
    p.add_argument("--candidate-policy", default=DEFAULT_CANDIDATE_POLICY, choices=["sampled", "mixture"],
                   help="how candidates train on their θ (mixture: the θ-weighted mixture every step)")
    p.add_argument("--baselines", default="all", help="which baselines to train (none: candidates only, an ablation)")
    p.add_argument("--n-random", type=int, default=1)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--max-train", type=int, default=800)
    p.add_argument("--max-eval", type=int, default=200)
    p.add_argument("--name", default="lm_search_vs_random")
    p.add_argument("--cache-dir", default=str(ROOT / ".cache" / "autoskd"))
    p.add_argument("--summary-only", action="store_true")
    p.add_argument("--teacher-ppl", action="store_true", help="also score each teacher on the split (minutes)")
    p.add_argument("--baselines-from", default=None, metavar="NAME",
                   help="an ablation: pair this run's candidates with the baseline arms of run NAME (same seeds, "
                        "split and team; an arm this run trained itself is kept and checks that they agree)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    theta = lm_theta_defaults()
    theta.num_candidates, theta.every, theta.center = args.candidates, args.theta_every, args.theta_center
    theta.strategy, theta.val_objective = args.strategy, args.val_objective
    if args.theta_lr is not None:
        theta.lr = args.theta_lr
    root = RESULTS_DIR / args.name
    per_seed, costs = {}, {}
    for seed in args.seeds:
        out = root / f"s{seed}"
        if args.summary_only:
            if not (out / "result.json").exists():
                continue
            summary = json.loads((out / "result.json").read_text())
        else:
            config = LMSearchConfig(search_epochs=100, eval_epochs=100, max_steps=args.steps, lr=args.lr,
                                    batch_size=args.batch_size, seed=seed, split_seed=args.split_seed,
                                    top_k=args.top_k, theta=theta, n_random=args.n_random, max_train=args.max_train,
                                    baselines=args.baselines, candidate_policy=args.candidate_policy,
                                    max_eval=args.max_eval, save_students=False, executor="local",
                                    # one team for every seed (its trained members built once, at the
                                    # team seed; that seed's own runs need not name it)
                                    team_seed=None if seed == args.team_seed else args.team_seed)
            for _ in range(3):  # a failed arm has no arm.json: a second pass retries just those
                summary = run_lm_search(args.team, {"name_or_path": args.corpus}, config, out,
                                        cache_dir=args.cache_dir, progress=not args.quiet)
                if not summary["failed"]:
                    break
                print(f"seed {seed}: retrying failed arms {summary['failed']}", flush=True)
            best = summary["best"]
            print(f"seed {seed}: best arm {best['name']} dev ppl {best['dev_ppl']:.1f} test ppl {best['test_ppl']:.1f}; "
                  f"theta {['%.3f' % t for t in summary['searches'][0]['theta']]}", flush=True)
        if args.baselines_from:
            summary = with_baselines_from(summary, RESULTS_DIR / args.baselines_from / f"s{seed}" / "result.json")
        per_seed[seed] = summary
        costs[seed] = {"search_seconds": summary["searches"][0]["seconds"]}
    if not per_seed:
        print("no finished seeds")
        return 1
    result = {"benchmark": args.name, "team": Path(args.team).name, "corpus": args.corpus,
              "settings": {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "theta_lr", "theta_every",
                                                          "candidates", "n_random", "top_k", "max_train", "max_eval",
                                                          "split_seed", "theta_center", "baselines",
                                                          "baselines_from", "strategy", "candidate_policy",
                                                          "val_objective")},
              "theta_config": ran_theta_config(root / f"s{min(per_seed)}") or theta.to_dict(),
              "teacher_ppl": teacher_perplexities(args, root) if args.teacher_ppl else None,
              **summarise(per_seed, costs)}
    path = write_result(args.name, result)
    plot(result, RESULTS_DIR / f"{args.name}.png")
    print(json.dumps({"target": result["target"], "paired": {k: v["test_ppl_diff_ci"] for k, v in result["paired"].items()}},
                     indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
