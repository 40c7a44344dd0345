"""Every method of GKD's Table 1 and GLMD on one engine, where ``kd`` and the no-teacher
fine-tune have converged, over seeds, paired against both.

rotten_tomatoes, the ladder team of the search benchmarks (teams/minilm-ladder.yaml: MiniLM
cut to a 2-layer student with the mean-pooling head of its sentence-transformers checkpoint;
teachers fine-tuned on the whole training split, cached in ``benchmarks/runs/cache``): students
train on ``--max-train`` train + ``--max-train`` val rows and are scored on the whole dev and
test splits. Single-teacher methods learn from the 6-layer teacher, multi-teacher methods
(tmkd, mt_bert, rl_kd, uncertainty) from the 4- and 6-layer ones, TAKD/DGKD run the chain
6 -> 4-layer assistant -> student (two hops). ``finetune`` is the student trained on gold labels
alone (no teacher): the baseline a user asks about first.

Budget: every method runs its own default recipe (:mod:`autoskd.methods`: its stages, weights
and schedules) and each of its task stages -- the one that trains the classifier included --
runs ``--epochs`` epochs (default 8: where ``kd`` and ``finetune`` have converged; the dev curves
of ``--name methods_convergence`` show it, see ``benchmarks/README.md``), so no method's
classifier gets less training than ``kd``'s; intermediate stages are extra cost, reported per run.
(The first table split one 2-epoch budget over a method's stages: a two-stage method's classifier
got 32 steps, too few to leave the majority class.) Methods with a pre-training stage run it for
``--pretrain-epochs`` epochs over the task's unlabelled texts first. Each (method, seed) is
written to ``benchmarks/results/<name>/<method>-s<seed>.json`` as soon as it finishes (with its
dev curve: accuracy per epoch and, with ``--diagnose``, the share of dev rows predicted as the
majority class), so an interrupted run resumes where it stopped. The table is
``benchmarks/results/<name>.json`` and ``<name>.png`` (and ``<name>_curves.png``: every run's
dev curve): per method the mean over seeds and its 95% Student-t interval, and the per-seed
paired difference (with its 95% interval) to ``kd`` and to ``finetune`` on test accuracy (seeds
pair arms: same student start, same batches), plus McNemar's test on the test rows pooled over
seeds.

    python benchmarks/methods_table.py --workers 2 [--seeds 0 1 2] [--epochs 8] [--methods kd,pkd]
    python benchmarks/methods_table.py --methods finetune,kd --seeds 0 --epochs 12 --diagnose \\
        --name methods_convergence                         # the convergence check
    python benchmarks/methods_table.py --report            # aggregate what has finished
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from gkd_directions import check_directions  # noqa: E402

# Word-prediction methods (full-vocabulary MLM logits: the slowest on a CPU) run last.
METHODS = ["finetune", "kd", "pkd", "theseus", "tinybert", "mobilebert", "sid", "minilm", "minilmv2", "alp_kd",
           "lrc_bert", "annealing_kd", "ckd", "universal_kd", "continuation_kd", "rail_kd", "mgskd", "tmkd",
           "mt_bert", "rl_kd", "uncertainty", "takd", "dgkd", "pd", "glmd", "distilbert", "diito"]
BASELINES = ("kd", "finetune")  # every method is paired against both
TEACHERS = ["minilm-L4", "minilm-L6"]
RESULTS = ROOT / "results"
CACHE = ROOT.parent / ".cache" / "autoskd"
TEAM_CACHE = ROOT / "runs" / "cache"  # shared with search_vs_random / search_ablation
#: Defaults: the converged budget (see the module doc) and the ladder team's student lr.
EPOCHS, PRETRAIN_EPOCHS, LR = 8.0, 1.0, 5e-4


def team_and_task(args):
    """The search benchmarks' team (teachers fine-tuned on the whole training split, cached in
    ``benchmarks/runs/cache``: good teachers, as in GKD's runs) -- only the teachers the table
    reads -- and the medium preset's data (students on ``--max-train`` rows; dev and test whole
    unless ``--max-eval``)."""
    from dataclasses import replace

    from _search_runs import TASK, TEAM

    from autoskd.data.tasks import load_task
    from autoskd.search.run import SearchConfig, load_search_task
    from autoskd.team import TeacherTeam, TeamSpec

    _, team_task = load_search_task(dict(TASK), SearchConfig.from_preset("medium"))
    spec = TeamSpec.from_yaml(TEAM)  # each teacher is cached on its own key: the full ladder reuses them
    spec = replace(spec, teachers=[t for t in spec.teachers if t.name in TEACHERS])
    team = TeacherTeam(spec).build(team_task, cache_dir=TEAM_CACHE / "teachers", seed=TASK["seed"], progress=True)
    full = load_task(**TASK)
    return team, full.subsample(args.max_train, args.max_eval, seed=TASK["seed"])


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        import threading

        self.mib, self._stop = self._rss(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _rss() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            self.mib = max(self.mib, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.mib = max(self.mib, self._rss())


def majority_share(predictions: list[int], majority: int) -> float:
    """Fraction of rows predicted as the majority class (1.0: the student predicts one class)."""
    return sum(1 for p in predictions if p == majority) / max(1, len(predictions))


class DevShare:
    """``--diagnose``: after each scored epoch, the share of dev rows predicted as the majority
    class (one more pass over dev), written into the epoch's history record."""

    def __init__(self, dev_loader, majority: int):
        from autoskd.engine.callbacks import Callback

        self.dev, self.majority = dev_loader, majority
        outer = self

        class _Cb(Callback):
            def on_epoch_end(self, trainer, ctx, metrics):
                if "dev_acc" in metrics:
                    from autoskd.engine.trainer import evaluate

                    out = evaluate(trainer.student, outer.dev, trainer.device, predictions=True)
                    metrics["dev_majority_share"] = majority_share(out["predictions"], outer.majority)

        self.callback = _Cb()


