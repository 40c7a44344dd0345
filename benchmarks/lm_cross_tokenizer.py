"""Does a teacher with another tokenizer help? Gemma 3 270M (262k vocabulary) teaching the 6-layer
SmolLM2 student (49k vocabulary) through ``uld_hybrid``, against CE-only training.

Same split, budget and student as ``lm_search_vs_random.py``'s ladder run (``lm_search_ladder``:
800 training documents of the rotten_tomatoes texts, split seed 0, 40 steps of 4 x 128 tokens),
so the CE arm here is also that run's no-teacher reference. The teacher reads the text with its own tokenizer; its
top-k next-token distributions are cached at the student positions that align with one of its
own (``autoskd/lm/cross_tokenizer.py``): KL on the tokens both vocabularies share, ULD
(sorted-probability L1, Boizard et al. 2024) on the rest. Arms ``ce`` and ``gemma_uld`` (and
``smollm2_kd``, the same-tokenizer full SmolLM2 teacher, for scale), seeds paired; each (arm,
seed) writes ``results/lm_cross_tokenizer/<arm>-s<seed>.json`` and is skipped when there.

    python benchmarks/lm_cross_tokenizer.py                 # 3 seeds (about 30 min here)

At this budget even the same-tokenizer teachers only tie CE (docs/lm.md), so the question is
measured where distillation pays: ``lm_distill.py --name lm_distill_long --arms ce
gemma_uld_ce`` (four epochs, 3 seeds) is the reported cross-tokenizer result.
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

from _common import RESULTS_DIR, write_result  # noqa: E402
from autoskd.lm.pipeline import LMDistillConfig, distill_lm  # noqa: E402
from autoskd.lm.team import LMMember, LMTeam  # noqa: E402
from autoskd.search.lm_search import corpus_of  # noqa: E402
from autoskd.search.stats import mean_ci, paired_ci, verdict  # noqa: E402

STUDENT_LAYERS = [0, 6, 12, 18, 24, 29]
ARMS = {"ce": ("finetune", None), "gemma_uld": ("kd", "gemma3-270m"), "smollm2_kd": ("kd", "smollm2-135m")}


def team_for(arm: str) -> LMTeam:
    _, teacher = ARMS[arm]
    teachers = {}
    if teacher == "gemma3-270m":
        teachers["gemma"] = LMMember("gemma3-270m", tokenizer="own")
    elif teacher:
        teachers["smollm2"] = LMMember(teacher)
    return LMTeam(student=LMMember("smollm2-135m", layers=STUDENT_LAYERS), teachers=teachers, max_length=128,
                  name=f"xtok-{arm}")


def run(arm: str, seed: int, args, out: Path) -> dict:
    path = out / f"{arm}-s{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    method, _ = ARMS[arm]
    corpus = corpus_of({"name_or_path": "rotten_tomatoes", "split_seed": args.split_seed, "max_train": args.max_train,
                        "max_eval": args.max_eval}, seed)
    config = LMDistillConfig(method=method, epochs=100, max_steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                             seed=seed, top_k=args.top_k, samples=0, agreement=False)
    start = time.perf_counter()
    outcome = distill_lm(team_for(arm), corpus, config, cache_dir=args.cache_dir, progress=not args.quiet)
    record = {"arm": arm, "seed": seed, **outcome.summary(), "wall_seconds": round(time.perf_counter() - start, 1)}
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    print(f"{arm:>11} seed {seed}: val ppl {record['val_ppl']:.1f} test ppl {record['test_ppl']:.1f}", flush=True)
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--max-train", type=int, default=800)
    p.add_argument("--max-eval", type=int, default=200)
    p.add_argument("--name", default="lm_cross_tokenizer")
    p.add_argument("--cache-dir", default=str(ROOT / ".cache" / "autoskd"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    out = RESULTS_DIR / args.name
    records = {(a, s): run(a, s, args, out) for s in args.seeds for a in args.arms}
    arms = {}
    for a in args.arms:
        test = mean_ci([records[(a, s)]["test_ppl"] for s in args.seeds])
        arms[a] = {"test_ppl_mean": test["mean"], "test_ppl_ci": [test["lo"], test["hi"]],
                   "val_ppl_mean": sum(records[(a, s)]["val_ppl"] for s in args.seeds) / len(args.seeds),
                   "test_ppl": [records[(a, s)]["test_ppl"] for s in args.seeds]}
    paired = {}
    for a in args.arms:
        if a == "ce" or "ce" not in args.arms:
            continue
        d = paired_ci([records[(a, s)]["test_ppl"] for s in args.seeds], [records[("ce", s)]["test_ppl"] for s in args.seeds])
        lg = paired_ci([math.log(records[(a, s)]["test_ppl"]) for s in args.seeds],
                       [math.log(records[("ce", s)]["test_ppl"]) for s in args.seeds])
        paired[a] = {"test_ppl_diff_mean": d["mean"], "test_ppl_diff_ci": [d["lo"], d["hi"]],
                     "test_log_ppl_diff_ci": [lg["lo"], lg["hi"]],
                     "verdict": {"win": "worse than ce", "loss": "better than ce", "tie": "tie"}[verdict(d)]}
    target = paired.get("gemma_uld", {}).get("test_ppl_diff_ci", [0, 0])[1] < 0 if "gemma_uld" in paired else None
    result = {"seeds": args.seeds, "teacher": "gemma3-270m (own tokenizer, 262k vocabulary)",
              "student": f"smollm2-135m layers {STUDENT_LAYERS}",
              "settings": {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "top_k", "max_train", "max_eval",
                                                          "split_seed")},
              "arms": arms, "paired_vs_ce": paired, "target_cross_tokenizer_beats_ce": target}
    print(json.dumps({"arms": {a: v["test_ppl_mean"] for a, v in arms.items()}, "paired_vs_ce": paired}, indent=2))
    print(f"wrote {write_result(args.name, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
