"""Every method of GKD's Table 1 and GLMD on one engine, at one small fixed budget (GKD Table 4).

rotten_tomatoes, the ladder team of the search benchmarks (teams/minilm-ladder.yaml: MiniLM
cut to a 2-layer student; teachers fine-tuned on the whole training split, shared cache):
students train on ``--max-train`` rows and are scored on the whole dev and test splits.
Single-teacher methods learn from the 6-layer teacher, multi-teacher methods (tmkd, mt_bert,
rl_kd, uncertainty) from the 4- and 6-layer ones, TAKD/DGKD run the chain 6 -> 4-layer assistant -> student (two hops). Budget: the same
number of epochs for every method (``--budget``, default 2), split evenly over the method's
stages (a pre-training stage on the task's unlabelled texts included where the method has
one). Each (method, seed) is measured in turn -- peak memory is the process's peak resident set
while it runs, sampled every 20 ms -- and is written to ``benchmarks/results/methods_table/<method>-s<seed>.json`` as
soon as it finishes, so an interrupted run resumes where it stopped. The table is
``benchmarks/results/methods_table.json`` (keys = method names) and ``methods_table.png``.

    python benchmarks/methods_table.py [--seeds 0] [--budget 2] [--max-train 100] [--methods kd,pkd]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

# Word-prediction methods (full-vocabulary MLM logits: the slowest on a CPU) run last.
METHODS = ["kd", "pkd", "theseus", "tinybert", "mobilebert", "sid", "minilm", "minilmv2", "alp_kd", "lrc_bert",
           "annealing_kd", "ckd", "universal_kd", "continuation_kd", "rail_kd", "mgskd", "tmkd", "mt_bert", "rl_kd",
           "uncertainty", "takd", "dgkd", "pd", "glmd", "distilbert", "diito"]
TEACHERS = ["minilm-L4", "minilm-L6"]
PARTS = ROOT / "results" / "methods_table"  # per (method, seed) records; --name picks another table
CACHE = ROOT.parent / ".cache" / "autoskd"
TEAM_CACHE = ROOT / "runs" / "cache"  # shared with search_vs_random / search_ablation


def team_and_task(args):
    """The search benchmarks' team (teachers fine-tuned on the whole training split, cached in
    ``benchmarks/runs/cache``: good teachers, as in GKD's runs) and the medium preset's data
    (students on ``--max-train`` rows; dev and test whole unless ``--max-eval``)."""
    from _search_runs import TASK, TEAM

    from autoskd.data.tasks import load_task
    from autoskd.search.run import SearchConfig, load_search_task
    from autoskd.team import TeacherTeam

    _, team_task = load_search_task(dict(TASK), SearchConfig.from_preset("medium"))
    team = TeacherTeam.from_yaml(TEAM).build(team_task, cache_dir=TEAM_CACHE / "teachers", seed=TASK["seed"],
                                             progress=True)
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


def run_one(args, team, task) -> dict:
    """One (method, seed) on the built team; returns its record."""
    import gc

    from autoskd.chain import run_chain
    from autoskd.engine.multi_teacher import MultiTeacherMethod
    from autoskd.methods import get_method
    from autoskd.pipeline import DistillConfig, distill

    gc.collect()
    name = args.one
    method = get_method(name)
    stages = [s for s in method.spec.stages]
    epochs = args.budget / len(stages)
    config = DistillConfig(method=name, epochs=epochs, pretrain_epochs=epochs if "pretrain" in stages else 0.0,
                           lr=args.lr, batch_size=32, seed=args.seed, teacher="minilm-L6",
                           teachers=TEACHERS if isinstance(method, MultiTeacherMethod) else None,
                           mlm_adapt_steps=args.mlm_adapt_steps, max_length=args.max_length,
                           method_options={"vocab_alpha": args.glmd_alpha} if name == "glmd" else {})
    start = time.perf_counter()
    if name in ("takd", "dgkd"):
        chain_dir = ROOT / "runs" / "methods_table" / f"{name}-s{args.seed}"
        out = run_chain(team, task, config, [4], out_dir=chain_dir, cache_dir=CACHE, progress=False)
        last = out.hops[-1]
        dev, test, train_seconds, hops = last.dev_acc, last.test_acc, sum(h.seconds for h in out.hops), len(out.hops)
        pred_file = chain_dir / f"hop{hops - 1}-{last.name}" / "predictions.json"
        predictions = json.loads(pred_file.read_text())["test"] if pred_file.exists() else None
    else:
        outcome = distill(team, task, config, out_dir=None, cache_dir=CACHE, progress=False,
                          student=team.build_student(task, seed=args.seed))
        dev, test, train_seconds, hops = outcome.dev_acc, outcome.test_acc, outcome.result.seconds, 1
        predictions = outcome.test_predictions
    return {"method": name, "seed": args.seed, "dev_acc": dev, "test_acc": test,
            "seconds_per_epoch": train_seconds / (args.budget * hops), "train_seconds": train_seconds,
            "wall_seconds": time.perf_counter() - start,
            "stages": (["pretrain"] if "pretrain" in stages else []) + [s for s in stages if s != "pretrain"],
            "epochs_per_stage": epochs, "hops": hops, "test_predictions": predictions}


def parts_dir(args) -> Path:
    return PARTS.parent / args.name


def ci95(values: list[float]) -> float | None:
    if len(values) < 2:
        return None
    from scipy.stats import t

    return float(t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values)))


def _pooled_correct(runs: list[dict], labels: list[int]) -> list[bool] | None:
    """Right/wrong per test row, pooled over seeds (in seed order), for McNemar's paired test."""
    if any(r.get("test_predictions") is None for r in runs):
        return None
    return [p == y for r in sorted(runs, key=lambda r: r["seed"]) for p, y in zip(r["test_predictions"], labels)]