def run_one(args, team, task) -> dict:
    """One (method, seed) on the built team; returns its record."""
    import gc

    from autoskd.chain import run_chain
    from autoskd.engine.multi_teacher import MultiTeacherMethod
    from autoskd.methods import get_method
    from autoskd.pipeline import DistillConfig, distill, make_loaders, method_stages

    gc.collect()
    name = args.one
    method = get_method(name)
    pretrain = args.pretrain_epochs if "pretrain" in method.spec.stages else 0.0
    epochs = args.epochs
    if args.split_budget:  # the first table's allocation: one budget split evenly over the stages
        epochs = pretrain = args.split_budget / len(method.spec.stages)
        pretrain = pretrain if "pretrain" in method.spec.stages else 0.0
    config = DistillConfig(method=name, epochs=epochs, pretrain_epochs=pretrain, lr=args.lr, batch_size=32,
                           seed=args.seed, teacher="minilm-L6",
                           teachers=TEACHERS if isinstance(method, MultiTeacherMethod) else None,
                           mlm_adapt_steps=args.mlm_adapt_steps, max_length=args.max_length,
                           method_options={"vocab_alpha": args.glmd_alpha} if name == "glmd" else {})
    max_length = config.max_length or team.max_length
    loaders = make_loaders(task, team.tokenizer, max_length, 32, args.seed)
    labels = [int(y) for y in task.split("dev")["label"]]
    majority = max(set(labels), key=labels.count)
    callbacks = [DevShare(loaders.dev, majority).callback] if args.diagnose else []
    dummy = {"pretrain": loaders.train, "task": loaders.train}
    plan = [{"stage": s.name, "epochs": s.epochs, "lr": s.lr, "steps": s.total_steps()}
            for s in method_stages(method, config, loaders, loaders.train, dummy)]
    start, cpu = time.perf_counter(), time.process_time()  # CPU time: the cost on a quiet machine
    if name in ("takd", "dgkd"):
        chain_dir = ROOT / "runs" / args.name / f"{name}-s{args.seed}"
        out = run_chain(team, task, config, [4], out_dir=chain_dir, cache_dir=CACHE, progress=False)
        last = out.hops[-1]
        dev, test, train_seconds, hops = last.dev_acc, last.test_acc, sum(h.seconds for h in out.hops), len(out.hops)
        hop_dir = chain_dir / f"hop{hops - 1}-{last.name}"
        predictions = json.loads((hop_dir / "predictions.json").read_text())["test"]
        history = json.loads((hop_dir / "result.json").read_text()).get("history", [])
    else:
        student = team.build_student(task, seed=args.seed)
        if args.student_pooling:  # diagnostics: the same student with another head
            from autoskd.models.loading import load_classifier

            spec = team.student_spec
            student = load_classifier(spec.source, num_labels=task.num_labels, layers=spec.layers, init=spec.init,
                                      seed=args.seed, pooling=args.student_pooling)
        outcome = distill(team, task, config, out_dir=None, cache_dir=CACHE, progress=False, callbacks=callbacks,
                          student=student)
        dev, test, train_seconds, hops = outcome.dev_acc, outcome.test_acc, outcome.result.seconds, 1
        predictions, history = outcome.test_predictions, outcome.result.history
    test_labels = [int(y) for y in task.split("test")["label"]]
    return {"method": name, "seed": args.seed, "dev_acc": dev, "test_acc": test,
            "test_majority_share": majority_share(predictions, max(set(test_labels), key=test_labels.count)),
            "train_seconds": train_seconds, "wall_seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu, "hops": hops,
            "epochs": epochs, "pretrain_epochs": pretrain, "lr": args.lr, "stages": plan,
            "steps": sum(s["steps"] for s in plan) * hops,
            "history": [{k: h[k] for k in ("stage", "epoch", "dev_acc", "dev_loss", "dev_majority_share") if k in h}
                        for h in history],
            "test_predictions": predictions}


