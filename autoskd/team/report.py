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


def safe(fn):
    """``fn()``, or None when it fails with a user-facing error (a layer count we cannot read)."""
    try:
        return fn()
    except AutoSKDError:
        return None
