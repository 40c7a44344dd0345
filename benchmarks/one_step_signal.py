"""Do the search's one-step θ signals rank the ladder's teachers the way full trainings do?

The medium benchmark's single-teacher arms rank the teachers by the student each one gives
(10 seeds, ``benchmarks/results/search_vs_random_medium.json``: the 1-layer teacher is best on
test). θ only ever sees a one-step signal, per val batch:

- ``distill`` (the preset: first-order SSWO, the paper's objective): the direct gradient of the
  student's val distillation loss in θ_i at uniform θ. Minus it is how far θ_i goes up.
- ``task`` (second order, CR, task objective): ``a_i = ∇_w CE_val(w) · ∇_w KD_i(w; train batch)``,
  the drop in val cross-entropy per unit virtual step taken on teacher i alone, i.e. CR's
  θ-gradient ``−ξ a_i`` to first order in ξ.

Each is centred over the team per batch (what Adam keeps, see ``ThetaConfig.center``), averaged
over val/train batch pairs with a 95% t-interval, and rank-correlated (Spearman) with the single
arms' mean test accuracy. Students: fresh ones (the search's starting point) and trained ones
from the benchmark's run folder (single-L1, single-L6, AvgKD). Writes
``benchmarks/results/one_step_signal.json`` and a plot beside it.

    python benchmarks/one_step_signal.py [--run-dir benchmarks/runs/search_vs_random_first/medium]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import RESULTS_DIR, write_result  # noqa: E402
from autoskd.engine.batches import model_inputs, output_logits  # noqa: E402
from autoskd.search.stats import mean_ci  # noqa: E402
from autoskd.engine.losses import ce  # noqa: E402
from autoskd.search.theta_step import sswo_direct_grads  # noqa: E402


def _flat_grad(loss: torch.Tensor, params, retain: bool = False) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=retain)])


def task_alignment(student, val_batch: dict, train_batch: dict, train_logits: list[torch.Tensor],
                   temperature: float = 1.0) -> torch.Tensor:
    """``[n]``: ``∇_w CE(student(val), labels) · ∇_w KD(student(train), teacher_i)`` for each teacher.

    ``CE_val(w − ε ∇_w KD_i) = CE_val(w) − ε a_i + O(ε²)``: positive means a step on teacher i
    alone lowers the val task loss."""
    params = [p for p in student.parameters() if p.requires_grad]
    g_val = _flat_grad(F.cross_entropy(output_logits(student(**model_inputs(val_batch))), val_batch["labels"]),
                       params)
    s_logits = output_logits(student(**model_inputs(train_batch)))
    return torch.stack([g_val @ _flat_grad(ce(s_logits, z, temperature=temperature), params, retain=True)
                        for z in train_logits])


def spearman(x, y) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def signals_for(student, names, train_batches, val_batches, train_logits, val_logits) -> dict:
    """Per teacher, the centred mean (over batch pairs) of each signal, sign set so that higher =
    θ_i goes up, with how often each teacher tops the batch."""
    student.eval()  # no dropout: one deterministic direction per batch pair
    task_rows, distill_rows = [], []
    uniform = torch.full((len(names),), 1.0 / len(names))
    for k, (vb, tb) in enumerate(zip(val_batches, train_batches)):
        task_rows.append(task_alignment(student, vb, tb, [train_logits[n][k] for n in names]))
        with torch.no_grad():
            s_val = output_logits(student(**model_inputs(vb)))
        # first-order SSWO's θ-gradient at uniform θ, teacher by teacher
        distill_rows.append(-sswo_direct_grads(s_val, torch.stack([val_logits[n][k] for n in names]), uniform,
                                               list(range(len(names))), "theta", None, 1.0, 1.0))
    out = {}
    for signal, rows in (("task", torch.stack(task_rows)), ("distill", torch.stack(distill_rows))):
        centred = rows - rows.mean(1, keepdim=True)
        top = torch.bincount(rows.argmax(1), minlength=len(names))
        out[signal] = {n: {"centred": mean_ci(centred[:, i].tolist()), "raw_mean": float(rows[:, i].mean()),
                           "top_batches": int(top[i])} for i, n in enumerate(names)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default="benchmarks/runs/search_vs_random_first/medium",
                    help="a search_vs_random run folder (seedN/trials/<arm>/student)")
    ap.add_argument("--truth", default="benchmarks/results/search_vs_random_medium.json",
                    help="result JSON whose single-* arms give the teachers' true ranking")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--batches", type=int, default=16, help="val/train batch pairs per student")
    ap.add_argument("--name", default="one_step_signal")
    args = ap.parse_args(argv)
    run_dir, truth_path = ROOT / args.run_dir, ROOT / args.truth
    for p, what in ((run_dir, "--run-dir"), (truth_path, "--truth")):
        if not p.exists():
            sys.exit(f"error: {what} {p} does not exist; run benchmarks/search_vs_random.py --preset medium first")
    torch.set_num_threads(2)
    from transformers import AutoModelForSequenceClassification

    from autoskd.data.collate import make_loader, tokenize_split
    from autoskd.search.run import SearchConfig, load_search_task
    from autoskd.team import TeacherTeam

    t0 = time.time()
    truth = json.load(open(truth_path))
    cfg = SearchConfig.from_preset("medium")
    task, team_task = load_search_task({"name_or_path": "rotten_tomatoes", "seed": 0}, cfg)
    team = TeacherTeam.from_yaml(ROOT / "teams/minilm-ladder.yaml").build(
        team_task, cache_dir=ROOT / "benchmarks/runs/cache/teachers", progress=False)
    names = list(team.teachers)
    true_test = [truth["arms"][f"single-{n}"]["test_acc_mean"] for n in names]

    def first_batches(split):
        data = tokenize_split(task.split(split), team.tokenizer, team.max_length)
        return [b for _, b in zip(range(args.batches), make_loader(data, team.tokenizer, 32, shuffle=True, seed=0))]

    train_batches, val_batches = first_batches("train"), first_batches("val")
    with torch.no_grad():
        train_logits = {n: [output_logits(team.teachers[n](**model_inputs(b))) for b in train_batches] for n in names}
        val_logits = {n: [output_logits(team.teachers[n](**model_inputs(b))) for b in val_batches] for n in names}

    students = {f"fresh (seed {s})": team.build_student(task, seed=s) for s in args.seeds}
    for s in args.seeds:
        for arm in ("single-minilm-L1", "single-minilm-L6", "avgkd"):
            path = run_dir / f"seed{s}" / "trials" / arm / "student"
            if path.exists():
                students[f"{arm} (seed {s})"] = AutoModelForSequenceClassification.from_pretrained(path)
    rows = {}
    for label, student in students.items():
        sig = signals_for(student, names, train_batches, val_batches, train_logits, val_logits)
        for signal in sig:
            sig[signal]["spearman_vs_single_test"] = spearman(
                [sig[signal][n]["centred"]["mean"] for n in names], true_test)
        rows[label] = sig
        print(f"{label}: spearman vs single-teacher test  task {sig['task']['spearman_vs_single_test']:+.2f}  "
              f"distill {sig['distill']['spearman_vs_single_test']:+.2f}")
        for n in names:
            t, d = sig["task"][n]["centred"], sig["distill"][n]["centred"]
            print(f"   {n:10s} task {t['mean']:+.3f} [{t['lo']:+.3f}, {t['hi']:+.3f}]   "
                  f"distill {d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]")
    result = {"benchmark": args.name, "team": "minilm-ladder", "teachers": names,
              "single_test_acc_mean": dict(zip(names, true_test)), "batches": args.batches,
              "students": rows, "seconds": round(time.time() - t0, 1)}
    write_result(args.name, result)
    plot(result, RESULTS_DIR / f"{args.name}.png")
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = result["teachers"]
    x = [result["single_test_acc_mean"][n] for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4))
    for ax, signal in zip(axes, ("distill", "task")):
        for j, (label, sig) in enumerate(result["students"].items()):
            means = [sig[signal][n]["centred"]["mean"] for n in names]
            errs = [sig[signal][n]["centred"]["half_width"] for n in names]
            ax.errorbar([v + 0.0004 * j for v in x], means, yerr=errs, fmt="o", capsize=2, label=label)
        ax.axhline(0, color="grey", lw=0.8)
        for n, v in zip(names, x):
            ax.annotate(n.replace("minilm-", ""), (v, ax.get_ylim()[0]), fontsize=8, ha="center", va="bottom")
        ax.set_xlabel("single-teacher arm: mean test accuracy (10 seeds)")
        ax.set_ylabel("centred signal (higher = θ_i up), 95% CI over batches")
        ax.set_title(f"{signal} objective, one step")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