def parts_dir(args) -> Path:
    return RESULTS / args.name


#: What a finished (method, seed) record was computed with; a rerun into the same table must match.
SETTINGS = ("epochs", "pretrain_epochs", "max_train", "max_eval", "lr", "mlm_adapt_steps", "max_length", "glmd_alpha",
            "split_budget", "student_pooling")


def settings_of(args) -> dict:
    return {k: getattr(args, k) for k in SETTINGS}


def finished(args, parts: Path, name: str, seed: int) -> bool:
    """Whether ``name`` at ``seed`` is done in this table; a record of other settings stops the run
    (a table never mixes budgets)."""
    path = parts / f"{name}-s{seed}.json"
    if not path.exists():
        return False
    got = json.loads(path.read_text()).get("settings")
    if got != settings_of(args):
        raise SystemExit(f"{path} was computed with other settings ({got} vs {settings_of(args)}); "
                         f"use another --name or delete {parts}")
    return True


def _pooled_correct(runs: list[dict], labels: list[int]) -> list[bool]:
    """Right/wrong per test row, pooled over seeds (in seed order), for McNemar's paired test."""
    return [p == y for r in sorted(runs, key=lambda r: r["seed"]) for p, y in zip(r["test_predictions"], labels)]


def test_labels(args, split: str = "test") -> list[int]:
    """A split's labels in loader order (the order every run's test predictions are in)."""
    from _search_runs import TASK

    from autoskd.data.tasks import load_task

    task = load_task(**TASK).subsample(args.max_train, args.max_eval, seed=TASK["seed"])
    return [int(y) for y in task.split(split)["label"]]


def majority_rate(labels: list[int]) -> float:
    return max(labels.count(c) for c in set(labels)) / len(labels)


def leaving_majority(run: dict, majority_dev: float, margin: float = 0.02) -> dict | None:
    """The first dev evaluation of ``run`` above the majority class by ``margin``: its stage, epoch
    in that stage and student steps so far (None: it never left). Why: the first table gave a
    method's classifier 16-32 steps, so a method that leaves the majority class later than that
    here was short of steps there."""
    before, per_epoch, total = {}, {}, 0
    for s in run["stages"]:
        before[s["stage"]], per_epoch[s["stage"]] = total, s["steps"] / max(s["epochs"], 1e-9)
        total += s["steps"]
    for h in run["history"]:
        if h.get("dev_acc") is not None and h["dev_acc"] > majority_dev + margin:
            stage = h["stage"]
            return {"stage": stage, "epoch": h["epoch"],
                    "step": round(before.get(stage, 0) + (h["epoch"] + 1) * per_epoch.get(stage, 0))}
    return None


def _interval(ci: dict) -> list[float]:
    return [ci["lo"], ci["hi"]]


