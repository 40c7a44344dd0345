"""Are the genre specialists of ``teams/smollm2-genres.yaml`` complementary?

Each teacher's perplexity on the review documents and on the plot-synopsis documents of the
benchmark's split of ``lm:rotten_tomatoes_all`` (the split ``lm_search_vs_random.py --team
teams/smollm2-genres.yaml`` trains and scores on), val and test. A team is complementary when no
teacher is best on both genres; only then can a teacher distribution beat every single teacher.

    python benchmarks/lm_genre_teachers.py        # ~3 min; writes results/lm_genre_teachers.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import write_result  # noqa: E402


def genre_perplexities(args) -> dict:
    from autoskd.lm.data import load_corpus, make_lm_loader, tokenize_lm_split
    from autoskd.lm.evaluate import evaluate_lm
    from autoskd.lm.team import LMTeam
    from autoskd.search.lm_search import corpus_of

    corpus = corpus_of({"name_or_path": args.corpus, "split_seed": args.split_seed, "max_train": args.max_train,
                        "max_eval": args.max_eval}, 0)
    team = LMTeam.from_yaml(args.team).build(seed=0, corpus=corpus, cache_dir=args.cache_dir, progress=False)
    synopses = load_corpus("rotten_tomatoes_plots")
    plots = {doc for role in ("train_full", "dev", "test") for doc in synopses.split(role)}
    out = {"teachers": {}, "documents": {}, "tokens": {}}
    loaders = {}
    for split in ("val", "test"):
        docs = corpus.split(split)
        for genre, keep in (("plots", lambda d: d in plots), ("reviews", lambda d: d not in plots)):
            chosen = [d for d in docs if keep(d)]
            rows = tokenize_lm_split(chosen, team.tokenizer, team.max_length)
            loaders[f"{split}_{genre}"] = make_lm_loader(rows, args.batch_size, shuffle=False)
            out["documents"][f"{split}_{genre}"] = len(chosen)
            out["tokens"][f"{split}_{genre}"] = rows.num_target_tokens
    for name, model in team.teachers.items():
        out["teachers"][name] = {f"{key}_ppl": evaluate_lm(model, loader, "cpu")["perplexity"]
                                 for key, loader in loaders.items()}
        print(name, {k: round(v, 1) for k, v in out["teachers"][name].items()}, flush=True)
    best = {key: min(out["teachers"], key=lambda n: out["teachers"][n][f"{key}_ppl"]) for key in loaders}
    out["best_teacher"] = best
    out["complementary"] = best["test_plots"] != best["test_reviews"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--team", default=str(ROOT / "teams" / "smollm2-genres.yaml"))
    p.add_argument("--corpus", default="lm:rotten_tomatoes_all")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--max-train", type=int, default=800)
    p.add_argument("--max-eval", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--cache-dir", default=str(ROOT / ".cache" / "autoskd"))
    args = p.parse_args()
    result = {"team": Path(args.team).name, "corpus": args.corpus, **genre_perplexities(args)}
    path = write_result("lm_genre_teachers", result)
    print(f"wrote {path}: best per genre {result['best_teacher']}, complementary: {result['complementary']}")


if __name__ == "__main__":
    main()
