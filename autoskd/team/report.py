"""The team table printed after ``build``: one row per teacher (layers, size, dev accuracy, status)."""

from __future__ import annotations

from ..errors import AutoSKDError


def team_table(name: str, rows: list[tuple] | None) -> str:
    """``rows``: ``(teacher, layers, parameters, dev accuracy, status)`` tuples."""
    if not rows:
        return f"team {name}: not built"
    header = ("teacher", "layers", "params", "dev acc", "status")
    lines = [(n, "?" if l is None else str(l), f"{p / 1e6:.1f}M", f"{a:.4f}", s) for n, l, p, a, s in rows]
    widths = [max(len(h), *(len(r[i]) for r in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:{'<' if i in (0, 4) else '>'}{w}}}" for i, w in enumerate(widths))
    out = [f"team {name}", fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*r) for r in lines]
    return "\n".join(out)


def majority_rate(labels) -> float:
    """The accuracy of always predicting the most frequent label (0 for no labels)."""
    labels = list(labels)
    return max(labels.count(y) for y in set(labels)) / len(labels) if labels else 0.0


def uninformative_teachers(dev_accuracy: dict[str, float], majority: float, margin: float = 0.01) -> list[str]:
    """Teachers whose dev accuracy is within ``margin`` of always predicting the majority class.

    Such a teacher carries (almost) no signal about the task, and its soft targets can pull a
    student to that class: measured on rotten_tomatoes (``teams/minilm-mixed.yaml``), one such
    teacher in a team of five made every θ-scaled candidate of one seed collapse to it.
    """
    return [name for name, acc in dev_accuracy.items() if acc <= majority + margin]


def uninformative_warning(names: list[str], dev_accuracy: dict[str, float], majority: float) -> str:
    """One line per teacher of :func:`uninformative_teachers`: what is wrong and what to do."""
    return "\n".join(f"[team] warning: teacher {n} scores {dev_accuracy[n]:.4f} on dev, no better than always "
                     f"predicting the majority class ({majority:.4f}); it teaches nothing: fine-tune it further "
                     f"or drop it from the team" for n in names)


def safe(fn):
    """``fn()``, or None when it fails with a user-facing error (a layer count we cannot read)."""
    try:
        return fn()
    except AutoSKDError:
        return None