def aggregate(runs_by_method: dict[str, list[dict]], labels: list[int], seeds: list[int] | None = None) -> dict:
    """The table: per method its mean dev/test accuracy over seeds with 95% intervals, and the
    paired comparison with each baseline on the seeds both finished (per-seed differences with
    their interval and verdict; McNemar on the pooled test rows). ``seeds``: only these."""
    from autoskd.search.stats import mcnemar, mean_ci, paired_ci, verdict

    table: dict[str, dict] = {}
    for name, runs in runs_by_method.items():
        runs = sorted((r for r in runs if seeds is None or r["seed"] in seeds), key=lambda r: r["seed"])
        if not runs:
            continue
        dev, test = mean_ci([r["dev_acc"] for r in runs]), mean_ci([r["test_acc"] for r in runs])
        table[name] = {"seeds": [r["seed"] for r in runs],
                       "dev_acc_mean": dev["mean"], "dev_acc_ci": _interval(dev),
                       "test_acc_mean": test["mean"], "test_acc_ci": _interval(test),
                       "test_majority_share": max(r["test_majority_share"] for r in runs),
                       "seconds_mean": sum(r["wall_seconds"] for r in runs) / len(runs),
                       "cpu_seconds_mean": sum(r.get("cpu_seconds", r["wall_seconds"]) for r in runs) / len(runs),
                       "steps": runs[0]["steps"], "stages": runs[0]["stages"],
                       "peak_rss_mib": max(r.get("peak_rss_mib", 0.0) for r in runs),
                       "runs": [{k: v for k, v in r.items() if k != "test_predictions"} for r in runs]}
    for base in BASELINES:
        if base not in table:
            continue
        base_runs = {r["seed"]: r for r in runs_by_method[base]}
        for name, row in table.items():
            if name == base:
                continue
            mine = {r["seed"]: r for r in runs_by_method[name] if r["seed"] in row["seeds"]}
            common = sorted(set(mine) & set(base_runs))
            if not common:
                continue
            diff = paired_ci([mine[s]["test_acc"] for s in common], [base_runs[s]["test_acc"] for s in common])
            mc = mcnemar(_pooled_correct([mine[s] for s in common], labels),
                         _pooled_correct([base_runs[s] for s in common], labels))
            row[f"test_vs_{base}"] = {"mean": diff["mean"], "ci": _interval(diff), "seeds": common,
                                      "verdict": verdict(diff) if len(common) > 1 else None,
                                      "mcnemar_p": mc["p_value"], "mcnemar": mc}
    return table


def load_runs(args) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for name in METHODS:
        runs = [json.loads(p.read_text()) for p in sorted(parts_dir(args).glob(f"{name}-s*.json"))]
        if runs:
            out[name] = runs
    return out


