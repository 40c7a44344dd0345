"""Statistics for comparing arms over seeds: what a claim that one arm beats another needs.

* :func:`mean_ci`: the mean over seeds with a two-sided Student-t confidence interval;
* :func:`paired_ci`: the same for per-seed differences (arms run on the same splits);
* :func:`mcnemar`: McNemar's exact test on paired test-set predictions, pooled over seeds.

A gap whose interval contains 0 is a tie, never a win: :func:`verdict` says which.
"""

from __future__ import annotations

import math
from typing import Sequence

from scipy import stats

__all__ = ["mean_ci", "paired_ci", "mcnemar", "verdict"]


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> dict:
    """``{"mean", "lo", "hi", "half_width", "n"}``: Student-t interval of the mean (0 width for n = 1)."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = sum(xs) / n
    if n == 1:
        return {"mean": mean, "lo": mean, "hi": mean, "half_width": 0.0, "n": 1}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "half_width": half, "n": n}


def paired_ci(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict:
    """Interval of the mean per-seed difference ``a - b`` (the seeds pair the two arms)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths (got {len(a)} and {len(b)})")
    return mean_ci([x - y for x, y in zip(a, b)], confidence)


def mcnemar(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict:
    """McNemar's exact test: do A and B err on different rows more often than chance says?

    ``a_only`` = rows A gets right and B wrong, ``b_only`` the reverse; the two-sided p-value
    is the binomial test of ``a_only`` out of ``a_only + b_only`` at 1/2.
    """
    if len(correct_a) != len(correct_b):
        raise ValueError(f"paired predictions need equal lengths (got {len(correct_a)} and {len(correct_b)})")
    a_only = sum(1 for x, y in zip(correct_a, correct_b) if x and not y)
    b_only = sum(1 for x, y in zip(correct_a, correct_b) if y and not x)
    n = a_only + b_only
    p = 1.0 if n == 0 else float(stats.binomtest(a_only, n, 0.5).pvalue)
    return {"a_only": a_only, "b_only": b_only, "rows": len(correct_a), "p_value": p}


def verdict(diff: dict) -> str:
    """``win`` / ``loss`` when the interval of a difference excludes 0, else ``tie``."""
    if diff["lo"] > 0:
        return "win"
    if diff["hi"] < 0:
        return "loss"
    return "tie"