def test_labels(args) -> list[int]:
    """The test split's labels in loader order (the order every run's predictions are in)."""
    from _search_runs import TASK

    from autoskd.data.tasks import load_task

    task = load_task(**TASK).subsample(args.max_train, args.max_eval, seed=TASK["seed"])
    return [int(y) for y in task.split("test")["label"]]


def aggregate(args, labels: list[int]) -> dict:
    from autoskd.search.stats import mcnemar

    table = {}
    for name in METHODS:
        runs = [json.loads(p.read_text()) for p in sorted(parts_dir(args).glob(f"{name}-s*.json"))]
        if not runs:
            continue
        dev, test = [r["dev_acc"] for r in runs], [r["test_acc"] for r in runs]
        table[name] = {"dev_acc": statistics.mean(dev), "dev_ci95": ci95(dev), "test_acc": statistics.mean(test),
                       "test_ci95": ci95(test), "seeds": [r["seed"] for r in runs],
                       "seconds_per_epoch": statistics.mean(r["seconds_per_epoch"] for r in runs),
                       "peak_rss_mib": max(r["peak_rss_mib"] for r in runs), "stages": runs[0]["stages"],
                       "hops": runs[0]["hops"], "runs": runs}
    if "kd" in table:
        kd = table["kd"]
        kd_correct = _pooled_correct(kd["runs"], labels)
        for name, row in table.items():
            mine = _pooled_correct(row["runs"], labels)
            if name != "kd" and mine is not None and kd_correct is not None and len(mine) == len(kd_correct):
                row["test_mcnemar_vs_kd"] = mcnemar(mine, kd_correct)
            row["dev_vs_kd"] = row["dev_acc"] - kd["dev_acc"]
            row["test_vs_kd"] = row["test_acc"] - kd["test_acc"]
            mc = row.get("test_mcnemar_vs_kd")  # paired on the same test rows: decides with one seed
            row["verdict_vs_kd"] = None if mc is None else "tie" if mc["p_value"] >= 0.05 else \
                "win" if mc["a_only"] > mc["b_only"] else "loss"
    for row in table.values():
        for r in row["runs"]:
            r.pop("test_predictions", None)  # kept in the per-run files, not in the table
    return table