def plot(table: dict, majority: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(table.items(), key=lambda kv: kv[1]["test_acc_mean"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 0.3 * len(rows) + 1.8), sharey=True,
                                   gridspec_kw={"width_ratios": [2, 1]})
    ys = list(range(len(rows)))
    colors = ["tab:red" if n == "kd" else "tab:green" if n == "finetune" else "tab:blue" for n, _ in rows]
    means = [r["test_acc_mean"] for _, r in rows]
    err = [[m - r["test_acc_ci"][0] for m, (_, r) in zip(means, rows)],
           [r["test_acc_ci"][1] - m for m, (_, r) in zip(means, rows)]]
    ax1.barh(ys, means, xerr=err, color=colors, alpha=0.8)
    ax1.scatter([r["dev_acc_mean"] for _, r in rows], ys, color="k", s=12, zorder=3, label="dev (mean)")
    ax1.axvline(majority, color="grey", ls="--", lw=1, label=f"majority class (test {majority:.3f})")
    lo = min(min(r["dev_acc_mean"], r["test_acc_ci"][0]) for _, r in rows)
    ax1.set_xlim(max(0.0, min(lo, majority) - 0.03), max(0.8, max(r["test_acc_ci"][1] for _, r in rows) + 0.01))
    ax1.set_yticks(ys, [f"{n} ({len(r['seeds'])})" for n, r in rows])
    ax1.set_xlabel("test accuracy: mean over seeds (bars) with 95% interval; dev mean (dots)")
    ax1.legend(loc="lower right", fontsize=8)
    ax2.barh(ys, [r["seconds_mean"] / 60 for _, r in rows], color=colors, alpha=0.8)
    ax2.set_xlabel("minutes per run (this machine)")
    fig.suptitle("Methods on one engine: rotten_tomatoes, ladder team (6-layer teacher, 2-layer student)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(runs_by_method: dict[str, list[dict]], path: Path, majority: float) -> Path:
    """Dev accuracy per epoch of every run (one panel per method; pre-training stages are not
    scored), with the dev majority-class share when ``--diagnose`` recorded it; dashed: the dev
    accuracy of always predicting the majority class."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(runs_by_method)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), squeeze=False, sharey=True)
    for ax, name in zip(axes.flat, names):
        for run in sorted(runs_by_method[name], key=lambda r: r["seed"]):
            points = [h for h in run["history"] if h.get("dev_acc") is not None]
            xs = list(range(1, len(points) + 1))
            line, = ax.plot(xs, [h["dev_acc"] for h in points], marker=".", label=f"seed {run['seed']}")
            shares = [h.get("dev_majority_share") for h in points]
            if any(s is not None for s in shares):
                ax.plot(xs, [s if s is not None else float("nan") for s in shares], ls=":", color=line.get_color())
            for i in range(1, len(points)):  # stage boundaries
                if points[i]["stage"] != points[i - 1]["stage"]:
                    ax.axvline(i + 0.5, color="grey", lw=0.8)
        ax.axhline(majority, color="grey", ls="--", lw=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_ylim(0.35, 1.0)
        ax.set_xlabel("scored epoch", fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes[0][0].set_ylabel("dev acc (solid), majority share (dotted)", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def markdown(table: dict) -> str:
    """The README table: one row per finished method, best test accuracy first."""
    lines = ["| method | seeds | dev acc | test acc [95% CI] | vs finetune (test) | vs kd (test) | min/run | stages |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    def vs(r, base):
        d = r.get(f"test_vs_{base}")
        if d is None:
            return ""
        tag = f" **{d['verdict']}**" if d.get("verdict") in ("win", "loss") else f" {d['verdict']}" if d.get("verdict") else ""
        return f"{d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]{tag}"

    for name, r in sorted(table.items(), key=lambda kv: -kv[1]["test_acc_mean"]):
        stages = ", ".join(f"{s['stage']} {s['epochs']:g}" for s in r["stages"])
        lines.append(f"| `{name}` | {len(r['seeds'])} | {r['dev_acc_mean']:.3f} | {r['test_acc_mean']:.3f} "
                     f"[{r['test_acc_ci'][0]:.3f}, {r['test_acc_ci'][1]:.3f}] | {vs(r, 'finetune')} | {vs(r, 'kd')} | "
                     f"{r['seconds_mean'] / 60:.1f} | {stages} |")
    return "\n".join(lines)


def report(args, team) -> int:
    from _common import write_result

    labels = test_labels(args)
    runs = load_runs(args)
    table = aggregate(runs, labels)
    if not table:
        print("no finished method yet")
        return 1
    majority = majority_rate(labels)
    settings = settings_of(args)
    seeds = sorted({s for r in table.values() for s in r["seeds"]})
    collapsed = [n for n, r in table.items() if r["test_majority_share"] >= 0.99]
    majority_dev = majority_rate(test_labels(args, "dev"))
    for row in table.values():  # when each run's dev accuracy first left the majority class
        row["left_majority"] = [leaving_majority(r, majority_dev) for r in row["runs"]]
    directions = check_directions(table)  # GKD's headline comparisons this task can test (gkd_directions.py)
    path = write_result(args.name, {"settings": settings, "seeds": seeds, "majority_test_acc": majority,
                                    "majority_dev_acc": majority_dev,
                                    "teacher": "minilm-L6", "multi_teachers": TEACHERS,
                                    "teacher_dev_acc": team.dev_accuracy if team else None,
                                    "missing": [m for m in args.methods.split(",") if m not in table],
                                    "at_majority_class": collapsed, "gkd_directions": directions,
                                    "methods": table})
    plot(table, majority, RESULTS / f"{args.name}.png")
    plot_curves(runs, RESULTS / f"{args.name}_curves.png", majority_rate(test_labels(args, "dev")))
    print(markdown(table))
    for base in BASELINES:
        verdicts = {v: [n for n, r in table.items() if r.get(f"test_vs_{base}", {}).get("verdict") == v]
                    for v in ("win", "tie", "loss")}
        print(f"vs {base} (paired over seeds, 95%): " +
              "; ".join(f"{v}: {', '.join(ns) or 'none'}" for v, ns in verdicts.items()))
    rho = directions["spearman_vs_gkd_table2"]
    print(f"GKD's headline directions: {directions['counts']}" +
          (f"; Spearman with GKD Table 2 {rho['rho']:+.2f} over {rho['methods']} methods (p {rho['p_value']:.2g})"
           if rho else ""))
    for pair in directions["pairs"]:
        lo, hi = pair["test_acc_diff_ci"]
        print(f"  {pair['better']} > {pair['worse']}: {pair['test_acc_diff_mean']:+.3f} [{lo:+.3f}, {hi:+.3f}] "
              f"{pair['direction']}")
    print(f"at the majority class: {', '.join(collapsed) or 'none'}; wrote {path}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=float, default=EPOCHS,
                   help="epochs of the run (the stage that trains the classifier; other stages per the method's recipe)")
    p.add_argument("--pretrain-epochs", type=float, default=PRETRAIN_EPOCHS,
                   help="epochs of the pre-training stage on unlabelled text (methods that have one)")
    p.add_argument("--max-train", type=int, default=500, help="train and val rows each (students)")
    p.add_argument("--max-eval", type=int, default=None, help="dev/test rows (default: whole)")
    p.add_argument("--lr", type=float, default=LR, help="student lr (the ladder team's: a cut MiniLM wants a high one)")
    p.add_argument("--mlm-adapt-steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (1: the shared CPU spins less)")
    p.add_argument("--workers", type=int, default=1,
                   help="(method, seed) runs at once, each in its own process (2 on a 2-core machine)")
    p.add_argument("--max-length", type=int, default=None, help="default: the team's (64)")
    p.add_argument("--glmd-alpha", type=float, default=0.1, help="GLMD vocabulary kept (fraction)")
    p.add_argument("--diagnose", action="store_true",
                   help="per scored epoch also the share of dev rows predicted as the majority class (one more dev pass)")
    p.add_argument("--split-budget", type=float, default=None,
                   help="diagnostics: the first table's budget instead (this many epochs split evenly over the stages)")
    p.add_argument("--student-pooling", choices=("cls", "mean"), default=None,
                   help="diagnostics: the student's head (default: its checkpoint's, mean for MiniLM)")
    p.add_argument("--report", action="store_true", help="only aggregate the finished runs (no training)")
    p.add_argument("--name", default="methods_table",
                   help="table name: records in results/<name>/, the table in results/<name>.json and .png")
    args = p.parse_args()
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    from tqdm import tqdm

    parts = parts_dir(args)
    parts.mkdir(parents=True, exist_ok=True)
    if args.report:
        return report(args, None)
    import torch

    torch.set_num_threads(args.threads)
    team, task = team_and_task(args)  # build (or reuse) the teachers once, before any worker starts
    print("teachers (dev acc):", json.dumps(team.dev_accuracy))
    todo = [(m, s) for s in args.seeds for m in args.methods.split(",") if not finished(args, parts, m, s)]
    print(f"{len(todo)} (method, seed) runs to go, {args.workers} at a time", flush=True)
    bar = tqdm(total=len(todo), desc="methods", dynamic_ncols=True)
    if args.workers <= 1:
        results = (_job(vars(args), name, seed) for name, seed in todo)
    else:  # one thread per worker process (spawn: the parent's torch state is not forked)
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        pool = ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"))
        results = (f.result() for f in as_completed([pool.submit(_job, vars(args), n, s) for n, s in todo]))
    for name, seed, record in results:
        bar.update(1)
        if isinstance(record, str):
            tqdm.write(f"{name} seed {seed} failed: {record}")
            continue
        curve = " ".join(f"{h['dev_acc']:.3f}" for h in record["history"] if h.get("dev_acc") is not None)
        tqdm.write(f"{name:16s} seed {seed}: dev {record['dev_acc']:.4f} test {record['test_acc']:.4f} "
                   f"majority share {record['test_majority_share']:.2f} {record['wall_seconds'] / 60:.1f} min "
                   f"{record['peak_rss_mib']:.0f} MiB | dev curve {curve}")
    bar.close()
    return report(args, team)


_TEAM: tuple | None = None  # (team, task) of this process, built on its first job


def _job(options: dict, name: str, seed: int) -> tuple[str, int, dict | str]:
    """Run one (method, seed) in this process and write its record; a failure is returned as text
    (one broken method must not lose the others' results)."""
    global _TEAM
    import torch

    args = argparse.Namespace(**options)
    torch.set_num_threads(args.threads)
    if _TEAM is None:
        _TEAM = team_and_task(args)
    args.one, args.seed = name, seed
    with PeakRSS() as peak:
        try:
            record = run_one(args, *_TEAM)
        except Exception as err:  # noqa: BLE001
            return name, seed, f"{type(err).__name__}: {err}"
    record["peak_rss_mib"], record["settings"] = peak.mib, settings_of(args)
    (parts_dir(args) / f"{name}-s{seed}.json").write_text(json.dumps(record, indent=1))
    return name, seed, record


if __name__ == "__main__":
    sys.exit(main())
