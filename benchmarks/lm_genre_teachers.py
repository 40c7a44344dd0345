"""Are the genre specialists of ``teams/smollm2-genres.yaml`` complementary?

Each teacher's perplexity on the review documents and on the plot-synopsis documents of the
benchmark's split of ``lm:rotten_tomatoes_all`` (the split ``lm_search_vs_random.py`` trains and
scores on, with the genre team and with the specialists team), val and test. A team is complementary when no
teacher is best on both genres; only then can a teacher distribution beat every single teacher.

``mixture_fit``: the weights θ* of the teachers' mixture ``Σ θ_j p_j`` that best predict the val
text (maximum likelihood by EM over the val tokens, all documents packed as the search packs
them), and the perplexity of that mixture, of the uniform mixture (AvgKD's target) and of each
teacher on val and test. A mixture that predicts the text better than every teacher is the
complementarity a distribution search can use; θ* is where the teachers' *predictions* are best
mixed (not necessarily the best target for a student at 40 steps).

    python benchmarks/lm_genre_teachers.py        # ~6 min; writes results/lm_genre_teachers.json
    python benchmarks/lm_genre_teachers.py --team teams/smollm2-specialists.yaml --name lm_specialist_teachers
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
    out["mixture_fit"] = mixture_fit(team, corpus, args.batch_size)
    print("mixture fit", out["mixture_fit"], flush=True)
    return out


def token_logprobs(model, loader):
    """Each counted position's log-probability of its actual next token (1-D, loader order)."""
    import torch

    from autoskd.engine.batches import model_inputs, output_logits

    model.eval()
    out = []
    with torch.no_grad():
        for batch in loader:
            logp = torch.log_softmax(output_logits(model(**model_inputs(batch))).float(), -1)
            targets = batch["target_ids"]
            keep = targets != -100
            out.append(logp.gather(-1, targets.clamp_min(0)[..., None])[..., 0][keep])
    return torch.cat(out).double()


def fit_mixture(logp, iters: int = 500):
    """EM for the weights of ``Σ θ_j p_j`` maximising the mean log-likelihood of the tokens;
    ``logp`` is [teachers, tokens]. The log-likelihood is concave in θ, so EM reaches its maximum."""
    import torch

    n = logp.shape[0]
    theta = torch.full((n,), 1.0 / n, dtype=torch.float64)
    for _ in range(iters):
        joint = logp + theta.log()[:, None]
        theta = torch.softmax(joint, 0).mean(1)
    return theta


def mixture_ppl(logp, theta) -> float:
    import math

    import torch

    nll = -torch.logsumexp(logp + theta.clamp_min(1e-300).log()[:, None], 0).mean()
    return math.exp(float(nll))


def mixture_fit(team, corpus, batch_size: int) -> dict:
    """θ* fitted on val; perplexities of θ*, uniform and each teacher on val and test."""
    import torch

    from autoskd.lm.data import make_lm_loader, tokenize_lm_split

    names = list(team.teachers)
    logp = {}
    for split in ("val", "test"):
        rows = tokenize_lm_split(corpus.split(split), team.tokenizer, team.max_length)
        loader = make_lm_loader(rows, batch_size, shuffle=False)
        logp[split] = torch.stack([token_logprobs(team.teachers[n], loader) for n in names])
    theta = fit_mixture(logp["val"])
    uniform = torch.full((len(names),), 1.0 / len(names), dtype=torch.float64)
    out = {"teachers": names, "theta": [round(float(t), 4) for t in theta]}
    for split, lp in logp.items():
        out[split] = {"fitted_mixture_ppl": mixture_ppl(lp, theta), "uniform_mixture_ppl": mixture_ppl(lp, uniform),
                      **{f"{n}_ppl": mixture_ppl(lp[j:j + 1], torch.ones(1, dtype=torch.float64))
                         for j, n in enumerate(names)}, "tokens": int(lp.shape[1])}
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
    p.add_argument("--name", default="lm_genre_teachers", help="results/<name>.json")
    args = p.parse_args()
    result = {"team": Path(args.team).name, "corpus": args.corpus, **genre_perplexities(args)}
    path = write_result(args.name, result)
    print(f"wrote {path}: best per genre {result['best_teacher']}, complementary: {result['complementary']}")


if __name__ == "__main__":
    main()