def plot(table: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(table.items(), key=lambda kv: kv[1]["dev_acc"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 0.3 * len(rows) + 1.5), sharey=True)
    ys = range(len(rows))
    colors = ["tab:red" if n == "kd" else "tab:blue" for n, _ in rows]
    ax1.barh(ys, [r["dev_acc"] for _, r in rows], xerr=[r["dev_ci95"] or 0 for _, r in rows], color=colors)
    ax1.scatter([r["test_acc"] for _, r in rows], ys, color="k", s=12, zorder=3, label="test")
    lo = min(min(r["dev_acc"], r["test_acc"]) for _, r in rows)
    ax1.set_xlim(max(0.0, lo - 0.05), 1.0)
    ax1.set_yticks(list(ys), [n for n, _ in rows])
    ax1.set_xlabel("dev accuracy (bars), test (dots)")
    ax1.legend(loc="lower right")
    ax2.barh(ys, [r["seconds_per_epoch"] for _, r in rows], color=colors)
    ax2.set_xlabel("seconds per epoch (CPU)")
    for y, (_, r) in zip(ys, rows):
        ax2.text(r["seconds_per_epoch"], y, f" {r['peak_rss_mib']:.0f} MiB", va="center", fontsize=7)
    fig.suptitle("Methods on one engine: rotten_tomatoes, ladder team (6-layer teacher, 2-layer student)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--budget", type=float, default=2.0, help="epochs per method, split over its stages")
    p.add_argument("--max-train", type=int, default=500, help="train and val rows each (students)")
    p.add_argument("--max-eval", type=int, default=None, help="dev/test rows (default: whole)")
    p.add_argument("--lr", type=float, default=5e-4, help="student lr (the quick preset's: cut MiniLM needs a high one)")
    p.add_argument("--mlm-adapt-steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the shared CPU spins less)")
    p.add_argument("--max-length", type=int, default=None, help="default: the team's (64)")
    p.add_argument("--glmd-alpha", type=float, default=0.1, help="GLMD vocabulary kept (fraction)")
    p.add_argument("--report", action="store_true", help="only aggregate the finished methods (no training)")
    p.add_argument("--name", default="methods_table",
                   help="table name: records in results/<name>/, the table in results/<name>.json and .png "
                        "(e.g. a larger --budget for a few methods, kept apart from the main table)")
    args = p.parse_args()
    from tqdm import tqdm

    parts = parts_dir(args)
    parts.mkdir(parents=True, exist_ok=True)
    if args.report:
        return report(args, None)
    import torch

    torch.set_num_threads(args.threads)
    team, task = team_and_task(args)  # build (or reuse) the teachers once
    print("teachers (dev acc):", json.dumps(team.dev_accuracy))
    todo = [(m, s) for s in args.seeds for m in args.methods.split(",") if not (parts / f"{m}-s{s}.json").exists()]
    for name, seed in tqdm(todo, desc="methods", dynamic_ncols=True):
        args.one, args.seed = name, seed
        with PeakRSS() as peak:
            try:
                record = run_one(args, team, task)
            except Exception as err:  # one broken method must not lose the others' results
                tqdm.write(f"{name} seed {seed} failed: {type(err).__name__}: {err}")
                continue
        record["peak_rss_mib"] = peak.mib
        (parts / f"{name}-s{seed}.json").write_text(json.dumps(record, indent=1))
        tqdm.write(f"{name:16s} seed {seed}: dev {record['dev_acc']:.4f} test {record['test_acc']:.4f} "
                   f"{record['seconds_per_epoch']:.1f} s/epoch {record['peak_rss_mib']:.0f} MiB")
    return report(args, team)


def markdown(table: dict) -> str:
    """The README table: one row per finished method, sorted by dev accuracy."""
    lines = ["| method | dev acc | test acc | vs kd (dev) | McNemar p vs kd (test) | s/epoch | peak RSS MiB | stages |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in sorted(table.items(), key=lambda kv: -kv[1]["dev_acc"]):
        ci = f" ± {r['dev_ci95']:.3f}" if r.get("dev_ci95") else ""
        gap = "" if name == "kd" or "dev_vs_kd" not in r else f"{r['dev_vs_kd']:+.3f}"
        mc = r.get("test_mcnemar_vs_kd")
        pval = "" if mc is None else f"{mc['p_value']:.3f} ({r['verdict_vs_kd']})"
        lines.append(f"| `{name}` | {r['dev_acc']:.3f}{ci} | {r['test_acc']:.3f} | {gap} | {pval} | {r['seconds_per_epoch']:.1f} | "
                     f"{r['peak_rss_mib']:.0f} | {', '.join(r['stages'])} |")
    return "\n".join(lines)


def report(args, team) -> int:
    from _common import write_result

    table = aggregate(args, test_labels(args))
    if not table:
        print("no finished method yet")
        return 1
    settings = {k: getattr(args, k) for k in ("budget", "max_train", "max_eval", "lr", "mlm_adapt_steps", "seeds",
                                              "max_length", "glmd_alpha")}
    path = write_result(args.name, {"settings": settings, "teacher": "minilm-L6", "multi_teachers": TEACHERS,
                                          "teacher_dev_acc": team.dev_accuracy if team else None,
                                          "missing": ", ".join(m for m in args.methods.split(",") if m not in table),
                                          "methods": table})
    plot(table, ROOT / "results" / f"{args.name}.png")
    verdicts = {v: [n for n, r in table.items() if r.get("verdict_vs_kd") == v] for v in ("win", "tie", "loss")}
    print(markdown(table))
    print(f"wrote {path}; vs kd on test (McNemar, p < 0.05): " +
          "; ".join(f"{v}: {', '.join(ns) or 'none'}" for v, ns in verdicts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
